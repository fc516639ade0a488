#!/usr/bin/env bash
# Create .venv and install edge-classify with every extra into it; re-run pip only when pyproject.toml,
# setup.py or the C decoder it compiles (preprocessing/_jpeg8.c) changes. Sourced by demo.sh and test.sh, so a fresh machine needs nothing but Python 3.10-3.13.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$root/.venv"
python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(not ((3, 10) <= sys.version_info[:2] <= (3, 13)))' 2>/dev/null; then
  echo "edge-classify needs Python 3.10 to 3.13 (TensorFlow 2.21's range); set PYTHON=/path/to/python3.x" >&2
  exit 2
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "==> creating $venv"
  "$python" -m venv "$venv"
fi
stamp="$venv/.edge-classify-installed"
want=$(cat "$root/pyproject.toml" "$root/setup.py" "$root/preprocessing/_jpeg8.c" | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "==> installing edge-classify[all] into $venv (first run: a few minutes)"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -e "$root[all]"
  echo "$want" > "$stamp"
fi
# Editable installs leave our own modules uncompiled, and where PYTHONDONTWRITEBYTECODE is set (as on
# CI machines) every `edge-classify` run would compile them again: ~30 ms of a 200 ms cold start.
# compileall skips files whose bytecode is current.
"$venv/bin/python" -m compileall -q "$root/preprocessing" "$root/converter" "$root/edge_runtime" >/dev/null
