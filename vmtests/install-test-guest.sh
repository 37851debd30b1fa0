#!/bin/bash
# Runs inside the guest (systemd as PID 1), as install-test.service: installs the
# .deb with apt, starts, reloads, marks real traffic, stops and purges, and says
# PASS or FAIL for each step. vmtests/install-test.sh boots the guest.
# The unit sends stdout to the journal and the console (serial: console.log).
exec > >(tee /root/install-test.log) 2>&1
set -u
fails=0
step() { echo; echo "=== $*"; }
check() {   # DESCRIPTION COMMAND...
    local what=$1; shift
    if "$@"; then echo "PASS $what"; else echo "FAIL $what"; fails=$((fails + 1)); fi
}
PY=$(readlink -f /usr/bin/python3)

step "kernel $(uname -r), systemd $(systemctl --version | head -n1 | cut -d' ' -f2), PID 1 $(cat /proc/1/comm)"
step "apt install"
# Offline: its dependencies (libc6, libelf1, zlib1g, systemd) are installed.
check "apt installs the .deb" apt-get install -y /root/flowd-rs_*_amd64.deb
dpkg -L flowd-rs | sort | sed 's/^/  /'
check "the unit is enabled" systemctl is-enabled flowd-rs
check "the account exists" id flowd-rs
check "flowd-rs is in the flowd group" sh -c 'id -nG flowd-rs | grep -qw flowd'
check "man flowd-rs-run exists" test -e /usr/share/man/man1/flowd-rs-run.1.gz -o -e /usr/share/man/man1/flowd-rs-run.1

step "two namespaces: this host (fd00:99::1) and peer (fd00:99::2)"
ip netns add peer
ip link add vpeer0 type veth peer name vpeer1 netns peer
ip addr add fd00:99::1/64 dev vpeer0 nodad; ip link set vpeer0 up
ip -n peer addr add fd00:99::2/64 dev vpeer1 nodad; ip -n peer link set vpeer1 up; ip -n peer link set lo up
# Listeners in the peer, owned by nobody.
for port in 5201 5202; do
    ip netns exec peer setpriv --reuid=65534 --regid=65534 --clear-groups "$PY" -c "
import socket
s=socket.socket(socket.AF_INET6); s.bind(('fd00:99::2',$port)); s.listen(16)
c=[]
while True:
    a=s.accept()[0]; c.append(a)
" &
done
sleep 1
# A connection from this host, as nobody, sending 20 segments.
send() {
    setpriv --reuid=65534 --regid=65534 --clear-groups "$PY" -c "
import socket,time
s=socket.create_connection(('fd00:99::2',$1))
for i in range(20):
    s.send(b'x'*100); time.sleep(0.05)
time.sleep(${2:-0})"
}
# The flow labels on the wire, as the peer receives them.
capture() {   # PORT FILE
    ip netns exec peer timeout 8 tcpdump -i vpeer1 -n -v -c 10 "ip6 and tcp dst port $1" >"$2" 2>/dev/null &
    sleep 1
}

step "start with the default configuration and no policies"
t0=$(date +%s%N)
check "systemctl start returns success" systemctl start flowd-rs
echo "  systemctl start took $(( ($(date +%s%N) - t0) / 1000000 )) ms (returns at READY=1)"
systemctl status flowd-rs --no-pager | sed 's/^/  /' | head -n 12
check "READY=1 was sent (Type=notify, active)" sh -c '[ "$(systemctl show -P ActiveState flowd-rs)" = active ]'
check "status text says marking" sh -c 'systemctl show -P StatusText flowd-rs | grep -q marking'
check "the journal says no policies" sh -c 'journalctl -u flowd-rs | grep -q "no policies: nothing is tagged"'
echo "  process: $(ps -o user=,pid=,comm= -C flowd-rs)"
grep -E '^Cap(Eff|Bnd|Amb)' /proc/$(pidof flowd-rs)/status | sed 's/^/  /'
check "runs as flowd-rs, not root" sh -c '[ "$(ps -o user= -C flowd-rs)" = flowd-rs ]'
systemd-analyze security flowd-rs --no-pager | tail -n 1 | sed 's/^/  /'

