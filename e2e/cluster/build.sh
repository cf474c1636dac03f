#!/usr/bin/env bash
# Builds (once) everything the e2e cluster runs, from the package registries only:
#   - Debian packages (etcd, containerd, runc, CNI plugins, iptables, conntrack), apt-get;
#   - kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy and
#     kubectl from the Go module k8s.io/kubernetes, version-stamped;
#   - CoreDNS from its Go module;
#   - metrics-server from its Go module (the resource metrics API for an HPA on CPU);
#   - the pod sandbox ("pause") image from a tiny static C program;
#   - helm, through .ci/helm.sh.
# Binaries are cached in $HOME/.cache/eventtermq/k8s-<version>/ (the directory name is
# the key; a binary that exists is not rebuilt). Go builds run one at a time: the
# machine has 2 cores and the first one (kube-apiserver) compiles most shared code.
#
# Usage: build.sh [deps|k8s|coredns|metrics-server|pause|helm|all]   (default all)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/lib.sh"

# Fixed build flags: changing any of them recompiles everything (and the binaries are
# reproducible byte for byte with them).
export CGO_ENABLED=0
GO_BUILD_FLAGS=(-trimpath)
export GOFLAGS="-mod=mod -buildvcs=false"

build_deps() {
  local missing=() p
  for p in "${APT_PACKAGES[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    log "apt-get install ${missing[*]}"
    apt-get update -qq
    # Debian's containerd, etcd-server and prometheus come with systemd units; none may
    # start (a second Prometheus on :9090, an etcd on :2379): a policy-rc.d that
    # refuses every start, for the install only, unless the machine has one already.
    local policy=/usr/sbin/policy-rc.d own_policy=0
    if [ ! -e "$policy" ]; then
      printf '#!/bin/sh\n# e2e/cluster/build.sh: no service starts during its apt-get install\nexit 101\n' >"$policy"
      chmod 755 "$policy"
      own_policy=1
    fi
    local rc=0
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || rc=$?
    [ "$own_policy" = 0 ] || rm -f "$policy"
    [ "$rc" = 0 ] || die "apt-get install failed ($rc)"
  fi
}

