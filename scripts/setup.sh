#!/usr/bin/env bash
# Installs what the tests and benchmarks need, idempotently, outside the clone:
#   - PostgreSQL server binaries from Debian packages (no system cluster is created or used),
#   - stunnel4 from Debian packages (TLS and mutual TLS in front of the test broker),
#   - prometheus from Debian packages (promtool for the alert rule tests),
#   - tansu 0.6 (Kafka-protocol broker with admin APIs) under $OUTBOX_CACHE,
#   - Apache Kafka $KAFKA_VERSION's broker jars from Maven Central (scripts/kafka/pom.xml, Maven verifies
#     their checksums) under $OUTBOX_CACHE/kafka-$KAFKA_VERSION/libs, unless $KAFKA_HOME has a distribution;
#     needs Java 17+ and Maven,
#   - a Python venv under $OUTBOX_CACHE with Helm's library (helm-python-sdk) and kubernetes-validate, for
#     `make check-manifests` (render the chart, validate manifests against the Kubernetes schemas),
#   - a Kubernetes control plane for tests (etcd, kube-apiserver, kube-controller-manager v$K8S_VERSION):
#     taken from $KUBEBUILDER_ASSETS when it holds all three, else unpacked once from the CI bundle
#     ($OUTBOX_K8S_BUNDLE, default ../shared/k8s beside the clone) into $OUTBOX_CACHE/k8s-v$K8S_VERSION.
set -euo pipefail

CACHE="${OUTBOX_CACHE:-$HOME/.cache/outbox-operator}"
TANSU_VERSION=0.6.0
KAFKA_VERSION=4.4.0
K8S_VERSION=1.36.2
mkdir -p "$CACHE"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  echo "setup: installing PostgreSQL from Debian packages"
  # Tests start their own throwaway clusters; do not create the package's default one.
  as_root mkdir -p /etc/postgresql-common
  grep -qs '^create_main_cluster' /etc/postgresql-common/createcluster.conf ||
    echo 'create_main_cluster = false' | as_root tee -a /etc/postgresql-common/createcluster.conf >/dev/null
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq postgresql >/dev/null
fi

if ! command -v cc >/dev/null || ! command -v make >/dev/null; then
  echo "setup: installing a C toolchain (librdkafka is built from source)"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq build-essential >/dev/null
fi

if ! command -v stunnel4 >/dev/null && ! command -v stunnel >/dev/null; then
  echo "setup: installing stunnel4 (the TLS listener in front of the test broker)"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq stunnel4 >/dev/null
fi

if ! command -v promtool >/dev/null; then
  echo "setup: installing promtool and Prometheus from Debian packages (alert rule tests)"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

TANSU="$CACHE/tansu-$TANSU_VERSION/bin/tansu"
if [ ! -x "$TANSU" ]; then
  echo "setup: building tansu $TANSU_VERSION into $CACHE (about 15 minutes, once)"
  cargo install tansu --version "$TANSU_VERSION" --features dynostore --locked --root "$CACHE/tansu-$TANSU_VERSION"
fi
# Apache Kafka: `java -cp 'libs/*' kafka.Kafka` is a KRaft broker (test-support's `apache` module).
java_major() { java -version 2>&1 | awk -F'"' '/version/ { split($2, v, "."); print (v[1] == 1 ? v[2] : v[1]); exit }'; }
if ! command -v java >/dev/null || [ "$(java_major)" -lt 17 ]; then
  echo "setup: Apache Kafka $KAFKA_VERSION needs Java 17 or newer; installing openjdk-17-jre-headless"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends openjdk-17-jre-headless >/dev/null
fi
KAFKA_DIR="$CACHE/kafka-$KAFKA_VERSION"
POM="$(cd "$(dirname "$0")" && pwd)/kafka/pom.xml"
if [ -n "${KAFKA_HOME:-}" ]; then
  [ -d "$KAFKA_HOME/libs" ] || { echo "setup: KAFKA_HOME=$KAFKA_HOME has no libs/ directory" >&2; exit 1; }
  KAFKA_FROM="\$KAFKA_HOME"
