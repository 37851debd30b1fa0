#!/usr/bin/env bash
# flowd-rs demo, self-contained: two hosts (network namespaces) joined by a veth pair.
# flowd-rs runs on the sender with two experiment policies; iperf3 sends real TCP
# traffic; tcpdump on the receiver captures it, and every flow label seen on the wire
# is decoded back to experiment/activity. Nothing leaves the namespaces it creates.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
    echo "run as root: the demo loads BPF programs and creates network namespaces" >&2
    exit 1
fi
bash .ci/setup
echo "== building flowd-rs"
cargo build --quiet
BIN=$PWD/target/debug/flowd-rs

WORK=$(mktemp -d /tmp/flowd-demo.XXXXXX)
A=flowd-demo-a-$$
B=flowd-demo-b-$$
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    ip netns del "$A" 2>/dev/null || true
    ip netns del "$B" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

echo "== two hosts: $A [fd00:de::1] <-veth-> $B [fd00:de::2]"
ip netns add "$A"
ip netns add "$B"
ip link add vdemo-a netns "$A" type veth peer name vdemo-b netns "$B"
ip -n "$A" addr add fd00:de::1/64 dev vdemo-a nodad
ip -n "$B" addr add fd00:de::2/64 dev vdemo-b nodad
for ns in "$A" "$B"; do ip -n "$ns" link set lo up; done
ip -n "$A" link set vdemo-a up
ip -n "$B" link set vdemo-b up

mkdir -p "$WORK/policies.d"
cat > "$WORK/policies.d/atlas.toml" <<'TOML'
# Transfers to port 5201 belong to ATLAS data consolidation.
experiment = "atlas"

[[rule]]
name = "consolidation"
activity = "Data Consolidation"
remote_ports = [5201]
TOML
cat > "$WORK/policies.d/cms.toml" <<'TOML'
# Transfers to port 5202 are CMS production input (scitag 204 = cms/12).
experiment = "cms"

[[rule]]
name = "production"
scitag = 204
remote_ports = [5202]
TOML
cat > "$WORK/flowd-rs.toml" <<TOML
state_dir = "$WORK/state"
[policy]
dir = "$WORK/policies.d"
[marker]
# A demo is a one-off: its exit removes the marker instead of leaving it pinned
# for a next start (what a service restart wants).
detach_on_exit = true
[fireflies]
# A UDP datagram of JSON at each tagged flow's start and end, sent to the flow's
# remote host (port 10514) by default.
enabled = true
TOML
echo "== policies"
"$BIN" -c "$WORK/flowd-rs.toml" policy check

echo "== starting flowd-rs on $A (it discovers sockets and marks them by itself)"
# nsenter, not ip netns exec: the tracker needs the host's cgroup2 mount.
nsenter --net=/var/run/netns/"$A" "$BIN" -c "$WORK/flowd-rs.toml" run 2>"$WORK/daemon.log" &
PIDS+=($!)
for _ in $(seq 200); do [ -S "$WORK/state/control.sock" ] && break; sleep 0.05; done
[ -S "$WORK/state/control.sock" ] || { cat "$WORK/daemon.log"; exit 1; }

echo "== capturing on $B"
ip netns exec "$B" tcpdump -i vdemo-b -l -nn -v --immediate-mode 'ip6 and tcp and (dst port 5201 or dst port 5202 or dst port 5203)' \
    >"$WORK/capture.txt" 2>"$WORK/tcpdump.err" &
PIDS+=($!)
for _ in $(seq 100); do grep -q "listening on" "$WORK/tcpdump.err" 2>/dev/null && break; sleep 0.05; done
ip netns exec "$B" tcpdump -i vdemo-b -l -nn -A --immediate-mode 'udp dst port 10514' \
    >"$WORK/fireflies.txt" 2>"$WORK/tcpdump-ff.err" &
PIDS+=($!)
for _ in $(seq 100); do grep -q "listening on" "$WORK/tcpdump-ff.err" 2>/dev/null && break; sleep 0.05; done

for port in 5201 5202 5203; do
    ip netns exec "$B" iperf3 -s -1 -B fd00:de::2 -p "$port" >/dev/null 2>&1 &
    PIDS+=($!)
done
sleep 0.3
for port in 5201 5202 5203; do
    echo "== iperf3 to port $port (1 s)"
    ip netns exec "$A" iperf3 -6 -c fd00:de::2 -p "$port" -t 1 -l 64K >/dev/null
done
sleep 0.5

echo
echo "== what the receiver saw: flow labels per flow, decoded"
# tcpdump -v: "IP6 (flowlabel 0x1000c, hlim 64, ...) fd00:de::1.43878 > fd00:de::2.5201: Flags ..."
awk '/flowlabel/ {
        match($0, /flowlabel 0x[0-9a-f]+/); label = substr($0, RSTART + 10, RLENGTH - 10);
        match($0, /\) [0-9a-f:.]+ > [0-9a-f:.]+:/); flow = substr($0, RSTART + 2, RLENGTH - 3);
        n[flow " " label]++
     }
     END { for (k in n) print k, n[k] }' "$WORK/capture.txt" | sort | while read -r src _ dst label count; do
    decoded=$("$BIN" -c "$WORK/flowd-rs.toml" label decode "$label")
    printf '%-26s -> %-18s %6s packets  %s\n' "$src" "$dst" "$count" "${decoded}"
done
echo
echo "(ports 5201/5202 match the atlas/cms policies; 5203 matches none, so its labels"
echo " are the kernel's own random hashes, which decode to nothing meaningful.)"
echo
echo "== fireflies the receiver got (UDP port 10514), one line each"
grep -o '{"version".*' "$WORK/fireflies.txt" | sed -E \
    's/.*"state":"([a-z]+)".*"src-ip":"([^"]+)".*"dst-ip":"([^"]+)".*"src-port":([0-9]+),"dst-port":([0-9]+).*"experiment-id":([0-9]+),"activity-id":([0-9]+)(,"application":"([^"]*)")?.*/  \1\t[\2]:\4 -> [\3]:\5  experiment \6 activity \7  (\9)/' \
    | sed 's/\t/ /'
echo
echo "== daemon status"
"$BIN" -c "$WORK/flowd-rs.toml" status | grep -E '"(flows_tagged_total|marked|unmarked|map_entries|strategy|policy_version|sent_start|sent_end)"' | sed 's/^ */  /'
