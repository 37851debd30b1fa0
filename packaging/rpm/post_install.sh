# The account and group of usr/lib/sysusers.d/flowd-rs.conf, before the unit runs.
systemd-sysusers /usr/lib/sysusers.d/flowd-rs.conf || :
# The pin directory under /sys/fs/bpf (gone at every boot; tmpfiles makes it again).
systemd-tmpfiles --create /usr/lib/tmpfiles.d/flowd-rs.conf >/dev/null 2>&1 || :
systemctl daemon-reload >/dev/null 2>&1 || :
if [ "$1" -eq 1 ]; then
    # First install: enabled per the presets (EL9 default: disabled).
    systemctl --no-reload preset flowd-rs.service >/dev/null 2>&1 || :
fi