k8s_ldflags() {
  local v=${K8S_VERSION#v} major minor
  major=${v%%.*}; minor=${v#*.}; minor=${minor%%.*}
  local flags="-s -w" pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    flags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    flags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  printf '%s' "$flags"
}

K8S_COMMANDS=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl)

build_k8s() {
  go_env
  local src="$K8S_CACHE/src" cmd need=0
  for cmd in "${K8S_COMMANDS[@]}"; do [ -x "$K8S_BIN/$cmd" ] || need=1; done
  [ "$need" = 1 ] || { log "kubernetes $K8S_VERSION: cached in $K8S_BIN"; return 0; }
  mkdir -p "$src" "$K8S_BIN"
  if [ ! -f "$src/go.sum" ]; then
    log "kubernetes $K8S_VERSION: preparing a Go module that requires it"
    local gomod
    gomod=$(cd "$src" && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" |
      sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
    [ -f "$gomod" ] || die "no go.mod for k8s.io/kubernetes@$K8S_VERSION"
    # kubernetes requires its staging modules (k8s.io/api, ...) as v0.0.0 and replaces
    # them with ./staging in its own tree; outside it each needs a replace line to the
    # published v0.<minor>.<patch>.
    local staging_version="v0.${K8S_VERSION#v1.}"
    {
      echo "module eventtermq.local/k8s-build"
      echo
      # kubernetes' own language version and GODEBUG defaults.
      grep -E '^(go|godebug) ' "$gomod"
      echo
      echo "require k8s.io/kubernetes $K8S_VERSION"
      echo
      echo "replace ("
      grep -E '^[[:space:]]+k8s\.io/[^ ]+ v0\.0\.0$' "$gomod" |
        awk -v v="$staging_version" '{ printf "\t%s => %s %s\n", $1, $1, v }'
      echo ")"
    } >"$src/go.mod"
    {
      echo "//go:build tools"
      echo
      echo "// Package tools only pins the commands built from k8s.io/kubernetes."
      echo "package tools"
      echo
      echo "import ("
      for cmd in "${K8S_COMMANDS[@]}"; do echo "	_ \"k8s.io/kubernetes/cmd/$cmd\""; done
      echo ")"
    } >"$src/tools.go"
    (cd "$src" && go mod tidy)
  fi
  local ldflags start
  ldflags=$(k8s_ldflags)
  for cmd in "${K8S_COMMANDS[@]}"; do
    [ -x "$K8S_BIN/$cmd" ] && continue
    log "kubernetes $K8S_VERSION: go build $cmd"
    start=$(date +%s)
    (cd "$src" && go build "${GO_BUILD_FLAGS[@]}" -ldflags "$ldflags" -o "$K8S_BIN/.$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd")
    mv "$K8S_BIN/.$cmd.tmp" "$K8S_BIN/$cmd"
    log "kubernetes $K8S_VERSION: $cmd built in $(( $(date +%s) - start )) s"
  done
}

build_coredns() {
  go_env
  local dir start
  dir=$(dirname "$COREDNS_BIN")
  if [ ! -x "$COREDNS_BIN" ]; then
    mkdir -p "$dir/gobin"
    log "coredns $COREDNS_VERSION: go install"
    start=$(date +%s)
    # CoreDNS's go.mod has no replace directives, so `go install mod@version` works.
    GOBIN="$dir/gobin" go install "${GO_BUILD_FLAGS[@]}" -ldflags "-s -w" "github.com/coredns/coredns@$COREDNS_VERSION"
    mv "$dir/gobin/coredns" "$COREDNS_BIN"
    rmdir "$dir/gobin"
    log "coredns $COREDNS_VERSION: built in $(( $(date +%s) - start )) s"
  fi
  if [ ! -f "$COREDNS_IMAGE_TAR" ]; then
    bash "$here/oci_image.sh" --name "$COREDNS_IMAGE" --entrypoint /coredns --user 65532:65532 \
      --file "$COREDNS_BIN:/coredns:0755" --out "$COREDNS_IMAGE_TAR"
    log "coredns image: built"
  fi
}

build_metrics_server() {
  go_env
  [ -x "$METRICS_SERVER_BIN" ] && { log "metrics-server $METRICS_SERVER_VERSION: cached"; return 0; }
  local dir start
  dir=$(dirname "$METRICS_SERVER_BIN")
  mkdir -p "$dir/gobin"
  log "metrics-server $METRICS_SERVER_VERSION: go install"
  start=$(date +%s)
  # Its go.mod has no replace directives, so `go install mod@version` works; the version
  # is stamped as its own Makefile does (it reports it in /version and its logs).
  GOBIN="$dir/gobin" go install "${GO_BUILD_FLAGS[@]}" \
    -ldflags "-s -w -X k8s.io/client-go/pkg/version.gitVersion=$METRICS_SERVER_VERSION" \
    "sigs.k8s.io/metrics-server/cmd/metrics-server@$METRICS_SERVER_VERSION"
  mv "$dir/gobin/metrics-server" "$METRICS_SERVER_BIN"
  rmdir "$dir/gobin"
  log "metrics-server $METRICS_SERVER_VERSION: built in $(( $(date +%s) - start )) s"
}

build_pause() {
  [ -f "$PAUSE_DIR/pause.oci.tar" ] && { log "pause image: cached"; return 0; }
  command -v gcc >/dev/null 2>&1 || die "gcc is missing (build.sh deps)"
  mkdir -p "$PAUSE_DIR"
  gcc -static -Os -s -o "$PAUSE_DIR/pause" "$here/pause.c"
  bash "$here/oci_image.sh" --name "$PAUSE_IMAGE" --entrypoint /pause \
    --file "$PAUSE_DIR/pause:/pause:0755" --out "$PAUSE_DIR/.pause.oci.tar"
  mv "$PAUSE_DIR/.pause.oci.tar" "$PAUSE_DIR/pause.oci.tar"
  log "pause image: built"
}

build_helm() {
  [ -x "$HELM" ] && return 0
  # .ci/helm.sh builds helm when missing (and lints the chart, which is cheap).
  bash "$here/../../.ci/helm.sh" >/dev/null
}

what=${1:-all}
case "$what" in
  deps) build_deps ;;
  k8s) build_k8s ;;
  coredns) build_coredns ;;
  metrics-server) build_metrics_server ;;
  pause) build_pause ;;
  helm) build_helm ;;
  all)
    build_deps
    build_pause
    build_k8s
    build_coredns
    build_metrics_server
    build_helm
    ;;
  *) die "usage: build.sh [deps|k8s|coredns|metrics-server|pause|helm|all]" ;;
esac
