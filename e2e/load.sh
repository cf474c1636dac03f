# Disruptions under continuous traffic (issue 19), sourced by e2e/scenarios.sh. One
# publisher pod and one consumer pod (`eventtermq load publish` / `load consume`,
# through the client Service, logged in as $APP_USER) start in load-start and run
# through every *-under-load scenario; each scenario lets traffic flow for
# $LOAD_PHASE_S, disrupts, waits for the cluster to settle, lets traffic flow for
# $LOAD_PHASE_S again, then runs `eventtermq load check` (the binary of the broker
# image, on this machine) over the pods' logs for its own time window and asserts that
# no confirmed message was lost. Its figures go to one line per scenario.

LOAD_TOPIC=e2e-load
LOAD_GROUP=e2e-load-group
LOAD_RATE_PER_S=20          # messages per second, one request each
LOAD_DURATION_S=1500        # bound of the load pods' runs (the rest of the suite is shorter)
LOAD_PHASE_S=3              # traffic before and after each disruption (60 messages)
LOAD_REQUEST_TIMEOUT_MS=2000  # an attempt without an answer by then is sent again on a new connection
LOAD_CATCH_UP_S=60          # how long the consumer may take to deliver what was confirmed
LOAD_PUBLISHER=load-publisher
LOAD_CONSUMER=load-consumer

load_require() {
  [ -f "$E2E_TMP/load-started" ] || fail "the load pods are not running (scenario load-start must run first)"
}
load_check_bin() { echo "$E2E_TMP/load-bin/eventtermq"; }
now_ms() { date +%s%3N; }

# load_pod NAME ARGS...: a long-running client pod of the broker image (eventtermq
# --host $CLUSTER, logged in as $APP_USER) with ARGS.
load_pod() {
  local name=$1; shift
  k delete pod "$name" --ignore-not-found --wait=true >/dev/null 2>&1 || true
  CLIENT_SECRET=$APP_SECRET pod_manifest "$name" "$BROKER_IMAGE" eventtermq --host "$CLUSTER" \
    --user "$APP_USER" --password-file "$CLIENT_SECRET_DIR/password" "$@" | k apply -f - >/dev/null
}
pod_running() { [ "$(k get pod "$1" -o jsonpath='{.status.phase}')" = Running ]; }
log_has() { # log_has POD PATTERN COUNT: the pod's log has at least COUNT lines matching
  [ "$(k logs "$1" 2>/dev/null | grep -c "$2")" -ge "$3" ]
}

