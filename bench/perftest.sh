#!/usr/bin/env bash
# RabbitMQ's PerfTest, unchanged, against a 3-node EventterMQ cluster of the release
# binary and then, with the same command, against a local 3-node RabbitMQ cluster with a
# quorum queue (Debian's rabbitmq-server); runs alternate; everything it started is
# stopped at the end. See bench/perftest.md for the figures and what bounds them.
#
#   bench/perftest.sh [--rounds N] [--seconds S] [--binary PATH] [--only emq|rabbitmq]
#                     [--perf] [--w1]
#
# --rounds: alternated pairs of runs (2); --seconds: each run's length (30);
# --binary: the eventtermq binary (target/release/eventtermq, or $CARGO_TARGET_DIR's);
# --perf: record `perf record -g` of the EventterMQ brokers during the first EventterMQ
# run into $BENCH_DIR/perf.data (needs perf); --w1: after each round, the gRPC W1 of
# `eventtermq bench data-path` (100,000 messages, its own 3 brokers on 127.0.0.60,
# 127.0.0.63, 127.0.0.64:27910), to compare with at the same load. PERFTEST_CONSUMER_ARGS and
# PERFTEST_PRODUCER_ARGS add PerfTest options to the consumer's or producer's command,
# for diagnosis only (e.g. PERFTEST_CONSUMER_ARGS=-a: auto-ack); the figures in
# bench/perftest.md are without them.
#
# Installs PerfTest (com.rabbitmq:perf-test, $PERFTEST_VERSION, with its dependencies)
# from Maven into $HOME/.cache/eventtermq/perftest and, if missing, Debian's
# rabbitmq-server with apt-get (root). Loopback only: EventterMQ on 127.0.0.54-56
# (gRPC 27900, AMQP 27901, metrics 27902; PERFTEST_EMQ_HOSTS and PERFTEST_EMQ_PORT
# move them), RabbitMQ on 127.0.0.57-59 (AMQP 5672,
# distribution 27957-27959, one epmd on their port 4369). Working files in $BENCH_DIR
# (default: a new directory under /tmp, removed at the end unless BENCH_KEEP=1).
#
# The commands (both brokers; two processes, so that the consumer is on node 2 and the
# producer on node 3: with --uris PerfTest picks a node at random for each connection):
#   perf-test --uri amqp://<node 2> -x 0 -y 1 $COMMON -z S+6        (consumer)
#   perf-test --uri amqp://<node 3> -x 1 -y 0 -c 500 $COMMON -z S   (producer, 3 s later)
#   COMMON="-s 1024 -f persistent -e perftest-x-N -t direct -u perftest-q-N
#           -k perftest-k-N -qq -ad false -ms"
set -euo pipefail
cd "$(dirname "$0")/.."

PERFTEST_VERSION=2.22.1
rounds=2 seconds=30 binary="" only="" perf=0 w1=0
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --binary) binary=$2; shift 2 ;;
    --only) only=$2; shift 2 ;;
    --perf) perf=1; shift ;;
    --w1) w1=1; shift ;;
    *) echo "usage: $0 [--rounds N] [--seconds S] [--binary PATH] [--only emq|rabbitmq] [--perf] [--w1]" >&2; exit 2 ;;
  esac
done
case "$rounds$seconds" in *[!0-9]*) echo "--rounds and --seconds take whole numbers" >&2; exit 2 ;; esac
case "$only" in "" | emq | rabbitmq) ;; *) echo "--only takes emq or rabbitmq, not '$only'" >&2; exit 2 ;; esac
if [ -z "$binary" ]; then
  for b in "${CARGO_TARGET_DIR:-target}/release/eventtermq" target/release/eventtermq; do
    [ -x "$b" ] && { binary=$b; break; }
  done
fi
[ -n "$binary" ] && [ -x "$binary" ] || { echo "no eventtermq binary: cargo build --release --workspace, or --binary PATH" >&2; exit 1; }

