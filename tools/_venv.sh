# Sourced by tools/demo and tools/test: create or refresh .venv from nothing but python3.
# The venv is rebuilt when pyproject.toml changes (its hash is kept in .venv/.stamp).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "tools: creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
if [[ "$(cat "$VENV/.stamp" 2>/dev/null)" != "$want" ]]; then
  echo "tools: installing charger-agent into $VENV (first run takes a minute)" >&2
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
  # one install (with the test and plot extras) serves both ./tools/demo and ./tools/test
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT[test,plot]"
  echo "$want" > "$VENV/.stamp"
fi
export PATH="$VENV/bin:$PATH"
