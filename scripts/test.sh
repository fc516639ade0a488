#!/usr/bin/env bash
# The whole test suite: set up .venv, then run pytest (arguments pass through, e.g. -k preprocess).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$root/scripts/bootstrap.sh"
cd "$root"
# The dashboard's browser test (tests/test_dashboard_browser.py) drives Debian's chromium through
# Playwright: install it where it is missing and we may (root, apt-get). With CI=true that test fails,
# not skips, when Chromium is still missing.
chromium=${CHROMIUM:-/usr/bin/chromium}
if [ ! -x "$chromium" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "==> installing chromium for the dashboard's browser test"
  export DEBIAN_FRONTEND=noninteractive
  apt_install() { apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; }
  if ! apt_install && ! { apt-get update -qq >/dev/null 2>&1 && apt_install; }; then
    echo "    could not install chromium with apt-get: the browser test will $([ "${CI:-}" = true ] && echo fail || echo skip)" >&2
  fi
fi
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
exec "$root/.venv/bin/python" -m pytest "$@"
