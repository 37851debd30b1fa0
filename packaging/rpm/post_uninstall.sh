systemctl daemon-reload >/dev/null 2>&1 || :
if [ "$1" -ge 1 ]; then
    # Upgrade: the new binary takes over (TCX links go with the old process).
    systemctl try-restart flowd-rs.service >/dev/null 2>&1 || :
fi
