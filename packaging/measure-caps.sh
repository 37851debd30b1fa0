#!/usr/bin/env bash
# Measures which capabilities flowd-rs needs: runs the daemon as an unprivileged
# uid (setpriv, no-new-privs) with a candidate capability set and checks every
# feature, then again with each capability of the set left out.
#
#   sudo bash packaging/measure-caps.sh [BINARY]      (default target/debug/flowd-rs)
#
# Needs root, iproute2, bpftool, curl, python3. Creates the network namespaces
# fcap-a and fcap-b (fd00:ca9::/64) and removes them at exit.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=$(realpath "${1:-target/debug/flowd-rs}")
SET=${CAPS:-bpf,perfmon,net_admin,sys_ptrace,dac_read_search}
DUID=64123     # the daemon
OUID=64125     # another user owning the traffic
GROUP=nogroup  # control.group: the daemon is given it as a supplementary group
W=$(mktemp -d /tmp/flowd-caps.XXXXXX)
chmod 755 "$W"
PY=$(readlink -f /usr/bin/python3)

cleanup() {
    [ -n "${DPID:-}" ] && kill "$DPID" 2>/dev/null
    [ -n "${SPID:-}" ] && kill "$SPID" 2>/dev/null
    ip netns del fcap-a 2>/dev/null; ip netns del fcap-b 2>/dev/null
    rm -rf "$W"
}
trap cleanup EXIT

ip netns add fcap-a && ip netns add fcap-b
ip link add fcap0 netns fcap-a type veth peer name fcap1 netns fcap-b
ip -n fcap-a addr add fd00:ca9::1/64 dev fcap0 nodad
ip -n fcap-b addr add fd00:ca9::2/64 dev fcap1 nodad
ip -n fcap-a link set fcap0 up; ip -n fcap-a link set lo up
ip -n fcap-b link set fcap1 up; ip -n fcap-b link set lo up

# A listener owned by another user in fcap-b, a client owned by another user in
# fcap-a (the daemon's namespace): its exe and cgroup decide the tag.
nsenter --net=/var/run/netns/fcap-b setpriv --reuid=$OUID --regid=$OUID --clear-groups \
    "$PY" -c 'import socket,time
s=socket.socket(socket.AF_INET6); s.bind(("fd00:ca9::2",5301)); s.listen(8)
c=[]
while True: c.append(s.accept()[0])' &
SPID=$!
sleep 0.5
client() {
    nsenter --net=/var/run/netns/fcap-a setpriv --reuid=$OUID --regid=$OUID --clear-groups \
        "$PY" -c 'import socket,time,os
s=socket.create_connection(("fd00:ca9::2",5301)); print(open("/proc/self/cgroup").read().split("::")[-1].strip(), flush=True); time.sleep(30)' &
}

mkdir -p "$W/policies" "$W/state"
chown $DUID:$DUID "$W/state"
cat >"$W/flowd.toml" <<CONF
state_dir = "$W/state"
[marker]
interfaces = ["fcap0"]
[policy]
dir = "$W/policies"
[metrics]
listen = "127.0.0.1:19617"
[control]
group = "$GROUP"
CONF
cat >"$W/policies/atlas.toml" <<POL
experiment = "atlas"
[[rule]]
name = "by-exe"
activity = "Data Consolidation"
exe = ["$PY"]
remote_ports = [5301]
POL

run_with() {   # CAPS -> prints one line of results
    local caps=$1 list
    list=$(echo "$caps" | sed 's/\([a-z_]*\)/+\1/g')
    rm -f "$W/state/"* "$W/log"
    nsenter --net=/var/run/netns/fcap-a setpriv --reuid=$DUID --regid=$DUID --groups=$(getent group $GROUP | cut -d: -f3) \
        --inh-caps=-all${list:+,$list} --ambient-caps=-all${list:+,$list} --bounding-set=-all${list:+,$list} \
        --no-new-privs "$BIN" -c "$W/flowd.toml" run >"$W/log" 2>&1 &
    DPID=$!
    local started=no
    for _ in $(seq 1 60); do
        grep -q "flowd-rs running" "$W/log" 2>/dev/null && { started=yes; break; }
        kill -0 $DPID 2>/dev/null || break
        sleep 0.5
    done
    local tc=no sockops=no diag=no exe=no group=no metrics=no denied=-
    if [ $started = yes ]; then
        # TCX links (bookworm's bpftool prints them as "type 11") or a clsact filter
        # running one of the daemon's programs.
        for id in $(bpftool link show | awk '/tcx|type 11/ {for (i=1;i<NF;i++) if ($i=="prog") print $(i+1)}'); do
            bpftool prog show id "$id" | grep -q flowd && tc=yes
        done
        nsenter --net=/var/run/netns/fcap-a tc filter show dev fcap0 egress 2>/dev/null | grep -q flowd && tc=yes
        local cg
        cg=$(grep -o 'cgroup2=Some("[^"]*")' "$W/log" | head -n1 | sed 's/.*("\(.*\)")/\1/')
        [ -n "$cg" ] && bpftool cgroup show "$cg" 2>/dev/null | grep -q flowd_sockops && sockops=yes
        client; local cpid=$!
        sleep 7   # one reconcile interval and a /proc walk
        local flows
        flows=$(nsenter --net=/var/run/netns/fcap-a "$BIN" -c "$W/flowd.toml" inspect --once --json 2>/dev/null)
        echo "$flows" | grep '5301' | grep -q "\"uid\":$OUID" && diag=yes
        echo "$flows" | grep '5301' | grep -q 'by-exe' && exe=yes
        [ "$(stat -c %G "$W/state/control.sock")" = "$GROUP" ] && group=yes
        nsenter --net=/var/run/netns/fcap-a curl -sf http://127.0.0.1:19617/metrics >"$W/metrics" && metrics=yes
        denied=$(grep '^flowd_fact_denied_total' "$W/metrics" | awk '{printf "%s=%s ", $1, $2}' | sed 's/flowd_fact_denied_total{fact="\([a-z]*\)"}/\1/g')
        kill $cpid 2>/dev/null
    fi
    kill $DPID 2>/dev/null; wait $DPID 2>/dev/null; DPID=
    cp "$W/log" "${LOGS:-$W}/flowd-caps-$(echo "${caps:-none}" | tr , -).log" 2>/dev/null
    printf '%-44s start=%-3s tc=%-3s sockops=%-3s diag=%-3s exe-rule=%-3s group=%-3s metrics=%-3s denied: %s\n' \
        "${caps:-(none)}" $started $tc $sockops $diag $exe $group $metrics "$denied"
    if [ $started = no ]; then grep -iE "error|refused|denied|permission" "$W/log" | head -n 2 | sed 's/^/    /'; fi
    grep -E "cannot read the" "$W/log" | head -n 1 | sed 's/^/    /'
}

echo "candidate set: $SET"
run_with "$SET"
IFS=, read -ra caps <<<"$SET"
for drop in "${caps[@]}"; do
    rest=$(printf '%s\n' "${caps[@]}" | grep -vx "$drop" | paste -sd,)
    run_with "$rest"
done
