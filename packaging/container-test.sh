#!/usr/bin/env bash
# Runs the image packaging/container.sh built, the way a fleet runs it (the
# network namespace it marks, the host's PID namespace and cgroup tree, only the
# unit's capabilities, policies mounted read-only), and checks the labels on the
# wire. The "host" here is the network namespace ct-a (a veth to ct-b), so the test
# sends traffic only between namespaces it creates.
#
#   sudo bash packaging/container-test.sh [IMAGE]
#   PODMAN_RUNTIME=runc ...   on a host with hybrid cgroups (crun refuses them)
#
# seccomp=unconfined: podman's default profile refuses bpf() without
# CAP_SYS_ADMIN (the daemon then fails with EPERM loading its programs). The
# --ulimit values stay below this machine's hard limits (podman would raise them).
set -uo pipefail
cd "$(dirname "$0")/.."
image=${1:-localhost/flowd-rs:0.1.0}
W=$(mktemp -d /tmp/flowd-ct.XXXXXX)
cleanup() {
    podman rm -f -t 5 flowd-rs-ct >/dev/null 2>&1
    [ -n "${SPID:-}" ] && kill "$SPID" 2>/dev/null
    ip netns del ct-a 2>/dev/null; ip netns del ct-b 2>/dev/null
    rm -rf "$W"
}
trap cleanup EXIT
ip netns add ct-a && ip netns add ct-b
ip link add cta0 netns ct-a type veth peer name ctb0 netns ct-b
ip -n ct-a addr add fd00:c7::1/64 dev cta0 nodad; ip -n ct-a link set cta0 up; ip -n ct-a link set lo up
ip -n ct-b addr add fd00:c7::2/64 dev ctb0 nodad; ip -n ct-b link set ctb0 up
mkdir -p "$W/policies" "$W/state"
cat >"$W/policies/perfsonar.toml" <<'POL'
experiment = "default"
[[rule]]
name = "iperf3-client"
activity = "perfSONAR"
protocol = "tcp"
direction = "outbound"
remote_ports = [5201]
POL

podman ${PODMAN_RUNTIME:+--runtime $PODMAN_RUNTIME} run -d --name flowd-rs-ct --network ns:/var/run/netns/ct-a --pid=host --cgroupns=host \
    --cap-drop=all --cap-add=BPF,PERFMON,NET_ADMIN,SYS_PTRACE,DAC_READ_SEARCH \
    --security-opt no-new-privileges --security-opt seccomp=unconfined --read-only --ulimit nofile=4096:4096 --ulimit nproc=1024:1024 \
    -v /sys/fs/cgroup:/sys/fs/cgroup:ro \
    -v "$W/policies:/etc/flowd-rs/policies.d:ro" -v "$W/state:/run/flowd-rs" \
    "$image" >/dev/null || { echo "FAIL podman run"; exit 1; }
for _ in $(seq 1 40); do
    podman logs flowd-rs-ct 2>&1 | grep -q "marking is live" && break
    sleep 0.5
done
podman logs flowd-rs-ct 2>&1 | sed 's/^/  /'
podman logs flowd-rs-ct 2>&1 | grep -q "marking is live" || { echo "FAIL the container did not start marking"; exit 1; }
grep -E '^Cap(Eff|Bnd)' /proc/"$(podman inspect -f '{{.State.Pid}}' flowd-rs-ct)"/status | sed 's/^/  /'

ip netns exec ct-b python3 -c 'import socket
s=socket.socket(socket.AF_INET6); s.bind(("fd00:c7::2",5201)); s.listen(4)
c=[]
while True: c.append(s.accept()[0])' &
SPID=$!
sleep 0.5
ip netns exec ct-b timeout 10 tcpdump -i ctb0 -n -v -c 10 'ip6 and tcp dst port 5201' >"$W/cap" 2>/dev/null &
TPID=$!
sleep 1
ip netns exec ct-a python3 -c 'import socket,time
s=socket.create_connection(("fd00:c7::2",5201))
for i in range(20): s.send(b"x"*100); time.sleep(0.05)'
wait $TPID
labels=$(grep -o 'flowlabel 0x[0-9a-f]*' "$W/cap" | awk '{print $2}')
echo "  packets captured: $(echo "$labels" | grep -c .)"
rc=0
for l in $(echo "$labels" | sort -u); do
    d=$(podman exec flowd-rs-ct /usr/bin/flowd-rs label decode "$l")
    echo "  $d"
    echo "$d" | grep -q perfSONAR || rc=1
done
[ "$(echo "$labels" | grep -c .)" -ge 5 ] || rc=1
podman exec flowd-rs-ct /usr/bin/flowd-rs inspect --once | sed 's/^/  /' | head -n 5
podman stop -t 10 flowd-rs-ct >/dev/null
podman logs flowd-rs-ct 2>&1 | tail -n 2 | sed 's/^/  /'
if [ $rc -eq 0 ]; then echo "CONTAINER TEST PASSED: every captured packet carries the perfSONAR label"; else echo "CONTAINER TEST FAILED"; fi
exit $rc
