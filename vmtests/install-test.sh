#!/usr/bin/env bash
# The packages on a real system: boots a Debian 12 (bookworm) guest with systemd as
# PID 1 in qemu (TCG: /dev/kvm is not needed) and runs vmtests/install-test-guest.sh
# in it: apt install of the .deb, start, reload, marks on the wire between two
# namespaces, stop, purge. Then checks the RPM's contents, scripts and
# dependencies on the host.
#
#   sudo bash vmtests/install-test.sh [--kernel linux-image-...]
#
# Cached under /var/cache/flowd-rs-vmtests (VMTEST_CACHE), shared with
# vmtests/run.sh: the bookworm root filesystem (debootstrap from Debian's
# registry, made once) and the kernel, by default the newest trixie 6.12
# package vmtests/run.sh unpacked (the host-like kernel; bookworm's own 6.1 also
# boots: --kernel linux-image-6.1...).
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${VMTEST_CACHE:-/var/cache/flowd-rs-vmtests}
KPKG=
while [ $# -gt 0 ]; do
    case $1 in
        --kernel) KPKG=$2; shift 2 ;;
        *) echo "usage: $0 [--kernel linux-image-...]" >&2; exit 2 ;;
    esac
done
deb=$(ls -t target/packaging/out/flowd-rs_*_amd64.deb 2>/dev/null | head -n1)
rpm=$(ls -t target/packaging/out/flowd-rs-*.x86_64.rpm 2>/dev/null | head -n1)
[ -n "$deb" ] && [ -n "$rpm" ] || { echo "run packaging/build.sh first" >&2; exit 1; }
for t in debootstrap qemu-system-x86_64 mkfs.ext4 debugfs rpm; do
    command -v $t >/dev/null || apt-get install -y -q debootstrap qemu-system-x86 e2fsprogs rpm >/dev/null
done

rootfs=$CACHE/bookworm-rootfs
if [ ! -d "$rootfs" ]; then
    echo "== debootstrap bookworm (once) into $rootfs"
    debootstrap --variant=minbase \
        --include=systemd-sysv,udev,kmod,initramfs-tools,iproute2,tcpdump,bpftool,curl,python3-minimal,procps,libelf1,zlib1g,dbus,e2fsprogs,less \
        bookworm "$rootfs.tmp" http://deb.debian.org/debian
    mv "$rootfs.tmp" "$rootfs"
fi

if [ -z "$KPKG" ]; then
    KPKG=$(ls -d "$CACHE"/kernels/linux-image-6.12* 2>/dev/null | sort -V | tail -n1 | xargs -r basename)
    [ -n "$KPKG" ] || { echo "no 6.12 kernel in $CACHE/kernels: run 'sudo bash vmtests/run.sh --kernel 6.12 --cmd true' once" >&2; exit 1; }
fi
kdir=$CACHE/kernels/$KPKG/root
kver=$(basename "$(ls "$kdir"/boot/vmlinuz-*)" | sed 's/^vmlinuz-//')
echo "== kernel $kver"

work=$(mktemp -d /tmp/flowd-install-test.XXXXXX)
tree=$work/tree
echo "== guest tree in $work"
cp -a "$rootfs" "$tree"
# The kernel's modules, and an initramfs for them (virtio_blk, ext4 are modules).
mkdir -p "$tree/usr/lib/modules/$kver"
for m in "$kdir/lib/modules/$kver" "$kdir/usr/lib/modules/$kver"; do
    [ -d "$m" ] && cp -a "$m/." "$tree/usr/lib/modules/$kver/"
done
cp "$kdir/boot/config-$kver" "$kdir/boot/System.map-$kver" "$tree/boot/"
chroot "$tree" depmod "$kver"
# The initramfs only needs the root disk: virtio_blk and ext4 (made once per kernel).
initrd=$CACHE/bookworm-initrd-$kver
if [ ! -s "$initrd" ]; then
    printf 'virtio_blk\nvirtio_pci\next4\n' >>"$tree/etc/initramfs-tools/modules"
    echo MODULES=list >"$tree/etc/initramfs-tools/conf.d/flowd-vmtest.conf"
    chroot "$tree" mkinitramfs -o "/boot/initrd.img-$kver" "$kver" 2>"$work/mkinitramfs.log"
    cp "$tree/boot/initrd.img-$kver" "$initrd.tmp" && mv "$initrd.tmp" "$initrd"
