#!/usr/bin/env bash
# Runs flowd-rs's privileged integration tests, or one shell command, inside qemu
# guests booting other kernels (Debian's 5.10, 6.1, 6.12, or the host's own).
# The guest sees the host's root filesystem read-only, so the test binaries built
# here on the host run there as they are. See vmtests/README.md.
#
#   sudo bash vmtests/run.sh [OPTIONS] [KERNEL ...]
#
# KERNEL: 5.10 | 6.1 | 6.12 | host | a Debian package name (linux-image-...-amd64).
# Default: 5.10 6.1 6.12, and host when /boot holds the running kernel's image.
#
# OPTIONS
#   --cmd 'COMMAND'   run COMMAND (bash, cwd /) in each guest instead of the tests;
#                     prints its output and exit status, exits with the first non-zero one
#   --kernel KERNEL   the same as a KERNEL argument
#   --tests 'SPEC...' test binaries to run, NAME or NAME:FILTER (libtest name filter;
#                     repeat NAME:FILTER for several filters). Default: $VMTEST_TESTS,
#                     else the subset in DEFAULT_TESTS below
#   --timeout SECS    wall-clock bound of one guest (default $VMTEST_TIMEOUT or 1800)
#   --refresh         look up the newest package of each kernel series again
# ENVIRONMENT
#   VMTEST_REPO       checkout whose tests run (default: the one holding this script)
#   VMTEST_CACHE      kernel cache (default /var/cache/flowd-rs-vmtests)
#   VMTEST_ACCEL      tcg | kvm: skip the KVM probe
#   VMTEST_TEST_ARGS  extra libtest arguments for every test binary
#   VMTEST_MODULES    modules loaded in the guest (default below)
#   VMTEST_SMP, VMTEST_MEM  guest CPUs and MiB (default 2, 2048)
set -euo pipefail
# In braces, so that bash reads the whole script before running any of it: a run in
# progress (other checkouts use this one) survives an edit of the file.
{
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=${VMTEST_REPO:-$(dirname "$HERE")}
CACHE=${VMTEST_CACHE:-/var/cache/flowd-rs-vmtests}
# Chosen in README.md ("Which tests run by default"): wire marking, first packet,
# clean detach, tracker events and sock_diag reconcile, within CI's time budget.
DEFAULT_TESTS="marker_wire marker_flow_index marker_first_packet marker_detach marker_restart tracker_tcp tracker_modes sockdiag_netns sockiter_netns"
# 9p and virtio are modules on Debian's 5.10 and 6.1 (built in on 6.12); the rest
# is what the tests use. Loaded before the chroot: the host root has no module tree
# for the guest kernel, so modprobe inside the guest cannot find them.
BOOT_MODULES="virtio_pci 9pnet_virtio 9p virtio_rng"
MODULES=${VMTEST_MODULES:-"veth sch_ingress cls_bpf inet_diag tcp_diag udp_diag"}

die() { echo "vmtests: $*" >&2; exit 2; }
log() { echo "vmtests: $*" >&2; }

cmd="" kernels=() tests=${VMTEST_TESTS:-$DEFAULT_TESTS} guest_timeout=${VMTEST_TIMEOUT:-1800} refresh=0
while [ $# -gt 0 ]; do
    case $1 in
        --cmd) cmd=${2:?--cmd needs a command}; shift 2 ;;
        --kernel) kernels+=("${2:?--kernel needs a kernel}"); shift 2 ;;
        --tests) tests=${2:?--tests needs a list}; shift 2 ;;
        --timeout) guest_timeout=${2:?--timeout needs seconds}; shift 2 ;;
        --refresh) refresh=1; shift ;;
        -h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) kernels+=("$1"); shift ;;
    esac
