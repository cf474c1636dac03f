# Scenarios of e2e/run.sh (sourced). Each runs in a subshell with errexit: `fail
# "reason"` (or any failing command) fails it, `skip "reason"` skips it. They run in
# order and build on each other: the first creates the cluster from examples/, the
# last deletes it. Everything is asserted the way a user would look: kubectl get,
# kubectl exec ... eventtermq dump, and client pods inside the cluster.

CLUSTER=emq                 # metadata.name in examples/eventtercluster.yaml
TOPIC=orders                # examples/topic.yaml
GROUP=orders-audit          # examples/consumergroup.yaml
APP_USER=app                # examples/user.yaml: the user every client pod logs in as
APP_SECRET=app-password     # ... its password Secret (made here with a random password)
WRONG_SECRET=e2e-wrong-password  # another password, for the refused logins
CLIENT_SECRET_DIR=/etc/eventtermq/client  # where a client pod has its Secret mounted
BROKER_IMAGE=localhost/eventtermq:0.1.0
MESSAGES=1000
LAG_TOPIC=e2e-lag           # the lag scenario's topic and its idle group
LAG_GROUP=e2e-lag-idle
LAG_ROUNDS=8                # publishes of MESSAGES/LAG_ROUNDS each, 1 s apart, so that
                            # rate() sees them (scrapes every 5 s)

SCENARIOS=(
  "cluster-ready:scenario_cluster_ready"
  "topic-and-group:scenario_topic_and_group"
  "user-and-refused-logins:scenario_users"
  "tls-cluster:scenario_tls_cluster"
  "upgrade-from-previous-release:scenario_upgrade_from_previous_release"
  "member-health-in-status:scenario_member_health"
  "topic-rejected:scenario_topic_rejected"
  "publish-subscribe:scenario_publish_subscribe"
  "amqp-client:scenario_amqp_client"
  "prometheus-targets:scenario_prometheus_targets"
  "lag-in-prometheus-and-kubectl:scenario_lag"
  "dashboard-and-alert-queries:scenario_monitoring_queries"
  "pod-restart:scenario_pod_restart"
  "pod-restart-no-loss:scenario_pod_restart_no_loss"
  "drift-repair:scenario_drift_repair"
  "load-start:scenario_load_start"
  "kill-leader-under-load:scenario_kill_leader_under_load"
  "kill-primary-under-load:scenario_kill_primary_under_load"
  "rolling-upgrade-under-load:scenario_rolling_upgrade_under_load"
  "scale-up-rebalance:scenario_scale_up_rebalance"
  "scale-down-under-load:scenario_scale_down_under_load"
  "hpa-scale:scenario_hpa_scale"
  "scale-no-loss:scenario_scale_no_loss"
  "load-whole-run:scenario_load_whole_run"
  "topic-delete-policy:scenario_topic_delete_policy"
  "cluster-delete:scenario_cluster_delete"
)

k() { kubectl_ -n "$NS" "$@"; }
fail() { echo "$*" >"$REASON_FILE"; exit 1; }
skip() { echo "$*" >"$REASON_FILE"; exit 77; }
note() { echo "   $*"; }

