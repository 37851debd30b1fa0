#!/usr/bin/env bash
# Builds benches/scripts/reconcile_iter.bpf.c and pins its iterator at $1 (default
# /sys/fs/bpf/flowd_bench_iter_tcp); `cargo bench --bench sockdiag` times reading it
# when FLOWD_BENCH_ITER names the pin. Remove the pin afterwards: rm "$1".
set -euo pipefail
cd "$(dirname "$0")/../.."
pin=${1:-/sys/fs/bpf/flowd_bench_iter_tcp}
out=$(mktemp -d)
# libbpf's BPF headers as <bpf/...>, from the libbpf-sys crate cargo fetched.
ln -s "$(ls -d ~/.cargo/registry/src/*/libbpf-sys-*/libbpf/src | tail -1)" "$out/bpf"
clang -O2 -g -target bpf -D__TARGET_ARCH_x86 -I bpf -I "$out" \
    -c benches/scripts/reconcile_iter.bpf.c -o "$out/iter.o"
rm -f "$pin"
bpftool iter pin "$out/iter.o" "$pin"
rm -rf "$out"
echo "$pin"
