# Sourced by scripts/dev and scripts/test: a virtualenv in .venv with roomshard installed.
# Re-running is cheap: pip only installs what is missing.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ROOMSHARD_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
stamp="$VENV/.roomshard-installed"
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
  "$VENV/bin/python" -m pip install -q -e "$ROOT[${ROOMSHARD_EXTRAS:-test}]"
  touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
