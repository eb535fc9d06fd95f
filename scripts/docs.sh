#!/usr/bin/env bash
# Build the documentation site (mkdocs.yml) strictly: a broken link, a nav entry without its page or
# an API reference to a missing name fails the build.
#   scripts/docs.sh [SITE_DIR]        (default: site/; needs `pip install -e ".[docs]"`)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
export NO_MKDOCS_2_WARNING=1   # Material's end-of-life banner, printed on every build
"$py" -m mkdocs build --strict --site-dir "${1:-site}"
