#!/usr/bin/env bash
# The whole Kubernetes path on a local cluster, one step or all of them.
#
#   scripts/k8s.sh kind up       create the cluster, build and load the images, install metrics-server
#                                and the chart, wait, and smoke-test through a port-forward
#   scripts/k8s.sh kind demo     the HPA demo: a load Job, with `kubectl get hpa` and pod counts as they change
#   scripts/k8s.sh kind down     delete the cluster
#   scripts/k8s.sh minikube up|demo|down    the same on minikube
#
# Needs docker, kubectl, helm 3 or 4, and kind or minikube. Everything runs on your machine.
set -euo pipefail
cd "$(dirname "$0")/.."

PLATFORM=${1:-}; STEP=${2:-}
CLUSTER=${CLUSTER:-inferencehub}
RELEASE=${RELEASE:-inferencehub}
NAMESPACE=${NAMESPACE:-default}
TAG=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' charts/inferencehub/Chart.yaml)
METRICS_SERVER=https://github.com/kubernetes-sigs/metrics-server/releases/download/v0.7.2/components.yaml
DEMO_SECONDS=${DEMO_SECONDS:-300}

say() { printf '\n==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
need() { for tool in "$@"; do command -v "$tool" >/dev/null || die "$tool is not installed"; done; }

build_images() {
  for component in gateway inference; do
    say "building inferencehub-$component:$TAG"
    docker build -f "Dockerfile.$component" -t "inferencehub-$component:$TAG" .
  done
}

load_images() {
  for component in gateway inference; do
    if [[ $PLATFORM == kind ]]; then
      kind load docker-image "inferencehub-$component:$TAG" --name "$CLUSTER"
    else
      minikube -p "$CLUSTER" image load "inferencehub-$component:$TAG"
    fi
  done
}

install_chart() {
  say "installing the chart as release $RELEASE"
  helm upgrade --install "$RELEASE" charts/inferencehub --namespace "$NAMESPACE" --wait --timeout 5m
  kubectl -n "$NAMESPACE" get pods -l app.kubernetes.io/instance="$RELEASE" -o wide
}

smoke() {
  say "smoke test through kubectl port-forward"
  kubectl -n "$NAMESPACE" port-forward "service/$RELEASE-gateway" 18080:8080 >/dev/null &
  local forward=$!
  trap 'kill $forward 2>/dev/null || true' RETURN
  for _ in $(seq 50); do curl -sf http://127.0.0.1:18080/readyz >/dev/null && break; sleep 0.2; done
  curl -sf http://127.0.0.1:18080/v2/models/iris/infer -H 'Content-Type: application/json' \
    -d '{"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [6.3, 3.3, 6.0, 2.5]}]}'
  echo
  for _ in 1 2 3 4; do
    curl -si http://127.0.0.1:18080/v2/models/mock/infer \
      -d '{"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}' \
      | grep -i '^x-inferencehub-replica'
  done
  helm test "$RELEASE" --namespace "$NAMESPACE"
}

up() {
  need docker kubectl helm "$PLATFORM"
  if [[ $PLATFORM == kind ]]; then
    kind get clusters | grep -qx "$CLUSTER" || kind create cluster --name "$CLUSTER" --config k8s/kind-cluster.yaml
    build_images
    load_images
    say "installing metrics-server (for the HPA)"
    kubectl apply -f "$METRICS_SERVER"
    kubectl -n kube-system patch deployment metrics-server --type=json --patch-file k8s/metrics-server-patch.yaml \
      || true  # already patched
    kubectl -n kube-system rollout status deployment/metrics-server --timeout=180s
  else
    minikube -p "$CLUSTER" status >/dev/null 2>&1 || minikube start -p "$CLUSTER" --cpus 4 --memory 6g
    minikube -p "$CLUSTER" addons enable metrics-server
    build_images
    load_images
  fi
  install_chart
  smoke
}

demo() {
  need kubectl
  say "HPA demo: mock-heavy load for up to ${DEMO_SECONDS}s (Ctrl-C stops watching; the Job runs on)"
  kubectl -n "$NAMESPACE" delete job inferencehub-hpa-load --ignore-not-found
  sed "s|http://inferencehub-gateway:8080|http://$RELEASE-gateway:8080|; s|inferencehub-gateway:0.1.0|inferencehub-gateway:$TAG|" \
    k8s/hpa-load-job.yaml | kubectl -n "$NAMESPACE" apply -f -
  local end=$((SECONDS + DEMO_SECONDS))
  while ((SECONDS < end)); do
    kubectl -n "$NAMESPACE" get hpa "$RELEASE-inference" --no-headers \
      | awk -v t="$(date +%T)" '{printf "%s  hpa %s  targets %s  replicas %s\n", t, $1, $3, $6}'
    kubectl -n "$NAMESPACE" get pods -l app.kubernetes.io/instance="$RELEASE",app.kubernetes.io/component=inference \
      --no-headers | awk '{print $3}' | sort | uniq -c | tr '\n' ' '
    echo
    kubectl -n "$NAMESPACE" get job inferencehub-hpa-load -o jsonpath='{.status.succeeded}' | grep -q 1 && break
    sleep 10
  done
  say "the load Job's summary (see the share each replica served)"
  kubectl -n "$NAMESPACE" logs job/inferencehub-hpa-load | tail -n 12
}

down() {
  if [[ $PLATFORM == kind ]]; then kind delete cluster --name "$CLUSTER"; else minikube delete -p "$CLUSTER"; fi
}

case "$PLATFORM:$STEP" in
  kind:up | minikube:up) up ;;
  kind:demo | minikube:demo) demo ;;
  kind:down | minikube:down) down ;;
  *) sed -n '2,11p' "$0"; exit 2 ;;
esac
