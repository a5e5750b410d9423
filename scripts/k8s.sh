#!/usr/bin/env bash
# The whole Kubernetes path on a local cluster, one step or all of them.
#
#   scripts/k8s.sh kind up       create the cluster, build and load the images, install metrics-server
#                                and the chart, wait, and smoke-test through a port-forward
#   scripts/k8s.sh kind demo     the HPA demo: a load Job, with the HPA's CPU and pod counts as they change
#   scripts/k8s.sh kind down     delete the cluster
#   scripts/k8s.sh minikube up|demo|down    the same on minikube
#
# Needs bash 4.4+, docker or podman, kubectl, helm 3 or 4, and kind or minikube. Every kubectl and helm call names
# the cluster's own context (kind-$CLUSTER, or the minikube profile $CLUSTER), never the current one.
# Settings: CLUSTER (inferencehub), RELEASE (inferencehub), NAMESPACE (inferencehub), LOCAL_PORT (18080),
# KIND_EXPERIMENTAL_PROVIDER=podman (images built with podman; also chosen when there is podman but no docker).

# Plain sh up to here, so that an older bash (macOS ships 3.2) or another shell prints this, not a syntax error.
case ${BASH_VERSION:-} in
  4.[4-9]* | 4.[1-9][0-9]* | [5-9].* | [1-9][0-9]*) ;;
  *)
    if [ -n "${BASH_VERSION:-}" ]; then shell="bash $BASH_VERSION"; else shell="not bash"; fi
    printf 'error: scripts/k8s.sh needs bash 4.4 or newer; this shell is %s.\n' "$shell" >&2
    printf '       On macOS: brew install bash, then run it with that bash: "$(brew --prefix)/bin/bash" scripts/k8s.sh ...\n' >&2
    exit 1
    ;;
esac
set -euo pipefail
cd "$(dirname "$0")/.."

PLATFORM=${1:-}; STEP=${2:-}
CLUSTER=${CLUSTER:-inferencehub}
RELEASE=${RELEASE:-inferencehub}
NAMESPACE=${NAMESPACE:-inferencehub}
LOCAL_PORT=${LOCAL_PORT:-18080}
METRICS_SERVER=https://github.com/kubernetes-sigs/metrics-server/releases/download/v0.7.2/components.yaml
DEMO_SECONDS=${DEMO_SECONDS:-300}
LOAD_JOB=inferencehub-hpa-load

KIND_NODE_RELEASE=0.33.0  # the kind release whose node image k8s/kind-cluster.yaml pins

say() { printf '\n==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
need() { for tool in "$@"; do command -v "$tool" >/dev/null || die "$tool is not installed"; done; }

if [[ $PLATFORM == kind ]]; then CONTEXT=kind-$CLUSTER; else CONTEXT=$CLUSTER; fi
k() { kubectl --context "$CONTEXT" --namespace "$NAMESPACE" "$@"; }
h() { helm --kube-context "$CONTEXT" --namespace "$NAMESPACE" "$@"; }

# Background processes (port-forwards) are stopped and temporary files removed on every way out: success, a
# failed step, Ctrl-C (INT), a closed terminal (HUP), kill or a CI timeout (TERM). A signal that arrives while a
# foreground command runs (a build, helm's --wait) takes effect when that command returns: bash waits for it.
BACKGROUND=()
WORK=$(mktemp -d "${TMPDIR:-/tmp}/inferencehub-k8s.XXXXXX")
cleanup() {
  local pid
  for pid in "${BACKGROUND[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then kill "$pid" 2>/dev/null || true; fi
  done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# Images are tagged by content: the commit, plus a hash of the working tree and "-dirty" when it has
# changes, so every `up` deploys the code as it is and a changed tree never reuses an old tag.
image_tag() {
  local revision tree index
  revision=$(git rev-parse --short=12 HEAD)
  if [[ -z $(git status --porcelain --untracked-files=normal) ]]; then echo "$revision"; return; fi
  index=$WORK/index
  cp "$(git rev-parse --git-path index)" "$index"
  tree=$(GIT_INDEX_FILE=$index git add -A && GIT_INDEX_FILE=$index git write-tree)
  rm -f "$index"
  echo "$revision-${tree:0:8}-dirty"
}

# Object names as the release really has them, found by the chart's labels (fullname overrides and
# truncation included), not guessed from the release name.
component_object() {  # KIND COMPONENT
  local name
  name=$(k get "$1" -l "app.kubernetes.io/instance=$RELEASE,app.kubernetes.io/component=$2" \
    -o jsonpath='{.items[*].metadata.name}')
  name=${name%% *}
  [[ -n $name ]] || die "no $1 of component $2 in release $RELEASE (namespace $NAMESPACE, context $CONTEXT)"
  echo "$name"
}

# The container engine that builds the images: podman when kind is told to use it
# (KIND_EXPERIMENTAL_PROVIDER=podman) or when there is podman and no docker, else docker.
container_engine() {
  case ${KIND_EXPERIMENTAL_PROVIDER:-} in
    podman) echo podman; return ;;
    docker) echo docker; return ;;
    "") ;;
    *) die "KIND_EXPERIMENTAL_PROVIDER=$KIND_EXPERIMENTAL_PROVIDER: this script builds with docker or podman" ;;
  esac
  if ! command -v docker >/dev/null && command -v podman >/dev/null; then echo podman; else echo docker; fi
}

