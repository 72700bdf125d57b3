# Sourced by the setup scripts. Every environment the project creates is installed from a
# committed lock (lock/*.txt: exact versions with sha256 hashes, `make lock` regenerates them)
# by uv, itself installed from lock/uv.txt with pip --require-hashes. Each venv is synced once
# per lock content (a stamp file) and by one process at a time (flock), so CI and concurrent
# runs never race.
#   PYTHON=...     interpreter for new venvs (default python3; the locks are for CPython 3.11)
#   TORCH_WHEELS=  folder holding the local torch CPU wheel the locks name (default /opt/wheels)

ROOT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
UV_VENV=${UV_VENV:-$ROOT_DIR/.venv-uv}
export TORCH_WHEELS=${TORCH_WHEELS:-/opt/wheels}
# uv never downloads a Python of its own: the venvs use the machine's interpreter.
export UV_PYTHON_DOWNLOADS=never
[ -n "${CI:-}" ] && export UV_NO_PROGRESS=1

# pip's warnings about this machine's absent local index folders are noise: hidden.
_pip_quiet() {
  local status
  set +o pipefail
  "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  status=${PIPESTATUS[0]}
  set -o pipefail
  return "$status"
}

# uv_ensure: sets UV to the locked uv (lock/uv.txt), installing it into .venv-uv first if needed.
uv_ensure() {
  local want
  want=$(sed -n 's/^uv==\([^ ]*\).*/\1/p' "$ROOT_DIR/lock/uv.txt")
  UV=$UV_VENV/bin/uv
  if [ -x "$UV" ] && [ "$("$UV" --version | cut -d' ' -f2)" = "$want" ]; then
    return 0
  fi
  echo "==> installing uv $want into $UV_VENV (pip --require-hashes, lock/uv.txt)"
  [ -x "$UV_VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$UV_VENV"
  _pip_quiet "$UV_VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps \
    --require-hashes -r "$ROOT_DIR/lock/uv.txt" \
    || { echo "setup: could not install uv from lock/uv.txt (see pip's output above)" >&2; exit 1; }
}

# _check_python: the locks are resolved for CPython 3.11 on x86_64 Linux (the local torch wheel).
_check_python() {
  local py=${PYTHON:-python3} ver
  ver=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || {
    echo "setup: no Python interpreter '$py' (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
  if [ "$ver" != "3.11" ]; then
    echo "setup: the locks (lock/*.txt) are for CPython 3.11; '$py' is $ver." >&2
    echo "       Set PYTHON=/path/to/python3.11, or install the package's ranges yourself:" >&2
    echo "       pip install 'llm-exporter[engine]' (unlocked)." >&2
    exit 1
  fi
}

# _check_torch_wheel LOCK: a lock that names the local torch CPU build needs its file.
_check_torch_wheel() {
  local lock=$1 version
  version=$(sed -n 's/^torch==\([^ ]*\).*/\1/p' "$lock")
  [ -z "$version" ] && return 0
  if ! compgen -G "$TORCH_WHEELS/torch-${version}-*.whl" >/dev/null; then
    echo "setup: $lock pins torch==$version, the local CPU wheel, and $TORCH_WHEELS has no" >&2
    echo "       torch-${version}-*.whl. Set TORCH_WHEELS to the folder that holds it." >&2
    exit 1
  fi
}

# venv_stamp VENV LOCK [EDITABLE]: the stamp file recording a sync of VENV to this lock content.
venv_stamp() {
  local venv=$1 lock=$2 editable=${3:-0} key
  key=$(cat "$lock" "$ROOT_DIR/lock/uv.txt" $([ "$editable" = 1 ] && echo "$ROOT_DIR/pyproject.toml") \
        | sha1sum | cut -c1-12)
  echo "$venv/.synced-$(basename "$lock" .txt)-$key"
}

# venv_synced VENV LOCK [EDITABLE]: true when VENV was synced to this very lock.
venv_synced() {
  [ -f "$(venv_stamp "$@")" ] && [ -x "$1/bin/python" ]
}

# venv_sync VENV LOCK [EDITABLE] [CHECK]: makes VENV hold exactly the packages of LOCK
# (hash-checked), plus the project itself in editable mode when EDITABLE=1, then runs the Python
# code CHECK (if any) in it; only a passing check stamps the venv. Returns at once when VENV was
# already synced to this lock (and, for EDITABLE, this pyproject.toml).
venv_sync() {
  local venv=$1 lock=$2 editable=${3:-0} check=${4:-} stamp t0
  stamp=$(venv_stamp "$venv" "$lock" "$editable")
  if venv_synced "$venv" "$lock" "$editable"; then
    echo "==> ready: $venv ($lock)"
    return 0
  fi
  mkdir -p "$venv"
  exec 9>"$venv/.setup.lock"
  if ! flock -n 9; then
    echo "==> another setup is installing $venv; waiting for it"
    flock 9
    if [ -f "$stamp" ]; then echo "==> ready: $venv ($lock)"; return 0; fi
  fi
  _check_python
  _check_torch_wheel "$lock"
  uv_ensure
  t0=$(date +%s)
  if [ ! -x "$venv/bin/python" ]; then
    echo "==> creating $venv"
    "$UV" venv --quiet --allow-existing --python "${PYTHON:-python3}" "$venv"
  fi
  echo "==> syncing $venv to $lock ($(grep -c '^[A-Za-z0-9].*==' "$lock") packages, hash-checked)"
  rm -f "$venv"/.synced-* "$venv"/.installed-*
  "$UV" pip sync --python "$venv/bin/python" --require-hashes --find-links "$TORCH_WHEELS" "$lock"
  if [ "$editable" = 1 ]; then
    "$UV" pip install --quiet --python "$venv/bin/python" --no-deps --no-build-isolation \
      -e "$ROOT_DIR"
  fi
  if [ -n "$check" ]; then
    echo "==> checking $venv"
    "$venv/bin/python" -c "$check" \
      || { echo "setup: $venv does not work after the sync (see above)" >&2; exit 1; }
  fi
  touch "$stamp"
  echo "==> ready: $venv ($lock, $(( $(date +%s) - t0 )) s)"
  exec 9>&-
}
