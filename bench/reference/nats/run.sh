#!/usr/bin/env bash
# NATS JetStream R3 reference benchmark for EventterMQ's W2: one-at-a-time
# synchronous publish latency on a three-server cluster on this machine.
# See README.md next to this script.
#
# usage: run.sh [always|default]
#   always (no argument): jetstream { sync_interval: always }  (fsync on every write)
#   default             : sync_interval left at the server default
# env:
#   N=5000, WARMUP=200 : measured and warm-up messages per W2 run
#   NATS_BENCH_BIN     : binaries (default $HOME/.cache/eventtermq/nats-bench/bin);
#                        build.sh runs first and builds what is missing or stale
#   TMPDIR             : parent of the work dir (configs, logs, data); put it on
#                        the disk you want to measure
#   STRACE=1           : after the measured runs, attach strace -c to all three
#                        servers during a short extra probe (1000 messages to the
#                        leader) and print fsync/fdatasync counts. Probe latencies
#                        are inflated by ptrace and are NOT reference figures.
#
# Output: JSON lines on stdout, progress on stderr. Servers listen on
# 127.0.0.21-23 (client 4222, cluster 6222). The work dir is removed at exit;
# if the run fails its configs and logs are kept and their place is printed.
set -euo pipefail

MODE=${1:-always}
case "$MODE" in
  always|default) ;;
  *) echo "usage: $0 [always|default]" >&2; exit 2 ;;
esac

HERE=$(cd "$(dirname "$0")" && pwd)
export NATS_BENCH_BIN=${NATS_BENCH_BIN:-$HOME/.cache/eventtermq/nats-bench/bin}
BIN=$NATS_BENCH_BIN
IPS=(127.0.0.21 127.0.0.22 127.0.0.23)
NAMES=(n1 n2 n3)
URLS="nats://127.0.0.21:4222,nats://127.0.0.22:4222,nats://127.0.0.23:4222"
N=${N:-5000}
WARMUP=${WARMUP:-200}
SIZE=1024
PUB_TIMEOUT=600   # seconds, hard bound for one W2 run
PIDS=()
STRACE_PIDS=()
WORK=

log() { echo "run.sh: $*" >&2; }

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  local pid i alive
  for pid in "${STRACE_PIDS[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  # bounded wait (10 s) for a clean shutdown, then SIGKILL
  for i in $(seq 1 100); do
    alive=0
    for pid in "${PIDS[@]}" "${STRACE_PIDS[@]}"; do
      kill -0 "$pid" 2>/dev/null && alive=1
    done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for pid in "${PIDS[@]}" "${STRACE_PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}" "${STRACE_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ -n "$WORK" ] && [ -d "$WORK" ]; then
    if [ "$rc" = 0 ]; then
      rm -rf "$WORK"
    else
      rm -rf "${WORK:?}/data" "$WORK/dd"
      log "FAILED (exit $rc); configs and server logs kept in $WORK (remove it when done)"
    fi
  elif [ "$rc" != 0 ]; then
    log "FAILED (exit $rc)"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

case "$N" in ''|*[!0-9]*) log "N must be a positive integer"; exit 2 ;; esac
case "$WARMUP" in ''|*[!0-9]*) log "WARMUP must be a non-negative integer"; exit 2 ;; esac
[ "$N" -ge 1 ] || { log "N must be a positive integer"; exit 2; }
for tool in ss timeout dd awk; do
  command -v "$tool" >/dev/null 2>&1 || { log "$tool not found"; exit 1; }
done
if [ "${STRACE:-0}" = 1 ]; then
  command -v strace >/dev/null 2>&1 || { log "STRACE=1 needs strace"; exit 1; }
fi

# Binaries: build.sh builds what is missing or out of date and otherwise only
# checks (a second at most), so it runs every time.
bash "$HERE/build.sh"
for f in "$BIN/nats-server" "$BIN/natsw2"; do
  [ -x "$f" ] || { log "missing $f"; exit 1; }
done
log "using $("$BIN/nats-server" --version) and natsw2 from $BIN"

# Refuse to start if any of our ports is already taken.
for ip in "${IPS[@]}"; do
  for port in 4222 6222; do
    if ss -Hltn "src $ip:$port" | grep -q .; then
      log "$ip:$port already in use"; exit 1
    fi
  done
done

WORK=$(mktemp -d -t eventtermq-nats-bench.XXXXXX)
CONF=$WORK/conf
LOGS=$WORK/logs
DATA=$WORK/data
mkdir -p "$CONF" "$LOGS" "$DATA"
log "work dir $WORK"

# --- disk reference: 1 KiB O_DSYNC writes (same file system as the data) ----
DDOUT=$(timeout 120 dd if=/dev/zero of="$WORK/dd" bs=1k count=2000 oflag=dsync 2>&1)
rm -f "$WORK/dd"
DDSECS=$(echo "$DDOUT" | awk '/copied/ { for (i = 1; i <= NF; i++) if ($i ~ /^s,?$/) print $(i-1) }')
[ -n "$DDSECS" ] || { log "cannot parse dd output: $DDOUT"; exit 1; }
awk -v s="$DDSECS" 'BEGIN { printf "{\"bench\":\"dd bs=1k count=2000 oflag=dsync\",\"total_s\":%s,\"us_per_write\":%.1f}\n", s, s * 1e6 / 2000 }'

# --- configs and servers ----------------------------------------------------
if [ "$MODE" = always ]; then SYNCLINE='sync_interval: always'; else SYNCLINE='# sync_interval: server default'; fi