capture 5201 /tmp/before.txt; send 5201; sleep 2
echo "  labels before any policy:"; grep -o 'flowlabel 0x[0-9a-f]*' /tmp/before.txt | sort | uniq -c | sed 's/^/    /'

step "drop policies, reload"
# The perfSONAR example names the accounts of pScheduler and OWAMP: this guest
# becomes a perfSONAR node first (a missing account is a load error, by design).
useradd --system pscheduler; useradd --system owamp
cp /etc/flowd-rs/policies.d/perfsonar.toml.example /etc/flowd-rs/policies.d/perfsonar.toml
cat >/etc/flowd-rs/policies.d/site.toml <<POL
experiment = "atlas"
[[rule]]
name = "python-transfers"
activity = "Data Consolidation"
exe = ["$PY"]
remote_ports = [5202]
POL
check "flowd-rs policy check" flowd-rs policy check
check "systemctl reload succeeds" systemctl reload flowd-rs

step "traffic: port 5201 (perfsonar rule, kernel-decided), port 5202 (exe rule, another user's process)"
capture 5201 /tmp/p5201.txt; send 5201 3 & c=$!; sleep 1.5
flowd-rs inspect --once | sed 's/^/  /' | head -n 20
inspect=$(flowd-rs inspect --once)
wait $c
capture 5202 /tmp/p5202.txt; send 5202 7 & c=$!; sleep 6.5
inspect2=$(flowd-rs inspect --once)
echo "$inspect2" | grep 5202 | sed 's/^/  /'
wait $c; sleep 2
for port in 5201 5202; do
    echo "  labels seen by the peer, port $port:"
    grep -o 'flowlabel 0x[0-9a-f]*' /tmp/p$port.txt | sort | uniq -c | sed 's/^/    /'
    for l in $(grep -o 'flowlabel 0x[0-9a-f]*' /tmp/p$port.txt | awk '{print $2}' | sort -u); do
        flowd-rs label decode "$l" | sed 's/^/    /'
    done
done
check "every packet to 5201 carries perfSONAR's label (default experiment)" sh -c '
    n=$(grep -c flowlabel /tmp/p5201.txt); [ "$n" -ge 5 ] || exit 1
    for l in $(grep -o "flowlabel 0x[0-9a-f]*" /tmp/p5201.txt | cut -d" " -f2); do
        flowd-rs label decode $l | grep -q "perfSONAR" || exit 1; done'
check "packets to 5202 carry atlas's label (exe of another user's process)" sh -c '
    grep -o "flowlabel 0x[0-9a-f]*" /tmp/p5202.txt | cut -d" " -f2 | while read l; do flowd-rs label decode $l; done | grep -q "atlas (2) / Data Consolidation"'
check "inspect --once shows the 5201 flow with its rule" sh -c "echo \"\$0\" | grep 5201 | grep -q iperf3-client" "$inspect"
check "inspect --once shows the 5202 flow with the exe rule" sh -c "echo \"\$0\" | grep 5202 | grep -q python-transfers" "$inspect2"
curl -s 127.0.0.1:9617/metrics | grep -E '^flowd_(flows_tagged|marked_packets_total|fact_denied_total|policy_reloads_total)' | sed 's/^/  /'
check "no error in the journal" sh -c '! journalctl -u flowd-rs -p err --no-pager -q | grep .'
echo "  journal (warnings and above):"; journalctl -u flowd-rs -p warning --no-pager -q | sed 's/^/    /'

step "a broken policy is refused by reload, the previous one stays"
echo "broken = [" >/etc/flowd-rs/policies.d/broken.toml
check "systemctl reload fails on a broken policy" sh -c '! systemctl reload flowd-rs'
journalctl -u flowd-rs -p err --no-pager -q | tail -n 3 | sed 's/^/    /'
check "still active, still marking" sh -c '[ "$(systemctl show -P ActiveState flowd-rs)" = active ] && flowd-rs status | grep -q "\"policy_version\""'
rm /etc/flowd-rs/policies.d/broken.toml
check "systemctl reload succeeds again" systemctl reload flowd-rs

