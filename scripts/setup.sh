#!/usr/bin/env bash
# Sets up everything the project needs on a fresh machine: a virtual environment holding exactly
# the locked packages (lock/engine.txt, or lock/test.txt for tests) and the package itself
# (editable), and, for tests, Debian's Prometheus, Alertmanager, promtool and Chromium.
# Idempotent: a second run only checks. Usage: scripts/setup.sh [engine] [test]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
want_test=0; want_engine=0
for a in "$@"; do case "$a" in test) want_test=1;; engine) want_engine=1;; esac; done
[ $# -eq 0 ] && want_engine=1

# shellcheck source=scripts/venv-lib.sh
source scripts/venv-lib.sh
if [ $want_test = 1 ]; then
  venv_sync "$VENV" lock/test.txt 1
elif venv_synced "$VENV" lock/test.txt 1; then
  # The test set holds the engine set at the same versions: nothing to change.
  echo "==> ready: $VENV (lock/test.txt, a superset of lock/engine.txt)"
else
  venv_sync "$VENV" lock/engine.txt 1
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
