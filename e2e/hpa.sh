# Autoscaling end to end (issue 19 item 6), sourced by e2e/scenarios.sh: a
# HorizontalPodAutoscaler (autoscaling/v2, examples/hpa.yaml with the values below) on
# the brokers' CPU, through metrics-server (e2e/cluster/up.sh) and the EventterCluster's
# scale subresource, under the running load of e2e/load.sh.

HPA_NAME=emq                    # metadata.name in examples/hpa.yaml
HPA_MAX_REPLICAS=4
# Of the broker container's CPU request (50m in examples/eventtercluster.yaml). Measured
# here: 11-13m a broker idle (22-26 %), 52-75m under the load of load-start (104-150 %),
# so the load crosses it and the HPA scales 3 -> 4.
HPA_CPU_TARGET_PERCENT=60
# The target raised for the way back: no broker comes near it, so the HPA scales 4 -> 3.
HPA_CPU_HIGH_TARGET_PERCENT=1000

# hpa_manifest TARGET_PERCENT SCALE_DOWN_WINDOW_S: examples/hpa.yaml with the test's
# target, maxReplicas and windows (scale-up at once, 1 pod per 15 s).
hpa_manifest() {
  kubectl_ -n "$NS" create --dry-run=client -o json -f "$root/examples/hpa.yaml" | python3 -c '
import json, sys
hpa = json.load(sys.stdin)
target, window, max_replicas = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
spec = hpa["spec"]
assert spec["scaleTargetRef"]["kind"] == "EventterCluster" and spec["minReplicas"] == 3, spec
spec["maxReplicas"] = max_replicas
spec["metrics"][0]["resource"]["target"]["averageUtilization"] = target
spec["behavior"]["scaleUp"] = {"stabilizationWindowSeconds": 0, "policies": [{"type": "Pods", "value": 1, "periodSeconds": 15}]}
spec["behavior"]["scaleDown"] = {"stabilizationWindowSeconds": window, "policies": [{"type": "Pods", "value": 1, "periodSeconds": 15}]}
print(json.dumps(hpa))' "$1" "$2" "$HPA_MAX_REPLICAS"
}

# top_shows N: `kubectl top pods` lists N broker pods with their CPU (saved to $E2E_TMP/top).
top_shows() {
  k top pods -l "app.kubernetes.io/instance=$CLUSTER" --no-headers >"$E2E_TMP/top" 2>&1 &&
    [ "$(awk '$2 ~ /^[0-9]+m$/' "$E2E_TMP/top" | wc -l)" = "$1" ]
}
top_line() { awk '{ printf "%s %s %s; ", $1, $2, $3 }' "$E2E_TMP/top"; }
spec_replicas_is() { [ "$(k get eventtercluster "$CLUSTER" -o jsonpath='{.spec.replicas}')" = "$1" ]; }
hpa_line() {
  k get hpa "$HPA_NAME" -o jsonpath='cpu {.status.currentMetrics[0].resource.current.averageUtilization}% of requests (target {.spec.metrics[0].resource.target.averageUtilization}%), replicas {.status.currentReplicas} -> {.status.desiredReplicas}'
}
# The HPA's rescale events, oldest first.
hpa_rescales() {
  k get events --field-selector "involvedObject.kind=HorizontalPodAutoscaler,involvedObject.name=$HPA_NAME,reason=SuccessfulRescale" \
    --sort-by=.lastTimestamp -o jsonpath='{range .items[*]}{.message}{"\n"}{end}'
}
# removed_gone POD: every remaining broker's dump shows 3 ALIVE nodes, and POD's node
# gone or LEFT: a drained broker is removed from the cluster state once stopped, while a
# pod removed without the drain would leave its node SUSPECT, then DEAD (the view is
# saved to $E2E_TMP/view).
removed_gone() {
  local i nodes
  for i in 0 1 2; do
    nodes=$(dump "$CLUSTER-$i" | dump_nodes) || return 1
    echo "$CLUSTER-$i sees $(awk '{ split($2, h, "."); printf "%s=%s ", h[1], $3 }' <<<"$nodes")" >"$E2E_TMP/view"
    [ "$(awk '$3 == "ALIVE"' <<<"$nodes" | wc -l)" = 3 ] || return 1
    if grep -qE "^[0-9]+ $1\\..* (ALIVE|SUSPECT|DEAD)\$" <<<"$nodes"; then return 1; fi
  done
}
# decommissioned_since ISO_TIME: the operator published a Decommissioning event for the
# EventterCluster at or after ISO_TIME (it decommissions the leaving brokers before it
# lowers the StatefulSet). The event recorder folds events of one reason into a series
# (count, lastObservedTime) that keeps its first note, so the note may name an earlier
# scale-down's brokers; which broker drained shows in the progress line and the dumps.
decommissioned_since() {
  k get events.events.k8s.io -o json | python3 -c '
import json, sys
cluster, since = sys.argv[1], sys.argv[2][:19]
for e in json.load(sys.stdin)["items"]:
    regarding = e.get("regarding", {})
    if e.get("reason") != "Decommissioning" or regarding.get("kind") != "EventterCluster" or regarding.get("name") != cluster:
        continue
    series = e.get("series") or {}
    seen = series.get("lastObservedTime") or e.get("eventTime") or ""
    if seen[:19] >= since:
        print("Decommissioning event at %s (%d so far)" % (seen[:19], series.get("count", 1)))
        sys.exit(0)
sys.exit(1)' "$CLUSTER" "$1"
}

