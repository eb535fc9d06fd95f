#!/usr/bin/env bash
# Install what the hub's browser test needs: Debian's chromium and the python playwright package.
#   scripts/setup-browser.sh [VENV_DIR]
# Playwright drives the system browser through executable_path; no browser build is ever downloaded
# (PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD guards against a post-install hook trying to).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv}
export DEBIAN_FRONTEND=noninteractive PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
if [ ! -x /usr/bin/chromium ]; then
  apt-get update -q
  apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core
fi
"$venv/bin/python" -m pip install -q "playwright>=1.40"
/usr/bin/chromium --version
"$venv/bin/python" -c "import playwright; print('playwright ok')"