CACHE="$HOME/.cache/eventtermq/perftest"
# PERFTEST_EMQ_HOSTS (three comma-separated loopback addresses) and PERFTEST_EMQ_PORT
# move the EventterMQ nodes (gRPC on the port, AMQP on port + 1, metrics on port + 2).
IFS=, read -r -a EMQ_HOSTS <<<"${PERFTEST_EMQ_HOSTS:-127.0.0.54,127.0.0.55,127.0.0.56}"
EMQ_PORT=${PERFTEST_EMQ_PORT:-27900}
[ "${#EMQ_HOSTS[@]}" = 3 ] || { echo "PERFTEST_EMQ_HOSTS: three addresses, comma-separated" >&2; exit 2; }
case "$EMQ_PORT" in "" | *[!0-9]*) echo "PERFTEST_EMQ_PORT: a port number" >&2; exit 2 ;; esac
RMQ_HOSTS=(127.0.0.57 127.0.0.58 127.0.0.59)
RMQ_DIST_PORTS=(27957 27958 27959)
RMQ_EPMD_ADDRESSES=127.0.0.57,127.0.0.58,127.0.0.59
BENCH_DIR=${BENCH_DIR:-$(mktemp -d /tmp/perftest.XXXXXX)}
mkdir -p "$BENCH_DIR"
pids=()

stamp() { echo "== $(date -u +%H:%M:%S) $*" >&2; }

# --- installs ----------------------------------------------------------------------------
install_perftest() {
  if [ -f "$CACHE/lib/perf-test-$PERFTEST_VERSION.jar" ]; then return 0; fi
  command -v mvn >/dev/null || { echo "mvn is needed to fetch PerfTest" >&2; exit 1; }
  stamp "fetching com.rabbitmq:perf-test:$PERFTEST_VERSION and its dependencies into $CACHE"
  mkdir -p "$CACHE/pom"
  cat >"$CACHE/pom/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>eventtermq.bench</groupId><artifactId>perftest-deps</artifactId><version>1</version>
  <dependencies>
    <dependency><groupId>com.rabbitmq</groupId><artifactId>perf-test</artifactId><version>$PERFTEST_VERSION</version></dependency>
  </dependencies>
</project>
EOF
  rm -rf "$CACHE/lib.tmp"
  mvn -B -q -f "$CACHE/pom/pom.xml" -Dmaven.repo.local="$CACHE/m2" \
    dependency:copy-dependencies -DoutputDirectory="$CACHE/lib.tmp"
  rm -rf "$CACHE/lib" && mv "$CACHE/lib.tmp" "$CACHE/lib"
}
install_rabbitmq() {
  [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] && return 0
  stamp "installing Debian's rabbitmq-server"
  [ "$(id -u)" = 0 ] || { echo "rabbitmq-server is not installed and this is not root (apt-get install rabbitmq-server)" >&2; exit 1; }
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends rabbitmq-server >/dev/null
  # The package starts a default node where an init system runs; this one is not ours.
  if command -v systemctl >/dev/null && systemctl is-active -q rabbitmq-server 2>/dev/null; then
    systemctl stop rabbitmq-server
  fi
}

perftest() { java -cp "$CACHE/lib/*" com.rabbitmq.perf.PerfTest "$@"; }

