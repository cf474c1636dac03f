#!/bin/bash
# The idle CPU of an empty three-node cluster: bench/idle.sh BINARY LABEL [broker flags...]
# Nodes on 127.0.0.204-206:27420; measured 10 s after all three are ALIVE, over 30 s,
# from /proc/PID/stat (user + system time). Prints one line.
set -u
B=$1; label=$2; shift 2
D=${TMPDIR:-/tmp}/eventtermq-idle/$label; rm -rf "$D"; mkdir -p "$D"
pids=()
for n in 4 5 6; do
  "$B" --dir "$D/$n" --host 127.0.0.20$n --port 27420 --insecure-trusted-network "$@" \
    $([ $n = 4 ] || echo --join 127.0.0.204:27420) > "$D/$n.log" 2>&1 &
  pids+=($!)
done
for _ in $(seq 60); do
  [ "$("$B" --host 127.0.0.204 --port 27420 dump 2>/dev/null | grep -c ALIVE)" = 3 ] && break
  sleep 1
done
sleep 10
ticks() { local s=0 f; for p in "${pids[@]}"; do read -ra f < /proc/$p/stat; s=$((s + f[13] + f[14])); done; echo $s; }
a=$(ticks); sleep 30; b=$(ticks)
hz=$(getconf CLK_TCK)
echo "$label: $(( (b - a) * 1000 / hz )) ms CPU over 30 s = $(python3 -c "print(round(($b - $a) / $hz / 30 * 100, 2))") % of one core"
kill "${pids[@]}"; wait 2>/dev/null
