#!/usr/bin/env bash
# End-to-end on a real Kubernetes (kind): images, helm install with the demo stack, orders through the
# whole pipeline, kubectl scale, relay leader failover. Needs docker, kind, kubectl, helm, curl and jq;
# without them it says which are missing and exits 0 ("skipped"). CI does not run it.
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER=${CLUSTER:-outbox-e2e}
NS=${NS:-outbox}
TAG=${TAG:-$(sed -n 's/^appVersion: *"\(.*\)"/\1/p' charts/outbox-operator/Chart.yaml)}
REGISTRY=${REGISTRY:-ghcr.io/outbox-operator}
ORDERS=${ORDERS:-200}
KEEP=${KEEP:-0}

missing=()
for tool in docker kind kubectl helm curl jq; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
  echo "kind-e2e skipped: missing ${missing[*]} (install them to run the end-to-end test on kind)"
  exit 0
fi

step() { printf '\n== %s\n' "$*"; }
cleanup() {
  if [[ "$KEEP" == 1 ]]; then
    echo "KEEP=1: cluster $CLUSTER left running (kind delete cluster --name $CLUSTER)"
  else
    kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT
k() { kubectl -n "$NS" "$@"; }
psql_count() { k exec statefulset/outbox-operator-postgres -- psql -U outbox -d orders -tAc "$1" | tr -d '[:space:]'; }

step "kind cluster $CLUSTER (kind-config.yaml: 1 control plane, 2 workers)"
kind create cluster --name "$CLUSTER" --config kind-config.yaml --wait 120s

step "images $REGISTRY/*:$TAG"
make images REGISTRY="$REGISTRY" TAG="$TAG"
for image in outbox-operator outbox-relay demo-consumer demo-api; do
  kind load docker-image --name "$CLUSTER" "$REGISTRY/$image:$TAG"
done

step "helm install (the CRD chart, then the operator with the demo stack)"
helm install outbox-operator-crds charts/outbox-operator-crds --namespace "$NS" --create-namespace --wait
helm install outbox-operator charts/outbox-operator --namespace "$NS" --create-namespace \
  --set demo.enabled=true --set image.tag="$TAG" --set image.registry="$REGISTRY" --wait --timeout 10m
k get obr,cg

step "custom resources Ready"
k wait --for=condition=Ready obr/orders cg/pharmacy cg/notification --timeout=5m
k get obr,cg

step "post $ORDERS orders to the demo API (localhost:8080 through the NodePort)"
for i in $(seq 1 "$ORDERS"); do
  curl -fsS localhost:8080/orders -H 'content-type: application/json' \
    -d "{\"customer\":\"c$i\",\"items\":[{\"sku\":\"aspirin-500\",\"quantity\":1}]}" >/dev/null
done
ledger() {
  for _ in $(seq 1 120); do
    p=$(psql_count "SELECT count(DISTINCT order_id) FROM demo.pharmacy_orders")
    n=$(psql_count "SELECT count(DISTINCT order_id) FROM demo.notifications")
    if [[ "$p" -ge "$1" && "$n" -ge "$1" ]]; then break; fi
    sleep 2
  done
  orders=$(psql_count "SELECT count(*) FROM shop.orders")
  p_rows=$(psql_count "SELECT count(*) FROM demo.pharmacy_orders")
  n_rows=$(psql_count "SELECT count(*) FROM demo.notifications")
  echo "orders $orders, pharmacy rows $p_rows, notification rows $n_rows"
  [[ "$orders" == "$1" && "$p_rows" == "$1" && "$n_rows" == "$1" ]] || {
    echo "FAIL: the ledger is not exactly one effect per order and group"; exit 1; }
}
ledger "$ORDERS"

step "kubectl scale cg pharmacy --replicas=3"
k scale cg pharmacy --replicas=3
k wait --for=jsonpath='{.status.readyReplicas}'=3 cg/pharmacy --timeout=5m
[[ "$(k get cg pharmacy -o jsonpath='{.status.replicas}')" == 3 ]] || { echo "FAIL: status.replicas"; exit 1; }
k get cg pharmacy

step "delete the relay leader pod: the standby takes the Lease, nothing is lost"
leader=$(k get lease orders-relay -o jsonpath='{.spec.holderIdentity}')
epoch=$(k get lease orders-relay -o jsonpath='{.spec.leaseTransitions}')
echo "leader $leader at epoch $epoch"
k delete pod "$leader" --wait=false
for i in $(seq 1 "$ORDERS"); do
  curl -fsS localhost:8080/orders -H 'content-type: application/json' \
    -d "{\"customer\":\"d$i\",\"items\":[{\"sku\":\"aspirin-500\",\"quantity\":1}]}" >/dev/null
done
for _ in $(seq 1 60); do
  now=$(k get lease orders-relay -o jsonpath='{.spec.holderIdentity}')
  [[ -n "$now" && "$now" != "$leader" ]] && break
  sleep 2
done
echo "leader now $now at epoch $(k get lease orders-relay -o jsonpath='{.spec.leaseTransitions}')"
[[ "$now" != "$leader" ]] || { echo "FAIL: no new leader"; exit 1; }
ledger $((ORDERS * 2))
[[ "$(psql_count "SELECT count(*) FROM outbox.events")" == 0 ]] || { echo "FAIL: events left pending"; exit 1; }

step "delete the operator leader pod: the standby operator takes its Lease and reconciles"
op=$(k get lease outbox-operator -o jsonpath='{.spec.holderIdentity}')
echo "operator leader $op"
k delete pod "$op" --wait=false
for _ in $(seq 1 30); do
  now=$(k get lease outbox-operator -o jsonpath='{.spec.holderIdentity}')
  [[ -n "$now" && "$now" != "$op" ]] && break
  sleep 2
done
[[ "$now" != "$op" ]] || { echo "FAIL: no new operator leader"; exit 1; }
k scale cg pharmacy --replicas=2
k wait --for=jsonpath='{.status.readyReplicas}'=2 cg/pharmacy --timeout=5m
echo "operator leader now $now; it scaled pharmacy back to 2"

step "uninstall"
helm uninstall outbox-operator --namespace "$NS" --wait
echo "kind-e2e passed"
