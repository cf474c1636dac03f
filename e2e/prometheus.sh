# A real Prometheus for the e2e scenarios (sourced by e2e/run.sh after e2e/cluster/lib.sh).
#
# Debian's `prometheus` package (installed by e2e/cluster/build.sh with the cluster's
# other packages, its service never started), run on the host as one of the cluster's
# processes (start_proc: e2e/cluster/down.sh stops it), scraping pod IPs directly (the
# host reaches them through the node's veth). It loads the alert rules of the chart's
# PrometheusRule.
#
# Discovery: Debian builds Prometheus without its Kubernetes service discovery
# (`kubernetes_sd_configs` is refused as an unknown field), so the harness does what
# `kubernetes_sd_configs` role pod plus the usual annotation relabelling would (README,
# "On Kubernetes"): it lists the pods, keeps the running ones annotated
# `prometheus.io/scrape: "true"`, targets `<pod IP>:<prometheus.io/port>` at
# `prometheus.io/path`, labels them kubernetes_namespace, pod, eventtermq_cluster (the
# pod's app.kubernetes.io/instance) and component, and hands them to Prometheus as a
# file_sd file, rewritten on every prometheus_discover. So what is checked is what the
# operator and the chart advertise, read from the API server, and a real Prometheus
# scraping it; only the listing is not Prometheus' own.

PROMETHEUS_BIN="${PROMETHEUS_BIN:-/usr/bin/prometheus}"
PROMTOOL_BIN="${PROMTOOL_BIN:-/usr/bin/promtool}"
# The e2e cluster's own loopback address (lib.sh's CONTROL_IP), a port of its own.
PROMETHEUS_ADDRESS="${E2E_PROMETHEUS_ADDRESS:-$CONTROL_IP:29090}"
PROMETHEUS_URL="http://$PROMETHEUS_ADDRESS"
PROMETHEUS_DIR="$STATE/prometheus"
# Short intervals keep the scenarios short; rate() windows in the checks are at
# least four of them.
PROMETHEUS_SCRAPE_INTERVAL=5s

# prometheus_rules CHART OUT: the rule groups of the chart's PrometheusRule, as a
# Prometheus rules file (helm template of the one template; its spec is the file).
prometheus_rules() {
  "$HELM" template eventtermq "$1" --kube-version 1.30.0 --set monitoring.prometheusRule.enabled=true \
    --show-only templates/prometheusrule.yaml | sed -n '/^spec:$/,$p' | sed '1d; s/^  //' >"$2"
  grep -q '^groups:' "$2"
}

# prometheus_start CHART: writes the config and rules, checks both with promtool and
# starts Prometheus; returns once it is ready.
prometheus_start() {
  # Called in an `if`, where errexit is off: every step returns on failure.
  mkdir -p "$PROMETHEUS_DIR/data" || return 1
  prometheus_rules "$1" "$PROMETHEUS_DIR/rules.yaml" || { echo "no rules rendered from $1" >&2; return 1; }
  prometheus_discover || { echo "cannot list the pods for the scrape targets" >&2; return 1; }
  cat >"$PROMETHEUS_DIR/prometheus.yml" <<YAML
global:
  scrape_interval: $PROMETHEUS_SCRAPE_INTERVAL
  scrape_timeout: 4s
  evaluation_interval: $PROMETHEUS_SCRAPE_INTERVAL
rule_files:
  - $PROMETHEUS_DIR/rules.yaml
scrape_configs:
  - job_name: kubernetes-pods
    # The brokers' own namespace label (a topic's or group's) wins over any target label.
    honor_labels: true
    file_sd_configs:
      - files: [$PROMETHEUS_DIR/targets.json]
        refresh_interval: 5s
YAML
  "$PROMTOOL_BIN" check config "$PROMETHEUS_DIR/prometheus.yml" >&2 || return 1
  "$PROMTOOL_BIN" check rules "$PROMETHEUS_DIR/rules.yaml" >&2 || return 1
  start_proc prometheus "$PROMETHEUS_BIN" -- \
    --config.file="$PROMETHEUS_DIR/prometheus.yml" --storage.tsdb.path="$PROMETHEUS_DIR/data" \
    --web.listen-address="$PROMETHEUS_ADDRESS" --storage.tsdb.retention.time=1d || return 1
  wait_for 60 "Prometheus ready on $PROMETHEUS_ADDRESS" curl -sf "$PROMETHEUS_URL/-/ready"
}

# prometheus_discover: (re)writes the file_sd targets from the pods' annotations (see
# the header). Prometheus notices the new file by itself.
prometheus_discover() {
  kubectl_ get pods --all-namespaces -o json | python3 -c '
import json, sys
targets = []
for pod in json.load(sys.stdin)["items"]:
    meta, status = pod["metadata"], pod.get("status", {})
    annotations, labels = meta.get("annotations") or {}, meta.get("labels") or {}
    port = annotations.get("prometheus.io/port", "")
    if annotations.get("prometheus.io/scrape") != "true" or not port.isdigit():
        continue
    if status.get("phase") != "Running" or not status.get("podIP"):
        continue
    target_labels = {
        "__metrics_path__": annotations.get("prometheus.io/path") or "/metrics",
        "kubernetes_namespace": meta["namespace"],
        "pod": meta["name"],
    }
    for label, name in (("app.kubernetes.io/instance", "eventtermq_cluster"), ("app.kubernetes.io/component", "component")):
        if labels.get(label):
            target_labels[name] = labels[label]
    targets.append({"targets": ["%s:%s" % (status["podIP"], port)], "labels": target_labels})
json.dump(targets, sys.stdout, indent=1)' >"$PROMETHEUS_DIR/targets.json.new" &&
    mv "$PROMETHEUS_DIR/targets.json.new" "$PROMETHEUS_DIR/targets.json"
}

# prom_query EXPR: the JSON answer of an instant query (exit status 1 on an HTTP error).
prom_query() {
  curl -sf --max-time 10 "$PROMETHEUS_URL/api/v1/query" --data-urlencode "query=$1"
}

# prom_value EXPR: the value of the query's single sample ("" when there is none; fails
# when the query fails or returns more than one series).
prom_value() {
  prom_query "$1" | python3 -c '
import json, sys
answer = json.load(sys.stdin)
if answer.get("status") != "success":
    sys.exit("query failed: %s" % answer)
result = answer["data"]["result"]
if answer["data"]["resultType"] == "scalar":
    print(result[1]); sys.exit()
if len(result) > 1:
    sys.exit("%d series: %s" % (len(result), result))
print(result[0]["value"][1] if result else "")'
}
