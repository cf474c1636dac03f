#!/usr/bin/env bash
# Lints and renders the Helm chart charts/eventtermq, with and without the optional
# EventterCluster, and checks that the rendered output holds the expected objects.
# helm is built from its Go module (nothing prebuilt can be downloaded) into
# $HOME/.cache/eventtermq/bin when missing; the Go module cache lives under $HOME too.
set -euo pipefail
cd "$(dirname "$0")/.."

HELM_VERSION="${HELM_VERSION:-v3.17.4}"
BIN_DIR="$HOME/.cache/eventtermq/bin"
HELM="$BIN_DIR/helm"
CHART=charts/eventtermq
# helm built with `go install` lacks the release ldflags and assumes Kubernetes v1.20;
# the chart needs >= 1.30 (CEL validation rules in the CRDs, the pods' preStop sleep).
KUBE_VERSION="${KUBE_VERSION:-1.30.0}"

if [ ! -x "$HELM" ]; then
  if ! command -v go >/dev/null 2>&1; then
    [ -x /usr/local/go/bin/go ] && export PATH="/usr/local/go/bin:$PATH"
  fi
  echo "== building helm $HELM_VERSION from the Go module proxy"
  mkdir -p "$BIN_DIR"
  start=$(date +%s)
  GOBIN="$BIN_DIR" GOFLAGS="-mod=mod -buildvcs=false" go install "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  echo "== helm build took $(( $(date +%s) - start )) s"
fi
echo "== $("$HELM" version) (built from $HELM_VERSION)"

# Helm keeps no state of its own here.
export HELM_CACHE_HOME="${HELM_CACHE_HOME:-$HOME/.cache/eventtermq/helm/cache}"
export HELM_CONFIG_HOME="${HELM_CONFIG_HOME:-$HOME/.cache/eventtermq/helm/config}"
export HELM_DATA_HOME="${HELM_DATA_HOME:-$HOME/.cache/eventtermq/helm/data}"

fail() {
  echo "FAIL: $*" >&2
  exit 1
}

# expect FILE KIND [NAME]: the rendered output holds an object of this kind (and name).
expect() {
  local file=$1 kind=$2 name=${3:-}
  grep -q "^kind: $kind\$" "$file" || fail "$file: no $kind rendered"
  if [ -n "$name" ]; then
    grep -A3 "^kind: $kind\$" "$file" | grep -q "^  name: $name\$" || fail "$file: no $kind named $name"
  fi
  echo "ok: $kind${name:+ $name}"
}

echo "== helm lint (defaults)"
"$HELM" lint --strict "$CHART"
echo "== helm lint (cluster.enabled=true)"
"$HELM" lint --strict "$CHART" --set cluster.enabled=true

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

echo "== helm template (defaults)"
"$HELM" template eventtermq "$CHART" --kube-version "$KUBE_VERSION" --namespace eventter --include-crds >"$out/default.yaml"
for kind in Deployment ServiceAccount ClusterRole ClusterRoleBinding; do
  expect "$out/default.yaml" "$kind"
done
expect "$out/default.yaml" CustomResourceDefinition eventterclusters.eventter.io
expect "$out/default.yaml" CustomResourceDefinition topics.eventter.io
expect "$out/default.yaml" CustomResourceDefinition consumergroups.eventter.io
expect "$out/default.yaml" CustomResourceDefinition users.eventter.io
if grep -q '^kind: EventterCluster$' "$out/default.yaml"; then
  fail "an EventterCluster rendered although cluster.enabled is false"
fi

echo "== helm template (cluster.enabled=true, replicaCount=2)"
"$HELM" template eventtermq "$CHART" --kube-version "$KUBE_VERSION" --namespace eventter --set cluster.enabled=true \
  --set operator.replicaCount=2 >"$out/cluster.yaml"
for kind in Deployment ServiceAccount ClusterRole ClusterRoleBinding EventterCluster Role RoleBinding; do
  expect "$out/cluster.yaml" "$kind"
done
grep -q -- '--no-leader-election' "$out/cluster.yaml" && fail "leader election off with 2 replicas"
grep -q -- '--no-leader-election' "$out/default.yaml" || fail "leader election on with 1 replica"
echo "ok: leader election only with more than one replica"