# load_fetch: both pods' logs into $E2E_TMP/load-{published,delivered}.log.
load_fetch() {
  k logs "$LOAD_PUBLISHER" >"$E2E_TMP/load-published.log" 2>/dev/null &&
    k logs "$LOAD_CONSUMER" >"$E2E_TMP/load-delivered.log" 2>/dev/null
}
# load_check FROM_MS TO_MS: the checker's line for that window (status 1: lost > 0).
load_check() {
  "$(load_check_bin)" load check --published "$E2E_TMP/load-published.log" \
    --delivered "$E2E_TMP/load-delivered.log" --from-ms "$1" --to-ms "$2" --confirmed-min 1 \
    >"$E2E_TMP/load-check.out" 2>&1
}
# load_verify SCENARIO FROM_MS: traffic for $LOAD_PHASE_S more, then the check of
# [FROM_MS, now], repeated while the consumer catches up (at most $LOAD_CATCH_UP_S);
# prints the figures and records them; fails with them (and the lost ids) otherwise.
load_verify() {
  local name=$1 from=$2 to deadline line
  sleep "$LOAD_PHASE_S"
  to=$(now_ms)
  for p in "$LOAD_PUBLISHER" "$LOAD_CONSUMER"; do
    pod_running "$p" || fail "load pod $p is not running: $(k logs "$p" --tail=3 2>&1 | tr '\n' ' ')"
  done
  deadline=$(( $(date +%s) + LOAD_CATCH_UP_S ))
  until load_fetch && load_check "$from" "$to"; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
      line=$(tr '\n' ' ' <"$E2E_TMP/load-check.out")
      echo "$name: $line" >>"$E2E_TMP/load-figures"
      [ ! -f "$E2E_TMP/broker-logs/pids" ] || { broker_logs_around "$from" "$to"; broker_logs_stop; }
      fail "load check after ${LOAD_CATCH_UP_S}s of catching up: $line"
    fi
    sleep 2
  done
  line=$(head -n 1 "$E2E_TMP/load-check.out")
  echo "$name $(( (to - from) / 1000 ))s: $line" >>"$E2E_TMP/load-figures"
  note "load ($(( (to - from) / 1000 )) s window): $line"
  load_errors "$from" "$to" | sed 's/^/     publisher: /'
  # Issue 19's target for a disruption: no client error, no gap over 2 s.
  if [ -f "$E2E_TMP/broker-logs/pids" ] && [ "$(target_missed <"$E2E_TMP/load-check.out")" = 1 ]; then
    note "target missed (a client error or a gap over 2 s); the brokers around it:"
    broker_logs_around "$from" "$to"
    # Kept past the run (the cluster's directories go with its teardown).
    local keep
    keep="${E2E_KEEP_DIR:-/tmp/eventtermq-e2e-misses}/$name-$(date -u +%Y%m%dT%H%M%S)"
    if mkdir -p "$keep" && cp -r "$E2E_TMP/broker-logs" "$E2E_TMP/load-published.log" "$E2E_TMP/load-check.out" "$keep/" 2>/dev/null; then
      note "the brokers' logs and the load's reports of this run: $keep"
    fi
  fi
  broker_logs_stop
}
# Broker logs through a disruption. A deleted pod's log goes with it, so every broker
# pod's log (kubectl's timestamps in front) is followed into
# $E2E_TMP/broker-logs/POD-UID-N.log from broker_logs_follow N until broker_logs_stop,
# across the pods' re-creation; a scenario that misses its target shows what the
# brokers said around each client error (broker_logs_around), and run.sh keeps the
# files in the cluster's log directory.
broker_logs_follow() {
  local dir=$E2E_TMP/broker-logs i
  broker_logs_stop # an earlier scenario's, if it failed before its check
  mkdir -p "$dir"
  rm -f "$dir/stop" "$dir"/*.log "$dir"/*.err
  for i in $(seq 0 $(( $1 - 1 ))); do
    (
      n=0
      end=$(( $(date +%s) + 900 ))
      while [ ! -f "$dir/stop" ] && [ "$(date +%s)" -lt "$end" ]; do
        uid=$(k get pod "$CLUSTER-$i" -o jsonpath='{.metadata.uid}' 2>/dev/null) || uid=""
        if [ -n "$uid" ]; then
          n=$((n + 1))
          # `timeout` runs programs, not shell functions: kubectl itself, as kubectl_ does.
          timeout 900 "$K8S_BIN/kubectl" --kubeconfig "$KUBECONFIG_ADMIN" -n "$NS" logs -f "$CLUSTER-$i" -c broker \
            --timestamps >"$dir/$CLUSTER-$i-$uid-$n.log" 2>"$dir/$CLUSTER-$i-$uid-$n.err" || true
        fi
        sleep 0.5
      done
    ) &
    echo $! >>"$dir/pids"
  done
}
broker_logs_stop() {
  local dir=$E2E_TMP/broker-logs pid
  [ -f "$dir/pids" ] || return 0
  touch "$dir/stop"
  while read -r pid; do
    pkill -P "$pid" 2>/dev/null || true
    kill "$pid" 2>/dev/null || true
  done <"$dir/pids"
  rm -f "$dir/pids"
  mkdir -p "$LOGS/broker-logs"
  cp "$dir"/*.log "$LOGS/broker-logs/" 2>/dev/null || true
}
# target_missed <CHECK_LINE: 1 when the checker's figures show a client error or a gap
# over 2 s (issue 19's target for a disruption), else 0.
target_missed() {
  awk 'NR == 1 { for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] } }
       END { print (v["client_errors"] + 0 > 0 || v["longest_gap_ms"] + 0 > 2000) ? 1 : 0 }'
}
# broker_logs_around FROM_MS TO_MS: for the publisher's first errors in the window and
# the start of its longest gap, the brokers' log lines from 5 s before to 3 s after (a
# stopping pod's broker says nothing during its preStop sleep).
broker_logs_around() {
  python3 - "$1" "$2" "$E2E_TMP/load-published.log" "$E2E_TMP/load-check.out" "$E2E_TMP"/broker-logs/*.log <<'PY' || true
import datetime, json, os, re, sys
lo, hi, published, check, logs = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:]
def ms(stamp):
    d = datetime.datetime.strptime(stamp[:26].rstrip("Z"), "%Y-%m-%dT%H:%M:%S.%f")
    return int(d.replace(tzinfo=datetime.timezone.utc).timestamp() * 1000)
events = []
for line in open(published):
    try:
        v = json.loads(line)
    except ValueError:
        continue
    if v.get("ev") == "error" and lo <= v["t_ms"] <= hi and len(events) < 3:
        events.append((v["t_ms"], "client error (attempt %s): %s" % (v.get("attempt"), v["error"][:160])))
gap = re.search(r"longest_gap_ms=(\d+) gap_from_ms=(\d+)", open(check).read())
if gap and int(gap.group(1)) > 2000:
    events.append((int(gap.group(2)), "last confirmation before the longest gap (%s ms)" % gap.group(1)))
lines = []
for path in logs:
    pod = "-".join(os.path.basename(path).split("-")[:2])
    for line in open(path, errors="replace"):
        try:
            lines.append((ms(line), pod, line.split(" ", 1)[1].rstrip()))
        except (ValueError, IndexError):
            pass
lines.sort()
for t, what in sorted(events):
    print("   at +%d ms: %s" % (t - lo, what))
    near = [l for l in lines if t - 5000 <= l[0] <= t + 3000]
    if not near:
        print("     (no broker line from 5 s before to 3 s after; %d lines in all)" % len(lines))
    for lt, pod, text in near[-40:]:
        print("     %+6d ms %s %s" % (lt - t, pod, re.sub(r"\x1b\[[0-9;]*m", "", text)[:220]))
PY
}
# load_errors FROM_MS TO_MS: the publisher's distinct errors in the window (at most 3,
# with how often each came and when first, its request id cut off).
load_errors() {
  python3 -c '
import json, re, sys
lo, hi, seen = int(sys.argv[1]), int(sys.argv[2]), {}
for line in open(sys.argv[3]):
    try:
        v = json.loads(line)
    except ValueError:
        continue
    if v.get("ev") == "error" and lo <= v["t_ms"] <= hi:
        e = re.sub(r" \[request id: [^]]*\]", "", v["error"])[:200]
        n, t = seen.get(e, (0, v["t_ms"]))
        seen[e] = (n + 1, t)
for e, (n, t) in list(seen.items())[:3]:
    print("%dx from +%d ms: %s" % (n, t - lo, e))' "$1" "$2" "$E2E_TMP/load-published.log"
}

# The id of the pod whose broker is node $1, from list-nodes on a live pod.
pod_of_node() {
  k exec "$CLUSTER-0" -c broker -- eventtermq --output json list-nodes |
    python3 -c 'import json, sys
want = int(sys.argv[1])
for n in json.load(sys.stdin)["nodes"]:
    if n["id"] == want:
        print(n["address"].split(".")[0])' "$1"
}
raft_leader_id() {
  k exec "$CLUSTER-0" -c broker -- eventtermq --output json list-nodes | python3 -c 'import json, sys; print(json.load(sys.stdin)["leader_id"])'
}
# The primary node id of $LOAD_TOPIC's open segment in the cluster state.
load_primary_id() {
  dump "$CLUSTER-0" | awk -v topic="\"$LOAD_TOPIC\"" '
    /^=== Segments ===/ { exit }
    /^segments: </ { s = 1; t = ""; o = ""; p = ""; next }
    s && /^  topic: / { t = $2 }
    s && /^  open: / { o = $2 }
    s && /^  primary_node_id: / { p = $2 }
    s && /^>/ { if (t == topic && o == "true") print p; s = 0 }' | head -n 1
}

# The last segments of $LOAD_TOPIC in the cluster state, one line each: "segment ID gen
# G open|closed primary POD replicas POD,POD" (for the notes: where a disruption moved
# the topic's writes).
load_segments() {
  local d
  d=$(dump "$CLUSTER-0") || return 0
  awk -v topic="\"$LOAD_TOPIC\"" '
    /^nodes: </ { n = 1; next }
    n && /^  id: / { id = $2 }
    n && /^  address: / { a = $2; gsub(/"/, "", a); split(a, h, "."); pod[id] = h[1] }
    n && /^>/ { n = 0 }
    /^=== Segments ===/ { exit }
    /^segments: </ { s = 1; t = ""; o = "closed"; p = ""; r = ""; g = ""; i = ""; next }
    s && /^  id: / { i = $2 }
    s && /^  topic: / { t = $2 }
    s && /^  generation: / { g = $2 }
    s && /^  open: true/ { o = "open" }
    s && /^  primary_node_id: / { p = $2 }
    s && /^  replica_node_ids: / { r = r (r == "" ? "" : ",") $2 }
    s && /^>/ { if (t == topic) { k = split(r, rs, ","); rp = ""; for (j = 1; j <= k; j++) rp = rp (j > 1 ? "," : "") (rs[j] in pod ? pod[rs[j]] : rs[j]); out[++m] = "segment " i " gen " g " " o " primary " (p in pod ? pod[p] : p) " replicas " rp }; s = 0 }
    END { for (j = (m > 5 ? m - 4 : 1); j <= m; j++) print out[j] }' <<<"$d"
}

# kill_pod POD: deletes it at once (no grace: the process gets SIGKILL, as kill -9; the
# image has no shell to run kill in), then waits for its successor and the cluster.
kill_pod() {
  local uid
  uid=$(k get pod "$1" -o jsonpath='{.metadata.uid}')
  k delete pod "$1" --grace-period=0 --force --wait=false >/dev/null 2>&1
  until_ok 120 "a new $1" uid_differs pod "$1" "$uid"
  wait_settled "${2:-3}" 240
}

scenario_load_start() {
  require_pubsub
  # The load pods log in as $APP_USER, whom user-and-refused-logins makes.
  k get secret "$APP_SECRET" >/dev/null 2>&1 ||
    fail "Secret $APP_SECRET of user $APP_USER is missing: scenario user-and-refused-logins makes it (include it in E2E_SCENARIOS)"
  k apply -f - >/dev/null <<EOT
apiVersion: eventter.io/v1alpha1
kind: Topic
metadata:
  name: $LOAD_TOPIC
spec:
  clusterRef: $CLUSTER
  replicationFactor: 3
---
apiVersion: eventter.io/v1alpha1
kind: ConsumerGroup
metadata:
  name: $LOAD_GROUP
spec:
  clusterRef: $CLUSTER
  bindings:
    - topic: $LOAD_TOPIC
EOT
  until_ok 60 "Topic $LOAD_TOPIC Ready" condition_is topic "$LOAD_TOPIC" Ready True
  until_ok 60 "ConsumerGroup $LOAD_GROUP Ready" condition_is consumergroup "$LOAD_GROUP" Ready True
  # The checker runs here, from the broker image's own layer.
  mkdir -p "$E2E_TMP/load-bin"
  tar -xzf "$IMAGES/eventtermq-rootfs.tar.gz" -C "$E2E_TMP/load-bin" eventtermq ||
    fail "cannot take eventtermq out of $IMAGES/eventtermq-rootfs.tar.gz"
  load_pod "$LOAD_CONSUMER" load consume --group "$LOAD_GROUP" --duration-s "$LOAD_DURATION_S"
  load_pod "$LOAD_PUBLISHER" load publish --topic "$LOAD_TOPIC" --rate-per-s "$LOAD_RATE_PER_S" \
    --duration-s "$LOAD_DURATION_S" --request-timeout-ms "$LOAD_REQUEST_TIMEOUT_MS"
  until_ok 60 "the load publisher's first 20 confirmations" log_has "$LOAD_PUBLISHER" '"ev":"confirmed"' 20
  until_ok 60 "the load consumer's first 20 deliveries" log_has "$LOAD_CONSUMER" '"ev":"delivered"' 20
  touch "$E2E_TMP/load-started"
  note "publishing $LOAD_RATE_PER_S/s to $LOAD_TOPIC, consuming $LOAD_GROUP, both through Service $CLUSTER"
}

scenario_kill_leader_under_load() {
  load_require
  broker_logs_follow 3
  local from leader pod
  from=$(now_ms)
  sleep "$LOAD_PHASE_S"
  leader=$(raft_leader_id)
  pod=$(pod_of_node "$leader")
  [ -n "$pod" ] || fail "no pod for the Raft leader $leader"
  note "Raft leader: node $leader on $pod: deleted with --grace-period=0"
  kill_pod "$pod"
  note "new leader: node $(raft_leader_id)"
  load_verify kill-leader-under-load "$from"
}

scenario_kill_primary_under_load() {
  load_require
  broker_logs_follow 3
  local from primary pod
  from=$(now_ms)
  sleep "$LOAD_PHASE_S"
  primary=$(load_primary_id)
  [ -n "$primary" ] || fail "no open segment of $LOAD_TOPIC in the dump"
  # A primary that also leads Raft hands leadership over first: this scenario is about
  # the data path (kill-leader-under-load is about the leader).
  if [ "$primary" = "$(raft_leader_id)" ]; then
    k exec "$CLUSTER-0" -c broker -- eventtermq transfer-leadership >/dev/null ||
      fail "could not move Raft leadership off node $primary, the primary"
    note "node $primary led Raft too: leadership moved to node $(raft_leader_id)"
  fi
  pod=$(pod_of_node "$primary")
  [ -n "$pod" ] || fail "no pod for node $primary, the primary of $LOAD_TOPIC's open segment"
  note "primary of $LOAD_TOPIC's open segment: node $primary on $pod (leader: $(raft_leader_id)): deleted with --grace-period=0"
  kill_pod "$pod"
  note "primary now: node $(load_primary_id)"
  load_verify kill-primary-under-load "$from"
  load_segments | sed 's/^/     /'
}

sts_rolled() { # sts_rolled N: the StatefulSet controller saw the latest template and rolled it out
  [ "$(k get statefulset "$CLUSTER" -o jsonpath='{.status.observedGeneration}')" = \
    "$(k get statefulset "$CLUSTER" -o jsonpath='{.metadata.generation}')" ] && sts_settled "$1"
}
template_annotation_is() {
  [ "$(k get statefulset "$CLUSTER" -o jsonpath='{.spec.template.metadata.annotations.e2e/rolled}')" = "$1" ]
}

# Records each new progress line of the EventterCluster's status.rollingUpdate (the
# Roll column) into $E2E_TMP/roll-progress until the StatefulSet rolled out.
roll_progress_seen() {
  local line
  line=$(k get eventtercluster "$CLUSTER" -o jsonpath='{.status.rollingUpdate}' 2>/dev/null)
  [ -z "$line" ] || [ "$line" = "$(tail -n1 "$E2E_TMP/roll-progress" 2>/dev/null)" ] || echo "$line" >>"$E2E_TMP/roll-progress"
  sts_rolled 3
}

# A pod-template change (an annotation of spec.pod): the operator evicts the pods one
# at a time (the StatefulSet is OnDelete), Raft followers first, the leader last after
# handing its leadership over, each next one once every pod is Ready (caught up) and
# the brokers healthy; each pod stops with SIGTERM (its primaries close first).
scenario_rolling_upgrade_under_load() {
  load_require
  broker_logs_follow 3
  local from stamp leader started
  from=$(now_ms)
  sleep "$LOAD_PHASE_S"
  leader=$(pod_of_node "$(raft_leader_id)")
  [ -n "$leader" ] || fail "no pod for the Raft leader $(raft_leader_id)"
  rm -f "$E2E_TMP/roll-progress"
  started=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  stamp=$(date +%s)
  k patch eventtercluster "$CLUSTER" --type=merge -p "{\"spec\": {\"pod\": {\"annotations\": {\"e2e/rolled\": \"$stamp\"}}}}" >/dev/null
  until_ok 60 "the operator to put the annotation into the StatefulSet's template" template_annotation_is "$stamp"
  until_ok 600 "StatefulSet $CLUSTER rolled out with 3 updated, ready replicas" roll_progress_seen
  wait_settled 3 120
  note "rolled: $(k get pods -l "app.kubernetes.io/instance=$CLUSTER" -o jsonpath='{range .items[*]}{.metadata.name} {.status.startTime}, {end}')"
  sed 's/^/   roll: /' "$E2E_TMP/roll-progress" 2>/dev/null || true
  # The operator's steps (its log): every pod evicted once, the followers first, the
  # last one the leader of that moment, after its leadership was handed over. (The
  # leader can change during a roll by itself: a restarted broker the others cannot
  # reach yet may start an election.)
  kubectl_ -n "$OPERATOR_NS" logs deployment/"$RELEASE-operator" --since-time="$started" 2>/dev/null |
    sed -n 's/.*rolling update: \(.*\)/\1/p' | sed 's/ cluster=[^ ]*//; s/ revision=.*//' >"$E2E_TMP/roll-steps"
  sed 's/^/   step: /' "$E2E_TMP/roll-steps"
  python3 - "$E2E_TMP/roll-steps" <<'PY' || fail "the operator's roll did not go followers first, leader last after a hand-over (steps above)"
import re, sys
steps = [l.strip() for l in open(sys.argv[1]) if l.strip()]
evicted = [re.search(r"pod=(\S+) leader=(\S+)", s).groups() for s in steps if s.startswith("evicted")]
pods = [p for p, _ in evicted]
assert len(pods) == 3 and len(set(pods)) == 3, evicted
assert [l for _, l in evicted] == ["false", "false", "true"], evicted
handed = [s for s in steps if s.startswith("leadership handed over")]
assert len(handed) == 1 and f"from={pods[-1]} " in handed[0] + " ", handed
assert steps.index(handed[0]) < steps.index(next(s for s in steps if f"pod={pods[-1]} " in s)), steps
PY
  note "leader before the roll: $leader; rolled last (after its hand-over): $(sed -n 's/^evicted pod=\([^ ]*\) leader=true.*/\1/p' "$E2E_TMP/roll-steps"); leader now: $(pod_of_node "$(raft_leader_id)")"
  load_verify rolling-upgrade-under-load "$from"
  load_segments | sed 's/^/     /'
}

