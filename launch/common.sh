# Sourced by the launch scripts: the one place that says how ddp_demo is started.
#   PYTHON   the interpreter that has torch and ddp_demo [default: the repo's .venv, else python3]
# Every script then runs torchrun through that interpreter, so no PATH setup is needed.

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$root/.venv/bin/python" ]; then PYTHON=$root/.venv/bin/python; else PYTHON=python3; fi
fi

# A required variable that is missing gets one line naming it, then the script's usage line.
require() {
  local var
  for var in "$@"; do
    if [ -z "${!var:-}" ]; then
      echo "launch: $var is not set" >&2
      echo "usage: $USAGE" >&2
      exit 2
    fi
  done
}

# torchrun is `python -m torch.distributed.run`; exec so signals reach it directly.
torchrun_train() {
  exec "$PYTHON" -m torch.distributed.run "$@"
}
