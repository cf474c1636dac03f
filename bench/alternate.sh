#!/usr/bin/env bash
# `bench data-path` with two binaries, alternated A B B A A B ... so that a busy
# neighbour weighs on both alike, then a summary: per binary, each run's W1 rate, W2
# p50/p99 (to the primary, through another node) and broker CPU per message, and the
# W2 floors of the same run. Compare A and B only within one series.
#
#   A=old/eventtermq B=new/eventtermq PAIRS=3 bash bench/alternate.sh [data-path flags]
#   A=... B=... bash bench/alternate.sh --messages 50000 --floor-samples 1000
#
# Every run's JSON lines go to $OUT (default a temporary directory), one file per run.
set -uo pipefail
A=${A:?binary A (e.g. the last release)}
B=${B:?binary B (e.g. the change)}
PAIRS=${PAIRS:-3}
HOSTS=${HOSTS:-127.0.0.221,127.0.0.222,127.0.0.223}
PORT=${PORT:-27560}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
echo "# runs in $OUT"
for pair in $(seq 1 "$PAIRS"); do
  order="A B"
  if (( pair % 2 == 0 )); then order="B A"; fi
  for which in $order; do
    bin=$A
    [[ $which == B ]] && bin=$B
    f="$OUT/$pair-$which.jsonl"
    # A failed run (a Raft election under a neighbour's load) is reported; the series goes on.
    timeout 900 "$bin" --port "$PORT" bench data-path --hosts "$HOSTS" "$@" > "$f" 2> "$OUT/$pair-$which.err" \
      || echo "# run $pair-$which failed: exit $? (see $OUT/$pair-$which.err)"
  done
done
python3 - "$OUT" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
def short(name):
    return {"W1 publish pipelined": "W1", "W3 consume from another node": "W3"}.get(name, name)
for which in "AB":
    for f in sorted(out.glob(f"*-{which}.jsonl")):
        cols = []
        for l in f.read_text().splitlines():
            try:
                j = json.loads(l)
            except ValueError:
                continue
            name, cpu = short(j.get("bench", "")), j.get("cpu") or {}
            if "messages_per_s" in j:
                cols.append(f"{name} {j['messages_per_s']:.0f}/s cpu {cpu.get('brokers_us_per_message', 0):.1f}us")
            elif name.startswith("W2"):
                lat, cf = j.get("floor") or {}, j.get("cpu_floor") or {}
                where = "other" if "another" in name else "primary"
                cols.append(f"W2 {where} p50 {j['p50_us']:.0f} ({lat.get('p50_ratio', 0):.2f}x floor) "
                            f"p99 {j['p99_us']:.0f} ({lat.get('p99_ratio', 0):.2f}x) "
                            f"cpu {cpu.get('brokers_us_per_message', 0):.0f}us (floor {cf.get('brokers_us_per_message', 0):.0f})")
            elif name.startswith("floor") and j.get("writers_at_once", 3) == 3:
                what = "3 fsyncs" if "writers_at_once" in j else "rpc"
                cols.append(f"floor {what} p50 {j['p50_us']:.0f} p99 {j['p99_us']:.0f}")
        print(f"{which} {f.stem}: " + " | ".join(cols))
EOF