# until_ok SECONDS WHAT CMD...: retry CMD every second until it succeeds.
until_ok() {
  local secs=$1 what=$2; shift 2
  local deadline=$(( $(date +%s) + secs ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || fail "timed out after ${secs}s waiting for $what"
    sleep 1
  done
}
# until_ok_showing SECS WHAT FILE CMD...: until_ok for a check that writes what it saw
# to FILE; a timeout shows that (its lines joined with ';').
until_ok_showing() {
  local secs=$1 what=$2 seen=$3; shift 3
  local deadline=$(( $(date +%s) + secs ))
  until "$@"; do
    [ "$(date +%s)" -lt "$deadline" ] ||
      fail "timed out after ${secs}s waiting for $what; last seen: $(tr '\n' ';' <"$seen")"
    sleep 1
  done
}

# The cluster state as broker pod $1 prints it.
dump() { k exec "$1" -c broker -- eventtermq dump; }
# "id address state" per node of the dump on stdin.
dump_nodes() {
  awk '/^nodes: </ { n = 1; next }
       n && /^  id: / { id = $2 }
       n && /^  address: / { a = $2; gsub(/"/, "", a) }
       n && /^  state: / { s = $2 }
       n && /^>/ { print id, a, s; n = 0 }'
}
# "topic ns/name" and "group ns/name" lines of the dump on stdin.
dump_objects() {
  awk '/^namespaces: </ { ns = "" }
       /^  name: / { ns = $2; gsub(/"/, "", ns) }
       /^  topics: </ { t = 1 } /^  consumer_groups: </ { g = 1 }
       /^    name: / { x = $2; gsub(/"/, "", x); if (t) print "topic " ns "/" x; if (g) print "group " ns "/" x }
       /^  >/ { t = 0; g = 0 }'
}
alive_count() { dump "$1" | dump_nodes | awk '$3 == "ALIVE"' | wc -l; }
pod_address() { echo "$CLUSTER-$1.$CLUSTER-nodes.$NS.svc.cluster.local:16000"; }

condition() { # condition KIND NAME TYPE [field]: a status condition's status (or field)
  k get "$1" "$2" -o jsonpath="{.status.conditions[?(@.type==\"$3\")].${4:-status}}"
}
# Predicates for until_ok (which re-runs a command, so no "$(...)" in its arguments).
condition_is() { [ "$(condition "$1" "$2" "$3")" = "$4" ]; }
uid_differs() { # uid_differs KIND NAME UID: the object exists with another UID
  local uid
  uid=$(k get "$1" "$2" -o jsonpath='{.metadata.uid}' 2>/dev/null) && [ -n "$uid" ] && [ "$uid" != "$3" ]
}
args_are() { [ "$(args_of_sts)" = "$1" ]; }

# The StatefulSet has rolled out: every replica updated (on the update revision) and
# ready. Not status.currentRevision: the StatefulSet is OnDelete (the operator rolls the
# pods), and before Kubernetes 1.36 the controller never moves currentRevision then.
sts_settled() {
  local want=$1 out
  out=$(k get statefulset "$CLUSTER" -o jsonpath='{.spec.replicas} {.status.readyReplicas} {.status.updatedReplicas} {.status.replicas}')
  read -r spec ready updated total <<<"$out"
  [ "$spec" = "$want" ] && [ "$ready" = "$want" ] && [ "$updated" = "$want" ] && [ "$total" = "$want" ]
}
pods_ready() { # pods_ready N: exactly N broker pods, all Ready
  local out
  out=$(k get pods -l "app.kubernetes.io/instance=$CLUSTER" \
    -o jsonpath='{range .items[*]}{.metadata.name} {.status.conditions[?(@.type=="Ready")].status} {.metadata.deletionTimestamp}{"\n"}{end}')
  [ "$(grep -c . <<<"$out")" = "$1" ] && [ "$(awk '$2 == "True" && $3 == ""' <<<"$out" | wc -l)" = "$1" ]
}
cluster_ready() { # cluster_ready N: the EventterCluster reports Ready with N ready replicas
  [ "$(condition eventtercluster "$CLUSTER" Ready)" = True ] &&
    [ "$(k get eventtercluster "$CLUSTER" -o jsonpath='{.status.readyReplicas}')" = "$1" ]
}
alive_is() { [ "$(alive_count "$1")" = "$2" ]; }
# every_pod_alive N: the dump on every broker pod shows N ALIVE nodes.
every_pod_alive() {
  local i
  for i in $(seq 0 $(($1 - 1))); do alive_is "$CLUSTER-$i" "$1" || return 1; done
}
wait_settled() { # wait_settled N SECONDS
  until_ok "$2" "StatefulSet $CLUSTER rolled out with $1 ready replicas" sts_settled "$1"
  until_ok 60 "$1 broker pods Ready" pods_ready "$1"
  until_ok 60 "$1 ALIVE nodes in every pod's dump" every_pod_alive "$1"
  until_ok 60 "EventterCluster $CLUSTER Ready with readyReplicas $1" cluster_ready "$1"
}

# --- publish / subscribe through in-cluster client pods ---------------------------------
# Enabled when the broker's CLI has the data-path commands; asked once, of a running
# broker, and remembered for the later scenarios.
have_pubsub() {
  if [ ! -f "$E2E_TMP/pubsub" ]; then
    local help
    help=$(k exec "$CLUSTER-0" -c broker -- eventtermq --help) || fail "could not ask $CLUSTER-0 for its CLI commands"
    if grep -qE '^[[:space:]]+publish[[:space:]]' <<<"$help"; then echo yes; else echo no; fi >"$E2E_TMP/pubsub"
  fi
  [ "$(cat "$E2E_TMP/pubsub")" = yes ]
}
require_pubsub() {
  have_pubsub || skip "the eventtermq CLI has no publish subcommand yet"
}
pod_finished() {
  case "$(k get pod "$1" -o jsonpath='{.status.phase}')" in Succeeded | Failed) return 0 ;; *) return 1 ;; esac
}
# client_output NAME ARGS...: runs `eventtermq --host <cluster> ARGS` in a throw-away
# pod, without stdin, logged in as $APP_USER (examples/user.yaml) with the password of
# its Secret, mounted; prints the pod's whole log once it has finished (stdout and
# stderr) and returns its exit status. (Not `kubectl run -i`: it attaches after the
# container started, so output printed before that is lost, and if the attach fails,
# stdin never ends.)
client_output() {
  local name=$1; shift
  CLIENT_SECRET=$APP_SECRET pod_output "$name" "$BROKER_IMAGE" eventtermq --host "$CLUSTER" \
    --user "$APP_USER" --password-file "$CLIENT_SECRET_DIR/password" "$@"
}
# pod_manifest NAME IMAGE COMMAND ARGS...: a Pod that runs COMMAND once; with
# CLIENT_SECRET set, that Secret is mounted read-only at $CLIENT_SECRET_DIR.
pod_manifest() {
  CLIENT_SECRET=${CLIENT_SECRET:-} CLIENT_SECRET_DIR=$CLIENT_SECRET_DIR python3 -c '
import json, os, sys
name, image, command = sys.argv[1], sys.argv[2], sys.argv[3:]
container = {"name": name, "image": image, "imagePullPolicy": "Never", "command": command}
pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"run": name}},
       "spec": {"restartPolicy": "Never", "containers": [container]}}
secret = os.environ["CLIENT_SECRET"]
if secret:
    pod["spec"]["volumes"] = [{"name": "client-secret", "secret": {"secretName": secret}}]
    container["volumeMounts"] = [{"name": "client-secret", "mountPath": os.environ["CLIENT_SECRET_DIR"], "readOnly": True}]
print(json.dumps(pod))' "$@"
}
# pod_output NAME IMAGE COMMAND ARGS...: the same for any local image and command
# (CLIENT_SECRET: a Secret to mount, as for pod_manifest).
pod_output() {
  local name=$1 image=$2; shift 2
  local code
  k delete pod "$name" --ignore-not-found --wait=true >/dev/null 2>&1 || true
  pod_manifest "$name" "$image" "$@" | k apply -f - >/dev/null
  until_ok 180 "client pod $name to finish" pod_finished "$name"
  k logs "$name"
  code=$(k get pod "$name" -o jsonpath='{.status.containerStatuses[0].state.terminated.exitCode}')
  k delete pod "$name" --wait=false >/dev/null 2>&1 || true
  return "${code:-1}"
}
# publish_batch TAG: publishes $MESSAGES messages "e2e-TAG-<n>" to $TOPIC.
publish_batch() {
  local out
  out=$(client_output "pub-$1" publish "$TOPIC" "e2e-$1-{n}" --count "$MESSAGES") ||
    fail "publishing batch $1 failed: $out"
  grep -q "\"published\": *$MESSAGES\b" <<<"$out" || fail "batch $1: publish said: $out"
  note "batch $1: $MESSAGES messages published from pod pub-$1"
}
# distinct_messages PREFIX: how many distinct message bodies starting with PREFIX the
# `subscribe` output on stdin holds (one JSON object per line, data in base64).
distinct_messages() {
  python3 -c '
import base64, json, sys
prefix, seen = sys.argv[1], set()
for line in sys.stdin:
    try:
        data = base64.b64decode(json.loads(line)["message"]["data"]).decode()
    except (ValueError, KeyError, TypeError):
        continue
    if data.startswith(prefix):
        seen.add(data)
print(len(seen))' "$1"
}
# receive_batch TAG: subscribes as $GROUP and checks every message of batch TAG came.
receive_batch() {
  local out got
  out=$(client_output "sub-$1" subscribe "$GROUP" --max-messages "$MESSAGES" --wait 10s) ||
    fail "subscribe for batch $1 failed: $(tail -n 5 <<<"$out")"
  got=$(distinct_messages "e2e-$1-" <<<"$out")
  [ "$got" = "$MESSAGES" ] || fail "batch $1: received $got of $MESSAGES distinct messages"
  note "batch $1: all $MESSAGES messages received"
}

# A disruptive scenario publishes a batch first (when the CLI can) and a "no loss"
# scenario after it reads the batch back, so each disruption happens once. Scenarios
# run in subshells: $E2E_TMP carries the fact that a batch went out.
publish_before() { # publish_before TAG
  if have_pubsub; then
    publish_batch "$1"
    touch "$E2E_TMP/published-$1"
  fi
}
receive_published() { # receive_published TAG SCENARIO
  [ -f "$E2E_TMP/published-$1" ] || fail "no batch $1 was published (see scenario $2)"
  receive_batch "$1"
}

# --- scenarios ------------------------------------------------------------------------------

scenario_cluster_ready() {
  k apply -f "$root/examples/eventtercluster.yaml" >/dev/null
  until_ok 30 "headless Service $CLUSTER-nodes" k get service "$CLUSTER-nodes"
  until_ok 30 "client Service $CLUSTER" k get service "$CLUSTER"
  until_ok 30 "StatefulSet $CLUSTER" k get statefulset "$CLUSTER"
  until_ok 30 "PodDisruptionBudget $CLUSTER" k get poddisruptionbudget "$CLUSTER"
  [ "$(k get service "$CLUSTER-nodes" -o jsonpath='{.spec.clusterIP} {.spec.publishNotReadyAddresses}')" = "None true" ] ||
    fail "headless Service is not headless with publishNotReadyAddresses"
  wait_settled 3 240
  local nodes want got i
  nodes=$(dump "$CLUSTER-0" | dump_nodes)
  note "dump on $CLUSTER-0:"; sed 's/^/     /' <<<"$nodes"
  want=$(for i in 0 1 2; do pod_address "$i"; done | sort)
  got=$(awk '$3 == "ALIVE" { print $2 }' <<<"$nodes" | sort)
  [ "$got" = "$want" ] || fail "ALIVE node addresses are [$(echo $got)], want the pods' DNS names [$(echo $want)]"
  note "status: $(condition eventtercluster "$CLUSTER" Ready message)"
}

scenario_topic_and_group() {
  k apply -f "$root/examples/topic.yaml" -f "$root/examples/consumergroup.yaml" >/dev/null
  until_ok 60 "Topic $TOPIC Ready" condition_is topic "$TOPIC" Ready True
  until_ok 60 "ConsumerGroup $GROUP Ready" condition_is consumergroup "$GROUP" Ready True
  local i objects
  for i in 0 1 2; do
    objects=$(dump "$CLUSTER-$i" | dump_objects)
    grep -qx "topic default/$TOPIC" <<<"$objects" || fail "topic $TOPIC missing from the dump on $CLUSTER-$i"
    grep -qx "group default/$GROUP" <<<"$objects" || fail "group $GROUP missing from the dump on $CLUSTER-$i"
  done
  note "topic index $(k get topic "$TOPIC" -o jsonpath='{.status.clusterStateIndex}'), in the dump on all 3 pods"
}

# members_healthy: every member of the EventterCluster's status reports its own free
# disk and watermark, none could not be asked, and exactly one is the leader.
members_healthy() {
  k get eventtercluster "$CLUSTER" -o json | python3 -c '
import json, sys
members = json.load(sys.stdin)["status"]["members"]
ok = len(members) == 3 and sum(1 for m in members if m.get("leader")) == 1 and all(
    m.get("diskFreeBytes", 0) > 0 and m.get("diskFreeMinBytes", 0) > 0 and "healthError" not in m
    and not m.get("diskLow") and m.get("state") == "Alive" for m in members)
print(" ".join("%s:%s%s free=%s" % (m["address"].split(".")[0], m.get("raftRole"), "*" if m.get("leader") else "",
      m.get("diskFreeBytes", m.get("healthError"))) for m in members))
sys.exit(0 if ok else 1)'
}

# The EventterCluster's status carries each broker's own health, asked of that broker.
scenario_member_health() {
  until_ok 90 "every member's own health in the EventterCluster status" members_healthy
  note "members: $(members_healthy)"
}

# A Topic the schema accepts but the broker refuses: the same broker topic as
# examples/topic.yaml with another replication factor (immutable in the broker).
scenario_topic_rejected() {
  k apply -f - >/dev/null <<EOF
apiVersion: eventter.io/v1alpha1
kind: Topic
metadata:
  name: orders-conflict
spec:
  clusterRef: $CLUSTER
  name: $TOPIC
  replicationFactor: 1
EOF
  until_ok 60 "Topic orders-conflict Ready=False" condition_is topic orders-conflict Ready False
  local reason message
  reason=$(condition topic orders-conflict Ready reason)
  message=$(condition topic orders-conflict Ready message)
  note "Ready=False reason=$reason message=$message"
  [ "$reason" = Rejected ] || fail "reason is $reason, want Rejected"
  grep -qi 'replication' <<<"$message" || fail "message does not carry the broker's reason: $message"
  # The broker's topic is untouched.
  dump "$CLUSTER-0" | grep -q 'replication_factor: 3' || fail "the broker's $TOPIC changed"
  # Never in sync: deleting it leaves the broker's topic alone.
  k delete topic orders-conflict --wait=true --timeout=60s >/dev/null
  dump "$CLUSTER-0" | dump_objects | grep -qx "topic default/$TOPIC" || fail "deleting the rejected Topic removed $TOPIC"
  # The API server itself refuses what the CRD's rules forbid (here a CEL rule).
  local refused
  if refused=$(k apply --dry-run=server -f - 2>&1 <<EOF
apiVersion: eventter.io/v1alpha1
kind: ConsumerGroup
metadata:
  name: dead-letter-key-alone
spec:
  clusterRef: $CLUSTER
  bindings: [{topic: $TOPIC}]
  deadLetterRoutingKey: retry
EOF
  ); then
    fail "a ConsumerGroup with deadLetterRoutingKey and no deadLetterTopic was accepted"
  fi
  grep -q 'deadLetterRoutingKey needs deadLetterTopic' <<<"$refused" || fail "refused without the rule's message: $refused"
}

# The brokers hold a user once its User resource is Ready; clients without credentials,
# or with a wrong password, are refused with Unauthenticated and say why. From here on
# every client pod logs in as that user (client_output, the AMQP client).
user_listed() { k exec "$CLUSTER-0" -c broker -- eventtermq list-users | grep -qw "$APP_USER"; }
scenario_users() {
  local password
  password=$(python3 -c 'import secrets; print(secrets.token_hex(24))')
  k create secret generic "$APP_SECRET" --from-literal=password="$password" --dry-run=client -o yaml | k apply -f - >/dev/null
  password=$(python3 -c 'import secrets; print(secrets.token_hex(24))')
  k create secret generic "$WRONG_SECRET" --from-literal=password="$password" --dry-run=client -o yaml | k apply -f - >/dev/null
  k apply -f "$root/examples/user.yaml" >/dev/null
  until_ok 60 "User $APP_USER Ready" condition_is user "$APP_USER" Ready True
  until_ok 30 "user $APP_USER in the brokers' list-users" user_listed
  note "User $APP_USER: $(condition user "$APP_USER" Ready message)"
  # The API server keeps admin as it was (CEL rule of the CRD).
  local patched
  if patched=$(k patch user "$APP_USER" --type=merge -p '{"spec": {"admin": true}}' 2>&1); then
    fail "spec.admin of User $APP_USER changed: $patched"
  fi
  grep -q 'admin is immutable' <<<"$patched" || fail "changing spec.admin refused without 'admin is immutable': $patched"
  # Both refused clients at once (separate pods, so neither waits for the other's
  # failed-login delay).
  local anon="$E2E_TMP/anon.out" wrong="$E2E_TMP/wrong.out" anon_rc=0 wrong_rc=0
  (pod_output cli-anonymous "$BROKER_IMAGE" eventtermq --host "$CLUSTER" list-topics >"$anon" 2>&1) & local p1=$!
  (CLIENT_SECRET=$WRONG_SECRET pod_output cli-wrong-password "$BROKER_IMAGE" eventtermq --host "$CLUSTER" \
    --user "$APP_USER" --password-file "$CLIENT_SECRET_DIR/password" list-topics >"$wrong" 2>&1) & local p2=$!
  wait "$p1" || anon_rc=$?
  wait "$p2" || wrong_rc=$?
  [ "$anon_rc" = 1 ] && grep -q 'Unauthenticated' "$anon" && grep -q 'credentials required' "$anon" ||
    fail "a client without credentials: exit $anon_rc, want 1 with Unauthenticated / credentials required: $(tail -n 3 "$anon")"
  [ "$wrong_rc" = 1 ] && grep -q 'Unauthenticated' "$wrong" && grep -q 'wrong user name or password' "$wrong" ||
    fail "a wrong password: exit $wrong_rc, want 1 with Unauthenticated / wrong user name or password: $(tail -n 3 "$wrong")"
  note "no credentials: $(grep -m1 Unauthenticated "$anon" | cut -c1-160)"
  note "wrong password: $(grep -m1 Unauthenticated "$wrong" | cut -c1-160)"
  local out
  out=$(client_output cli-app list-topics) || fail "$APP_USER could not list topics: $(tail -n 3 <<<"$out")"
  grep -q "$TOPIC" <<<"$out" || fail "$APP_USER's list-topics shows no $TOPIC: $out"
  note "$APP_USER (password from Secret $APP_SECRET, mounted) lists the topics"
  # ... and nothing outside the namespaces its User resource names.
  local other="$E2E_TMP/other-namespace.out" other_rc=0
  client_output cli-app-other-namespace --namespace billing list-topics >"$other" 2>&1 || other_rc=$?
  [ "$other_rc" = 1 ] && grep -q 'PermissionDenied' "$other" && grep -q "user \"$APP_USER\"" "$other" &&
    grep -q 'namespace "billing"' "$other" ||
    fail "$APP_USER in namespace billing: exit $other_rc, want 1 with PermissionDenied naming user and namespace: $(tail -n 3 "$other")"
  note "another namespace: $(grep -m1 PermissionDenied "$other" | cut -c1-160)"
}

# A second cluster with spec.tls.selfSigned (2 brokers: node-to-node over TLS, verified
# with the operator's CA), its Topic and ConsumerGroup, and a User without a Secret:
# the operator generates one. A client pod with the CA (ca.crt of the cluster's TLS
# Secret, that key only) and the generated Secret publishes and subscribes; without
# the CA (plaintext) it gets no answer.
TLS_CLUSTER=emq-tls
TLS_USER=tls-app
TLS_MESSAGES=200
tls_pod_output() { # tls_pod_output NAME WITH_CA ARGS...: eventtermq against $TLS_CLUSTER as $TLS_USER
  local name=$1 with_ca=$2; shift 2
  local code
  k delete pod "$name" --ignore-not-found --wait=true >/dev/null 2>&1 || true
  python3 -c '
import json, sys
name, image, with_ca, cluster, user, args = sys.argv[1], sys.argv[2], sys.argv[3] == "yes", sys.argv[4], sys.argv[5], sys.argv[6:]
command = ["eventtermq", "--host", cluster, "--user", user, "--password-file", "/etc/eventtermq/client/password"]
if with_ca:
    command += ["--tls-ca-file", "/etc/eventtermq/ca/ca.crt"]
mounts = [{"name": "credentials", "mountPath": "/etc/eventtermq/client", "readOnly": True}]
volumes = [{"name": "credentials", "secret": {"secretName": user + "-eventter-credentials"}}]
if with_ca:
    mounts.append({"name": "ca", "mountPath": "/etc/eventtermq/ca", "readOnly": True})
    volumes.append({"name": "ca", "secret": {"secretName": cluster + "-tls", "items": [{"key": "ca.crt", "path": "ca.crt"}]}})
container = {"name": name, "image": image, "imagePullPolicy": "Never", "command": command + args, "volumeMounts": mounts}
print(json.dumps({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
                  "spec": {"restartPolicy": "Never", "containers": [container], "volumes": volumes}}))' \
    "$name" "$BROKER_IMAGE" "$with_ca" "$TLS_CLUSTER" "$TLS_USER" "$@" | k apply -f - >/dev/null
  until_ok 120 "client pod $name to finish" pod_finished "$name"
  k logs "$name"
  code=$(k get pod "$name" -o jsonpath='{.status.containerStatuses[0].state.terminated.exitCode}')
  k delete pod "$name" --wait=false >/dev/null 2>&1 || true
  return "${code:-1}"
}
secret_gone() { ! k get secret "$1" >/dev/null 2>&1; }
tls_alive_is() { [ "$(k exec "$TLS_CLUSTER-0" -c broker -- eventtermq dump | dump_nodes | awk '$3 == "ALIVE"' | wc -l)" = "$1" ]; }
scenario_tls_cluster() {
  k apply -f - >/dev/null <<YAML
apiVersion: eventter.io/v1alpha1
kind: EventterCluster
metadata: {name: $TLS_CLUSTER}
spec:
  replicas: 2
  image: $BROKER_IMAGE
  imagePullPolicy: IfNotPresent
  storage: {size: 1Gi}
  resources: {requests: {cpu: 50m, memory: 64Mi}, limits: {memory: 512Mi}}
  tls:
    selfSigned: {}
---
apiVersion: eventter.io/v1alpha1
kind: Topic
metadata: {name: tls-orders}
spec: {clusterRef: $TLS_CLUSTER, replicationFactor: 2}
---
apiVersion: eventter.io/v1alpha1
kind: ConsumerGroup
metadata: {name: tls-orders-audit}
spec: {clusterRef: $TLS_CLUSTER, bindings: [{topic: tls-orders}]}
---
apiVersion: eventter.io/v1alpha1
kind: User
metadata: {name: $TLS_USER}
spec:
  clusterRef: $TLS_CLUSTER
  permissions: [{namespace: default, write: "^tls-orders\$", read: "^tls-orders-audit\$"}]
YAML
  until_ok 240 "EventterCluster $TLS_CLUSTER Ready" condition_is eventtercluster "$TLS_CLUSTER" Ready True
  condition_is eventtercluster "$TLS_CLUSTER" TLSReady True || fail "TLSReady is not True: $(condition eventtercluster "$TLS_CLUSTER" TLSReady message)"
  note "TLSReady: $(condition eventtercluster "$TLS_CLUSTER" TLSReady message | cut -c1-200)"
  [ "$(k get eventtercluster "$TLS_CLUSTER" -o jsonpath='{.status.nodeAuthentication} {.status.tls.mode}')" = "ClusterSecret SelfSigned" ] ||
    fail "status: $(k get eventtercluster "$TLS_CLUSTER" -o jsonpath='{.status.nodeAuthentication} {.status.tls}')"
  # Both brokers in each other's view: node-to-node over TLS (the CLI in the pod uses the
  # CA from EVENTTERMQ_TLS_CA_FILE and the certificate's localhost name).
  until_ok 60 "2 ALIVE brokers in $TLS_CLUSTER-0's dump (over TLS)" tls_alive_is 2
  until_ok 60 "Topic tls-orders Ready" condition_is topic tls-orders Ready True
  until_ok 60 "ConsumerGroup tls-orders-audit Ready" condition_is consumergroup tls-orders-audit Ready True
  until_ok 60 "User $TLS_USER Ready" condition_is user "$TLS_USER" Ready True
  local secret="$TLS_USER-eventter-credentials"
  [ "$(k get user "$TLS_USER" -o jsonpath='{.status.passwordSecretName}')" = "$secret" ] || fail "status.passwordSecretName is not $secret"
  [ "$(k get secret "$secret" -o jsonpath='{.metadata.ownerReferences[0].kind}/{.data.username}')" = "User/$(printf %s "$TLS_USER" | base64)" ] ||
    fail "Secret $secret is not the User's, with its username"
  note "User $TLS_USER: password generated in Secret $secret (owned by the User)"
  local out
  out=$(tls_pod_output tls-pub yes publish tls-orders "e2e-tls-{n}" --count "$TLS_MESSAGES") ||
    fail "publishing over TLS failed: $(tail -n 3 <<<"$out")"
  grep -q "\"published\": *$TLS_MESSAGES\b" <<<"$out" || fail "publish over TLS said: $out"
  out=$(tls_pod_output tls-sub yes subscribe tls-orders-audit --max-messages "$TLS_MESSAGES" --wait 10s) ||
    fail "subscribing over TLS failed: $(tail -n 3 <<<"$out")"
  [ "$(distinct_messages e2e-tls- <<<"$out")" = "$TLS_MESSAGES" ] || fail "received $(distinct_messages e2e-tls- <<<"$out") of $TLS_MESSAGES"
  note "$TLS_MESSAGES messages published and received over TLS by $TLS_USER"
  local rc=0
  out=$(tls_pod_output tls-plaintext no list-topics) || rc=$?
  [ "$rc" != 0 ] || fail "a plaintext client was answered: $out"
  note "plaintext client refused (exit $rc): $(tail -n 1 <<<"$out" | cut -c1-160)"
  # Gone with its resources (the User's Secret with the User).
  k delete user "$TLS_USER" --wait=true --timeout=60s >/dev/null
  k delete topic tls-orders --wait=false >/dev/null
  k delete consumergroup tls-orders-audit --wait=false >/dev/null
  until_ok 60 "Secret $secret deleted with its User" secret_gone "$secret"
  k delete eventtercluster "$TLS_CLUSTER" --wait=false >/dev/null
}

# --- upgrade from the previous release (issue 19) -----------------------------------------
# A cluster of its own runs the previous release's broker image (e2e/previous-release
# names the commit; its image is built from that commit once and cached by commit),
# holds messages and a group's committed offsets, and is upgraded by changing
# spec.image to this checkout's image: the operator rolls it.
UP_CLUSTER=emq-up
UP_TOPIC=up-orders
UP_GROUP=up-orders-audit
UP_ALL_GROUP=up-orders-all  # made after the upgrade: reads the topic from its start
UP_MESSAGES=300
UP_CONSUMED=120
UP_IMAGE=""
# previous_release_image: sets UP_IMAGE to localhost/eventtermq:<short commit>, built
# from the commit of e2e/previous-release with that commit's own images/build.sh (the
# same IMAGE_CARGO_TARGET_DIR as this checkout's images, so only the workspace's crates
# are built again) and cached in $CACHE_ROOT/previous-release/<commit>; imported into
# the node's containerd. Skips when the commit is not in this clone (a shallow clone).
previous_release_image() {
  local commit short cache src t bin_dir
  commit=$(grep -v '^#' "$root/e2e/previous-release" | tr -d '[:space:]')
  [[ "$commit" =~ ^[0-9a-f]{40}$ ]] || fail "e2e/previous-release does not name a commit (40 hex digits): '$commit'"
  git -C "$root" cat-file -e "$commit^{commit}" 2>/dev/null ||
    skip "the previous release $commit is not in this clone (a shallow clone? git fetch --unshallow)"
  short=${commit:0:7}
  UP_IMAGE="localhost/eventtermq:$short"
  cache="$CACHE_ROOT/previous-release/$commit"
  if [ ! -s "$cache/eventtermq.oci.tar" ]; then
    src="$CACHE_ROOT/previous-release/checkout"
    t=$(date +%s)
    git -C "$root" worktree remove --force "$src" >/dev/null 2>&1 || rm -rf "$src"
    git -C "$root" worktree prune
    git -C "$root" worktree add --detach "$src" "$commit" >/dev/null 2>&1 || fail "git worktree add $src $commit failed"
    note "building the previous release's images from $short (log: $LOGS/previous-release-build.log)"
    if ! (cd "$src" && bash images/build.sh --profile "$PROFILE" "$src/images-out") >"$LOGS/previous-release-build.log" 2>&1; then
      fail "building $short's images failed: $(tail -n 5 "$LOGS/previous-release-build.log")"
    fi
    # Named by the commit, not by its workspace version (which this checkout may share).
    bin_dir="${IMAGE_CARGO_TARGET_DIR:-$HOME/.cache/eventtermq/target-image}/x86_64-unknown-linux-gnu/$PROFILE"
    mkdir -p "$cache.tmp"
    python3 "$src/images/oci.py" broker "$bin_dir/eventtermq" "$short" "$cache.tmp" >/dev/null
    rm -rf "$cache" && mv "$cache.tmp" "$cache"
    git -C "$root" worktree remove --force "$src" >/dev/null 2>&1 || rm -rf "$src"
    note "previous release's broker image built in $(( $(date +%s) - t )) s, cached in $cache"
  fi
  ctr --address "$CONTAINERD_SOCK" -n k8s.io images import "$cache/eventtermq.oci.tar" >/dev/null
  ctr --address "$CONTAINERD_SOCK" -n k8s.io images ls -q | grep -qx "$UP_IMAGE" || fail "$UP_IMAGE not imported"
}
# The host directory of a broker pod's data volume (hostPath provisioner).
data_dir_of() {
  local claim volume
  claim=$(k get pod "$1" -o jsonpath='{.spec.volumes[?(@.name=="data")].persistentVolumeClaim.claimName}')
  volume=$(k get pvc "$claim" -o jsonpath='{.spec.volumeName}')
  kubectl_ get pv "$volume" -o jsonpath='{.spec.hostPath.path}'
}
pod_images_are() { # pod_images_are IMAGE: every broker pod of $CLUSTER runs IMAGE
  local images
  images=$(k get pods -l "app.kubernetes.io/instance=$CLUSTER" -o jsonpath='{range .items[*]}{.spec.containers[0].image}{"\n"}{end}')
  [ -n "$images" ] && [ "$(sort -u <<<"$images")" = "$1" ]
}
# committed_is GROUP N: the cluster state records N messages of GROUP acknowledged
# (the sum of its committed offsets over its segments).
committed_is() {
  k exec "$CLUSTER-0" -c broker -- eventtermq list-consumer-groups --output json |
    python3 -c '
import json, sys
group, want, total = sys.argv[1], int(sys.argv[2]), None
text = sys.stdin.read()
try:
    docs = [json.loads(text)]
except ValueError:
    docs = [json.loads(l) for l in text.splitlines() if l.strip()]
def groups(d):
    if isinstance(d, list):
        for x in d: yield from groups(x)
    elif isinstance(d, dict):
        if "committed_offsets" in d and d.get("name") == group: yield d
        for v in d.values():
            if isinstance(v, (list, dict)): yield from groups(v)
for g in groups(docs):
    total = sum(int(v) for v in (g["committed_offsets"] or {}).values())
sys.exit(0 if total == want else 1)' "$1" "$2"
}
# bodies: the message bodies of `subscribe` output on stdin, one per line, sorted.
bodies() {
  python3 -c '
import base64, json, sys
for line in sys.stdin:
    try:
        print(base64.b64decode(json.loads(line)["message"]["data"]).decode())
    except (ValueError, KeyError, TypeError):
        pass' | sort
}
broker_exited_with() { # broker_exited_with POD STATUS: its broker container last exited with STATUS
  local codes
  codes=$(k get pod "$1" -o jsonpath='{.status.containerStatuses[0].state.terminated.exitCode} {.status.containerStatuses[0].lastState.terminated.exitCode}')
  [[ " $codes " == *" $2 "* ]]
}
termination_message() {
  local m
  m=$(k get pod "$1" -o jsonpath='{.status.containerStatuses[0].state.terminated.message}')
  [ -n "$m" ] || m=$(k get pod "$1" -o jsonpath='{.status.containerStatuses[0].lastState.terminated.message}')
  echo "$m"
}
roll_line() { k get eventtercluster "$CLUSTER" -o jsonpath='{.status.rollingUpdate}'; }
scenario_upgrade_from_previous_release() {
  previous_release_image
  local CLUSTER=$UP_CLUSTER  # the helpers below (wait_settled, dump ...) act on this cluster
  local t0 i dir out first rest all want_rest lines
  t0=$(date +%s)
  k apply -f - >/dev/null <<YAML
apiVersion: eventter.io/v1alpha1
kind: EventterCluster
metadata: {name: $UP_CLUSTER}
spec:
  replicas: 3
  image: $UP_IMAGE
  imagePullPolicy: IfNotPresent
  storage: {size: 1Gi}
  resources: {requests: {cpu: 50m, memory: 64Mi}, limits: {memory: 512Mi}}
---
apiVersion: eventter.io/v1alpha1
kind: Topic
metadata: {name: $UP_TOPIC}
spec: {clusterRef: $UP_CLUSTER, replicationFactor: 3}
---
apiVersion: eventter.io/v1alpha1
kind: ConsumerGroup
metadata: {name: $UP_GROUP}
spec: {clusterRef: $UP_CLUSTER, bindings: [{topic: $UP_TOPIC}]}
YAML
  wait_settled 3 300
  pod_images_are "$UP_IMAGE" || fail "the pods do not run $UP_IMAGE"
  until_ok 60 "Topic $UP_TOPIC Ready" condition_is topic "$UP_TOPIC" Ready True
  until_ok 60 "ConsumerGroup $UP_GROUP Ready" condition_is consumergroup "$UP_GROUP" Ready True
  note "3 brokers of $UP_IMAGE ready in $(( $(date +%s) - t0 )) s (the new operator runs the old image)"
  # The previous release writes no format marker: the new one must take its directories
  # as format 1 (and mark them).
  for i in 0 1 2; do
    dir=$(data_dir_of "$CLUSTER-$i")
    [ -d "$dir/raft" ] || fail "no raft/ in $CLUSTER-$i's data directory $dir"
    [ ! -e "$dir/FORMAT" ] || note "$CLUSTER-$i's data directory already has a FORMAT marker (previous release writes one)"
  done

  out=$(k exec "$CLUSTER-0" -c broker -- eventtermq publish "$UP_TOPIC" "up-{n}" --count "$UP_MESSAGES") ||
    fail "publishing on the previous release failed: $out"
  grep -q "\"published\": *$UP_MESSAGES\b" <<<"$out" || fail "publish said: $out"
  out=$(k exec "$CLUSTER-1" -c broker -- eventtermq subscribe "$UP_GROUP" --max-messages "$UP_CONSUMED" --wait 10s) ||
    fail "subscribing on the previous release failed: $(tail -n 3 <<<"$out")"
  first=$(bodies <<<"$out")
  [ "$(sort -u <<<"$first" | grep -c .)" = "$UP_CONSUMED" ] || fail "consumed $(sort -u <<<"$first" | grep -c .) distinct of $UP_CONSUMED"
  until_ok 30 "$UP_CONSUMED acknowledged messages of $UP_GROUP committed" committed_is "$UP_GROUP" "$UP_CONSUMED"
  note "previous release: $UP_MESSAGES published, $UP_CONSUMED consumed and committed"

  # The upgrade: the new image's tag in spec.image; the operator rolls the pods.
  t0=$(date +%s)
  k patch eventtercluster "$UP_CLUSTER" --type merge -p "{\"spec\":{\"image\":\"$BROKER_IMAGE\"}}" >/dev/null
  local deadline=$(( t0 + 300 )) line seen=""
  until sts_settled 3 && pod_images_are "$BROKER_IMAGE" && pods_ready 3; do
    [ "$(date +%s)" -lt "$deadline" ] || fail "the roll to $BROKER_IMAGE did not finish in 300 s (last: $(roll_line))"
    line=$(roll_line 2>/dev/null || true)
    if [ -n "$line" ] && [[ "$seen" != *"|$line|"* ]]; then
      seen="$seen|$line|"
      note "roll: $line"
    fi
    sleep 1
  done
  wait_settled 3 120
  note "rolled to $BROKER_IMAGE in $(( $(date +%s) - t0 )) s"

  for i in 0 1 2; do
    dir=$(data_dir_of "$CLUSTER-$i")
    [ -s "$dir/FORMAT" ] || fail "$CLUSTER-$i's data directory $dir has no FORMAT marker after the upgrade"
    grep -aq "format 1\$" "$dir/FORMAT" || fail "$CLUSTER-$i's FORMAT marker: $(tr -c '[:print:]\n' '.' <"$dir/FORMAT")"
  done
  note "every data directory now carries the format marker: $(grep -ao 'format [0-9]*\|written_by .*' "$(data_dir_of "$CLUSTER-0")/FORMAT" | paste -sd ' ')"

  # The group goes on from its committed offset: exactly the messages it had not taken.
  out=$(k exec "$CLUSTER-2" -c broker -- eventtermq subscribe "$UP_GROUP" --max-messages "$UP_MESSAGES" --wait 10s) ||
    fail "subscribing after the upgrade failed: $(tail -n 3 <<<"$out")"
  rest=$(bodies <<<"$out")
  all=$(for i in $(seq 1 "$UP_MESSAGES"); do echo "up-$i"; done | sort)
  want_rest=$(comm -23 <(echo "$all") <(sort -u <<<"$first"))
  lines=$(grep -c . <<<"$rest" || true)
  [ "$rest" = "$want_rest" ] ||
    fail "after the upgrade the group got $lines messages ($(comm -12 <(sort -u <<<"$rest") <(sort -u <<<"$first") | grep -c . || true) of them consumed before), want exactly the other $(grep -c . <<<"$want_rest")"
  note "the group went on from its committed offset: exactly the other $lines messages, none again"
  # Every message is readable: a new group reads the topic from its start.
  k apply -f - >/dev/null <<YAML
apiVersion: eventter.io/v1alpha1
kind: ConsumerGroup
metadata: {name: $UP_ALL_GROUP}
spec: {clusterRef: $UP_CLUSTER, bindings: [{topic: $UP_TOPIC}]}
YAML
  until_ok 60 "ConsumerGroup $UP_ALL_GROUP Ready" condition_is consumergroup "$UP_ALL_GROUP" Ready True
  out=$(k exec "$CLUSTER-1" -c broker -- eventtermq subscribe "$UP_ALL_GROUP" --max-messages "$UP_MESSAGES" --wait 10s) ||
    fail "reading the topic after the upgrade failed: $(tail -n 3 <<<"$out")"
  [ "$(bodies <<<"$out" | sort -u)" = "$all" ] || fail "a new group read $(bodies <<<"$out" | sort -u | grep -c .) of the $UP_MESSAGES messages"
  note "all $UP_MESSAGES messages written by the previous release read back by the new one"

  # A downgrade after a format change, as this release would meet it: emq-up-2's
  # marker says format 2, written by a later release. Its broker refuses to start (exit
  # 4), and the pod's termination message (FallbackToLogsOnError) says why.
  dir=$(data_dir_of "$CLUSTER-2")
  cp -p "$dir/FORMAT" "$E2E_TMP/up-format"
  python3 -c '
import struct, sys
def crc32c(data):
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF
payload = b"format 2\nwritten_by eventtermq 9.0.0\n"
with open(sys.argv[1], "r+b") as f:
    f.truncate(0)
    f.write(struct.pack("<II", len(payload), crc32c(payload)) + payload)' "$dir/FORMAT"
  k delete pod "$CLUSTER-2" --wait=false >/dev/null
  until_ok 90 "$CLUSTER-2 to exit with status 4" broker_exited_with "$CLUSTER-2" 4
  out=$(termination_message "$CLUSTER-2")
  grep -q "has format 2 (written by eventtermq 9.0.0).*downgrade refused, nothing in the directory was changed" <<<"$out" ||
    fail "$CLUSTER-2's termination message does not say why: $out"
  note "a marker of format 2: $CLUSTER-2 exits 4; termination message: $(tail -n 1 <<<"$out" | cut -c1-160)..."
  cp -p "$E2E_TMP/up-format" "$dir/FORMAT"
  k delete pod "$CLUSTER-2" --wait=false >/dev/null
  wait_settled 3 180

  k delete consumergroup "$UP_GROUP" "$UP_ALL_GROUP" --wait=true --timeout=60s >/dev/null
  k delete topic "$UP_TOPIC" --wait=true --timeout=60s >/dev/null
  k delete eventtercluster "$UP_CLUSTER" --wait=false >/dev/null
}

scenario_publish_subscribe() {
  require_pubsub
  publish_batch basic
  receive_batch basic
}

# --- AMQP 0.9.1 with a real client in a pod ---------------------------------------------
AMQP_CLIENT_IMAGE=localhost/amqp-roundtrip:e2e
AMQP_TOPIC=e2e-amqp          # a Topic resource (fanout) the client publishes to
AMQP_GROUP=e2e-amqp-group    # a ConsumerGroup resource bound to it: a queue to the client
AMQP_FIRST=e2e-amqp-first    # an exchange the client declares (direct) before a Topic names it
AMQP_MESSAGES=200

# Builds e2e/amqp-client (Go, github.com/rabbitmq/amqp091-go; static, CGO_ENABLED=0) into
# a FROM-scratch image and imports it into the node's containerd. The Go module download
# and build cache live under $CACHE_ROOT, so a warm run downloads and compiles nothing.
amqp_client_image() {
  local dir="$CACHE_ROOT/amqp-client"
  command -v go >/dev/null || fail "go is needed to build e2e/amqp-client"
  mkdir -p "$dir"
  (cd "$root/e2e/amqp-client" &&
    GOMODCACHE="$CACHE_ROOT/go-mod" GOCACHE="$CACHE_ROOT/go-build" GOFLAGS="-mod=readonly -buildvcs=false" \
      CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$dir/amqp-roundtrip" .) ||
    fail "building e2e/amqp-client failed"
  bash "$root/e2e/cluster/oci_image.sh" --name "$AMQP_CLIENT_IMAGE" --entrypoint /amqp-roundtrip \
    --user 65532:65532 --file "$dir/amqp-roundtrip:/amqp-roundtrip:0755" --out "$dir/amqp-roundtrip.oci.tar"
  ctr --address "$CONTAINERD_SOCK" -n k8s.io images import "$dir/amqp-roundtrip.oci.tar" >/dev/null
}
# The default exchange type of broker topic $2 in the dump of pod $1.
topic_exchange_type() {
  dump "$1" | awk -v want="\"$2\"" '/^  topics: </ { t = 1 } /^  >/ { t = 0 }
    t && /^    name: / { n = ($2 == want) }
    t && n && /^    default_exchange_type: / { x = $2; gsub(/"/, "", x); print x; exit }'
}
group_in_dump() { dump "$CLUSTER-$1" | dump_objects | grep -qx "group default/$2"; }
topic_type_is() { [ "$(topic_exchange_type "$CLUSTER-0" "$1")" = "$2" ]; }

# A real AMQP client program in a pod, through the client Service's `amqp` port:
# publishes with confirms and consumes with properties and headers intact, and shows
# which side wins when a Topic/ConsumerGroup resource and AMQP name the same thing
# (the resource: the operator brings the broker object back to its spec).
scenario_amqp_client() {
  local t0 port out
  t0=$(date +%s)
  amqp_client_image
  note "client image (e2e/amqp-client, amqp091-go) built and imported in $(( $(date +%s) - t0 )) s"
  port=$(k get service "$CLUSTER" -o jsonpath='{.spec.ports[?(@.name=="amqp")].port}')
  [ -n "$port" ] || fail "the client Service $CLUSTER has no port named amqp"
  k apply -f - >/dev/null <<EOF
apiVersion: eventter.io/v1alpha1
kind: Topic
metadata:
  name: $AMQP_TOPIC
spec:
  clusterRef: $CLUSTER
  replicationFactor: 3
  defaultExchangeType: fanout
---
apiVersion: eventter.io/v1alpha1
kind: ConsumerGroup
metadata:
  name: $AMQP_GROUP
spec:
  clusterRef: $CLUSTER
  bindings:
    - topic: $AMQP_TOPIC
EOF
  until_ok 60 "Topic $AMQP_TOPIC Ready" condition_is topic "$AMQP_TOPIC" Ready True
  until_ok 60 "ConsumerGroup $AMQP_GROUP Ready" condition_is consumergroup "$AMQP_GROUP" Ready True
  # A wrong password is refused at login with 403 ACCESS_REFUSED.
  out=$(CLIENT_SECRET=$WRONG_SECRET pod_output amqp-refused "$AMQP_CLIENT_IMAGE" /amqp-roundtrip \
    --url "amqp://$CLUSTER:$port/" --user "$APP_USER" --password-file "$CLIENT_SECRET_DIR/password" --expect-refused) ||
    fail "AMQP login with a wrong password: $(grep -E '^(FAIL|ok) ' <<<"$out" | tail -n 3)"
  grep -q '^ok login refused: .*403' <<<"$out" || fail "AMQP login with a wrong password not refused with 403: $out"
  note "AMQP, wrong password: $(grep '^ok login refused' <<<"$out" | cut -c1-160)"
  # The round trip as $APP_USER, the password from its Secret (the client puts it in
  # the URL: amqp://$APP_USER:<password>@$CLUSTER:$port/).
  out=$(CLIENT_SECRET=$APP_SECRET pod_output amqp-roundtrip "$AMQP_CLIENT_IMAGE" /amqp-roundtrip \
    --url "amqp://$CLUSTER:$port/" --user "$APP_USER" --password-file "$CLIENT_SECRET_DIR/password" \
    --exchange "$AMQP_TOPIC" --exchange-type fanout \
    --group "$AMQP_GROUP" --first-exchange "$AMQP_FIRST" --count "$AMQP_MESSAGES") ||
    fail "the AMQP client failed: $(grep -E '^(FAIL|ok) ' <<<"$out" | tail -n 3)"
  sed 's/^/     /' <<<"$out"
  grep -qx 'ok done' <<<"$out" || fail "the AMQP client did not finish: $(tail -n 3 <<<"$out")"
  grep -q "^ok exchange.declare $AMQP_TOPIC type direct: 406 " <<<"$out" ||
    fail "exchange.declare with another type than the Topic's was not refused with 406"
  # The ConsumerGroup resource wins: deleted over AMQP, its group is back after the
  # operator's next pass (groupStatusPeriodMs, 5 s here).
  until_ok 60 "the operator to recreate group $AMQP_GROUP, deleted over AMQP" group_in_dump 0 "$AMQP_GROUP"
  note "group $AMQP_GROUP deleted over AMQP: recreated by the operator"
  # A Topic resource naming an exchange declared over AMQP takes it over, spec and all.
  [ "$(topic_exchange_type "$CLUSTER-0" "$AMQP_FIRST")" = direct ] ||
    fail "exchange $AMQP_FIRST declared over AMQP is not a direct topic in the dump"
  k apply -f - >/dev/null <<EOF
apiVersion: eventter.io/v1alpha1
kind: Topic
metadata:
  name: $AMQP_FIRST
spec:
  clusterRef: $CLUSTER
  replicationFactor: 3
  defaultExchangeType: fanout
EOF
  until_ok 60 "Topic $AMQP_FIRST Ready" condition_is topic "$AMQP_FIRST" Ready True
  until_ok 30 "topic $AMQP_FIRST to become fanout as its Topic says" topic_type_is "$AMQP_FIRST" fanout
  note "exchange $AMQP_FIRST declared direct over AMQP, then a Topic (fanout): Ready, now fanout"
  k delete topic "$AMQP_FIRST" "$AMQP_TOPIC" --wait=true --timeout=60s >/dev/null
  k delete consumergroup "$AMQP_GROUP" --wait=true --timeout=60s >/dev/null
}

# Node ids of the dump on pod $1, sorted.
node_ids() { dump "$1" | dump_nodes | awk '{ print $1 }' | sort; }

scenario_pod_restart() {
  local ids_before volume_before uid_before ids_after volume_after
  ids_before=$(node_ids "$CLUSTER-0")
  volume_before=$(k get pvc "data-$CLUSTER-1" -o jsonpath='{.spec.volumeName}')
  uid_before=$(k get pod "$CLUSTER-1" -o jsonpath='{.metadata.uid}')
  publish_before restart
  k delete pod "$CLUSTER-1" --wait=true --timeout=120s >/dev/null
  until_ok 120 "a new $CLUSTER-1" uid_differs pod "$CLUSTER-1" "$uid_before"
  wait_settled 3 180
  volume_after=$(k get pod "$CLUSTER-1" -o jsonpath='{.spec.volumes[?(@.name=="data")].persistentVolumeClaim.claimName}')
  [ "$volume_after" = "data-$CLUSTER-1" ] || fail "new pod mounts claim $volume_after"
  [ "$(k get pvc "data-$CLUSTER-1" -o jsonpath='{.spec.volumeName}')" = "$volume_before" ] || fail "claim data-$CLUSTER-1 is bound to another volume"
  ids_after=$(node_ids "$CLUSTER-1")
  [ "$ids_after" = "$ids_before" ] || fail "node ids changed: [$(echo $ids_before)] -> [$(echo $ids_after)]"
  dump "$CLUSTER-1" | dump_objects | grep -qx "topic default/$TOPIC" || fail "topic $TOPIC missing after the restart"
  note "$CLUSTER-1 back on volume $volume_before with the same node id; 3 ALIVE; $TOPIC kept"
}

# The batch pod-restart published before deleting the pod all arrives.
scenario_pod_restart_no_loss() {
  require_pubsub
  receive_published restart pod-restart
}

args_of_sts() { k get statefulset "$CLUSTER" -o jsonpath='{.spec.template.spec.containers[0].args}'; }

scenario_drift_repair() {
  local args_before uid_before
  args_before=$(args_of_sts)
  # A hand edit of the broker's arguments (as `kubectl edit` would make it): text logs.
  local i
  i=$(k get statefulset "$CLUSTER" -o jsonpath='{range .spec.template.spec.containers[0].args[*]}{@}{"\n"}{end}' |
    awk '$0 == "--log-format" { print NR; exit }')
  [ -n "$i" ] || fail "no --log-format in the StatefulSet's args"
  k patch statefulset "$CLUSTER" --type=json -p "[{\"op\": \"test\", \"path\": \"/spec/template/spec/containers/0/args/$i\", \"value\": \"json\"},
    {\"op\": \"replace\", \"path\": \"/spec/template/spec/containers/0/args/$i\", \"value\": \"text\"}]" >/dev/null
  until_ok 60 "the operator to restore the StatefulSet's args" args_are "$args_before"
  note "StatefulSet args restored"
  # A deleted client Service.
  uid_before=$(k get service "$CLUSTER" -o jsonpath='{.metadata.uid}')
  k delete service "$CLUSTER" --wait=true >/dev/null
  until_ok 60 "the operator to recreate Service $CLUSTER" uid_differs service "$CLUSTER" "$uid_before"
  note "client Service recreated"
  # The StatefulSet's update strategy set back to what an earlier operator's
  # StatefulSet has (no strategy given, so the API server defaulted type RollingUpdate
  # and rollingUpdate.partition 0, which makes an apply of OnDelete invalid): the
  # operator moves it to OnDelete again, restarting no pod.
  local pods_before
  pods_before=$(pod_uids)
  k patch statefulset "$CLUSTER" --type=merge \
    -p '{"spec": {"updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"partition": 0}}}}' >/dev/null
  until_ok 60 "the operator to put the StatefulSet back on OnDelete" update_strategy_is "OnDelete "
  [ "$(pod_uids)" = "$pods_before" ] || fail "moving the update strategy restarted pods"
  kubectl_ -n "$OPERATOR_NS" logs deployment/"$RELEASE-operator" --since=120s 2>/dev/null |
    grep -q "moving the StatefulSet's update strategy to OnDelete" ||
    fail "the operator's log does not show the strategy's merge patch"
  note "update strategy RollingUpdate with rollingUpdate.partition 0 moved back to OnDelete (merge patch); no pod restarted"
  wait_settled 3 300
}
pod_uids() { k get pods -l "app.kubernetes.io/instance=$CLUSTER" -o jsonpath='{range .items[*]}{.metadata.uid} {end}'; }
update_strategy_is() {
  [ "$(k get statefulset "$CLUSTER" -o jsonpath='{.spec.updateStrategy.type} {.spec.updateStrategy.rollingUpdate}')" = "$1" ]
}

# The batch scale-up-rebalance published before scaling 3 -> 5 -> 3 all arrives.
scenario_scale_no_loss() {
  require_pubsub
  receive_published scale scale-up-rebalance
}

scenario_topic_delete_policy() {
  k apply -f - >/dev/null <<EOF
apiVersion: eventter.io/v1alpha1
kind: Topic
metadata:
  name: e2e-delete
spec:
  clusterRef: $CLUSTER
  deletionPolicy: Delete
---
apiVersion: eventter.io/v1alpha1
kind: Topic
metadata:
  name: e2e-retain
spec:
  clusterRef: $CLUSTER
  deletionPolicy: Retain
EOF
  until_ok 60 "Topic e2e-delete Ready" condition_is topic e2e-delete Ready True
  until_ok 60 "Topic e2e-retain Ready" condition_is topic e2e-retain Ready True
  local objects
  objects=$(dump "$CLUSTER-0" | dump_objects)
  grep -qx "topic default/e2e-delete" <<<"$objects" && grep -qx "topic default/e2e-retain" <<<"$objects" ||
    fail "new topics missing from the dump"
  k delete topic e2e-delete e2e-retain --wait=true --timeout=60s >/dev/null
  objects=$(dump "$CLUSTER-0" | dump_objects)
  grep -qx "topic default/e2e-delete" <<<"$objects" && fail "e2e-delete (deletionPolicy Delete) is still in the cluster state"
  grep -qx "topic default/e2e-retain" <<<"$objects" || fail "e2e-retain (deletionPolicy Retain) was removed from the cluster state"
  note "Delete: gone from the dump; Retain: kept"
  # The examples go too (group before the topic it binds), so no finalizer waits on a
  # cluster that is about to be deleted.
  k delete -f "$root/examples/consumergroup.yaml" --wait=true --timeout=60s >/dev/null
  k delete -f "$root/examples/topic.yaml" --wait=true --timeout=60s >/dev/null
  objects=$(dump "$CLUSTER-0" | dump_objects)
  grep -qx "group default/$GROUP" <<<"$objects" && fail "group $GROUP still in the cluster state"
  grep -qx "topic default/$TOPIC" <<<"$objects" && fail "topic $TOPIC still in the cluster state"
  # The User goes too: deleted from the brokers.
  k delete -f "$root/examples/user.yaml" --wait=true --timeout=60s >/dev/null
  user_listed && fail "user $APP_USER still in the brokers' list-users after its User was deleted"
  note "User $APP_USER deleted: gone from list-users"
  return 0
}

children_gone() {
  local n
  n=$(k get statefulset,service,poddisruptionbudget -l "app.kubernetes.io/instance=$CLUSTER" -o name | wc -l)
  [ "$n" = 0 ] && [ "$(k get pods -l "app.kubernetes.io/instance=$CLUSTER" -o name | wc -l)" = 0 ]
}

scenario_cluster_delete() {
  k delete -f "$root/examples/eventtercluster.yaml" --wait=true --timeout=60s >/dev/null
  until_ok 120 "Services, StatefulSet, PodDisruptionBudget and pods of $CLUSTER to go" children_gone
  note "children removed by the garbage collector (volume claims stay, as for any StatefulSet)"
}

# --- metrics, as a real Prometheus scrapes them (e2e/prometheus.sh) ---------------------

require_prometheus() {
  [ -s "$E2E_TMP/prometheus-ready" ] || fail "Prometheus did not start (see the setup lines above)"
  prometheus_discover || fail "cannot list the pods for Prometheus' targets"
}
# discovered_value_is EXPR WANT: value_is after listing the pods again (pods that only
# now run become targets).
discovered_value_is() { prometheus_discover && value_is "$1" "$2"; }
# value_is EXPR WANT: Prometheus answers EXPR with exactly one sample of value WANT.
value_is() { [ "$(prom_value "$1")" = "$2" ]; }

# All three brokers (found through the pods' prometheus.io annotations) and the
# operator are scraped and up.
scenario_prometheus_targets() {
  require_prometheus
  local brokers="{kubernetes_namespace=\"$NS\", eventtermq_cluster=\"$CLUSTER\"}"
  until_ok 90 "3 broker targets in Prometheus" discovered_value_is "count(up$brokers)" 3
  until_ok 60 "all 3 broker targets up" value_is "sum(up$brokers)" 3
  until_ok 30 "3 brokers' build_info" value_is "count(eventtermq_build_info$brokers)" 3
  until_ok 60 "the operator's target up" discovered_value_is "sum(up{kubernetes_namespace=\"$OPERATOR_NS\", component=\"operator\"})" 1
  note "up: $(prom_query "up$brokers" | python3 -c 'import json,sys; print(" ".join(r["metric"]["pod"] + "=" + r["value"][1] for r in json.load(sys.stdin)["data"]["result"]))')"
}

# lag_column: the LAG column of `kubectl get consumergroup $LAG_GROUP`.
lag_column() {
  local table
  table=$(k get consumergroup "$LAG_GROUP") || return 1
  awk 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == "LAG") c = i } NR == 2 && c { print $c }' <<<"$table"
}
lag_column_is() { [ "$(lag_column)" = "$1" ]; }

# A topic with an idle group: publishing N messages makes the group's lag N in
# Prometheus and in `kubectl get consumergroups`; reading them makes it 0. rate() of
# published messages is positive while the publishes run.
scenario_lag() {
  require_prometheus
  require_pubsub
  k apply -f - >/dev/null <<EOF
apiVersion: eventter.io/v1alpha1
kind: Topic
metadata:
  name: $LAG_TOPIC
spec:
  clusterRef: $CLUSTER
---
apiVersion: eventter.io/v1alpha1
kind: ConsumerGroup
metadata:
  name: $LAG_GROUP
spec:
  clusterRef: $CLUSTER
  bindings:
    - topic: $LAG_TOPIC
EOF
  until_ok 60 "Topic $LAG_TOPIC Ready" condition_is topic "$LAG_TOPIC" Ready True
  until_ok 60 "ConsumerGroup $LAG_GROUP Ready" condition_is consumergroup "$LAG_GROUP" Ready True
  # (Whole output first: with pipefail, `kubectl | head` fails when head stops reading.)
  local table
  table=$(k get consumergroup "$LAG_GROUP")
  head -n 1 <<<"$table" | grep -qw LAG || fail "kubectl get consumergroups shows no LAG column: $table"
  until_ok 60 "LAG column 0 before publishing" lag_column_is 0

  local per_round=$((MESSAGES / LAG_ROUNDS)) pub_log="$E2E_TMP/lag-publish.log" t0
  t0=$(date +%s)
  (
    for i in $(seq "$LAG_ROUNDS"); do
      k exec "$CLUSTER-0" -c broker -- eventtermq publish "$LAG_TOPIC" "lag-$i-{n}" --count "$per_round" || exit 1
      sleep 1
    done
  ) >"$pub_log" 2>&1 &
  local publisher=$! rate_expr seen="" settle_deadline
  rate_expr="sum(rate(eventtermq_publish_messages_total{namespace=\"default\", topic=\"$LAG_TOPIC\"}[20s]))"
  # rate_seen: the rate now, when positive.
  rate_seen() {
    local value
    value=$(prom_value "$rate_expr" 2>/dev/null || true)
    [ -n "$value" ] && awk -v v="$value" 'BEGIN { exit !(v > 0) }' && echo "$value"
  }
  while [ -z "$seen" ] && kill -0 "$publisher" 2>/dev/null; do
    seen=$(rate_seen) || sleep 1
  done
  wait "$publisher" || fail "publishing to $LAG_TOPIC failed: $(tail -n 3 "$pub_log")"
  [ "$(grep -c "\"published\": $per_round" "$pub_log")" = "$LAG_ROUNDS" ] ||
    fail "not every publish confirmed: $(tail -n 3 "$pub_log")"
  # A quick publish can end before two scrapes (every 5 s) saw the counter grow; the 20 s
  # window of rate() still holds it for a while after.
  settle_deadline=$(( $(date +%s) + 15 ))
  while [ -z "$seen" ] && [ "$(date +%s)" -lt "$settle_deadline" ]; do
    seen=$(rate_seen) || sleep 1
  done
  [ -n "$seen" ] || fail "rate() of published messages was never positive during the publish and 15 s after"
  note "rate() of the publish: $seen messages/s ($(( $(date +%s) - t0 )) s after the first of $LAG_ROUNDS publishes)"
  t0=$(date +%s)

  local lag_expr="sum(eventtermq_consumer_group_lag_records{namespace=\"default\", group=\"$LAG_GROUP\"})"
  until_ok 60 "lag $MESSAGES in Prometheus" value_is "$lag_expr" "$MESSAGES"
  until_ok 60 "LAG column $MESSAGES in kubectl get consumergroups" lag_column_is "$MESSAGES"
  note "lag $MESSAGES in Prometheus and in kubectl get -o wide after $(( $(date +%s) - t0 )) s: $(k get consumergroup "$LAG_GROUP" -o wide | tail -n 1)"
  t0=$(date +%s)

  local out got
  out=$(client_output sub-lag subscribe "$LAG_GROUP" --max-messages "$MESSAGES" --wait 10s) ||
    fail "subscribe to $LAG_GROUP failed: $(tail -n 5 <<<"$out")"
  got=$(distinct_messages "lag-" <<<"$out")
  [ "$got" = "$MESSAGES" ] || fail "received $got of $MESSAGES distinct messages"
  until_ok 60 "lag 0 in Prometheus" value_is "$lag_expr" 0
  until_ok 60 "LAG column 0 in kubectl get consumergroups" lag_column_is 0
  note "after reading them: lag 0 in Prometheus and in kubectl get ($(( $(date +%s) - t0 )) s, subscribing included)"
  k delete consumergroup "$LAG_GROUP" --wait=true --timeout=60s >/dev/null
  k delete topic "$LAG_TOPIC" --wait=true --timeout=60s >/dev/null
}

# until_ok_quiet SECONDS CMD...: until_ok without failing the scenario (status 1).
until_ok_quiet() {
  local deadline=$(( $(date +%s) + $1 )); shift
  until "$@"; do
    [ "$(date +%s)" -lt "$deadline" ] || return 1
    sleep 2
  done
}

# Every query of the dashboard the chart installed (its ConfigMap, as the Grafana
# sidecar would load it) and every alert rule of the chart's PrometheusRule parses and
# runs against the real Prometheus; the rules pass promtool and evaluate cleanly.
scenario_monitoring_queries() {
  require_prometheus
  local dashboard="$E2E_TMP/dashboard.json" alerts
  [ "$(kubectl_ -n "$OPERATOR_NS" get configmap -l grafana_dashboard=1 -o name | wc -l)" = 1 ] ||
    fail "no ConfigMap labelled grafana_dashboard=1 in $OPERATOR_NS"
  kubectl_ -n "$OPERATOR_NS" get configmap -l grafana_dashboard=1 -o jsonpath='{.items[0].data.eventtermq\.json}' >"$dashboard"
  "$PROMTOOL_BIN" check rules "$PROMETHEUS_DIR/rules.yaml" >/dev/null || fail "promtool check rules failed"
  alerts=$(sed -n 's/^ *- alert: *//p' "$PROMETHEUS_DIR/rules.yaml")
  [ -n "$alerts" ] || fail "no alerts in the chart's PrometheusRule"
  # Rules are evaluated every scrape interval: retry until each was evaluated once.
  # shellcheck disable=SC2086
  queries_pass() { python3 "$root/e2e/monitoring_queries.py" "$PROMETHEUS_URL" "$dashboard" $alerts >"$E2E_TMP/queries.log" 2>&1; }
  until_ok_quiet 30 queries_pass || fail "$(grep FAILED "$E2E_TMP/queries.log" | head -n 5 | tr '\n' ' ')"
  sed 's/^/   /' "$E2E_TMP/queries.log"
}

# --- disruptions under continuous traffic (issue 19) ------------------------------------------
. "$root/e2e/load.sh"
. "$root/e2e/hpa.sh"

# --- diagnostics on failure -------------------------------------------------------------------
print_diagnostics() {
  echo "== diagnostics"
  print_load_diagnostics
  kubectl_ get nodes -o wide 2>&1 || true
  kubectl_ get pods -A -o wide 2>&1 || true
  kubectl_ -n "$NS" get eventterclusters,topics,consumergroups,users,statefulsets,services,pvc 2>&1 || true
  kubectl_ -n "$NS" get events --sort-by=.lastTimestamp 2>&1 | tail -n 40 || true
  echo "== operator logs"
  kubectl_ -n "$OPERATOR_NS" logs deployment/"$RELEASE-operator" --tail=200 2>&1 || true
  local pod ready restarts
  while read -r pod ready restarts; do
    [ -n "$pod" ] || continue
    if [ "$ready" != True ] || [ "${restarts:-0}" != 0 ]; then
      echo "== logs of $pod (ready=$ready restarts=$restarts)"
      kubectl_ -n "$NS" logs "$pod" --all-containers --tail=100 2>&1 || true
      if [ "${restarts:-0}" != 0 ]; then
        echo "== previous logs of $pod"
        kubectl_ -n "$NS" logs "$pod" --all-containers --previous --tail=50 2>&1 || true
      fi
    fi
  done < <(kubectl_ -n "$NS" get pods -o jsonpath='{range .items[*]}{.metadata.name} {.status.conditions[?(@.type=="Ready")].status} {.status.containerStatuses[0].restartCount}{"\n"}{end}' 2>/dev/null)
  # Last, as CI shows the end of the output: each broker's view of the cluster and
  # its membership events.
  for pod in $(kubectl_ -n "$NS" get pods -l app.kubernetes.io/name=eventtermq -o name 2>/dev/null); do
    pod=${pod#pod/}
    echo "== $pod: nodes in its dump; membership events"
    k exec "$pod" -c broker -- eventtermq dump --stale 2>&1 | dump_nodes | sed 's/^/   /' || true
    kubectl_ -n "$NS" logs "$pod" -c broker 2>/dev/null |
      grep -E 'member down|rejoin|re-joining|removing node|not removing|bootstrapping|rejoining' |
      sed -E 's/.*"timestamp":"[^T]*T([^.]*)[^"]*".*"message":"([^"]*)"(.*)/   \1 \2 \3/' | cut -c1-160 | tail -n 6 || true
  done
}