scenario_hpa_scale() {
  load_require
  broker_logs_follow 4
  local from started down_started progress="" line new_pod="$CLUSTER-3"
  from=$(now_ms)
  sleep "$LOAD_PHASE_S"
  # The resource metrics API (metrics-server) sees the brokers under load.
  until_ok 90 "kubectl top pods to show the CPU of 3 broker pods" top_shows 3
  note "kubectl top pods under load: $(top_line)"
  k delete hpa "$HPA_NAME" --ignore-not-found >/dev/null
  started=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  # Up: a target the load crosses; no scale-down meanwhile (a 600 s window).
  hpa_manifest "$HPA_CPU_TARGET_PERCENT" 600 | k apply -f - >/dev/null
  until_ok 120 "the HPA to set EventterCluster $CLUSTER's spec.replicas to $HPA_MAX_REPLICAS" spec_replicas_is "$HPA_MAX_REPLICAS"
  note "HPA scaled up after $(( $(date +%s) - $(date -d "$started" +%s) )) s: $(hpa_line)"
  wait_settled "$HPA_MAX_REPLICAS" 300
  note "$HPA_MAX_REPLICAS ALIVE: $(dump "$CLUSTER-0" | dump_nodes | awk '{ split($2, h, "."); printf "%s ", h[1] }')"
  # The new broker gets work: the HPA only adds it; `rebalance` (as after any scale-up)
  # moves open segments and groups onto it.
  line=$(k exec "$CLUSTER-0" -c broker -- eventtermq rebalance) || fail "rebalance failed: $line"
  note "rebalance: $line"
  until_ok_showing 60 "$new_pod to get load after rebalance (pod primaries replicas groups)" "$E2E_TMP/loads" \
    new_nodes_loaded "$new_pod"
  note "load per broker (primaries replicas groups): $(tr '\n' ';' <"$E2E_TMP/loads")"
  # Down: a target nobody reaches, the scale-down window dropped: the HPA lowers
  # spec.replicas and the operator decommissions $new_pod before removing its pod.
  down_started=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  hpa_manifest "$HPA_CPU_HIGH_TARGET_PERCENT" 0 | k apply -f - >/dev/null
  until_ok 120 "the HPA to set EventterCluster $CLUSTER's spec.replicas to 3" spec_replicas_is 3
  note "HPA scaled down after $(( $(date +%s) - $(date -d "$down_started" +%s) )) s: $(hpa_line)"
  scale_down_wait 3
  progress=$SCALE_DOWN_PROGRESS
  [ -z "$progress" ] || grep -q "$new_pod" <<<"$progress" || fail "the scale-down drained another broker than $new_pod: $progress"
  line=$(decommissioned_since "$down_started") ||
    fail "no Decommissioning event since $down_started: the pod went without the operator's drain"
  note "operator: $line"
  until_ok 60 "3 broker pods Ready" pods_ready 3
  until_ok_showing 180 "3 ALIVE nodes with $new_pod's gone or LEFT" "$E2E_TMP/view" removed_gone "$new_pod"
  note "after scale-down: $(cat "$E2E_TMP/view")"
  until_ok 120 "EventterCluster $CLUSTER Ready with readyReplicas 3" cluster_ready 3
  # Both decisions were the HPA's.
  hpa_rescales >"$E2E_TMP/hpa-rescales"
  sed 's/^/   HPA: /' "$E2E_TMP/hpa-rescales"
  grep -q "New size: $HPA_MAX_REPLICAS; reason: cpu resource utilization (percentage of request) above target" "$E2E_TMP/hpa-rescales" ||
    fail "no HPA rescale to $HPA_MAX_REPLICAS on CPU above target: $(tr '\n' ';' <"$E2E_TMP/hpa-rescales")"
  grep -q "New size: 3; reason: All metrics below target" "$E2E_TMP/hpa-rescales" ||
    fail "no HPA rescale to 3 with all metrics below target: $(tr '\n' ';' <"$E2E_TMP/hpa-rescales")"
  # The later scenarios set spec.replicas themselves.
  k delete hpa "$HPA_NAME" --wait=true --timeout=60s >/dev/null
  load_verify hpa-scale "$from"
}
