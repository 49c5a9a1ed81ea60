#!/usr/bin/env bash
# Set up the environment (pinned set in constraints.txt) and run the test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` for the long benchmark runs.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev,bench,paper,nashmtl,ray,peers,docs]"
exec .venv/bin/python -m pytest "$@"
