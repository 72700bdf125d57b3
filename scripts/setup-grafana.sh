#!/usr/bin/env bash
# A separate environment for `llm-exporter dashboards push`: grafana-client replaces urllib3 with
# urllib3-future wherever it is installed, so it stays out of .venv. The push test uses it when
# present. Idempotent. Usage: scripts/setup-grafana.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV_GRAFANA:-.venv-grafana}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
stamp="$VENV/.installed-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "==> installing llm-exporter[dashboards,grafana] into $VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -e ".[dashboards,grafana]"
  touch "$stamp"
fi
echo "==> ready: $VENV"
