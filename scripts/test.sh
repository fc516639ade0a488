#!/usr/bin/env bash
# The whole test suite: set up .venv, then run pytest (arguments pass through, e.g. -k preprocess).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$root/scripts/bootstrap.sh"
cd "$root"
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
exec "$root/.venv/bin/python" -m pytest "$@"
