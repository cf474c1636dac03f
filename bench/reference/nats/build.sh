#!/usr/bin/env bash
# Builds the two binaries of the NATS JetStream reference benchmark:
#   nats-server  github.com/nats-io/nats-server/v2, pinned below, via `go install`
#   natsw2       the client in ./client (nats.go version pinned by client/go.mod)
# into ${NATS_BENCH_BIN:-$HOME/.cache/eventtermq/nats-bench/bin}.
#
# Idempotent: a binary that is already there at the right version is kept
# (nats-server: its --version; natsw2: a hash of the client sources recorded
# next to it at build time). Needs Go >= 1.26 only when something is built;
# modules come from the Go module proxy only (no VCS access), and the
# installed Go toolchain is used as is (no toolchain download).
set -euo pipefail

NATS_SERVER_MODULE=github.com/nats-io/nats-server/v2
NATS_SERVER_VERSION=v2.15.3

HERE=$(cd "$(dirname "$0")" && pwd)
BIN=${NATS_BENCH_BIN:-$HOME/.cache/eventtermq/nats-bench/bin}
CLIENT=$HERE/client

log() { echo "build.sh: $*" >&2; }

# Go settings for every build: the proxy only, the local toolchain, the
# checksum database as usual, and no VCS stamping (the tree may be dirty).
export GOPROXY=https://proxy.golang.org
export GOTOOLCHAIN=local
export GOFLAGS=-buildvcs=false

need_go() {
  if ! command -v go >/dev/null 2>&1 && [ -x /usr/local/go/bin/go ]; then
    export PATH="/usr/local/go/bin:$PATH"
  fi
  command -v go >/dev/null 2>&1 || { log "go not found (Go >= 1.26 is needed to build)"; exit 1; }
}

server_version() {
  # `nats-server --version` prints "nats-server: vX.Y.Z"
  [ -x "$BIN/nats-server" ] || return 0
  "$BIN/nats-server" --version 2>/dev/null | awk '{ print $2 }' || true
}

client_hash() {
  (cd "$CLIENT" && sha256sum go.mod go.sum main.go) | sha256sum | awk '{ print $1 }'
}

mkdir -p "$BIN"

# --- nats-server ------------------------------------------------------------
have=$(server_version)
if [ "$have" = "$NATS_SERVER_VERSION" ]; then
  log "nats-server $have already in $BIN"
else
  need_go
  log "building nats-server $NATS_SERVER_VERSION (had: ${have:-none}) with $(go version)"
  # go install replaces the file by rename, so a running copy is not disturbed.
  GOBIN="$BIN" go install "$NATS_SERVER_MODULE@$NATS_SERVER_VERSION"
  have=$(server_version)
  [ "$have" = "$NATS_SERVER_VERSION" ] || { log "built nats-server reports '${have}', expected $NATS_SERVER_VERSION"; exit 1; }
fi

# --- natsw2 -------------------------------------------------------------------
want=$(client_hash)
stamp="$BIN/natsw2.src-sha256"
if [ -x "$BIN/natsw2" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  log "natsw2 (sources ${want:0:12}) already in $BIN"
else
  need_go
  log "building natsw2 (sources ${want:0:12}) with $(go version)"
  tmp="$BIN/.natsw2.$$"
  trap 'rm -f "$tmp"' EXIT
  (cd "$CLIENT" && go build -mod=readonly -o "$tmp" .)
  mv -f "$tmp" "$BIN/natsw2"
  echo "$want" > "$stamp"
fi
