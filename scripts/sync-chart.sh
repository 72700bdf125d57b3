#!/usr/bin/env bash
# Copies the generated Prometheus rules and Grafana dashboards into the Helm chart and rewrites
# the chart README's values table. The chart keeps no hand-edited copies: tests/test_helm.py
# fails when helm/llm-exporter/files/ differs from deploy/prometheus/rules.yaml and
# dashboards/*.json, or when the README table is stale. `make generate` runs this last.
# Exits 2 (after syncing what exists) when a source is missing, naming the command that makes it.
set -euo pipefail
cd "$(dirname "$0")/.."
CHART=helm/llm-exporter
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
missing=0

# Rules: deploy/prometheus/rules.yaml -> files/rules.yaml (rendered into the PrometheusRule).
if [ -f deploy/prometheus/rules.yaml ]; then
  install -m 0644 deploy/prometheus/rules.yaml "$CHART/files/rules.yaml"
  echo "sync-chart: $CHART/files/rules.yaml <- deploy/prometheus/rules.yaml"
else
  rm -f "$CHART/files/rules.yaml"  # a copy without its source would be hand-kept
  echo "sync-chart: deploy/prometheus/rules.yaml is missing; generate it with" \
       "'llm-exporter rules --out deploy/prometheus' (make generate)" >&2
  missing=1
fi

# The SLO file the rules were generated from -> files/slo.yaml (mounted as the sidecar's --slo).
if [ -f deploy/prometheus/slo.yaml ]; then
  install -m 0644 deploy/prometheus/slo.yaml "$CHART/files/slo.yaml"
  echo "sync-chart: $CHART/files/slo.yaml <- deploy/prometheus/slo.yaml"
else
  rm -f "$CHART/files/slo.yaml"
  echo "sync-chart: deploy/prometheus/slo.yaml is missing (the SLOs behind the rules)" >&2
  missing=1
fi

# Dashboards: dashboards/*.json -> files/dashboards/*.json (one ConfigMap each); stale copies go.
mkdir -p "$CHART/files/dashboards"
shopt -s nullglob
for copy in "$CHART"/files/dashboards/*.json; do
  [ -f "dashboards/$(basename "$copy")" ] || { rm -f "$copy"; echo "sync-chart: removed stale $copy"; }
done
sources=(dashboards/*.json)
if [ ${#sources[@]} -gt 0 ]; then
  install -m 0644 "${sources[@]}" "$CHART/files/dashboards/"
  echo "sync-chart: $CHART/files/dashboards/ <- ${#sources[@]} dashboard(s) from dashboards/"
else
  echo "sync-chart: no dashboards/*.json; generate them with" \
       "'llm-exporter dashboards generate --out dashboards' (make generate)" >&2
  missing=1
fi

# The chart README's values table, from values.schema.json and values.yaml.
"$PY" helm/values_table.py

if [ $missing -ne 0 ]; then
  echo "sync-chart: incomplete: the chart ships without the missing artefacts above" >&2
  exit 2
fi
