#!/usr/bin/env bash
# Builds the Debian and RPM packages of flowd-rs from one release build:
#   target/packaging/out/flowd-rs_VERSION-1_amd64.deb
#   target/packaging/out/flowd-rs-VERSION-1.x86_64.rpm
# Needs a Rust toolchain (>= 1.88), clang, libelf-dev, zlib1g-dev, pkg-config;
# installs cargo-deb and cargo-generate-rpm from crates.io when missing.
#
# The binary built here (Debian 12, glibc 2.36) must run on EL9 (glibc 2.34): the
# build fails if it asks for a newer GLIBC symbol version.
set -euo pipefail
cd "$(dirname "$0")/.."

MAX_GLIBC=2.34
stage=target/packaging
out=$stage/out

need_tool() {
    local cmd=$1 crate=$2
    if ! cargo "$cmd" --version >/dev/null 2>&1; then
        echo "== installing $crate (cargo install --locked)"
        cargo install --locked "$crate"
    fi
}
need_tool deb cargo-deb
need_tool generate-rpm cargo-generate-rpm

echo "== release build"
cargo build --release --locked --bin flowd-rs
bin=target/release/flowd-rs

# The highest GLIBC_x.y the binary asks for.
glibc=$(objdump -T "$bin" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n1)
if [ "$(printf '%s\n%s\n' "$glibc" "$MAX_GLIBC" | sort -V | tail -n1)" != "$MAX_GLIBC" ]; then
    echo "$bin needs GLIBC_$glibc, newer than EL9's $MAX_GLIBC: it would not start there" >&2
    exit 1
fi
echo "   highest GLIBC symbol version: $glibc (limit $MAX_GLIBC)"
strip --strip-debug "$bin"

echo "== manual pages, completions, example policies"
rm -rf "$stage/man" "$stage/completions" "$stage/policies.d"
mkdir -p "$stage/completions" "$stage/policies.d" "$out"
"$bin" man --dir "$stage/man"
"$bin" completions bash >"$stage/completions/flowd-rs.bash"
"$bin" completions zsh >"$stage/completions/_flowd-rs"
"$bin" completions fish >"$stage/completions/flowd-rs.fish"
# Shipped disabled: they name accounts and ports of services a host may not have.
for p in policies/*.toml; do
    cp "$p" "$stage/policies.d/$(basename "$p").example"
done
# Every page the others reference exists.
for ref in $(grep -oh 'flowd\\-rs[a-z\\-]*(1)' "$stage"/man/*.1 | sed 's/\\-/-/g; s/(1)//' | sort -u); do
    [ -f "$stage/man/$ref.1" ] || { echo "man page $ref(1) is referenced but not generated" >&2; exit 1; }
done

echo "== packages"
cargo deb --no-build --no-strip --output "$out/"
cargo generate-rpm --output "$out/"
ls -l "$out"