done
[ "$(id -u)" -eq 0 ] || die "run as root: it installs packages, writes $CACHE and runs privileged tests"
[ "$(uname -m)" = x86_64 ] || die "only x86_64 hosts are supported (Debian amd64 kernels)"
if [ ${#kernels[@]} -eq 0 ]; then
    kernels=(5.10 6.1 6.12)
    if [ -r "/boot/vmlinuz-$(uname -r)" ]; then
        kernels+=(host)
    else
        log "host kernel $(uname -r) not included: /boot/vmlinuz-$(uname -r) does not exist"
    fi
fi

# --- host packages -----------------------------------------------------------
install_tools() {
    local pkgs=(qemu-system-x86 busybox-static cpio kmod xz-utils zstd bsdextrautils debian-archive-keyring) missing=()
    local p
    for p in "${pkgs[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# --- kernels: Debian packages, unpacked once under $CACHE ----------------------
APT=(-o Dir::Etc::sourcelist="$HERE/kernels.list" -o Dir::Etc::sourceparts=-
    -o Dir::State::Lists="$CACHE/apt/lists" -o Dir::Cache="$CACHE/apt/cache"
    -o APT::Sandbox::User=root)
# Once per run; a file, because package_of runs in a subshell.
apt_update() {
    [ -e "$RUN/apt-updated" ] && return
    mkdir -p "$CACHE/apt/lists/partial" "$CACHE/apt/cache/archives/partial"
    log "apt-get update for the suites in $HERE/kernels.list"
    apt-get -qq "${APT[@]}" update
    touch "$RUN/apt-updated"
}

# Package name of a kernel series: the newest one the suites offer.
package_of() {
    local re
    case $1 in
        5.10) re='^linux-image-5\.10\.0-[0-9]+-amd64$' ;;
        6.1) re='^linux-image-6\.1\.0-[0-9]+-amd64$' ;;
        6.12) re='^linux-image-6\.12\.[0-9]+\+deb13(\.[0-9]+)?-amd64$' ;;
        linux-image-*) echo "$1"; return ;;
        *) die "unknown kernel '$1': use 5.10, 6.1, 6.12, host or a linux-image-* package name" ;;
    esac
    local alias="$CACHE/alias/$1"
    if [ $refresh -eq 0 ] && [ -s "$alias" ]; then
        cat "$alias"
        return
    fi
    apt_update
    local pkg
    pkg=$(apt-cache "${APT[@]}" search --names-only "$re" | awk '{print $1}' | sort -V | tail -n 1)
    [ -n "$pkg" ] || die "no package matching $re in $HERE/kernels.list"
    mkdir -p "$CACHE/alias"
    echo "$pkg" >"$alias"
    echo "$pkg"
}

# Sets KNAME, KIMG (bzImage), KROOT (tree holding lib/modules/KVER) and KVER.
prepare_kernel() {
    if [ "$1" = host ]; then
        KNAME=host-$(uname -r) KVER=$(uname -r) KROOT=/ KIMG=/boot/vmlinuz-$(uname -r)
        [ -r "$KIMG" ] || die "host kernel image $KIMG not found"
        [ -d "/lib/modules/$KVER" ] || die "host kernel modules /lib/modules/$KVER not found"
        return
    fi
    KNAME=$(package_of "$1")
    local dir="$CACHE/kernels/$KNAME"
    if [ ! -e "$dir/ready" ]; then
        apt_update
        rm -rf "$dir"
        mkdir -p "$dir/deb"
        log "downloading $KNAME"
        (cd "$dir/deb" && apt-get -qq "${APT[@]}" download "$KNAME")
        dpkg-deb -x "$dir"/deb/*.deb "$dir/root"
        rm -rf "$dir/deb"
        # trixie ships its modules under usr/lib only; depmod -b and modprobe -d look in lib.
        [ -e "$dir/root/lib" ] || ln -s usr/lib "$dir/root/lib"
        local img
        img=$(ls "$dir"/root/boot/vmlinuz-*)
        depmod -b "$dir/root" "${img##*/vmlinuz-}"
        touch "$dir/ready"
    fi
    KROOT="$dir/root"
    KIMG=$(ls "$KROOT"/boot/vmlinuz-*)
    KVER=${KIMG##*/vmlinuz-}
}

# An initramfs with busybox, init and the modules (dependencies first, decompressed
# because busybox's insmod takes plain .ko files); cached per kernel and content.
initramfs_for() {
    local key out
    key=$(cat "$HERE/init" <(echo "$BOOT_MODULES $MODULES") /bin/busybox | sha256sum | cut -c1-16)
    out="$CACHE/initramfs/$KNAME-$key.cpio.gz"
    if [ ! -s "$out" ]; then
        local tmp m ko n=0
        tmp=$(mktemp -d)
        mkdir -p "$tmp/bin" "$tmp/modules" "$CACHE/initramfs"
        cp /bin/busybox "$tmp/bin/busybox"
        install -m 755 "$HERE/init" "$tmp/init"
        : >"$tmp/modules/order"
        for m in $BOOT_MODULES $MODULES; do
            modprobe -d "$KROOT" -S "$KVER" --show-depends "$m" >"$tmp/deps" 2>&1 ||
                die "$KNAME has no module $m: $(head -n 1 "$tmp/deps")"
            for ko in $(awk '$1 == "insmod" {print $2}' "$tmp/deps"); do
                local base=${ko##*/}
                base=${base%%.ko*}
                grep -q -- "-$base.ko\$" "$tmp/modules/order" && continue
                n=$((n + 1))
                local name
                name=$(printf '%02d-%s.ko' $n "$base")
                case $ko in
                    *.ko.xz) xz -dc "$ko" >"$tmp/modules/$name" ;;
                    *.ko.zst) zstd -qdc "$ko" >"$tmp/modules/$name" ;;
                    *.ko.gz) gzip -dc "$ko" >"$tmp/modules/$name" ;;
                    *) cp "$ko" "$tmp/modules/$name" ;;
                esac
                echo "$name" >>"$tmp/modules/order"
            done
        done
        (cd "$tmp" && find . ! -name deps | cpio -o -H newc --quiet | gzip -1) >"$out.tmp"
        mv "$out.tmp" "$out"
        rm -rf "$tmp"
    fi
    echo "$out"
}

