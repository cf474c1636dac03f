#!/usr/bin/env bash
# End-to-end suite on a real single-node Kubernetes (issue #6):
#   1. builds the broker and operator images from the workspace (images/build.sh);
#   2. brings the cluster up (e2e/cluster/up.sh; binaries cached in $HOME/.cache);
#   3. imports the images, `helm install`s charts/eventtermq;
#   4. runs the scenarios in e2e/scenarios.sh, one line each: PASS name / FAIL name:
#      reason / SKIP name: reason, then `N passed, N failed` (and skipped, if any);
#   5. prints the operator's and failing pods' logs on failure; tears the cluster down
#      unless E2E_KEEP=1.
# Exit status 0 only when no scenario failed.
#
# Environment: E2E_PROFILE=release|debug (image build profile, default release),
# E2E_KEEP=1 (leave the cluster up; `e2e/cluster/down.sh` removes it),
# E2E_SCENARIOS="name ..." (run only these), E2E_IMAGES=DIR (use prebuilt archives).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
. e2e/cluster/lib.sh
. e2e/prometheus.sh

PROFILE="${E2E_PROFILE:-release}"
IMAGES="${E2E_IMAGES:-}"
RELEASE=eventtermq
OPERATOR_NS=eventter-system
NS=e2e
export KUBECONFIG="$KUBECONFIG_ADMIN"
run_started=$(date +%s)

stamp() { echo "== $(date +%H:%M:%S) $*"; }
elapsed() { echo $(( $(date +%s) - $1 )); }

passed=0 failed=0 skipped=0
finished=0
# finish: tear down (unless E2E_KEEP=1), then the summary as the very last line.
finish() {
  local rc=$?
  [ "$finished" = 0 ] || return 0
  finished=1
  if [ -n "${E2E_TMP:-}" ]; then
    ! declare -F broker_logs_stop >/dev/null || broker_logs_stop
    rm -rf "$E2E_TMP"
  fi
  if [ "$rc" != 0 ] && [ "$passed$failed" = 00 ]; then
    echo "FAIL setup: exit status $rc before any scenario ran"
    failed=1
  fi
  if [ "${E2E_KEEP:-0}" = 1 ]; then
    stamp "E2E_KEEP=1: cluster left up (KUBECONFIG=$KUBECONFIG_ADMIN; e2e/cluster/down.sh removes it)"
  else
    stamp "tearing the cluster down"
    bash e2e/cluster/down.sh 2>&1 | tail -n 3
  fi
  stamp "whole run: $(elapsed "$run_started") s"
  [ "$skipped" = 0 ] || echo "$skipped skipped"
  echo "$passed passed, $failed failed"
  [ "$failed" = 0 ] && exit 0
  exit 1
}
trap finish EXIT
trap 'exit 130' INT TERM

# --- 1. images -------------------------------------------------------------------------
if [ -z "$IMAGES" ]; then
  [ -f images/build.sh ] || { echo "FAIL setup: images/build.sh is missing"; failed=1; exit 1; }
  # The same directory .ci/run builds into, so a CI run packages the images once.
  IMAGES="$CACHE_ROOT/images"
  stamp "building images (--profile $PROFILE) into $IMAGES"
  t=$(date +%s)
  bash images/build.sh --profile "$PROFILE" "$IMAGES"
  stamp "images built in $(elapsed "$t") s"
fi
for f in eventtermq.oci.tar eventter-operator.oci.tar; do
  [ -f "$IMAGES/$f" ] || { echo "FAIL setup: $IMAGES/$f is missing"; failed=1; exit 1; }
done

# --- 2. cluster ------------------------------------------------------------------------
stamp "bringing the cluster up"
t=$(date +%s)
bash e2e/cluster/up.sh >/dev/null
stamp "cluster up in $(elapsed "$t") s"
server_version=$(kubectl_ version -o json | sed -n '/"serverVersion"/,/}/s/.*"gitVersion": "\([^"]*\)".*/\1/p')
echo "Kubernetes API server: $server_version ($("$K8S_BIN/kubectl" version --client | head -n 1))"