# The images' names: podman names an unqualified image localhost/<name>, and the cluster's nodes keep that name
# after `kind load image-archive`, so the chart's image repositories carry the prefix too.
image_name() {  # COMPONENT
  if [[ $ENGINE == podman ]]; then echo "localhost/inferencehub-$1:$TAG"; else echo "inferencehub-$1:$TAG"; fi
}

build_images() {
  local component
  for component in gateway inference; do
    say "building $(image_name "$component") with $ENGINE"
    "$ENGINE" build -f "Dockerfile.$component" -t "$(image_name "$component")" .
  done
}

# docker: `kind load docker-image` / `minikube image load` read the image from the Docker daemon. podman has no
# daemon they can read, so the image goes through an archive (`podman save`), removed on exit.
load_images() {
  local component image archive
  for component in gateway inference; do
    image=$(image_name "$component")
    if [[ $ENGINE == podman ]]; then
      archive=$WORK/inferencehub-$component.tar
      podman save --format docker-archive -o "$archive" "$image"
      if [[ $PLATFORM == kind ]]; then
        kind load image-archive "$archive" --name "$CLUSTER"
      else
        minikube -p "$CLUSTER" image load "$archive"
      fi
      rm -f "$archive"
    elif [[ $PLATFORM == kind ]]; then
      kind load docker-image "$image" --name "$CLUSTER"
    else
      minikube -p "$CLUSTER" image load "$image"
    fi
  done
}

# k8s/kind-cluster.yaml pins a node image built by one kind release: an older kind may not boot it.
check_kind_version() {
  local version
  version=$(kind version 2>/dev/null || true)
  [[ $version =~ v([0-9]+)\.([0-9]+)\.([0-9]+) ]] || return 0
  local IFS=.
  local -a want=($KIND_NODE_RELEASE)
  if ((BASH_REMATCH[1] < want[0] || (BASH_REMATCH[1] == want[0] && BASH_REMATCH[2] < want[1]))); then
    printf 'warning: kind %s is older than v%s, whose node image k8s/kind-cluster.yaml pins; if the cluster does not start, upgrade kind\n' \
      "${BASH_REMATCH[0]}" "$KIND_NODE_RELEASE" >&2
  fi
}

metrics_server() {
  say "installing metrics-server (for the HPA)"
  kubectl --context "$CONTEXT" apply -f "$METRICS_SERVER"
  # kind's kubelets serve self-signed certificates: add the flag once (apply resets the args to the manifest's).
  local args
  args=$(kubectl --context "$CONTEXT" -n kube-system get deployment metrics-server \
    -o jsonpath='{.spec.template.spec.containers[0].args}')
  if [[ $args != *--kubelet-insecure-tls* ]]; then
    kubectl --context "$CONTEXT" -n kube-system patch deployment metrics-server --type=json \
      --patch-file k8s/metrics-server-patch.yaml
  fi
  kubectl --context "$CONTEXT" -n kube-system rollout status deployment/metrics-server --timeout=180s
}

install_chart() {
  say "installing the chart as release $RELEASE in namespace $NAMESPACE (context $CONTEXT, images :$TAG)"
  local images=(--set "gateway.image.tag=$TAG" --set "inference.image.tag=$TAG")
  if [[ $ENGINE == podman ]]; then
    images+=(--set "gateway.image.repository=localhost/inferencehub-gateway")
    images+=(--set "inference.image.repository=localhost/inferencehub-inference")
  fi
  h upgrade --install "$RELEASE" charts/inferencehub --create-namespace --wait --timeout 5m "${images[@]}"
  k get pods -l "app.kubernetes.io/instance=$RELEASE" -o wide
}

smoke() {
  local gateway port url
  gateway=$(component_object service gateway)
  port=$(k get service "$gateway" -o jsonpath='{.spec.ports[?(@.name=="http")].port}')
  say "smoke test through kubectl port-forward service/$gateway $LOCAL_PORT:$port"
  # kubectl itself in the background (not the k function, whose subshell would be what $! names).
  kubectl --context "$CONTEXT" --namespace "$NAMESPACE" port-forward "service/$gateway" "$LOCAL_PORT:$port" \
    >/dev/null &
  BACKGROUND+=($!)
  url=http://127.0.0.1:$LOCAL_PORT
  local deadline=$((SECONDS + 30))
  until curl -sf "$url/readyz" >/dev/null; do
    ((SECONDS < deadline)) || die "the port-forward to service/$gateway did not answer in 30 s"
    kill -0 "${BACKGROUND[-1]}" 2>/dev/null || die "kubectl port-forward service/$gateway exited"
    sleep 0.5
  done
  curl -sSf "$url/v2/models/iris/infer" -H 'Content-Type: application/json' \
    -d '{"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [6.3, 3.3, 6.0, 2.5]}]}'
  echo
  local _
  for _ in 1 2 3 4; do
    curl -sSfi "$url/v2/models/mock/infer" \
      -d '{"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}' \
      | grep -i '^x-inferencehub-replica'
  done
  h test "$RELEASE"
}