fi
cp "$kdir/boot/vmlinuz-$kver" "$work/vmlinuz"
cp "$initrd" "$work/initrd"

# The guest: root on /dev/vda, a console on ttyS0, the test as a boot service.
echo "/dev/vda / ext4 rw 0 1" >"$tree/etc/fstab"
echo flowd-guest >"$tree/etc/hostname"
chroot "$tree" passwd -d root >/dev/null
cp "$deb" "$tree/root/"
cp vmtests/install-test-guest.sh "$tree/root/install-test-guest.sh"
cat >"$tree/etc/systemd/system/install-test.service" <<UNIT
[Unit]
Description=flowd-rs install test
After=multi-user.target
[Service]
Type=oneshot
ExecStart=/bin/bash /root/install-test-guest.sh
StandardOutput=journal+console
[Install]
WantedBy=multi-user.target
UNIT
ln -sf /etc/systemd/system/install-test.service "$tree/etc/systemd/system/multi-user.target.wants/install-test.service"
# No login prompt on the console the test writes to.
ln -sf /dev/null "$tree/etc/systemd/system/serial-getty@ttyS0.service"
mkfs.ext4 -q -F -L root -d "$tree" "$work/disk.img" 3G

echo "== booting (TCG; a few minutes)"
# no_timer_check: under TCG on a busy host the kernel's IO-APIC timer check can
# time out and panic.
timeout 1500 qemu-system-x86_64 -accel tcg,thread=multi -cpu max -smp 2 -m 2048 \
    -nodefaults -display none -no-reboot \
    -kernel "$work/vmlinuz" -initrd "$work/initrd" \
    -append "root=/dev/vda rw console=ttyS0 panic=-1 no_timer_check systemd.show_status=0" \
    -drive file="$work/disk.img",format=raw,if=virtio \
    -device virtio-rng-pci -serial file:"$work/console.log" </dev/null || true
debugfs -R "cat /root/install-test.log" "$work/disk.img" 2>/dev/null >"$work/install-test.log" || true
cat "$work/install-test.log"

echo
echo "== RPM: $(basename "$rpm")"
rpm -qip "$rpm" 2>/dev/null | grep -E '^(Name|Version|Release|Architecture|Size|License|Summary)'
echo "-- files"; rpm -qlp "$rpm" 2>/dev/null
echo "-- config files"; rpm -qcp "$rpm" 2>/dev/null
echo "-- requires"; rpm -qp --requires "$rpm" 2>/dev/null
echo "-- scripts"; rpm -qp --scripts "$rpm" 2>/dev/null
rc=0
grep -q "INSTALL-TEST: ALL PASSED" "$work/install-test.log" || { echo "guest test failed (console: $work/console.log)"; rc=1; }
# Lists first: grep -q closing the pipe early would fail rpm under pipefail.
files=$(rpm -qlp "$rpm" 2>/dev/null)
requires=$(rpm -qp --requires "$rpm" 2>/dev/null)
for f in /usr/bin/flowd-rs /usr/lib/systemd/system/flowd-rs.service /etc/flowd-rs/flowd-rs.toml /usr/lib/sysusers.d/flowd-rs.conf /usr/share/man/man1/flowd-rs-run.1 /usr/share/licenses/flowd-rs/LICENSE; do
    grep -qx "$f" <<<"$files" || { echo "rpm lacks $f"; rc=1; }
done
for r in 'libelf.so.1()(64bit)' 'libz.so.1()(64bit)' elfutils-libelf zlib; do
    grep -qF "$r" <<<"$requires" || { echo "rpm does not require $r"; rc=1; }
done
newest=$(grep -o 'GLIBC_[0-9.]*' <<<"$requires" | sort -V | tail -n1)
[ "$(printf '%s\n' "$newest" GLIBC_2.34 | sort -V | tail -n1)" = GLIBC_2.34 ] || { echo "rpm requires $newest, newer than EL9's glibc 2.34"; rc=1; }
[ $rc -eq 0 ] && rm -rf "$tree" && echo "INSTALL TEST PASSED (logs in $work)"
exit $rc
