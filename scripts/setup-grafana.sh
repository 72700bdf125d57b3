#!/usr/bin/env bash
# A separate environment for `llm-exporter dashboards push`: grafana-client replaces urllib3 with
# urllib3-future wherever it is installed, so it stays out of .venv. The push test uses it when
# present. Installed from lock/grafana.txt. Idempotent. Usage: scripts/setup-grafana.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/venv-lib.sh
source scripts/venv-lib.sh
venv_sync "${VENV_GRAFANA:-.venv-grafana}" lock/grafana.txt 1
