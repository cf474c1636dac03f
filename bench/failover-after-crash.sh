#!/usr/bin/env bash
# Recovery time after a crash of every node: three brokers on 127.0.0.121-123, a topic
# with 1,000 messages, then ROUNDS times: kill -9 of all three, start them again, and
# publish (one message, waited for) until one is confirmed. Prints the time from the
# restart to that confirmation. Bounded: each round gives up after 60 s.
#   bash bench/failover-after-crash.sh            # uses target/release/eventtermq
set -euo pipefail
B="${B:-target/release/eventtermq}"
PORT="${PORT:-27100}"
ROUNDS="${ROUNDS:-3}"
D="$(mktemp -d)"
trap 'kill -9 $(cat "$D"/*.pid 2>/dev/null) 2>/dev/null || true; rm -rf "$D"' EXIT

start() { "$B" --dir "$D/$1" --host "127.0.0.12$1" --advertise-host "127.0.0.12$1" --port "$PORT" $2 >> "$D/$1.log" 2>&1 & echo $! > "$D/$1.pid"; disown; }
alive() { "$B" --host 127.0.0.121 --port "$PORT" dump 2>/dev/null | grep -c "state: ALIVE" || true; }

start 1 ""; start 2 "--join 127.0.0.121:$PORT"; start 3 "--join 127.0.0.121:$PORT"
for _ in $(seq 1 150); do [ "$(alive)" = 3 ] && break; sleep 0.2; done
"$B" --host 127.0.0.121 --port "$PORT" create-topic t > /dev/null
"$B" --host 127.0.0.122 --port "$PORT" publish t 'm-{n}' --count 1000 > /dev/null
for r in $(seq 1 "$ROUNDS"); do
  kill -9 $(cat "$D"/1.pid "$D"/2.pid "$D"/3.pid); sleep 0.5
  t0=$(date +%s%N)
  start 1 "--join 127.0.0.122:$PORT"; start 2 "--join 127.0.0.121:$PORT"; start 3 "--join 127.0.0.121:$PORT"
  ok=no
  for _ in $(seq 1 600); do
    if timeout 5 "$B" --host 127.0.0.123 --port "$PORT" publish t "after-$r" > /dev/null 2>&1; then ok=yes; break; fi
    [ $(( ($(date +%s%N) - t0) / 1000000 )) -gt 60000 ] && break
    sleep 0.1
  done
  echo "{\"bench\":\"restart of all 3 after kill -9 -> first confirmed publish\",\"round\":$r,\"ok\":\"$ok\",\"ms\":$(( ($(date +%s%N) - t0) / 1000000 ))}"
done
