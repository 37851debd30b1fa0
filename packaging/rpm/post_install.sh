# The account and group of usr/lib/sysusers.d/flowd-rs.conf, before the unit runs.
systemd-sysusers /usr/lib/sysusers.d/flowd-rs.conf || :
systemctl daemon-reload >/dev/null 2>&1 || :
if [ "$1" -eq 1 ]; then
    # First install: enabled per the presets (EL9 default: disabled).
    systemctl --no-reload preset flowd-rs.service >/dev/null 2>&1 || :
fi