# --- EventterMQ ----------------------------------------------------------------------------
emq_start() {
  local i h
  export EVENTTERMQ_INSECURE_TRUSTED_NETWORK=true # loopback only
  for i in 0 1 2; do
    h=${EMQ_HOSTS[$i]}
    mkdir -p "$BENCH_DIR/emq/$i"
    "$binary" --dir "$BENCH_DIR/emq/$i" --host "$h" --advertise-host "$h" --port "$EMQ_PORT" \
      $([ "$i" = 0 ] || echo --join "${EMQ_HOSTS[0]}:$EMQ_PORT") \
      >"$BENCH_DIR/emq/$i.log" 2>&1 &
    pids+=($!)
    echo $! >"$BENCH_DIR/emq/$i.pid"
  done
  local deadline=$(( $(date +%s) + 60 ))
  until [ "$("$binary" --host "${EMQ_HOSTS[2]}" --port "$EMQ_PORT" dump 2>/dev/null | grep -c 'state: ALIVE')" = 3 ]; do
    [ "$(date +%s)" -lt "$deadline" ] || { echo "EventterMQ: 3 ALIVE nodes not seen within 60 s" >&2; tail -n 20 "$BENCH_DIR"/emq/*.log >&2; exit 1; }
    sleep 0.5
  done
  stamp "EventterMQ: 3 nodes ALIVE ($("$binary" --version 2>/dev/null || echo "$binary"))"
}
emq_stop() {
  local i p
  for i in 0 1 2; do
    p=$(cat "$BENCH_DIR/emq/$i.pid" 2>/dev/null) || continue
    kill "$p" 2>/dev/null || true
  done
  for i in 0 1 2; do
    p=$(cat "$BENCH_DIR/emq/$i.pid" 2>/dev/null) || continue
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$p" 2>/dev/null || true
    rm -f "$BENCH_DIR/emq/$i.pid"
  done
}
emq_pids() { local f; for f in "$BENCH_DIR"/emq/*.pid; do echo "$(cat "$f")"; done; }

# --- RabbitMQ ------------------------------------------------------------------------------
RMQ_BIN=/usr/lib/rabbitmq/bin
rmq_env() { # rmq_env I: the environment of node I (and of rabbitmqctl talking to it)
  local i=$1 h=${RMQ_HOSTS[$1]}
  echo HOME="$BENCH_DIR/rmq" \
    RABBITMQ_CONF_ENV_FILE="$BENCH_DIR/rmq/empty.conf" \
    RABBITMQ_USE_LONGNAME=true \
    RABBITMQ_NODENAME="perftest$i@$h" \
    RABBITMQ_NODE_IP_ADDRESS="$h" RABBITMQ_NODE_PORT=5672 \
    RABBITMQ_DIST_PORT="${RMQ_DIST_PORTS[$i]}" \
    RABBITMQ_MNESIA_BASE="$BENCH_DIR/rmq/$i/mnesia" RABBITMQ_LOG_BASE="$BENCH_DIR/rmq/$i/log" \
    RABBITMQ_PID_FILE="$BENCH_DIR/rmq/$i/pid" \
    RABBITMQ_CONFIG_FILE="$BENCH_DIR/rmq/$i/rabbitmq.conf" \
    RABBITMQ_ADVANCED_CONFIG_FILE="$BENCH_DIR/rmq/$i/advanced.config" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$BENCH_DIR/rmq/enabled_plugins" \
    ERL_EPMD_ADDRESS="$RMQ_EPMD_ADDRESSES"
}
rmqctl() { # rmqctl I ARGS...: rabbitmqctl against node I
  local i=$1; shift
  env $(rmq_env "$i") "$RMQ_BIN/rabbitmqctl" -n "perftest$i@${RMQ_HOSTS[$i]}" "$@"
}
rmq_start() {
  local i h
  mkdir -p "$BENCH_DIR/rmq"
  : >"$BENCH_DIR/rmq/empty.conf"
  echo '[].' >"$BENCH_DIR/rmq/enabled_plugins"
  # One cookie for the three nodes and rabbitmqctl (read from $HOME).
  head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$BENCH_DIR/rmq/.erlang.cookie"
  chmod 400 "$BENCH_DIR/rmq/.erlang.cookie"
  # One epmd on the three RabbitMQ hosts (it adds loopback 127.0.0.1 itself).
  ERL_EPMD_ADDRESS="$RMQ_EPMD_ADDRESSES" epmd -daemon
  for i in 0 1 2; do
    h=${RMQ_HOSTS[$i]}
    mkdir -p "$BENCH_DIR/rmq/$i/mnesia" "$BENCH_DIR/rmq/$i/log"
    printf 'listeners.tcp.1 = %s:5672\nloopback_users = none\n' "$h" >"$BENCH_DIR/rmq/$i/rabbitmq.conf"
    echo "[{kernel, [{inet_dist_use_interface, {127,0,0,${h##*.}}}]}]." >"$BENCH_DIR/rmq/$i/advanced.config"
    env $(rmq_env "$i") "$RMQ_BIN/rabbitmq-server" >"$BENCH_DIR/rmq/$i.out" 2>&1 &
    pids+=($!)
  done
  # await_startup gives up at once while the node has not registered with epmd yet.
  local deadline=$(( $(date +%s) + 120 ))
  for i in 0 1 2; do
    until rmqctl "$i" -q await_startup --timeout 60 >/dev/null 2>&1; do
      [ "$(date +%s)" -lt "$deadline" ] ||
        { echo "RabbitMQ node $i did not start within 120 s" >&2; tail -n 30 "$BENCH_DIR/rmq/$i.out" >&2; exit 1; }
      sleep 1
    done
  done
  for i in 1 2; do
    rmqctl "$i" -q stop_app >/dev/null
    rmqctl "$i" -q join_cluster "perftest0@${RMQ_HOSTS[0]}" >/dev/null
    rmqctl "$i" -q start_app >/dev/null
  done
  local running
  running=$(rmqctl 0 -q cluster_status --formatter json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["running_nodes"]))')
  [ "$running" = 3 ] || { echo "RabbitMQ: $running running nodes, want 3" >&2; exit 1; }
  stamp "RabbitMQ $(rmqctl 0 -q version 2>/dev/null): 3 nodes running"
}
rmq_stop() {
  local i
  for i in 0 1 2; do
    [ -f "$BENCH_DIR/rmq/$i/pid" ] || continue
    rmqctl "$i" -q stop --idempotent >/dev/null 2>&1 || true
  done
  for i in 0 1 2; do
    [ -f "$BENCH_DIR/rmq/$i/pid" ] || continue
    local p; p=$(cat "$BENCH_DIR/rmq/$i/pid")
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$p" 2>/dev/null || true
    rm -f "$BENCH_DIR/rmq/$i/pid"
  done
  if [ -f "$BENCH_DIR/rmq/.erlang.cookie" ]; then
    HOME="$BENCH_DIR/rmq" ERL_EPMD_ADDRESS="$RMQ_EPMD_ADDRESSES" epmd -kill >/dev/null 2>&1 || true
  fi
}
rmq_pids() { local f; for f in "$BENCH_DIR"/rmq/*/pid; do echo "$(cat "$f")"; done; }

cleanup() {
  set +e
  emq_stop
  rmq_stop
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  wait 2>/dev/null
  if [ "${BENCH_KEEP:-0}" = 1 ]; then echo "working files kept in $BENCH_DIR" >&2; else rm -rf "$BENCH_DIR"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# cpu_ticks PID...: user+system clock ticks the processes used so far.
cpu_ticks() {
  local t=0 p
  for p in "$@"; do
    [ -r "/proc/$p/stat" ] || continue
    t=$(( t + $(awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$p/stat") ))
  done
  echo "$t"
}

# The PerfTest options both processes share: 1 KiB persistent messages, one exchange
# and one quorum queue bound to it with one routing key, latency in ms (two JVMs).
common_args() { # common_args N
  echo -s 1024 -f persistent -e "perftest-x-$1" -t direct -u "perftest-q-$1" -k "perftest-k-$1" -qq -ad false -ms
}
# received_rate FILE: the consumer's mean rate over the seconds it received anything.
received_rate() {
  sed -n 's/.*, received: \([0-9.]*\) msg\/s.*/\1/p' "$1" |
    awk '$1 > 0 { s += $1; n++ } END { if (n) printf "%d", s / n; else print "?" }'
}

# emq_placement N: which node runs queue perftest-q-N's group and which is the primary
# of exchange perftest-x-N's open segment (from the dump), as "group on H, primary on H".
emq_placement() {
  "$binary" --host "${EMQ_HOSTS[0]}" --port "$EMQ_PORT" dump 2>/dev/null | python3 -c '
import re, sys
text = sys.stdin.read().split("=== Segments ===")[0]
nodes = dict(re.findall(r"nodes: <\s*id: (\d+)\s*address: \"([^\":]+)", text))
group = re.search(r"consumer_groups: <\s*name: \"perftest-q-%s\".*?node_id: (\d+)" % sys.argv[1], text, re.S)
seg = [m for m in re.finditer(r"segments: <(.*?)\n>", text, re.S)
       if "topic: \"perftest-x-%s\"" % sys.argv[1] in m.group(1) and "open: true" in m.group(1)]
primary = re.search(r"primary_node_id: (\d+)", seg[-1].group(1)).group(1) if seg else None
print("group on %s, segment primary on %s" % (nodes.get(group.group(1), "?") if group else "?", nodes.get(primary, "?")))
' "$1"
}

# run_one NAME N URI_CONSUMER URI_PRODUCER BROKER_PIDS: one run, a result line.
# Two PerfTest processes, so that the consumer is on one node and the producer on
# another (with --uris PerfTest picks a node at random for each connection): the
# consumer first (it declares the queue and binding), the producer 3 s later.
run_one() {
  local name=$1 n=$2 a=$3 b=$4 bpids=$5 out="$BENCH_DIR/$1-$2"
  local b0 j0 cpid ppid sent recv lat conf cpu_b cpu_j window t0
  window=$(( seconds > 7 ? seconds - 7 : 1 ))
  b0=$(cpu_ticks $bpids)
  # shellcheck disable=SC2046
  java -cp "$CACHE/lib/*" com.rabbitmq.perf.PerfTest --uri "$a" -x 0 -y 1 $(common_args "$n") \
    -z $(( seconds + 6 )) ${PERFTEST_CONSUMER_ARGS:-} >"$out.consumer" 2>&1 &
  cpid=$!
  sleep 3
  t0=$(date +%s.%N)
  # shellcheck disable=SC2046
  java -cp "$CACHE/lib/*" com.rabbitmq.perf.PerfTest --uri "$b" -x 1 -y 0 -c 500 $(common_args "$n") \
    -z "$seconds" ${PERFTEST_PRODUCER_ARGS:-} >"$out.producer" 2>&1 &
  ppid=$!
  sleep 5
  # CPU from 5 s into the producer's run for $window s (the JVMs' warm-up left out).
  j0=$(cpu_ticks "$cpid" "$ppid")
  local bw0; bw0=$(cpu_ticks $bpids)
  if [ "$perf" = 1 ] && [ "$name" = eventtermq ] && [ "$n" = 1 ]; then
    perf record -g -o "$BENCH_DIR/perf.data" -p "$(echo $bpids | tr ' ' ,)" -- sleep "$window" >/dev/null 2>&1 || true
  else
    sleep "$window"
  fi
  cpu_j=$(( $(cpu_ticks "$cpid" "$ppid") - j0 ))
  cpu_b=$(( $(cpu_ticks $bpids) - bw0 ))
  wait "$ppid" || { echo "PerfTest's producer against $name failed:" >&2; tail -n 30 "$out.producer" >&2; return 1; }
  wait "$cpid" || { echo "PerfTest's consumer against $name failed:" >&2; tail -n 30 "$out.consumer" >&2; return 1; }
  sent=$(sed -n 's/.*sending rate avg: \([0-9]*\) msg\/s.*/\1/p' "$out.producer" | tail -n 1)
  conf=$(sed -n 's/.*confirm latency min\/median\/75th\/95th\/99th \(.*\)$/\1/p' "$out.producer" | tail -n 1)
  recv=$(received_rate "$out.consumer")
  lat=$(sed -n 's/.*consumer latency min\/median\/75th\/95th\/99th \(.*\)$/\1/p' "$out.consumer" | tail -n 1)
  local tck placed=""; tck=$(getconf CLK_TCK)
  [ "$name" != eventtermq ] || placed="; consumer on ${a##*@}, producer on ${b##*@}, $(emq_placement "$n")"
  printf '%-10s run %s: sent and confirmed %s msg/s, received %s msg/s; confirm latency %s, consumer latency %s (min/median/75th/95th/99th); CPU over %s s: brokers %.1f s (%s us a message), PerfTest %.1f s; load average %s%s\n' \
    "$name" "$n" "${sent:-?}" "$recv" "${conf:-?}" "${lat:-?}" "$window" \
    "$(echo "$cpu_b / $tck" | bc -l)" "$(echo "scale=0; $cpu_b * 1000000 / $tck / ($window * ${sent:-1})" | bc)" \
    "$(echo "$cpu_j / $tck" | bc -l)" "$(cut -d' ' -f1 /proc/loadavg)" "$placed"
  [ -n "$sent" ] || { echo "no rate in PerfTest's output:" >&2; tail -n 20 "$out.producer" >&2; return 1; }
}

install_perftest
[ "$only" = emq ] || install_rabbitmq
command -v bc >/dev/null || { echo "bc is needed (apt-get install bc)" >&2; exit 1; }
stamp "PerfTest $PERFTEST_VERSION: $(perftest --version 2>&1 | head -n 1)"

[ "$only" = rabbitmq ] || emq_start
[ "$only" = emq ] || rmq_start

run_w1() { # run_w1 N: W1 of `bench data-path` at this moment, one result line
  local out
  out=$("$binary" --port 27910 bench data-path --hosts 127.0.0.60,127.0.0.63,127.0.0.64 \
    --messages 100000 --latency-messages 100 --floor-samples 0 --bench-dir "$BENCH_DIR/w1-$1" 2>&1) ||
    { echo "bench data-path failed: $(tail -n 5 <<<"$out")" >&2; return 1; }
  rm -rf "$BENCH_DIR/w1-$1"
  grep '"W1 publish pipelined"' <<<"$out" | python3 -c '
import json, sys
w = json.loads(sys.stdin.read())
print("grpc-w1    run %s: %d msg/s (W1 of bench data-path, 100,000 x 1 KiB); brokers %.1f us a message; load average %s"
      % (sys.argv[1], w["messages_per_s"], w["cpu"]["brokers_us_per_message"], open("/proc/loadavg").read().split()[0]))' "$1"
}

results=()
for n in $(seq 1 "$rounds"); do
  if [ "$only" != rabbitmq ]; then
    results+=("$(run_one eventtermq "$n" "amqp://guest:guest@${EMQ_HOSTS[1]}:$((EMQ_PORT + 1))" \
      "amqp://guest:guest@${EMQ_HOSTS[2]}:$((EMQ_PORT + 1))" "$(emq_pids | tr '\n' ' ')")")
    echo "${results[-1]}"
  fi
  if [ "$only" != emq ]; then
    results+=("$(run_one rabbitmq "$n" "amqp://guest:guest@${RMQ_HOSTS[1]}:5672" \
      "amqp://guest:guest@${RMQ_HOSTS[2]}:5672" "$(rmq_pids | tr '\n' ' ')")")
    echo "${results[-1]}"
  fi
  if [ "$w1" = 1 ]; then
    results+=("$(run_w1 "$n")")
    echo "${results[-1]}"
  fi
done
echo
echo "summary ($rounds rounds of $seconds s, 1 producer, 1 consumer, 1 KiB, persistent, confirms 500 outstanding):"
printf '%s\n' "${results[@]}"