# --- guests ------------------------------------------------------------------
# Boots the prepared kernel with ACCEL (tcg|kvm) and SHARE as the writable share
# holding job.sh; streams SHARE/out while it runs. Returns the job's exit status,
# or 255 when the guest did not report one (boot failure, crash, timeout).
boot() {
    local accel=$1 share=$2 timeout=$3 quiet=${4:-0} initrd
    initrd=$(initramfs_for)
    echo "$timeout" >"$share/timeout"
    realpath "$REPO" >"$share/repo"
    rm -f "$share/status" "$share/out"
    : >"$share/out"
    local cpu=(-accel tcg,thread=multi -cpu max)
    [ "$accel" = kvm ] && cpu=(-accel kvm -cpu host)
    # Bounded on the host too: a guest that never boots must not hang the run.
    timeout -k 10 $((timeout + 120)) qemu-system-x86_64 "${cpu[@]}" \
        -smp "${VMTEST_SMP:-2}" -m "${VMTEST_MEM:-2048}" \
        -nodefaults -no-reboot -display none -serial "file:$share/../console.log" \
        -kernel "$KIMG" -initrd "$initrd" -append "console=ttyS0 panic=-1" \
        -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
        -virtfs "local,path=$share,mount_tag=results,security_model=none,multidevs=remap" \
        -virtfs "local,path=$(realpath "$REPO"),mount_tag=repo,security_model=none,readonly=on,multidevs=remap" \
        -device virtio-rng-pci </dev/null >"$share/../qemu.log" 2>&1 &
    local qemu=$!
    [ "$quiet" = 1 ] || tail -n +1 -f --pid=$qemu "$share/out" || true
    local qrc=0
    wait $qemu || qrc=$?
    echo "$qrc" >"$share/../qemu.rc"
    if [ -s "$share/status" ]; then
        return "$(cat "$share/status")"
    fi
    return 255
}

# tcg unless a probe boot under KVM completes: /dev/kvm may be a KVM that cannot
# run these kernels (kvm-pvm), where qemu aborts or the guest hangs silently.
choose_accel() {
    if [ -n "${VMTEST_ACCEL:-}" ]; then
        echo "$VMTEST_ACCEL"
        return
    fi
    [ -w /dev/kvm ] || { echo tcg; return; }
    local probe="$CACHE/accel/$KNAME@$(uname -r)"
    if [ ! -s "$probe" ]; then
        local d
        d=$(mktemp -d)
        mkdir "$d/share"
        echo 'exit 0' >"$d/share/job.sh"
        mkdir -p "$CACHE/accel"
        if boot kvm "$d/share" 20 1; then
            echo kvm >"$probe"
        else
            log "$KNAME does not boot under this host's KVM (probe: $(grep -a -m1 -iE 'error|fail' "$d/qemu.log" || echo 'no output in 20 s')): using TCG"
            echo tcg >"$probe"
        fi
        rm -rf "$d"
    fi
    cat "$probe"
}

check_qemu() {
    qemu-system-x86_64 -accel help 2>/dev/null | grep -qx tcg ||
        die "qemu-system-x86_64 cannot start (no TCG accelerator): $(qemu-system-x86_64 --version 2>&1 | head -n 1)"
}

# --- test binaries -----------------------------------------------------------
# "name path" per selected integration test binary, built once on the host.
build_tests() {
    local names=() spec
    for spec in $tests; do names+=(--test "${spec%%:*}"); done
    log "building test binaries in $REPO: ${names[*]}"
    (cd "$REPO" && cargo test --no-run --message-format=json "${names[@]}") |
        python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    t = m.get("target", {})
    if m.get("reason") == "compiler-artifact" and "test" in t.get("kind", []) and m.get("executable"):
        print(t["name"], m["executable"])'
}

write_test_job() {
    local bins=$1 spec name exe
    {
        echo "cd '$REPO'"
        # A test binary gets a quarter of the guest's time at most, so one that hangs
        # still leaves the others their turn.
        echo "per=$((guest_timeout / 4))"
        while read -r name exe; do
            local args=()
            for spec in $tests; do
                [ "${spec%%:*}" = "$name" ] && [ "$spec" != "$name" ] && args+=("'${spec#*:}'")
            done
            echo "s=\$(date +%s); timeout -k 5 \$per '$exe' ${VMTEST_TEST_ARGS:-} ${args[*]} >/run/vmtest/$name.log 2>&1; rc=\$?"
            echo "echo \"$name rc=\$rc \$((\$(date +%s) - s))s\"; echo \"$name \$rc\" >>/run/vmtest/results"
        done <"$bins"
        echo "exit 0"
    }
}

