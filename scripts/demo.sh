#!/usr/bin/env bash
# The main job on embedded defaults: set up .venv, then run `edge-demo` (arguments pass through).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$root/scripts/bootstrap.sh"
cd "$root"
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
exec "$root/.venv/bin/edge-demo" "$@"