# "pod primaries replicas groups" of each node, from list-nodes.
node_loads() {
  k exec "$CLUSTER-0" -c broker -- eventtermq --output json list-nodes | python3 -c 'import json, sys
for n in json.load(sys.stdin)["nodes"]:
    l = n.get("load") or {}
    print(n["address"].split(".")[0], l.get("primaries", 0), l.get("replicas", 0), l.get("consumer_groups", 0))'
}
new_nodes_loaded() { # every pod of $@ has a primary, a replica or a group
  local loads p
  loads=$(node_loads) || return 1
  echo "$loads" >"$E2E_TMP/loads"
  for p in "$@"; do
    awk -v p="$p" '$1 == p && $2 + $3 + $4 > 0 { found = 1 } END { exit !found }' <<<"$loads" || return 1
  done
}

# 3 -> 5 under load, then `rebalance`: the new brokers take open segments (primaries or
# copies) or consumer groups.
scenario_scale_up_rebalance() {
  load_require
  broker_logs_follow 5
  local from out
  publish_before scale
  from=$(now_ms)
  sleep "$LOAD_PHASE_S"
  k patch eventtercluster "$CLUSTER" --type=merge -p '{"spec": {"replicas": 5}}' >/dev/null
  wait_settled 5 600
  note "5 ALIVE: $(dump "$CLUSTER-0" | dump_nodes | awk '{ split($2, h, "."); printf "%s ", h[1] }')"
  out=$(k exec "$CLUSTER-0" -c broker -- eventtermq rebalance) || fail "rebalance failed: $out"
  note "rebalance: $out"
  until_ok_showing 60 "the new brokers to get load after rebalance (pod primaries replicas groups)" "$E2E_TMP/loads" \
    new_nodes_loaded "$CLUSTER-3" "$CLUSTER-4"
  note "load per broker (primaries replicas groups): $(tr '\n' ';' <"$E2E_TMP/loads")"
  load_verify scale-up-rebalance "$from"
}

