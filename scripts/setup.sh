#!/usr/bin/env bash
# Sets up everything the project needs on a fresh machine: a virtual environment with the
# package and its extras, and (for tests) Debian's Prometheus, Alertmanager and promtool.
# Idempotent: a second run only checks. Usage: scripts/setup.sh [engine] [test]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
want_test=0; want_engine=0
for a in "$@"; do case "$a" in test) want_test=1;; engine) want_engine=1;; esac; done
[ $# -eq 0 ] && want_engine=1

if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating $VENV"
  python3 -m venv "$VENV"
fi
extras="dashboards"
[ $want_engine = 1 ] && extras="$extras,engine"
[ $want_test = 1 ] && extras="$extras,engine,test"
stamp="$VENV/.installed-$(echo "$extras" | tr ',' '-')-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "==> installing llm-exporter[$extras] (torch pinned to the local CPU build)"
  # torch==2.13.0 in the same command so no other package can pull a CUDA build. pip's
  # warnings about absent local index folders (this machine's pip config) are noise: hidden.
  set +o pipefail
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "torch==2.13.0" -e ".[$extras]" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  status=${PIPESTATUS[0]}
  set -o pipefail
  [ "$status" = 0 ] || { echo "pip install failed ($status)" >&2; exit "$status"; }
  touch "$stamp"
fi

if [ $want_test = 1 ]; then
  need=""
  command -v promtool >/dev/null || need="$need prometheus"
  command -v prometheus-alertmanager >/dev/null || command -v alertmanager >/dev/null \
    || need="$need prometheus-alertmanager"
  command -v chromium >/dev/null || need="$need chromium"
  if [ -n "$need" ]; then
    echo "==> apt-get install$need"
    SUDO=""; [ "$(id -u)" != 0 ] && SUDO=sudo
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends $need >/dev/null
  fi
fi
echo "==> ready: $VENV"
