#!/usr/bin/env bash
# Every benchmark, one after the other, each printing its own table. As root: they
# load BPF programs and build network namespaces (traffic never leaves them).
# Bounded: about 5 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
    echo "run as root: the benchmarks load BPF programs and create network namespaces" >&2
    exit 1
fi
bash .ci/setup
cargo bench --no-run --quiet
for b in marker coverage throughput sockdiag tracker_rate flows daemon policy decide_cost fireflies restart_gap; do
    echo
    echo "===== $b"
    cargo bench --quiet --bench "$b" 2>&1 | grep -v -E '^\s*(Running|Finished|Compiling)'
done