# scale_down_wait N: until the StatefulSet is down to N (at most 600 s), keeping the
# first line of the SCALE-DOWN column (status.scaleDown, while it drains) seen in
# SCALE_DOWN_PROGRESS and printing it.
scale_down_wait() {
  local deadline=$(( $(date +%s) + 600 )) line
  SCALE_DOWN_PROGRESS=""
  until sts_settled "$1"; do
    [ "$(date +%s)" -lt "$deadline" ] || fail "StatefulSet $CLUSTER not down to $1 after 600 s (SCALE-DOWN: $SCALE_DOWN_PROGRESS)"
    line=$(k get eventtercluster "$CLUSTER" -o jsonpath='{.status.scaleDown}' 2>/dev/null || true)
    [ -n "$SCALE_DOWN_PROGRESS" ] || SCALE_DOWN_PROGRESS=$line
    sleep 1
  done
  note "scale-down progress seen: ${SCALE_DOWN_PROGRESS:-none (drained before the first look)}"
}

scenario_scale_down_under_load() {
  load_require
  broker_logs_follow 5
  local from
  from=$(now_ms)
  sleep "$LOAD_PHASE_S"
  k patch eventtercluster "$CLUSTER" --type=merge -p '{"spec": {"replicas": 3}}' >/dev/null
  scale_down_wait 3
  until_ok 60 "3 broker pods Ready" pods_ready 3
  scaled_down() {
    local i nodes
    for i in 0 1 2; do
      nodes=$(dump "$CLUSTER-$i" | dump_nodes) || { echo "$CLUSTER-$i: no dump" >"$E2E_TMP/view"; return 1; }
      echo "$CLUSTER-$i sees $(awk '{ split($2, h, "."); printf "%s=%s ", h[1], $3 }' <<<"$nodes")" >"$E2E_TMP/view"
      [ "$(awk '$3 == "ALIVE"' <<<"$nodes" | wc -l)" = 3 ] || return 1
      if grep -qE "^[0-9]+ $CLUSTER-[012]\\..* (SUSPECT|DEAD|LEFT)\$" <<<"$nodes"; then return 1; fi
      if grep -qE "^[0-9]+ $CLUSTER-[34]\\..* (ALIVE|SUSPECT)\$" <<<"$nodes"; then return 1; fi
    done
  }
  deadline=$(( $(date +%s) + 180 ))
  until scaled_down; do
    [ "$(date +%s)" -lt "$deadline" ] ||
      fail "after 180 s not 3 ALIVE nodes with the removed ones gone or LEFT: $(cat "$E2E_TMP/view")"
    sleep 1
  done
  note "after scale-down: $(dump "$CLUSTER-0" | dump_nodes | awk '{ split($2, h, "."); printf "%s=%s ", h[1], $3 }')"
  until_ok 120 "EventterCluster $CLUSTER Ready with readyReplicas 3" cluster_ready 3
  dump "$CLUSTER-0" | dump_objects | grep -qx "topic default/$TOPIC" || fail "topic $TOPIC missing after scaling"
  load_verify scale-down-under-load "$from"
}