step "restart and upgrade hand the pinned marker over: no packet of a live flow unlabelled"
# A flow that lasts through both hand-overs (60 segments over 6 s).
ip netns exec peer timeout 12 tcpdump -i vpeer1 -n -v "ip6 and tcp dst port 5201 and greater 100" >/tmp/handover.txt 2>/dev/null &
sleep 1
setpriv --reuid=65534 --regid=65534 --clear-groups "$PY" -c "
import socket,time
s=socket.create_connection(('fd00:99::2',5201))
for i in range(60):
    s.send(b'x'*100); time.sleep(0.1)" & c=$!
sleep 1
check "systemctl restart" systemctl restart flowd-rs
check "the restart left the marker pinned and the new daemon adopted it" sh -c '
    journalctl -u flowd-rs --no-pager -q | grep -q "marker left pinned for the next start" &&
    journalctl -u flowd-rs --no-pager -q | grep -qi "adopt"'
sleep 1
# The package's upgrade path (postinst: restart-after-upgrade).
check "dpkg -i of the package again (upgrade path)" dpkg -i /root/flowd-rs_*_amd64.deb
check "active after the upgrade" sh -c '[ "$(systemctl show -P ActiveState flowd-rs)" = active ]'
wait $c; sleep 5
n=$(grep -c flowlabel /tmp/handover.txt)
echo "  packets of the live flow seen by the peer: $n"
grep -o 'flowlabel 0x[0-9a-f]*' /tmp/handover.txt | sort | uniq -c | sed 's/^/    /'
check "all 60 segments captured, each with perfSONAR's label" sh -c '
    [ "$(grep -c flowlabel /tmp/handover.txt)" -ge 60 ] || exit 1
    for l in $(grep -o "flowlabel 0x[0-9a-f]*" /tmp/handover.txt | cut -d" " -f2); do
        flowd-rs label decode $l | grep -q "perfSONAR" || exit 1; done'
check "pins exist while running" sh -c 'ls -d /sys/fs/bpf/flowd-rs/net* >/dev/null 2>&1'

step "stop"
check "systemctl stop" systemctl stop flowd-rs
check "a stop removes the pins" sh -c '! ls -d /sys/fs/bpf/flowd-rs/net* >/dev/null 2>&1'
journalctl -u flowd-rs --no-pager -q | tail -n 4 | sed 's/^/    /'
check "no TC filter left on vpeer0" sh -c '! tc filter show dev vpeer0 egress | grep -q .'
check "no clsact qdisc left" sh -c '! tc qdisc show dev vpeer0 | grep -q clsact'
check "no flowd BPF program left" sh -c '! bpftool prog show | grep -q flowd'
echo "  BPF links left: $(bpftool link show | grep -c '^[0-9]')"
check "/run/flowd-rs removed" test ! -e /run/flowd-rs

step "purge"
check "apt purge" apt-get purge -y flowd-rs
# The two policies this test wrote are the operator's, not the package's: dpkg
# keeps them (and so their directory), as it keeps any file it did not install.
left=$(find / -xdev \( -path /proc -o -path /sys -o -path /root \) -prune -o \( -name '*flowd*' -o -path '/etc/flowd-rs/*' \) -print 2>/dev/null | sort)
echo "  left:"; echo "$left" | sed 's/^/    /'
check "nothing of the package left (only the operator's two policies)" test "$left" = "/etc/flowd-rs
/etc/flowd-rs/policies.d
/etc/flowd-rs/policies.d/perfsonar.toml
/etc/flowd-rs/policies.d/site.toml"
echo "  account left (Debian keeps system accounts): $(getent passwd flowd-rs || echo none)"

echo
if [ $fails -eq 0 ]; then echo "INSTALL-TEST: ALL PASSED"; else echo "INSTALL-TEST: $fails FAILED"; fi
sync
systemctl poweroff
