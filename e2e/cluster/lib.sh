# Shared settings of the e2e cluster scripts (sourced, not run).
#
# One single-node Kubernetes whose node lives in its own network namespace. Versions
# key the cache of built binaries; addresses and paths are fixed so that `down` can
# find everything `up` made even after a crash.

K8S_VERSION="${K8S_VERSION:-v1.34.4}"
COREDNS_VERSION="${COREDNS_VERSION:-v1.14.7}"
HELM_VERSION="${HELM_VERSION:-v3.17.4}"
METRICS_SERVER_VERSION="${METRICS_SERVER_VERSION:-v0.8.0}"

CACHE_ROOT="${EVENTTERMQ_CACHE:-$HOME/.cache/eventtermq}"
K8S_CACHE="$CACHE_ROOT/k8s-$K8S_VERSION"
K8S_BIN="$K8S_CACHE/bin"                       # kube-* and kubectl
COREDNS_BIN="$K8S_CACHE/coredns-$COREDNS_VERSION/coredns"
PAUSE_DIR="$K8S_CACHE/pause"                  # pause binary and its OCI archive
PAUSE_IMAGE=localhost/pause:e2e
COREDNS_IMAGE="localhost/coredns:$COREDNS_VERSION"
COREDNS_IMAGE_TAR="$K8S_CACHE/coredns-$COREDNS_VERSION/coredns.oci.tar"
HELM="$CACHE_ROOT/bin/helm"                   # built by .ci/helm.sh
# metrics-server (the resource metrics API behind `kubectl top` and CPU autoscaling),
# run as a host process like the control plane.
METRICS_SERVER_BIN="$K8S_CACHE/metrics-server-$METRICS_SERVER_VERSION/metrics-server"

# Where a running cluster keeps its state (configs, certs, etcd data, logs, pids).
STATE="${E2E_STATE:-/var/lib/eventtermq-e2e}"
RUN_DIR=/run/eventtermq-e2e                    # containerd's state (task mounts, sockets)
PIDS="$STATE/pids"
SYSCTL_SAVE="$STATE/sysctls.saved"
LOGS="$STATE/logs"
KUBECONFIG_ADMIN="$STATE/admin.kubeconfig"
CONTAINERD_SOCK="$STATE/containerd/containerd.sock"

# Network: the node namespace and a veth pair. The host end carries the apiserver,
# the node end kubelet; pod and service ranges are routed through the node end.
NETNS=eventtermq-e2e
NETNS_PATH="/run/netns/$NETNS"
VETH_HOST=emqe2e-h
VETH_NODE=emqe2e-n
HOST_IP=10.213.0.1
NODE_IP=10.213.0.2
POD_CIDR=10.214.0.0/16
SERVICE_CIDR=10.215.0.0/16
KUBERNETES_SVC_IP=10.215.0.1
DNS_SVC_IP=10.215.0.10
POD_SUBNET=10.214.0.0/24                      # the node's share of POD_CIDR
NODE_NAME=eventtermq-e2e
# Host-side control plane endpoints other than the apiserver: a loopback address of
# our own, so nothing clashes with other processes on this machine.
ETCD_IP=127.0.0.80
CONTROL_IP=127.0.0.80
# kubelet's cgroup root (in every v1 hierarchy); pods go below $CGROUP_ROOT/kubepods.
CGROUP_ROOT=/eventtermq-e2e
# The in-tree hostPath provisioner's fixed base directory, and the UID that owns the
# volumes it makes (the broker's non-root UID).
HOSTPATH_PV_DIR=/tmp/hostpath_pv
VOLUME_UID=65532
ETCD_CLIENT_PORT=23790
ETCD_PEER_PORT=23800
APISERVER_PORT=6443
# metrics-server listens on the host end of the veth pair (the apiserver reaches it as the
# endpoint of a Service without selector: an endpoint address may not be a loopback one).
METRICS_SERVER_PORT=4443

# Debian packages the node needs (gcc and libc6-dev build the pause binary; python3
# decodes subscribed messages in the scenarios; prometheus (with promtool) and curl
# check the brokers' metrics as Prometheus scrapes them, e2e/prometheus.sh).
APT_PACKAGES=(etcd-server containerd runc containernetworking-plugins iptables conntrack openssl util-linux iproute2 procps gcc libc6-dev python3 prometheus curl)

# The sysctls kubelet may change (saved by up, restored by down).
SAVED_SYSCTLS=(vm.overcommit_memory kernel.panic kernel.panic_on_oops vm.panic_on_oom)

log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

go_env() {
  if ! command -v go >/dev/null 2>&1; then
    [ -x /usr/local/go/bin/go ] && export PATH="/usr/local/go/bin:$PATH"
  fi
  command -v go >/dev/null 2>&1 || die "go is not installed"
}

kubectl_() { "$K8S_BIN/kubectl" --kubeconfig "$KUBECONFIG_ADMIN" "$@"; }

# Process helpers: every long-running process is started detached, its PID kept in
# $PIDS/<name> together with the binary it runs, so down.sh stops exactly these.
start_proc() { # start_proc NAME BINARY [--netns] [--as UID] -- ARGS...
  local name=$1 bin=$2; shift 2
  local prefix=()
  while [ "$1" != "--" ]; do
    case "$1" in
      --netns) prefix+=(nsenter "--net=$NETNS_PATH" --) ;;
      --as) prefix+=(setpriv "--reuid=$2" "--regid=$2" --clear-groups --); shift ;;
    esac
    shift
  done
  shift
  mkdir -p "$PIDS" "$LOGS"
  # setsid --fork: the process leads its own session, so no signal meant for the
  # caller's process group reaches it; the shell records its own PID and execs, and
  # the exec chain (nsenter, setpriv) keeps that PID.
  rm -f "$PIDS/$name.pid"
  PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    setsid --fork sh -c 'echo $$ >"$0"; exec "$@"' "$PIDS/$name.pid" "${prefix[@]}" "$bin" "$@" \
    >>"$LOGS/$name.log" 2>&1 </dev/null
  local i
  for i in $(seq 50); do [ -s "$PIDS/$name.pid" ] && break; sleep 0.05; done
  echo "$(cat "$PIDS/$name.pid") $bin" >"$PIDS/$name"
  rm -f "$PIDS/$name.pid"
}

# proc_alive NAME: the recorded process still runs the recorded binary.
proc_alive() {
  local pid bin
  [ -f "$PIDS/$1" ] || return 1
  read -r pid bin <"$PIDS/$1"
  [ -e "/proc/$pid/exe" ] && [ "$(readlink "/proc/$pid/exe" 2>/dev/null)" = "$(readlink -f "$bin")" ]
}

# wait_for SECONDS WHAT CMD...: retry CMD every 0.2 s.
wait_for() {
  local secs=$1 what=$2; shift 2
  local deadline=$(( $(date +%s) + secs ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || { log "timed out after ${secs}s waiting for $what"; return 1; }
    sleep 0.2
  done
}
