#!/bin/sh
# RSS of a daemon under a flood of start fireflies (issue 14), in a throwaway
# network namespace. Root. Usage: firefly-flood.sh [COUNT] [MAX_HELD]
# Builds the debug binary and the firefly_flood example first.
set -eu
COUNT=${1:-600000}
MAX_HELD=${2:-16384}
cd "$(dirname "$0")/../.."
cargo build -q --bin flowd-rs --example firefly_flood
NS=flowd-flood-$$
DIR=$(mktemp -d)
ip netns add "$NS"
cleanup() {
    [ -n "${PID:-}" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null || true
    ip netns del "$NS"
    rm -rf "$DIR"
}
trap cleanup EXIT
ip -n "$NS" link set lo up
ip -n "$NS" link add d0 type veth peer name d1
ip -n "$NS" link set d1 up
ip -n "$NS" addr add fd00:99::1/64 dev d0
ip -n "$NS" link set d0 up
mkdir "$DIR/policies"
cat > "$DIR/flowd.toml" <<CONF
state_dir = "$DIR/state"
[policy]
dir = "$DIR/policies"
[marker]
interfaces = ["d0"]
[discovery]
reconcile_interval_ms = 1000
[announcements]
firefly_listen = ["127.0.0.1:10514"]
grace_secs = 10
max_held = $MAX_HELD
CONF
nsenter --net=/var/run/netns/"$NS" target/debug/flowd-rs -c "$DIR/flowd.toml" run 2>"$DIR/log" &
PID=$!
while [ ! -S "$DIR/state/control.sock" ]; do
    kill -0 "$PID" 2>/dev/null || { cat "$DIR/log"; exit 1; }
    sleep 0.1
done
sleep 2
ip netns exec "$NS" target/debug/examples/firefly_flood "$PID" "$COUNT" 127.0.0.1:10514 20
nsenter --net=/var/run/netns/"$NS" target/debug/flowd-rs -c "$DIR/flowd.toml" status | tr ',' '\n' | grep -A8 '"announcements"' || true
