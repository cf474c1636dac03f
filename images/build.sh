#!/usr/bin/env bash
# Builds the broker and operator images FROM scratch without buildah or a Docker
# engine: statically linked binaries (glibc, +crt-static) and one-layer OCI image
# archives written by images/oci.py.
#
#   images/build.sh [--profile release|debug] OUTDIR
#
# writes OUTDIR/eventtermq.oci.tar and OUTDIR/eventter-operator.oci.tar (named
# localhost/<name>:<workspace version>) plus OUTDIR/<name>-rootfs.tar.gz (the layer,
# for the Containerfiles). Import: ctr -n k8s.io images import OUTDIR/eventtermq.oci.tar
set -euo pipefail

usage() { echo "usage: $0 [--profile release|debug] OUTDIR" >&2; exit 2; }
profile=release
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) [ $# -ge 2 ] || usage; profile="$2"; shift 2 ;;
    --profile=*) profile="${1#*=}"; shift ;;
    -*) usage ;;
    *) break ;;
  esac
done
[ $# -eq 1 ] || usage
case "$profile" in
  release) cargo_profile=release ;;
  debug) cargo_profile=dev ;;
  *) usage ;;
esac
mkdir -p "$1"
out="$(cd "$1" && pwd)"
cd "$(dirname "$0")/.."

version="$(sed -n '/^\[workspace\.package\]/,/^\[/ s/^version *= *"\(.*\)"/\1/p' Cargo.toml)"
[ -n "$version" ] || { echo "no workspace version in Cargo.toml" >&2; exit 1; }
# The chart's default image tag is its appVersion.
app_version="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' charts/eventtermq/Chart.yaml)"
[ "$app_version" = "$version" ] ||
  { echo "charts/eventtermq/Chart.yaml appVersion '$app_version' != workspace version $version" >&2; exit 1; }

# With --target, RUSTFLAGS apply to the target's crates only, not to build scripts and
# proc-macros (which stay dynamic). A target dir of its own: no lock contention with
# other builds, and the flags differ anyway.
# getrandom 0.3/0.4 find glibc's getrandom() with dlsym, which fails in a static
# binary, and then fall back to /dev/urandom; the cfg makes them call it directly, so
# the binaries need no /dev (rand's ThreadRng panicked in the chroot without it).
target=x86_64-unknown-linux-gnu
export CARGO_TARGET_DIR="${IMAGE_CARGO_TARGET_DIR:-$HOME/.cache/eventtermq/target-image}"
export RUSTFLAGS='-C target-feature=+crt-static --cfg getrandom_backend="linux_getrandom"'
# Cargo names a workspace crate's output the same in every checkout of the repository
# and decides by file times whether it is up to date, so after another checkout (a git
# worktree) built into this shared directory, an older edit here would be taken for
# built. When the last build came from elsewhere, the workspace's sources are touched.
mkdir -p "$CARGO_TARGET_DIR"
built_from="$CARGO_TARGET_DIR/.built-from-checkout"
if [ "$(cat "$built_from" 2>/dev/null)" != "$PWD" ]; then
  git ls-files -z -- '*.rs' '*.proto' '*/Cargo.toml' 'Cargo.toml' 'Cargo.lock' '*/build.rs' 2>/dev/null |
    xargs -0 -r touch --no-create
fi
echo "$PWD" >"$built_from"
cargo build --locked --profile "$cargo_profile" --target "$target" \
  -p eventtermq --bin eventtermq -p eventter-operator --bin eventter-operator

bin_dir="$CARGO_TARGET_DIR/$target/$profile"
for bin in eventtermq eventter-operator; do
  desc="$(file -b "$bin_dir/$bin")"
  case "$desc" in
    *"static-pie linked"* | *"statically linked"*) ;;
    *) echo "$bin is not statically linked: $desc" >&2; exit 1 ;;
  esac
  deps="$(ldd "$bin_dir/$bin" 2>&1 || true)"
  case "$deps" in
    *"=>"*) echo "$bin has shared library dependencies: $deps" >&2; exit 1 ;;
  esac
done

python3 images/oci.py broker "$bin_dir/eventtermq" "$version" "$out"
python3 images/oci.py operator "$bin_dir/eventter-operator" "$version" "$out"
ls -l "$out"/*.oci.tar
