#!/usr/bin/env bash
# What serving /metrics costs the data path (issue 16): `bench data-path` without and
# with every broker's /metrics scraped once a second (`--scrape-interval-ms 1000`),
# alternating, the order swapped every pair (ABBA) so that a busy neighbour weighs on
# both sides alike. Prints the JSON lines of each run under a `# pair N scrape=MS` header.
#
#   B=target/release/eventtermq PAIRS=4 bash bench/metrics-scrape.sh
set -uo pipefail
B=${B:-target/release/eventtermq}
PAIRS=${PAIRS:-3}
HOSTS=${HOSTS:-127.0.0.216,127.0.0.217,127.0.0.218}
PORT=${PORT:-27540}
for pair in $(seq 1 "$PAIRS"); do
  order="0 1000"
  if (( pair % 2 == 0 )); then order="1000 0"; fi
  for scrape in $order; do
    echo "# pair $pair scrape=$scrape"
    # A failed run (e.g. a Raft election under a neighbour's load) is reported, and the
    # series goes on.
    "$B" --port "$PORT" bench data-path --hosts "$HOSTS" --floor-samples 0 --scrape-interval-ms "$scrape" \
      || echo "# run failed: exit $?"
  done
done
