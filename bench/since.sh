#!/usr/bin/env bash
# How long a consumer group created with --since waits for its first message on a topic
# of MESSAGES records in one segment (issue 14: `since` uses the time index). One
# broker on 127.0.0.148; MESSAGES small messages, then 10 more after a mark; a group
# with --since at the mark subscribes for those 10 (counted by their data, base64 of
# "late-"). Prints JSON lines; bounded (each step gives up after 120 s).
#   bash bench/since.sh                       # target/release/eventtermq, 3,000,000
#   B=/path/to/eventtermq MESSAGES=1000000 bash bench/since.sh
set -euo pipefail
B="${B:-target/release/eventtermq}"
PORT="${PORT:-27150}"
MESSAGES="${MESSAGES:-3000000}"
ROUNDS="${ROUNDS:-3}"
H=127.0.0.148
D="$(mktemp -d)"
trap 'kill -9 $(cat "$D"/pid 2>/dev/null) 2>/dev/null || true; rm -rf "$D"' EXIT
cli() { timeout 120 "$B" --host "$H" --port "$PORT" "$@"; }
ms() { echo $(( $(date +%s%N) / 1000000 )); }

"$B" --dir "$D/data" --host "$H" --advertise-host "$H" --port "$PORT" --metrics-port 0 --amqp-port 0 \
  --segment-age-max-ms 86400000 > "$D/log" 2>&1 & echo $! > "$D/pid"
for _ in $(seq 1 150); do cli dump 2>/dev/null | grep -q "state: ALIVE" && break; sleep 0.2; done
# One segment of up to 4 GiB holds every record.
cli create-topic s --replication-factor 1 --segment-size-max-bytes 4294967296 > /dev/null
t0=$(ms)
cli publish s 'message-{n}' --count "$MESSAGES" --persistence none > /dev/null
echo "{\"bench\":\"since\",\"step\":\"publish\",\"messages\":$MESSAGES,\"ms\":$(( $(ms) - t0 ))}"
sleep 1.1
since=$(date -u +%Y-%m-%dT%H:%M:%S.%3NZ)
sleep 0.1
cli publish s 'late-{n}' --count 10 > /dev/null
for r in $(seq 1 "$ROUNDS"); do
  cli create-consumer-group "g$r" --bind s --since "$since" > /dev/null
  t0=$(ms)
  got=$(cli subscribe "g$r" --max-messages 10 --wait 60s 2>"$D/err" | grep -c bGF0ZS0 || true); [ "$got" = 10 ] || cat "$D/err" >&2
  echo "{\"bench\":\"since\",\"step\":\"first 10 after since\",\"round\":$r,\"messages_before\":$MESSAGES,\"got\":$got,\"ms\":$(( $(ms) - t0 ))}"
done
# For scale: a group without since reading the same topic from its start.
cli create-consumer-group all --bind s > /dev/null
t0=$(ms)
cli subscribe all --max-messages "$((MESSAGES + 10))" --wait 60s --size 10000 > /dev/null
echo "{\"bench\":\"since\",\"step\":\"a group without since reads everything\",\"messages\":$((MESSAGES + 10)),\"ms\":$(( $(ms) - t0 ))}"
