# A real Prometheus for the e2e scenarios (sourced by e2e/run.sh after e2e/cluster/lib.sh).
#
# Debian's `prometheus` package (installed by e2e/cluster/build.sh with the cluster's
# other packages, its service never started), run on the host as one of the cluster's
# processes (start_proc: e2e/cluster/down.sh stops it). It discovers the pods through
# the API server (kubernetes_sd_configs, role pod, the admin kubeconfig) and keeps
# those annotated `prometheus.io/scrape: "true"`, scraping `prometheus.io/port` and
# `prometheus.io/path`: exactly what the operator puts on the broker pods and the chart
# on the operator pod, with the relabelling the chart's Pod/ServiceMonitor use
# (kubernetes_namespace, pod, eventtermq_cluster). The host reaches pod IPs through the
# node's veth. It loads the alert rules of the chart's PrometheusRule.

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
    kubernetes_sd_configs:
      - role: pod
        kubeconfig_file: $KUBECONFIG_ADMIN
    relabel_configs:
      - source_labels: [__meta_kubernetes_pod_annotation_prometheus_io_scrape]
        action: keep
        regex: "true"
      - source_labels: [__meta_kubernetes_pod_phase]
        action: drop
        regex: Succeeded|Failed
      - source_labels: [__meta_kubernetes_pod_annotation_prometheus_io_path]
        action: replace
        regex: (.+)
        target_label: __metrics_path__
      - source_labels: [__address__, __meta_kubernetes_pod_annotation_prometheus_io_port]
        action: replace
        regex: ([^:]+)(?::\d+)?;(\d+)
        replacement: \$1:\$2
        target_label: __address__
      - source_labels: [__meta_kubernetes_namespace]
        target_label: kubernetes_namespace
      - source_labels: [__meta_kubernetes_pod_name]
        target_label: pod
      - source_labels: [__meta_kubernetes_pod_label_app_kubernetes_io_instance]
        target_label: eventtermq_cluster
      - source_labels: [__meta_kubernetes_pod_label_app_kubernetes_io_component]
        target_label: component
YAML
  "$PROMTOOL_BIN" check config "$PROMETHEUS_DIR/prometheus.yml" >&2 || return 1
  "$PROMTOOL_BIN" check rules "$PROMETHEUS_DIR/rules.yaml" >&2 || return 1
  start_proc prometheus "$PROMETHEUS_BIN" -- \
    --config.file="$PROMETHEUS_DIR/prometheus.yml" --storage.tsdb.path="$PROMETHEUS_DIR/data" \
    --web.listen-address="$PROMETHEUS_ADDRESS" --storage.tsdb.retention.time=1d || return 1
  wait_for 60 "Prometheus ready on $PROMETHEUS_ADDRESS" curl -sf "$PROMETHEUS_URL/-/ready"
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