for i in 0 1 2; do
  n=${NAMES[$i]}; ip=${IPS[$i]}
  mkdir -p "$DATA/$n"
  cat > "$CONF/$n.conf" <<EOF
server_name: $n
listen: $ip:4222
log_file: "$LOGS/$n.log"
logtime: true
jetstream {
  store_dir: "$DATA/$n"
  max_memory_store: 256MB
  max_file_store: 2GB
  $SYNCLINE
}
cluster {
  name: natsbench
  listen: $ip:6222
  routes: [
    nats-route://127.0.0.21:6222
    nats-route://127.0.0.22:6222
    nats-route://127.0.0.23:6222
  ]
}
EOF
  : > "$LOGS/$n.log"
  "$BIN/nats-server" -c "$CONF/$n.conf" &
  PIDS+=($!)
done
sleep 0.5
for i in 0 1 2; do
  kill -0 "${PIDS[$i]}" 2>/dev/null || { log "${NAMES[$i]} died at startup"; tail -20 "$LOGS/${NAMES[$i]}.log" >&2; exit 1; }
done
log "servers started: n1=${PIDS[0]} n2=${PIDS[1]} n3=${PIDS[2]} (sync_interval $MODE)"

# Wait (max 60 s) until all three answer the JetStream API (=> meta leader elected).
timeout 70 "$BIN/natsw2" -mode wait -urls "$URLS" -timeout 60s
# Wait (max 60 s) until routes are up on all three (log lines), as a second check.
for i in 0 1 2; do
  for t in $(seq 1 120); do
    c=$(grep -c 'Route connection created' "$LOGS/${NAMES[$i]}.log" || true)
    [ "${c:-0}" -ge 2 ] && break
    [ "$t" = 120 ] && { log "${NAMES[$i]}: routes not up after 60 s"; exit 1; }
    sleep 0.5
  done
done
{ grep -h 'Self is new JetStream cluster metadata leader' "$LOGS"/n?.log || true; } | tail -1 | sed 's/^/run.sh: /' >&2

# index_of NAME: position of a server name in NAMES
index_of() {
  local i
  for i in 0 1 2; do
    if [ "${NAMES[$i]}" = "$1" ]; then echo "$i"; return 0; fi
  done
  return 1
}

# Create the R3 stream and wait (max 60 s) for a leader with both replicas current.
LEADER=$(timeout 70 "$BIN/natsw2" -mode setup -urls "$URLS" -timeout 60s)
LI=$(index_of "$LEADER") || { log "unexpected leader name '$LEADER'"; exit 1; }
for i in 0 1 2; do   # the first server in name order that is not the leader
  if [ "$i" != "$LI" ]; then NI=$i; break; fi
done
LIP=${IPS[$LI]}; FOLLOWER=${NAMES[$NI]}; FIP=${IPS[$NI]}
log "stream leader: $LEADER ($LIP); non-leader used: $FOLLOWER ($FIP)"

SYNCLABEL="sync_interval=$MODE"
timeout $PUB_TIMEOUT "$BIN/natsw2" -mode pub -url "nats://$LIP:4222" -n "$N" -warmup "$WARMUP" -size $SIZE \
  -label "nats W2 $SYNCLABEL to leader"
timeout $PUB_TIMEOUT "$BIN/natsw2" -mode pub -url "nats://$FIP:4222" -n "$N" -warmup "$WARMUP" -size $SIZE \
  -label "nats W2 $SYNCLABEL to non-leader"

# --- optional strace probe (not a reference figure) ---------------------------
if [ "${STRACE:-0}" = 1 ]; then
  LEADER=$(timeout 20 "$BIN/natsw2" -mode leader -urls "$URLS" -timeout 10s)
  LI=$(index_of "$LEADER") || { log "unexpected leader name '$LEADER'"; exit 1; }
  LIP=${IPS[$LI]}
  for i in 0 1 2; do
    timeout -s INT 300 strace -f -c -e trace=fsync,fdatasync,sync_file_range \
      -o "$LOGS/strace-${NAMES[$i]}.txt" -p "${PIDS[$i]}" 2>/dev/null &
    STRACE_PIDS+=($!)
  done
  sleep 2
  PROBE_N=1000
  timeout 300 "$BIN/natsw2" -mode pub -url "nats://$LIP:4222" -n $PROBE_N -warmup 0 -size $SIZE \
    -label "strace probe $SYNCLABEL to leader (ptrace-inflated, NOT a reference)"
  sleep 1
  for pid in "${STRACE_PIDS[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
  for pid in "${STRACE_PIDS[@]}"; do
    for t in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    wait "$pid" 2>/dev/null || true
  done
  STRACE_PIDS=()
  for n in "${NAMES[@]}"; do
    f="$LOGS/strace-$n.txt"
    [ -s "$f" ] || { log "no strace output for $n ($f)"; exit 1; }
    role=follower; [ "$n" = "$LEADER" ] && role=leader
    awk -v n="$n" -v role="$role" -v m=$PROBE_N -v mode="$MODE" '
      $NF=="fsync" {fs=$4} $NF=="fdatasync" {fd=$4} $NF=="sync_file_range" {sr=$4}
      END { printf "{\"bench\":\"strace probe sync_interval=%s\",\"server\":\"%s\",\"role\":\"%s\",\"probe_messages\":%d,\"fsync\":%d,\"fdatasync\":%d,\"sync_file_range\":%d,\"window\":\"~%d msgs + 3 s idle\"}\n", mode, n, role, m, fs, fd, sr, m }' "$f"
  done
fi

log "done"