# --- 3. images into containerd, helm install ------------------------------------------------
t=$(date +%s)
for f in eventtermq.oci.tar eventter-operator.oci.tar; do
  ctr --address "$CONTAINERD_SOCK" -n k8s.io images import "$IMAGES/$f" >/dev/null
done
ctr --address "$CONTAINERD_SOCK" -n k8s.io images ls -q | grep -E '^localhost/(eventtermq|eventter-operator):' | sed 's/^/image: /'
stamp "images imported in $(elapsed "$t") s"

export HELM_CACHE_HOME="$CACHE_ROOT/helm/cache" HELM_CONFIG_HOME="$CACHE_ROOT/helm/config" HELM_DATA_HOME="$CACHE_ROOT/helm/data"
t=$(date +%s)
helm_ok=1
if ! "$HELM" upgrade --install "$RELEASE" charts/eventtermq --namespace "$OPERATOR_NS" --create-namespace \
  --set operator.image.pullPolicy=Never --set operator.logFormat=text \
  --set operator.groupStatusPeriodMs=5000 \
  --wait --timeout 3m; then
  helm_ok=0
fi
stamp "helm install took $(elapsed "$t") s"

# A real Prometheus, scraping the pods the way the chart advertises (e2e/prometheus.sh);
# started now so that it has discovered the brokers by the time the scenarios ask.
t=$(date +%s)
prometheus_ok=0
if prometheus_start charts/eventtermq; then
  prometheus_ok=1
else
  echo "Prometheus did not start: $(tail -n 5 "$LOGS/prometheus.log" 2>/dev/null)"
fi
stamp "Prometheus started in $(elapsed "$t") s ($PROMETHEUS_URL, $("$PROMETHEUS_BIN" --version 2>&1 | head -n 1))"

# --- 4. scenarios --------------------------------------------------------------------------
. e2e/scenarios.sh
E2E_TMP=$(mktemp -d)
[ "$prometheus_ok" = 0 ] || echo "$PROMETHEUS_URL" >"$E2E_TMP/prometheus-ready"
kubectl_ create namespace "$NS" --dry-run=client -o yaml | kubectl_ apply -f - >/dev/null

failed_names=()
timings=()
# run_scenario NAME FUNCTION: runs FUNCTION in a subshell with errexit; a failing
# command or `fail "reason"` makes it FAIL with that reason.
run_scenario() {
  local name=$1 fn=$2 t reason_file rc
  if [ -n "${E2E_SCENARIOS:-}" ] && [[ " $E2E_SCENARIOS " != *" $name "* ]]; then
    return 0
  fi
  reason_file=$(mktemp)
  t=$(date +%s)
  stamp "scenario $name"
  set +e
  (
    set -eEo pipefail
    REASON_FILE=$reason_file
    trap 'echo "command failed (line $LINENO): $BASH_COMMAND" >"$REASON_FILE"' ERR
    "$fn"
  )
  rc=$?
  set -e
  timings+=("$name $(elapsed "$t") s")
  if [ "$rc" = 0 ]; then
    echo "PASS $name"
    passed=$((passed + 1))
  elif [ "$rc" = 77 ]; then
    echo "SKIP $name: $(cat "$reason_file")"
    skipped=$((skipped + 1))
  else
    echo "FAIL $name: $(head -c 600 "$reason_file" | tr '\n' ' ')"
    failed=$((failed + 1))
    failed_names+=("$name")
  fi
  rm -f "$reason_file"
}

if [ "$helm_ok" = 1 ]; then
  echo "PASS helm-install"
  passed=$((passed + 1))
  for s in "${SCENARIOS[@]}"; do
    run_scenario "${s%%:*}" "${s#*:}"
  done
else
  echo "FAIL helm-install: helm install --wait did not succeed"
  failed=$((failed + 1))
  failed_names+=(helm-install)
fi

stamp "timings: $(IFS=';'; echo "${timings[*]}")"
if [ "$failed" -gt 0 ]; then
  print_diagnostics
fi
finish