# "P/F" from a libtest log, or why there is none.
cell() {
    local log=$1 rc=$2 line
    line=$(grep -a '^test result:' "$log" | tail -n 1 || true)
    if [ -n "$line" ]; then
        local p f
        p=$(sed -E 's/.* ([0-9]+) passed.*/\1/' <<<"$line")
        f=$(sed -E 's/.* ([0-9]+) failed.*/\1/' <<<"$line")
        echo "$p/$f"
    elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        echo "timeout"
    else
        echo "crash($rc)"
    fi
}

# --- main --------------------------------------------------------------------
install_tools
check_qemu
mkdir -p "$CACHE"
RUN=$(mktemp -d /tmp/flowd-vmtests.XXXXXX)
log "logs in $RUN"
bins="$RUN/binaries"
if [ -z "$cmd" ]; then
    build_tests >"$RUN/built"
    # In the order asked for, each binary once.
    for spec in $tests; do
        grep -q "^${spec%%:*} " "$bins" 2>/dev/null && continue
        grep "^${spec%%:*} " "$RUN/built" >>"$bins" || die "no test binary ${spec%%:*} in $REPO (see tests/*.rs)"
    done
fi

status=0
rows=()
for k in "${kernels[@]}"; do
    # One preparer at a time: several checkouts share the cache.
    exec 9>"$CACHE/lock"
    flock 9
    prepare_kernel "$k"
    initramfs_for >/dev/null
    accel=$(choose_accel)
    flock -u 9
    dir="$RUN/$KNAME"
    mkdir -p "$dir/share"
    log "$k: $KNAME ($KVER), accelerator $accel, guest timeout ${guest_timeout}s"
    # The tests' deadlines are sized for real CPUs: stretch them (tests/common/patience.rs).
    patience=2
    [ "$accel" = tcg ] && patience=5
    echo "export FLOWD_PRIVILEGED_TESTS=1 FLOWD_TEST_PATIENCE=$patience RUST_BACKTRACE=1" >"$dir/share/job.sh"
    if [ -n "$cmd" ]; then
        printf '%s\n' "$cmd" >>"$dir/share/job.sh"
    else
        write_test_job "$bins" >>"$dir/share/job.sh"
    fi
    start=$(date +%s)
    rc=0
    boot "$accel" "$dir/share" "$guest_timeout" || rc=$?
    secs=$(($(date +%s) - start))
    if [ $rc -eq 255 ] && [ ! -s "$dir/share/status" ]; then
        log "$k: the guest reported no exit status (boot failure, crash or timeout); qemu exited with $(cat "$dir/qemu.rc") after ${secs}s; last console lines:"
        tail -n 20 "$dir/console.log" >&2 || true
        [ -s "$dir/console.log" ] || log "(the console is empty)"
        [ -s "$dir/qemu.log" ] && { log "qemu said:"; cat "$dir/qemu.log" >&2; }
    fi
    if [ -n "$cmd" ]; then
        why=""
        [ $rc -eq 137 ] && why=", killed at the guest timeout (--timeout)"
        log "$k: exit status $rc (${secs}s$why)"
        [ $rc -ne 0 ] && [ $status -eq 0 ] && status=$rc
        continue
    fi
    row="$KVER $accel ${secs}s"
    while read -r name _; do
        # No results file when the guest ran nothing: every cell is then not-run.
        trc=$(awk -v n="$name" '$1 == n {print $2}' "$dir/share/results" 2>/dev/null || true)
        if [ -z "$trc" ]; then
            c="not-run"
        else
            c=$(cell "$dir/share/$name.log" "$trc")
        fi
        [ "$trc" = 0 ] || status=1
        row+=" $c"
    done <"$bins"
    rows+=("$row")
done

if [ -z "$cmd" ]; then
    echo
    echo "passed/failed per test binary (logs in $RUN/<kernel>/share/<binary>.log)"
    { echo "kernel accel time $(awk '{print $1}' "$bins" | tr '\n' ' ')"; printf '%s\n' "${rows[@]}"; } | column -t
    [ $status -eq 0 ] && echo "vmtests: every test passed" || echo "vmtests: FAILED (details below)"
    for d in "$RUN"/*/share; do
        for l in "$d"/*.log; do
            [ -e "$l" ] || continue
            grep -aq '^test result: ok' "$l" && continue
            echo "--- $(basename "$(dirname "$d")") $(basename "$l" .log):"
            awk -f "$HERE/failures.awk" "$l"
        done
    done
fi
exit $status
}
