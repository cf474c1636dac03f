#!/usr/bin/env bash
# Smoke test of the images written by images/build.sh: unpacks each image's layer
# into a root filesystem and runs the binaries from it with chroot (as UID 65532,
# so nothing from the host leaks in), then checks that
#   - the broker starts on /data and `dump` shows the cluster state with one ALIVE node,
#   - the static binary resolves a name through /etc/hosts (nss "files") and fails
#     cleanly when DNS has no answer (nss "dns"),
#   - SIGTERM stops the broker with status 0,
#   - `eventter-operator crd` prints the three CRDs.
# Needs root (chroot). Uses 127.0.0.61:26961 (TCP and UDP).
#
#   images/smoke.sh OUTDIR
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 OUTDIR" >&2; exit 2; }
out="$1"
host=127.0.0.61
port=26961
as_nonroot=(chroot --userspec=65532:65532)

tmp="$(mktemp -d /tmp/eventtermq-smoke.XXXXXX)"
broker_pid=""
cleanup() {
  if [ -n "$broker_pid" ] && kill -0 "$broker_pid" 2>/dev/null; then
    kill -KILL "$broker_pid" 2>/dev/null || true
    wait "$broker_pid" 2>/dev/null || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT
fail() {
  echo "smoke: FAIL: $*" >&2
  if [ -f "$tmp/broker.log" ]; then
    echo "--- broker log" >&2
    cat "$tmp/broker.log" >&2
  fi
  exit 1
}

# unpack NAME: the image's single layer into $tmp/NAME (owners and modes kept).
unpack() {
  mkdir -p "$tmp/$1.oci" "$tmp/$1"
  tar -xf "$out/$1.oci.tar" -C "$tmp/$1.oci"
  local layer
  layer="$(python3 - "$tmp/$1.oci" <<'EOF'
import json, sys
d = sys.argv[1]
blob = lambda digest: f"{d}/blobs/sha256/{digest.split(':')[1]}"
index = json.load(open(f"{d}/index.json"))
manifest = json.load(open(blob(index["manifests"][0]["digest"])))
assert len(manifest["layers"]) == 1, manifest
print(blob(manifest["layers"][0]["digest"]))
EOF
)"
  tar -xzf "$layer" -C "$tmp/$1"
}

unpack eventtermq
unpack eventter-operator
root="$tmp/eventtermq"
[ "$(stat -c %u:%g:%a "$root/data")" = "65532:65532:700" ] || fail "/data: $(stat -c %u:%g:%a "$root/data")"
[ "$(stat -c %a "$root/tmp")" = "1777" ] || fail "/tmp: $(stat -c %a "$root/tmp")"
# Name resolution inside the rootfs: a name only /etc/hosts knows, and a DNS server
# that does not exist (port unreachable: fails at once).
printf '127.0.0.1 localhost\n%s eventtermq-smoke.test\n' "$host" >"$root/etc/hosts"
printf 'nameserver 127.0.0.62\noptions timeout:1 attempts:1\n' >"$root/etc/resolv.conf"

"${as_nonroot[@]}" "$root" /eventtermq --dir /data --host "$host" --port "$port" >"$tmp/broker.log" 2>&1 &
broker_pid=$!

ready=""
deadline=$((SECONDS + 30))
while [ "$SECONDS" -lt "$deadline" ]; do
  kill -0 "$broker_pid" 2>/dev/null || fail "the broker exited"
  if timeout 10 "${as_nonroot[@]}" "$root" /eventtermq --host "$host" --port "$port" dump \
    >"$tmp/dump.txt" 2>&1 && grep -q 'state: ALIVE' "$tmp/dump.txt"; then
    ready=1
    break
  fi
  sleep 0.2
done
[ -n "$ready" ] || { cat "$tmp/dump.txt" >&2; fail "no ALIVE node in dump after 30 s"; }
grep -q '^=== Cluster state ===$' "$tmp/dump.txt" || fail "dump has no '=== Cluster state ==='"
alive="$(grep -c 'state: ALIVE' "$tmp/dump.txt" || true)"
[ "$alive" -eq 1 ] || { cat "$tmp/dump.txt" >&2; fail "$alive ALIVE nodes, expected 1"; }
echo "smoke: broker from the image is up; dump shows 1 ALIVE node"

timeout 10 "${as_nonroot[@]}" "$root" /eventtermq --host eventtermq-smoke.test --port "$port" dump \
  >"$tmp/dump-name.txt" 2>&1 || { cat "$tmp/dump-name.txt" >&2; fail "dump via a name from /etc/hosts"; }
grep -q 'state: ALIVE' "$tmp/dump-name.txt" || fail "dump via a name from /etc/hosts shows no ALIVE node"
status=0
timeout 20 "${as_nonroot[@]}" "$root" /eventtermq --host no-such-host.invalid --port "$port" dump \
  >"$tmp/dump-dns.txt" 2>&1 || status=$?
# 1: the CLI's error exit; 124: timeout; >128: a signal (a crash in the resolver).
[ "$status" -eq 1 ] || { cat "$tmp/dump-dns.txt" >&2; fail "dump of an unknown name: status $status, expected 1"; }
echo "smoke: name resolution works (/etc/hosts; unknown name: $(tail -1 "$tmp/dump-dns.txt"))"

kill -TERM "$broker_pid"
for _ in $(seq 1 100); do # 10 s
  kill -0 "$broker_pid" 2>/dev/null || break
  sleep 0.1
done
kill -0 "$broker_pid" 2>/dev/null && fail "the broker did not stop within 10 s of SIGTERM"
status=0
wait "$broker_pid" || status=$?
broker_pid=""
[ "$status" -eq 0 ] || fail "the broker exited with status $status after SIGTERM"
[ -s "$root/data/id" ] || fail "no /data/id written"
echo "smoke: broker stopped on SIGTERM with status 0"

"${as_nonroot[@]}" "$tmp/eventter-operator" /eventter-operator crd >"$tmp/crds.yaml" 2>"$tmp/operator.log" ||
  { cat "$tmp/operator.log" >&2; fail "eventter-operator crd"; }
for crd in eventterclusters topics consumergroups users; do
  grep -q "^  name: $crd.eventter.io$" "$tmp/crds.yaml" || fail "eventter-operator crd: no $crd.eventter.io"
done
kinds="$(grep -c '^kind: CustomResourceDefinition$' "$tmp/crds.yaml" || true)"
[ "$kinds" -eq 4 ] || fail "eventter-operator crd printed $kinds CRDs, expected 4"
echo "smoke: eventter-operator crd from the image prints the 4 CRDs"
echo "smoke: OK"