# The whole run's figures (from the publisher's start to now), then the load pods,
# topic and group go.
scenario_load_whole_run() {
  load_require
  local line
  load_verify_all() { load_fetch && "$(load_check_bin)" load check --published "$E2E_TMP/load-published.log" \
    --delivered "$E2E_TMP/load-delivered.log" >"$E2E_TMP/load-check.out" 2>&1; }
  until_ok_quiet "$LOAD_CATCH_UP_S" load_verify_all || fail "load check of the whole run: $(tr '\n' ' ' <"$E2E_TMP/load-check.out")"
  line=$(head -n 1 "$E2E_TMP/load-check.out")
  echo "whole run: $line" >>"$E2E_TMP/load-figures"
  note "whole run: $line"
  note "per scenario:"; sed 's/^/     /' "$E2E_TMP/load-figures"
  k delete pod "$LOAD_PUBLISHER" "$LOAD_CONSUMER" --wait=true --timeout=60s >/dev/null
  k delete consumergroup "$LOAD_GROUP" --wait=true --timeout=60s >/dev/null
  k delete topic "$LOAD_TOPIC" --wait=true --timeout=60s >/dev/null
}

# On failure: the figures so far and the load pods' last errors.
print_load_diagnostics() {
  [ -n "${E2E_TMP:-}" ] && [ -f "$E2E_TMP/load-started" ] || return 0
  echo "== load figures per scenario"
  cat "$E2E_TMP/load-figures" 2>/dev/null || true
  local p
  for p in "$LOAD_PUBLISHER" "$LOAD_CONSUMER"; do
    echo "== $p: last errors"
    kubectl_ -n "$NS" logs "$p" 2>/dev/null | grep -E '"ev":"(error|gave_up|end)"' | tail -n 10 | cut -c1-300 || true
  done
}
