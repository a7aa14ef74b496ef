#!/usr/bin/env bash
# Installs what the tests and benchmarks need, idempotently, outside the clone:
#   - PostgreSQL server binaries from Debian packages (no system cluster is created or used),
#   - tansu 0.6 (Kafka-protocol broker with admin APIs) under $OUTBOX_CACHE,
#   - a Python venv under $OUTBOX_CACHE with Helm's library (helm-python-sdk) and kubernetes-validate, for
#     `make check-manifests` (render the chart, validate manifests against the Kubernetes schemas).
set -euo pipefail

CACHE="${OUTBOX_CACHE:-$HOME/.cache/outbox-operator}"
TANSU_VERSION=0.6.0
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

TANSU="$CACHE/tansu-$TANSU_VERSION/bin/tansu"
if [ ! -x "$TANSU" ]; then
  echo "setup: building tansu $TANSU_VERSION into $CACHE (about 15 minutes, once)"
  cargo install tansu --version "$TANSU_VERSION" --features dynostore --locked --root "$CACHE/tansu-$TANSU_VERSION"
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

echo "setup: PostgreSQL $(ls -d /usr/lib/postgresql/*/ | xargs -n1 basename | sort -n | tail -1), tansu $TANSU_VERSION ready"