elif [ "$(cat "$KAFKA_DIR/.installed" 2>/dev/null)" != "$(sha256sum < "$POM")" ]; then
  if ! command -v mvn >/dev/null; then
    echo "setup: installing Maven (fetches Apache Kafka's jars from Maven Central)"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends maven >/dev/null
  fi
  echo "setup: fetching Apache Kafka $KAFKA_VERSION from Maven Central into $KAFKA_DIR"
  rm -rf "$KAFKA_DIR.part"
  # -C: a checksum mismatch fails the fetch (Maven only warns by default).
  mvn -q -B -C -Dstyle.color=never -f "$POM" dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$KAFKA_DIR.part/libs"
  rm -rf "$KAFKA_DIR" && mv "$KAFKA_DIR.part" "$KAFKA_DIR"
  sha256sum < "$POM" > "$KAFKA_DIR/.installed"
  KAFKA_FROM="$KAFKA_DIR"
else
  KAFKA_FROM="$KAFKA_DIR"
fi

VENV="$CACHE/manifests-venv"
MANIFEST_TOOLS="helm-python-sdk==0.2.2 kubernetes-validate==1.37.0"
if [ "$(cat "$VENV/.installed" 2>/dev/null)" != "$MANIFEST_TOOLS" ]; then
  echo "setup: installing $MANIFEST_TOOLS into $VENV"
  if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv "$VENV"
  fi
  # shellcheck disable=SC2086
  "$VENV/bin/pip" install -q $MANIFEST_TOOLS
  echo "$MANIFEST_TOOLS" > "$VENV/.installed"
fi

# The control plane the Kubernetes tests start (test-support's `kube` module reads the same places).
K8S_DIR="$CACHE/k8s-v$K8S_VERSION"
k8s_complete() { [ -x "$1/kube-apiserver" ] && [ -x "$1/kube-controller-manager" ] && [ -x "$1/etcd" ]; }
if [ -n "${KUBEBUILDER_ASSETS:-}" ] && k8s_complete "$KUBEBUILDER_ASSETS"; then
  K8S_FROM="\$KUBEBUILDER_ASSETS"
elif k8s_complete "$K8S_DIR"; then
  K8S_FROM="$K8S_DIR"
else
  BUNDLE="${OUTBOX_K8S_BUNDLE:-$(cd "$(dirname "$0")/.." && pwd)/../shared/k8s}"
  declare -A K8S_SHA256=(
    [kube-apiserver]=91f44158c4019a46accc008154fd293d587b2fa24b1d5d51f8312a22e7ca4959
    [kube-controller-manager]=5b7974c143b4161097d1d4d707e83f630c54571e9860ee2e986f2b97aabbffe5
    [mini-etcd]=9f659a6d23bcc25882a7904301200e411c640c872f96283dbb00a1587c9a1c96
  )
  for name in kube-apiserver kube-controller-manager mini-etcd; do
    if [ ! -f "$BUNDLE/$name.xz" ]; then
      cat >&2 <<MSG
setup: no Kubernetes control plane for the tests. Provide one of:
  - KUBEBUILDER_ASSETS=DIR holding etcd, kube-apiserver and kube-controller-manager v$K8S_VERSION
    (official release binaries from dl.k8s.io/v$K8S_VERSION/bin/linux/amd64/, or \`setup-envtest use $K8S_VERSION\`
    plus kube-controller-manager from the same release), or
  - OUTBOX_K8S_BUNDLE=DIR holding kube-apiserver.xz, kube-controller-manager.xz and mini-etcd.xz.
  Looked for $BUNDLE/$name.xz.
MSG
      exit 1
    fi
    echo "${K8S_SHA256[$name]}  $BUNDLE/$name.xz" | sha256sum --quiet -c - ||
      { echo "setup: $BUNDLE/$name.xz does not match its sha256" >&2; exit 1; }
  done
  echo "setup: unpacking the Kubernetes v$K8S_VERSION control plane into $K8S_DIR"
  mkdir -p "$K8S_DIR"
  for name in kube-apiserver kube-controller-manager mini-etcd; do
    target="$K8S_DIR/${name/mini-etcd/etcd}"
    xz -dc "$BUNDLE/$name.xz" > "$target.part" && chmod +x "$target.part" && mv "$target.part" "$target"
  done
  K8S_FROM="$K8S_DIR"
fi

echo "setup: PostgreSQL $(ls -d /usr/lib/postgresql/*/ | xargs -n1 basename | sort -n | tail -1), tansu $TANSU_VERSION, Apache Kafka from $KAFKA_FROM, Kubernetes control plane from $K8S_FROM ready"
