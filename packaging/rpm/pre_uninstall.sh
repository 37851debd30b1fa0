if [ "$1" -eq 0 ]; then
    # Removal, not upgrade: stopping detaches every marker program.
    systemctl --no-reload disable --now flowd-rs.service >/dev/null 2>&1 || :
fi