echo "== helm template (monitoring)"
# Defaults: the operator's metrics Service and the dashboard ConfigMap, no Prometheus
# Operator objects (their CRDs may not exist).
for kind in ServiceMonitor PodMonitor PrometheusRule; do
  grep -q "^kind: $kind\$" "$out/default.yaml" && fail "$kind rendered by default"
done
expect "$out/default.yaml" Service eventtermq-operator
expect "$out/default.yaml" ConfigMap eventtermq-dashboard
grep -A12 '^kind: ConfigMap$' "$out/default.yaml" | grep -q 'grafana_dashboard: "1"' || fail "dashboard ConfigMap not labelled grafana_dashboard: \"1\""
grep -q 'prometheus.io/scrape: "true"' "$out/default.yaml" || fail "operator pods not annotated for scraping"
python3 -m json.tool charts/eventtermq/dashboards/eventtermq.json >/dev/null || fail "dashboards/eventtermq.json is not JSON"
echo "ok: dashboard ConfigMap, operator metrics Service and scrape annotations"
"$HELM" template eventtermq "$CHART" --kube-version "$KUBE_VERSION" --namespace eventter \
  --set monitoring.serviceMonitor.enabled=true --set monitoring.podMonitor.enabled=true \
  --set monitoring.prometheusRule.enabled=true >"$out/monitoring.yaml"
expect "$out/monitoring.yaml" ServiceMonitor eventtermq-brokers
expect "$out/monitoring.yaml" ServiceMonitor eventtermq-operator
expect "$out/monitoring.yaml" PodMonitor eventtermq-brokers
expect "$out/monitoring.yaml" PrometheusRule eventtermq
# "auto": only where the cluster serves monitoring.coreos.com/v1.
auto=(--set monitoring.serviceMonitor.enabled=auto --set monitoring.podMonitor.enabled=auto --set monitoring.prometheusRule.enabled=auto)
"$HELM" template eventtermq "$CHART" --kube-version "$KUBE_VERSION" "${auto[@]}" >"$out/auto-without.yaml"
grep -qE '^kind: (ServiceMonitor|PodMonitor|PrometheusRule)$' "$out/auto-without.yaml" && fail "auto rendered a monitor without the API"
"$HELM" template eventtermq "$CHART" --kube-version "$KUBE_VERSION" "${auto[@]}" \
  --api-versions monitoring.coreos.com/v1 >"$out/auto-with.yaml"
for kind in ServiceMonitor PodMonitor PrometheusRule; do expect "$out/auto-with.yaml" "$kind"; done
echo "ok: enabled=auto follows monitoring.coreos.com/v1"
# The PrometheusRule's spec is a Prometheus rules file: promtool checks it.
"$HELM" template eventtermq "$CHART" --kube-version "$KUBE_VERSION" --set monitoring.prometheusRule.enabled=true \
  --show-only templates/prometheusrule.yaml | sed -n '/^spec:$/,$p' | sed '1d; s/^  //' >"$out/rules.yaml"
if command -v promtool >/dev/null 2>&1; then
  promtool check rules "$out/rules.yaml" || fail "promtool check rules failed on the PrometheusRule"
else
  fail "promtool is missing (Debian package prometheus; .ci/run installs it)"
fi

echo "== helm template (networkPolicy)"
grep -q '^kind: NetworkPolicy$' "$out/default.yaml" && fail "a NetworkPolicy rendered although networkPolicy.enabled is false"
"$HELM" template eventtermq "$CHART" --kube-version "$KUBE_VERSION" --namespace eventter \
  --set networkPolicy.enabled=true --set networkPolicy.clusterName=emq \
  --set-json 'networkPolicy.clients.from=[{"namespaceSelector":{"matchLabels":{"team":"shop"}}}]' \
  --set-json 'networkPolicy.metrics.from=[{"namespaceSelector":{"matchLabels":{"kubernetes.io/metadata.name":"monitoring"}}}]' \
  --show-only templates/networkpolicy.yaml >"$out/netpol.yaml"