up() {
  ENGINE=$(container_engine)
  need "$ENGINE" kubectl helm git "$PLATFORM"
  if [[ $PLATFORM == kind ]]; then
    # kind itself uses this provider for its nodes; with podman, kind also finds it alone when docker is absent.
    if [[ $ENGINE == podman ]]; then export KIND_EXPERIMENTAL_PROVIDER=podman; fi
    check_kind_version
  fi
  TAG=$(image_tag)
  if [[ $PLATFORM == kind ]]; then
    local clusters
    clusters=$(kind get clusters)
    if ! grep -qx "$CLUSTER" <<<"$clusters"; then
      kind create cluster --name "$CLUSTER" --config k8s/kind-cluster.yaml
    fi
    build_images
    load_images
    metrics_server
  else
    if ! minikube -p "$CLUSTER" status >/dev/null 2>&1; then
      minikube start -p "$CLUSTER" --cpus 4 --memory 6g
    fi
    minikube -p "$CLUSTER" addons enable metrics-server
    build_images
    load_images
  fi
  install_chart
  smoke
}

# One line of HPA status, read structurally (jsonpath), printed the way `kubectl get hpa` shows targets
# since Kubernetes 1.30: "cpu: 4%/60%".
hpa_line() {  # HPA_NAME
  local current target replicas desired phases cpu="<unknown>"
  IFS='|' read -r current target replicas desired < <(k get hpa "$1" -o jsonpath='{.status.currentMetrics[?(@.type=="Resource")].resource.current.averageUtilization}|{.spec.metrics[?(@.type=="Resource")].resource.target.averageUtilization}|{.status.currentReplicas}|{.status.desiredReplicas}{"\n"}')
  phases=$(k get pods -l "app.kubernetes.io/instance=$RELEASE,app.kubernetes.io/component=inference" \
    -o jsonpath='{range .items[*]}{.status.phase}{"\n"}{end}' | sort | uniq -c | awk '{printf " %s %s", $1, $2}')
  if [[ -n $current ]]; then cpu=$current%; fi
  printf '%s  hpa %s  cpu: %s/%s%%  replicas %s (desired %s)  pods:%s\n' "$(date +%T)" "$1" \
    "$cpu" "$target" "${replicas:-0}" "${desired:-0}" "$phases"
}

demo() {
  need kubectl
  local hpa gateway image port
  hpa=$(component_object hpa inference)
  gateway=$(component_object service gateway)
  port=$(k get service "$gateway" -o jsonpath='{.spec.ports[?(@.name=="http")].port}')
  image=$(k get deployment "$(component_object deployment gateway)" \
    -o jsonpath='{.spec.template.spec.containers[?(@.name=="gateway")].image}')
  say "HPA demo: mock-heavy load for up to ${DEMO_SECONDS}s (Ctrl-C stops watching; the Job runs on)"
  k delete job "$LOAD_JOB" --ignore-not-found --wait
  local manifest
  manifest=$(sed -e "s|http://inferencehub-gateway:8080|http://$gateway:$port|" \
    -e "s|image: inferencehub-gateway\$|image: $image|" k8s/hpa-load-job.yaml)
  [[ $manifest == *"image: $image"* && $manifest == *"http://$gateway:$port"* ]] \
    || die "k8s/hpa-load-job.yaml no longer has the image and URL lines this script rewrites"
  k apply -f - <<<"$manifest"
  local end=$((SECONDS + DEMO_SECONDS))
  while ((SECONDS < end)); do
    hpa_line "$hpa"
    [[ $(k get job "$LOAD_JOB" -o jsonpath='{.status.succeeded}') == 1 ]] && break
    [[ $(k get job "$LOAD_JOB" -o jsonpath='{.status.failed}') =~ ^[1-9] ]] && die "the load Job failed"
    sleep 10
  done
  say "the load Job's summary (see the share each replica served)"
  k logs "job/$LOAD_JOB" --tail 12
}

down() {
  need "$PLATFORM"
  if [[ $PLATFORM == kind ]]; then kind delete cluster --name "$CLUSTER"; else minikube delete -p "$CLUSTER"; fi
}

case "$PLATFORM:$STEP" in
  kind:up | minikube:up) up ;;
  kind:demo | minikube:demo) demo ;;
  kind:down | minikube:down) down ;;
  *) sed -n '2,13p' "$0"; exit 2 ;;
esac
