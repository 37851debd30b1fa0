#!/usr/bin/env bash
# Builds the flowd-rs container image (packaging/Containerfile) from the .deb that
# packaging/build.sh made: the package's files plus the shared libraries the binary
# links, copied from this (Debian 12) host. No base image or registry is used.
#
#   bash packaging/container.sh [IMAGE]      (default localhost/flowd-rs:VERSION)
set -euo pipefail
cd "$(dirname "$0")/.."
deb=$(ls -t target/packaging/out/flowd-rs_*_amd64.deb 2>/dev/null | head -n1)
[ -n "$deb" ] || { echo "no .deb in target/packaging/out: run packaging/build.sh first" >&2; exit 1; }
version=$(dpkg-deb -f "$deb" Version)
image=${1:-localhost/flowd-rs:${version%-*}}
ctx=target/packaging/container
rm -rf "$ctx"
mkdir -p "$ctx/rootfs"
dpkg-deb -x "$deb" "$ctx/rootfs"
root=$ctx/rootfs
# The binary's libraries and the loader, at the paths the loader looks in.
for lib in $(ldd "$root/usr/bin/flowd-rs" | awk '/=> \// {print $3} /^\t\/lib/ {print $1}'); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done
# NSS by files only: user and group names in policies and control.group.
mkdir -p "$root/etc"
printf 'passwd: files\ngroup: files\n' >"$root/etc/nsswitch.conf"
printf 'root:x:0:0:root:/:/nonexistent\n' >"$root/etc/passwd"
printf 'root:x:0:\nflowd:x:990:\n' >"$root/etc/group"
for nss in /lib/x86_64-linux-gnu/libnss_files.so.2; do
    [ -e "$nss" ] && cp -L "$nss" "$root$nss"
done
mkdir -p "$root/run/flowd-rs" "$root/tmp"
# Documentation and units are for hosts, not for the image.
rm -rf "$root/usr/share/man" "$root/usr/share/doc" "$root/lib/systemd" "$root/usr/lib/systemd" "$root/usr/lib/sysusers.d"
cp packaging/Containerfile "$ctx/Containerfile"
podman build --quiet -t "$image" -f "$ctx/Containerfile" "$ctx"
podman image ls "$image"