expect "$out/netpol.yaml" NetworkPolicy eventtermq-brokers
python3 - "$out/netpol.yaml" <<'PY' || fail "the NetworkPolicy does not limit the broker ports as documented"
import sys, yaml
policy = yaml.safe_load(open(sys.argv[1]))
spec = policy["spec"]
brokers = {"app.kubernetes.io/name": "eventtermq", "app.kubernetes.io/managed-by": "eventter-operator",
           "app.kubernetes.io/instance": "emq"}
assert spec["podSelector"]["matchLabels"] == brokers, spec["podSelector"]
assert spec["policyTypes"] == ["Ingress"]
rules = spec["ingress"]
ports = lambda rule: sorted((p["protocol"], p["port"]) for p in rule["ports"])
# Node-to-node (gossip on UDP included) only from broker pods.
assert rules[0]["from"] == [{"podSelector": {"matchLabels": brokers}}], rules[0]
assert ("UDP", 16000) in ports(rules[0])
assert not any(("UDP", 16000) in ports(r) for r in rules[1:]), "gossip open to others"
# The operator: gRPC only.
assert rules[1]["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "operator"
assert ports(rules[1]) == [("TCP", 16000)]
# Clients: gRPC and AMQP from the selected namespaces; metrics from the monitoring one.
assert rules[2]["from"] == [{"namespaceSelector": {"matchLabels": {"team": "shop"}}}], rules[2]
assert ports(rules[2]) == [("TCP", 16000), ("TCP", 16001)]
assert ports(rules[3]) == [("TCP", 16002)] and "monitoring" in str(rules[3]["from"])
assert len(rules) == 4
PY
# Without clients and metrics peers: brokers and the operator only.
"$HELM" template eventtermq "$CHART" --kube-version "$KUBE_VERSION" --set networkPolicy.enabled=true \
  --show-only templates/networkpolicy.yaml | grep -c 'from:' | grep -qx 2 || fail "NetworkPolicy without peers opens more"
if "$HELM" template eventtermq "$CHART" --kube-version "$KUBE_VERSION" --set networkPolicy.enabled=true \
  --set-json 'networkPolicy.clients.from=[{"namespace":"x"}]' >/dev/null 2>&1; then
  fail "networkPolicy.clients.from with an unknown peer field accepted"
fi
echo "ok: networkPolicy off by default; brokers-only node-to-node, clients and metrics from the selected peers"

echo "== the operator pod runs non-root, read-only, without capabilities"
python3 - "$out/default.yaml" <<'PY' || fail "the operator Deployment lost its locked-down security context"
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
deployment = next(d for d in docs if d["kind"] == "Deployment")
pod = deployment["spec"]["template"]["spec"]
assert pod["securityContext"]["runAsNonRoot"] is True
for c in pod["containers"] + pod.get("initContainers", []):
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True, c["name"]
    assert sc["allowPrivilegeEscalation"] is False, c["name"]
    assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), c["name"]
# The operator renews certificates in place: patch on Secrets, nothing broader.
role = next(d for d in docs if d["kind"] == "ClusterRole")
secrets = next(r for r in role["rules"] if "secrets" in r["resources"])
assert sorted(secrets["verbs"]) == ["create", "get", "list", "patch", "watch"], secrets["verbs"]
PY
echo "ok: operator pod locked down; Secrets: get, create, patch, list, watch"

echo "== helm template rejects invalid values (values.schema.json)"
if "$HELM" template eventtermq "$CHART" --kube-version "$KUBE_VERSION" --set operator.replicaCount=-1 >/dev/null 2>&1; then
  fail "operator.replicaCount=-1 accepted"
fi
if "$HELM" template eventtermq "$CHART" --kube-version "$KUBE_VERSION" --set operator.image.pullPolicy=Sometimes >/dev/null 2>&1; then
  fail "operator.image.pullPolicy=Sometimes accepted"
fi
if "$HELM" template eventtermq "$CHART" --kube-version "$KUBE_VERSION" --set monitoring.podMonitor.enabled=sometimes >/dev/null 2>&1; then
  fail "monitoring.podMonitor.enabled=sometimes accepted"
fi
echo "ok: invalid values rejected"
echo "== helm chart ok"
