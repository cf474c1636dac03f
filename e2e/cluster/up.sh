#!/usr/bin/env bash
# Brings up a single-node Kubernetes on this machine, idempotently:
#   - a cluster that is already up and healthy is left alone;
#   - anything left over from an earlier or broken run is torn down first (down.sh);
#   - if bring-up fails, everything it made is torn down again.
# The node (containerd, kubelet, kube-proxy, pods) lives in its own network namespace
# without a default route; etcd, kube-apiserver, kube-controller-manager and
# kube-scheduler run on the host, the apiserver on the host end of a veth pair; so does
# metrics-server (the resource metrics API, for `kubectl top` and an HPA on CPU).
# Prints `export KUBECONFIG=...` on success.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/lib.sh"

healthy() {
  [ -f "$STATE/ready" ] || return 1
  local p
  for p in etcd kube-apiserver kube-controller-manager kube-scheduler containerd kubelet kube-proxy metrics-server; do
    proc_alive "$p" || return 1
  done
  kubectl_ get --raw /readyz >/dev/null 2>&1 || return 1
  [ "$(kubectl_ get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ]
}

if healthy; then
  log "cluster already up"
  echo "export KUBECONFIG=$KUBECONFIG_ADMIN"
  exit 0
fi
if [ -e "$STATE" ] || [ -e "$NETNS_PATH" ] || [ -e "$RUN_DIR" ]; then
  log "leftovers of an earlier cluster: tearing them down first"
  bash "$here/down.sh"
fi

bash "$here/build.sh" all

started=$(date +%s)
ok=0
on_exit() {
  if [ "$ok" != 1 ]; then
    log "bring-up failed; last log lines:"
    local f
    for f in "$LOGS"/*.log; do
      [ -f "$f" ] || continue
      echo "--- $(basename "$f")" >&2
      tail -n 15 "$f" >&2
    done
    [ "${E2E_KEEP:-0}" = 1 ] || bash "$here/down.sh"
  fi
}
trap on_exit EXIT
trap 'exit 130' INT TERM

mkdir -p "$STATE" "$PIDS" "$LOGS" "$RUN_DIR"
chmod 0755 "$STATE"

# --- sysctls kubelet changes: keep the values from before the first up -------------
if [ ! -f "$SYSCTL_SAVE" ]; then
  for s in "${SAVED_SYSCTLS[@]}"; do
    echo "$s=$(sysctl -n "$s")"
  done >"$SYSCTL_SAVE.tmp"
  mv "$SYSCTL_SAVE.tmp" "$SYSCTL_SAVE"
fi

# --- certificates (EC P-256: quick to make) ------------------------------------------
pki="$STATE/pki"
mkdir -p "$pki"
newkey=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
openssl req -x509 "${newkey[@]}" -keyout "$pki/ca.key" -out "$pki/ca.crt" -days 3650 \
  -subj "/CN=eventtermq-e2e-ca" 2>/dev/null
# The aggregation layer's own CA: kube-apiserver proxies a request to metrics-server with
# a client certificate of this CA (front-proxy-client) and the user in headers; only
# this CA may vouch for such headers.
openssl req -x509 "${newkey[@]}" -keyout "$pki/front-proxy-ca.key" -out "$pki/front-proxy-ca.crt" -days 3650 \
  -subj "/CN=eventtermq-e2e-front-proxy-ca" 2>/dev/null
# [CA=front-proxy-ca] cert NAME SUBJECT [SAN]: a leaf certificate for both server and
# client use, of the cluster CA (or of CA).
cert() {
  local name=$1 subj=$2 san=${3:-} ca=${CA:-ca}
  openssl req -new "${newkey[@]}" -keyout "$pki/$name.key" -out "$pki/$name.csr" -subj "$subj" 2>/dev/null
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=serverAuth,clientAuth"
    [ -n "$san" ] && echo "subjectAltName=$san"
  } >"$pki/$name.ext"
  openssl x509 -req -in "$pki/$name.csr" -CA "$pki/$ca.crt" -CAkey "$pki/$ca.key" -CAcreateserial \
    -out "$pki/$name.crt" -days 3650 -extfile "$pki/$name.ext" 2>/dev/null
  rm -f "$pki/$name.csr" "$pki/$name.ext"
}
cert apiserver "/CN=kube-apiserver" \
  "DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost,IP:$HOST_IP,IP:$KUBERNETES_SVC_IP,IP:127.0.0.1"
cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
cert admin "/O=system:masters/CN=eventtermq-e2e-admin"
cert kube-controller-manager "/CN=system:kube-controller-manager"
cert kube-scheduler "/CN=system:kube-scheduler"
cert kube-proxy "/CN=system:kube-proxy"
cert kubelet "/O=system:nodes/CN=system:node:$NODE_NAME" "DNS:$NODE_NAME,IP:$NODE_IP"
CA=front-proxy-ca cert front-proxy-client "/CN=front-proxy-client"
# metrics-server: its serving certificate (for the name the aggregator checks, the
# Service's) and its client certificate towards the apiserver and kubelet, in one.
cert metrics-server "/CN=system:metrics-server" "DNS:metrics-server.kube-system.svc,IP:$HOST_IP"
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$pki/sa.key" 2>/dev/null
openssl pkey -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
chmod 0600 "$pki"/*.key

kubeconfig() { # kubeconfig NAME -> $STATE/NAME.kubeconfig with client cert NAME
  local name=$1
  cat >"$STATE/$name.kubeconfig" <<EOC
apiVersion: v1
kind: Config
clusters:
  - name: e2e
    cluster:
      server: https://$HOST_IP:$APISERVER_PORT
      certificate-authority-data: $(base64 -w0 "$pki/ca.crt")
users:
  - name: $name
    user:
      client-certificate-data: $(base64 -w0 "$pki/$name.crt")
      client-key-data: $(base64 -w0 "$pki/$name.key")
contexts:
  - name: e2e
    context: {cluster: e2e, user: $name}
current-context: e2e
EOC
  chmod 0600 "$STATE/$name.kubeconfig"
}
for n in admin kube-controller-manager kube-scheduler kube-proxy kubelet metrics-server; do kubeconfig "$n"; done

# --- network: the node's namespace and the veth pair ---------------------------------
ip netns add "$NETNS"
ip link add "$VETH_HOST" type veth peer name "$VETH_NODE" netns "$NETNS"
ip addr add "$HOST_IP/30" dev "$VETH_HOST"
ip link set "$VETH_HOST" up
innode() { nsenter "--net=$NETNS_PATH" -- "$@"; }
innode ip link set lo up
innode ip addr add "$NODE_IP/30" dev "$VETH_NODE"
innode ip link set "$VETH_NODE" up
# No default route in the node namespace: nothing leaves the machine. The host reaches
# pods and services through the node end.
ip route add "$POD_CIDR" via "$NODE_IP" dev "$VETH_HOST"
ip route add "$SERVICE_CIDR" via "$NODE_IP" dev "$VETH_HOST"
# Per-namespace sysctls (they vanish with the namespace).
innode sysctl -qw net.ipv4.ip_forward=1
innode sysctl -qw net.bridge.bridge-nf-call-iptables=1
innode sysctl -qw net.bridge.bridge-nf-call-ip6tables=1

# --- cgroups: one root of our own in every v1 hierarchy ------------------------------
for h in /sys/fs/cgroup/*/; do
  h=${h%/}
  [ -f "$h/cgroup.procs" ] || continue
  case "$(basename "$h")" in unified) continue ;; esac
  mkdir -p "$h$CGROUP_ROOT"
  if [ -f "$h/cpuset.cpus" ]; then
    cat "$h/cpuset.cpus" >"$h$CGROUP_ROOT/cpuset.cpus"
    cat "$h/cpuset.mems" >"$h$CGROUP_ROOT/cpuset.mems"
  fi
done

# --- etcd -----------------------------------------------------------------------------
mkdir -p "$STATE/etcd"
chmod 0700 "$STATE/etcd"
start_proc etcd /usr/bin/etcd -- \
  --name e2e --data-dir "$STATE/etcd" \
  --listen-client-urls "http://$ETCD_IP:$ETCD_CLIENT_PORT" --advertise-client-urls "http://$ETCD_IP:$ETCD_CLIENT_PORT" \
  --listen-peer-urls "http://$ETCD_IP:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://$ETCD_IP:$ETCD_PEER_PORT" \
  --initial-cluster "e2e=http://$ETCD_IP:$ETCD_PEER_PORT" \
  --logger zap --log-level warn

# --- kube-apiserver -------------------------------------------------------------------
start_proc kube-apiserver "$K8S_BIN/kube-apiserver" -- \
  --etcd-servers "http://$ETCD_IP:$ETCD_CLIENT_PORT" \
  --bind-address "$HOST_IP" --advertise-address "$HOST_IP" --secure-port "$APISERVER_PORT" \
  --service-cluster-ip-range "$SERVICE_CIDR" \
  --client-ca-file "$pki/ca.crt" --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
  --kubelet-client-certificate "$pki/apiserver-kubelet-client.crt" --kubelet-client-key "$pki/apiserver-kubelet-client.key" \
  --kubelet-certificate-authority "$pki/ca.crt" --kubelet-preferred-address-types InternalIP \
  --service-account-issuer https://kubernetes.default.svc.cluster.local \
  --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
  --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction \
  --allow-privileged=true --profiling=false --cert-dir "$STATE/apiserver-certs" \
  --requestheader-client-ca-file "$pki/front-proxy-ca.crt" --requestheader-allowed-names front-proxy-client \
  --requestheader-username-headers X-Remote-User --requestheader-group-headers X-Remote-Group \
  --requestheader-extra-headers-prefix X-Remote-Extra- \
  --proxy-client-cert-file "$pki/front-proxy-client.crt" --proxy-client-key-file "$pki/front-proxy-client.key" \
  --enable-aggregator-routing=true \
  --v 1
wait_for 60 "kube-apiserver /readyz" kubectl_ get --raw /readyz
log "kube-apiserver ready after $(( $(date +%s) - started )) s"

# --- kube-controller-manager (as UID $VOLUME_UID) and kube-scheduler ------------------
# The in-tree hostPath provisioner creates each volume directory with mode 0750 owned
# by the process that runs it, and the hostPath volume ignores fsGroup. Running the
# controller manager as the broker's UID makes every provisioned directory writable
# by a non-root pod running as that UID (it needs no root privileges otherwise).
mkdir -p "$HOSTPATH_PV_DIR" "$STATE/kcm"
chown "$VOLUME_UID:$VOLUME_UID" "$HOSTPATH_PV_DIR" "$STATE/kcm" "$STATE/kube-controller-manager.kubeconfig"
cp "$pki/ca.crt" "$pki/ca.key" "$pki/sa.key" "$STATE/kcm/"
chown "$VOLUME_UID:$VOLUME_UID" "$STATE/kcm"/*
start_proc kube-controller-manager "$K8S_BIN/kube-controller-manager" --as "$VOLUME_UID" -- \
  --kubeconfig "$STATE/kube-controller-manager.kubeconfig" \
  --authentication-kubeconfig "$STATE/kube-controller-manager.kubeconfig" \
  --authorization-kubeconfig "$STATE/kube-controller-manager.kubeconfig" \
  --bind-address "$CONTROL_IP" --cert-dir "$STATE/kcm" \
  --leader-elect=false --use-service-account-credentials=true \
  --service-account-private-key-file "$STATE/kcm/sa.key" --root-ca-file "$STATE/kcm/ca.crt" \
  --cluster-signing-cert-file "$STATE/kcm/ca.crt" --cluster-signing-key-file "$STATE/kcm/ca.key" \
  --allocate-node-cidrs=true --cluster-cidr "$POD_CIDR" --node-cidr-mask-size 24 \
  --service-cluster-ip-range "$SERVICE_CIDR" \
  --enable-hostpath-provisioner=true \
  --horizontal-pod-autoscaler-sync-period 5s \
  --profiling=false --v 1
mkdir -p "$STATE/scheduler"
start_proc kube-scheduler "$K8S_BIN/kube-scheduler" -- \
  --kubeconfig "$STATE/kube-scheduler.kubeconfig" \
  --authentication-kubeconfig "$STATE/kube-scheduler.kubeconfig" \
  --authorization-kubeconfig "$STATE/kube-scheduler.kubeconfig" \
  --bind-address "$CONTROL_IP" --cert-dir "$STATE/scheduler" --leader-elect=false --profiling=false --v 1

# --- containerd (in the node namespace) -----------------------------------------------
mkdir -p "$STATE/containerd/root" "$STATE/cni/net.d" "$STATE/cni/ipam" "$RUN_DIR/containerd"
cat >"$STATE/containerd/config.toml" <<EOC
version = 2
root = "$STATE/containerd/root"
state = "$RUN_DIR/containerd"
# Nothing outside our state directories: no /opt/containerd.
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "$CONTAINERD_SOCK"
[ttrpc]
  address = "$CONTAINERD_SOCK.ttrpc"
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # Lowering oom_score_adj needs CAP_SYS_RESOURCE, which this machine does not give.
  restrict_oom_score_adj = true
  disable_apparmor = true
  # Pod network namespaces under our state directory (not /run/netns).
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$RUN_DIR/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$STATE/cni/net.d"
EOC
cat >"$STATE/cni/net.d/10-e2e.conflist" <<EOC
{
  "cniVersion": "0.4.0",
  "name": "e2e",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "emq0",
      "isGateway": true,
      "ipMasq": true,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$STATE/cni/ipam",
        "ranges": [[{"subnet": "$POD_SUBNET"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOC
start_proc containerd /usr/bin/containerd --netns -- --config "$STATE/containerd/config.toml" --log-level warn
wait_for 30 "containerd" ctr --address "$CONTAINERD_SOCK" version
for img in "$PAUSE_DIR/pause.oci.tar" "$COREDNS_IMAGE_TAR"; do
  ctr --address "$CONTAINERD_SOCK" -n k8s.io images import "$img" >/dev/null
done

# --- kubelet and kube-proxy (in the node namespace) -----------------------------------
mkdir -p "$STATE/kubelet" "$STATE/pod-logs"
cat >"$STATE/resolv.conf" <<EOC
# Pods with dnsPolicy Default (CoreDNS itself): nothing outside the cluster resolves.
nameserver $DNS_SVC_IP
EOC
cat >"$STATE/kubelet-config.yaml" <<EOC
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $pki/ca.crt}
authorization: {mode: Webhook}
tlsCertFile: $pki/kubelet.crt
tlsPrivateKeyFile: $pki/kubelet.key
containerRuntimeEndpoint: unix://$CONTAINERD_SOCK
clusterDomain: cluster.local
clusterDNS: [$DNS_SVC_IP]
resolvConf: $STATE/resolv.conf
# cgroup v1, cgroupfs, our own cgroup root.
cgroupDriver: cgroupfs
cgroupRoot: $CGROUP_ROOT
failCgroupV1: false
failSwapOn: false
# No CAP_SYS_RESOURCE: keep the OOM score and the open-files limit where they are.
oomScoreAdj: 0
maxOpenFiles: $(ulimit -Hn)
podLogsDir: $STATE/pod-logs
volumePluginDir: $STATE/kubelet/volume-plugins
# Imported images are the only copies: never garbage-collect them; no disk evictions.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
# Quick pod status updates for the tests.
syncFrequency: 10s
nodeStatusUpdateFrequency: 5s
EOC
start_proc kubelet "$K8S_BIN/kubelet" --netns -- \
  --config "$STATE/kubelet-config.yaml" --kubeconfig "$STATE/kubelet.kubeconfig" \
  --root-dir "$STATE/kubelet" --cert-dir "$STATE/kubelet/pki" \
  --hostname-override "$NODE_NAME" --node-ip "$NODE_IP" --v 1
cat >"$STATE/kube-proxy-config.yaml" <<EOC
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $STATE/kube-proxy.kubeconfig}
mode: iptables
hostnameOverride: $NODE_NAME
clusterCIDR: $POD_CIDR
bindAddress: $NODE_IP
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
# In a non-initial network namespace: no global conntrack sysctls, no OOM score.
oomScoreAdj: 0
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOC
start_proc kube-proxy "$K8S_BIN/kube-proxy" --netns -- --config "$STATE/kube-proxy-config.yaml" --v 1

node_ready() {
  [ "$(kubectl_ get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ]
}
wait_for 90 "node Ready" node_ready
log "node Ready after $(( $(date +%s) - started )) s"

# --- add-ons: default StorageClass, CoreDNS -----------------------------------------
sed -e "s|@DNS_SVC_IP@|$DNS_SVC_IP|g" -e "s|@COREDNS_IMAGE@|$COREDNS_IMAGE|g" "$here/addons.yaml" |
  kubectl_ apply -f - >/dev/null
wait_for 30 "default ServiceAccount" kubectl_ -n default get serviceaccount default
kubectl_ -n kube-system rollout status deployment/coredns --timeout=90s >/dev/null
log "CoreDNS ready after $(( $(date +%s) - started )) s"

# --- metrics-server (on the host, as UID $VOLUME_UID) -------------------------------
# Registered as the APIService v1beta1.metrics.k8s.io behind a Service without selector
# whose endpoint is its host address (the apiserver routes to the endpoint itself,
# --enable-aggregator-routing). It scrapes kubelet's /metrics/resource every 10 s (its
# shortest resolution), verifying kubelet's serving certificate with the cluster CA.
ms_dir="$STATE/metrics-server"
mkdir -p "$ms_dir"
cp "$pki/ca.crt" "$pki/metrics-server.crt" "$pki/metrics-server.key" "$STATE/metrics-server.kubeconfig" "$ms_dir/"
chown -R "$VOLUME_UID:$VOLUME_UID" "$ms_dir"
sed -e "s|@HOST_IP@|$HOST_IP|g" -e "s|@PORT@|$METRICS_SERVER_PORT|g" -e "s|@CA_BUNDLE@|$(base64 -w0 "$pki/ca.crt")|g" \
  "$here/metrics-server.yaml" | kubectl_ apply -f - >/dev/null 2>"$LOGS/metrics-server-apply.log" ||
  { cat "$LOGS/metrics-server-apply.log" >&2; exit 1; }
start_proc metrics-server "$METRICS_SERVER_BIN" --as "$VOLUME_UID" -- \
  --kubeconfig "$ms_dir/metrics-server.kubeconfig" \
  --authentication-kubeconfig "$ms_dir/metrics-server.kubeconfig" \
  --authorization-kubeconfig "$ms_dir/metrics-server.kubeconfig" \
  --bind-address "$HOST_IP" --secure-port "$METRICS_SERVER_PORT" \
  --tls-cert-file "$ms_dir/metrics-server.crt" --tls-private-key-file "$ms_dir/metrics-server.key" \
  --kubelet-certificate-authority "$ms_dir/ca.crt" --kubelet-preferred-address-types InternalIP \
  --kubelet-use-node-status-port --metric-resolution 10s --kubelet-request-timeout 5s --profiling=false \
  --v 1
apiservice_available() {
  [ "$(kubectl_ get apiservice v1beta1.metrics.k8s.io -o jsonpath='{.status.conditions[?(@.type=="Available")].status}')" = True ]
}
wait_for 60 "APIService v1beta1.metrics.k8s.io Available" apiservice_available
log "metrics-server ready after $(( $(date +%s) - started )) s"

touch "$STATE/ready"
ok=1
log "cluster up in $(( $(date +%s) - started )) s: $("$K8S_BIN/kubectl" version --kubeconfig "$KUBECONFIG_ADMIN" 2>/dev/null | tr '\n' ' ')"
echo "export KUBECONFIG=$KUBECONFIG_ADMIN"
