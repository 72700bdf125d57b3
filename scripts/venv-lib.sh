# Sourced by the setup scripts of the third-party tool venvs (.venv-vllm, .venv-llamacpp):
# each is installed once (a stamp file) and by one process at a time (flock), so CI and
# concurrent runs never race.

# venv_begin VENV STAMP LABEL: exits the calling script when VENV is already installed (or
# was, by a concurrent run we waited for); otherwise returns holding the install lock.
venv_begin() {
  local venv=$1 stamp=$2 label=$3
  if [ -f "$stamp" ] && [ -x "$venv/bin/python" ]; then
    echo "==> ready: $venv ($label)"
    exit 0
  fi
  mkdir -p "$venv"
  exec 9>"$venv/.setup.lock"
  if ! flock -n 9; then
    echo "==> another $(basename "$0") is running; waiting for it"
    flock 9
    if [ -f "$stamp" ]; then echo "==> ready: $venv ($label)"; exit 0; fi
  fi
}

# venv_create VENV STEP: the venv's interpreter, created with $PYTHON (python3) unless an
# unfinished install left one; STEP numbers the progress line ("1/3").
venv_create() {
  local venv=$1 step=$2
  if [ ! -x "$venv/bin/python" ]; then
    echo "==> [$step] creating $venv"
    "${PYTHON:-python3}" -m venv "$venv"
  else
    echo "==> [$step] $venv exists (unfinished install): resuming"
  fi
}
