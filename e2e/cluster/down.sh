#!/usr/bin/env bash
# Tears the e2e cluster down completely, also after a failed or interrupted bring-up,
# and is safe to run when nothing is up. It removes only what up.sh makes:
#   processes by recorded PID (plus whatever runs in the node's network namespace or
#   in our cgroup root, which only the cluster uses), mounts under our state
#   directories, the node's network namespace (with its iptables rules and the veth
#   pair), our cgroup root in every hierarchy, the hostPath volumes, and the sysctls
#   kubelet changed (restored to the values saved before the first bring-up).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/lib.sh"

started=$(date +%s)

# gone PID: the process has exited (a zombie waiting for init to reap it counts).
gone() {
  local state
  state=$(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null) || return 0
  [ -z "$state" ] || [ "$state" = Z ]
}

# stop_procs SECONDS NAME...: SIGTERM to all, SIGKILL to those still running after SECONDS.
stop_procs() {
  local secs=$1 name pid bin i t pids=()
  shift
  t=$(date +%s.%N)
  for name in "$@"; do
    if proc_alive "$name"; then
      read -r pid bin <"$PIDS/$name"
      kill -TERM "$pid" 2>/dev/null
      pids+=("$pid")
    fi
    rm -f "$PIDS/$name"
  done
  [ "${#pids[@]}" -gt 0 ] || return 0
  local running
  for i in $(seq $(( secs * 10 ))); do
    running=0
    for pid in "${pids[@]}"; do gone "$pid" || { running=1; break; }; done
    [ "$running" = 1 ] || break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do gone "$pid" || kill -KILL "$pid" 2>/dev/null; done
  [ -z "${E2E_DEBUG:-}" ] || log "stopped $* in $(awk -v a="$t" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }') s"
}

# Processes in our cgroup root (pods' containers and sandboxes), from every hierarchy.
cgroup_pids() {
  local h
  for h in /sys/fs/cgroup/*/; do
    [ -d "${h%/}$CGROUP_ROOT" ] || continue
    find "${h%/}$CGROUP_ROOT" -name cgroup.procs -exec cat {} + 2>/dev/null
  done | sort -u
}

# Processes in the node's network namespace (containerd, its shims, kubelet, kube-proxy).
netns_pids() {
  [ -e "$NETNS_PATH" ] && ip netns pids "$NETNS" 2>/dev/null
}

kill_all() { # kill_all WHAT FUNCTION: SIGKILL what FUNCTION lists until nothing is left
  local what=$1 fn=$2 i pids
  for i in $(seq 50); do
    pids=$($fn)
    [ -n "$pids" ] || return 0
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null
    sleep 0.1
  done
  log "warning: $what still running: $($fn | tr '\n' ' ')"
}

# 0. The scenarios' Prometheus (e2e/prometheus.sh), which watches the API server.
stop_procs 5 prometheus
# 1. The node: kubelet first (so nothing restarts), then the pods, then containerd.
stop_procs 5 kubelet kube-proxy kube-scheduler kube-controller-manager metrics-server
kill_all "pod processes" cgroup_pids
stop_procs 5 containerd
# containerd's shims outlive it; they run in the node's network namespace.
shim_sockets=$(cat "$RUN_DIR"/containerd/io.containerd.runtime.v2.task/*/*/address 2>/dev/null |
  sed -n 's|^unix://||p')
kill_all "processes in the node namespace" netns_pids
for s in $shim_sockets; do rm -f "$s"; done

# 2. The rest of the control plane.
stop_procs 10 kube-apiserver etcd

# 3. Mounts under our directories (container root filesystems, shm, pod network
# namespaces, kubelet's volumes), deepest first; lazily if busy.
our_mounts() {
  awk '{ print $5 }' /proc/self/mountinfo |
    grep -E "^($STATE|$RUN_DIR|$HOSTPATH_PV_DIR)(/|$)" | awk '{ print length, $0 }' | sort -rn | cut -d' ' -f2-
}
for i in 1 2 3; do
  m=$(our_mounts)
  [ -n "$m" ] || break
  while read -r mp; do
    umount "$mp" 2>/dev/null || umount -l "$mp" 2>/dev/null
  done <<<"$m"
done
[ -z "$(our_mounts)" ] || log "warning: mounts left: $(our_mounts | tr '\n' ' ')"

# 4. The network namespace (veth pair, bridge, iptables rules and routes go with it).
if [ -e "$NETNS_PATH" ]; then
  ip netns del "$NETNS" || log "warning: could not delete network namespace $NETNS"
fi
ip link show "$VETH_HOST" >/dev/null 2>&1 && ip link del "$VETH_HOST" 2>/dev/null

# 5. Our cgroup root in every hierarchy (kubelet made kubepods/... below it).
for h in /sys/fs/cgroup/*/; do
  d="${h%/}$CGROUP_ROOT"
  [ -d "$d" ] || continue
  for i in $(seq 20); do
    find "$d" -depth -type d -exec rmdir {} + 2>/dev/null
    [ -d "$d" ] || break
    sleep 0.1
  done
  [ -d "$d" ] && log "warning: cgroup $d left"
done

# 6. Sysctls kubelet changed.
if [ -f "$SYSCTL_SAVE" ]; then
  while IFS='=' read -r key value; do
    [ -n "$key" ] && sysctl -qw "$key=$value"
  done <"$SYSCTL_SAVE"
fi

# 7. Files: state, hostPath volumes, kubelet's legacy log symlinks into our state.
if [ -d /var/log/containers ]; then
  find /var/log/containers -maxdepth 1 -type l -lname "$STATE/*" -delete 2>/dev/null
fi
rm -rf "$RUN_DIR" "$HOSTPATH_PV_DIR"
# Directories containerd's shims and kubelet create at fixed paths, if nothing else uses them.
rmdir /run/containerd/s /run/containerd /var/log/containers 2>/dev/null
if [ -z "$(our_mounts)" ]; then
  rm -rf "$STATE"
else
  log "warning: $STATE kept (mounts left)"
fi
log "cluster down in $(( $(date +%s) - started )) s"
