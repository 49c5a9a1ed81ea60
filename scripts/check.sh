#!/usr/bin/env bash
# Release checks, from the repository root with the project's venv (scripts/test.sh creates it):
# ruff on the whole repository, mypy on the library, the docs site (mkdocs --strict), sdist + wheel (python -m build), twine check,
# and the built wheel installed into a fresh venv and imported from outside the source tree.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || { echo "check.sh: no .venv; run bash scripts/test.sh (or create it) first" >&2; exit 1; }
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
step() { printf '\n== %s\n' "$*"; }

step "ruff check ."
"$PY" -m ruff check .

step "mypy lightning_cost/ (settings in setup.cfg [mypy])"
"$PY" -m mypy lightning_cost/

step "mkdocs build --strict (the documentation site, mkdocs.yml)"
"$PY" -m mkdocs build --strict --quiet -d "$TMP/site"

step "python -m build (sdist + wheel)"
"$PY" -m build --sdist --wheel --outdir "$TMP/dist" . > "$TMP/build.log" 2>&1 || { cat "$TMP/build.log"; exit 1; }
ls "$TMP/dist"
WHEEL="$(ls "$TMP"/dist/*.whl)"
SDIST="$(ls "$TMP"/dist/*.tar.gz)"
# no `unzip -l | grep -q` pipe: grep -q exits at the first match, and under pipefail unzip's SIGPIPE fails it
"$PY" -c 'import sys, zipfile; sys.exit("lightning_cost/py.typed" not in zipfile.ZipFile(sys.argv[1]).namelist())' "$WHEEL" \
  || { echo "check.sh: py.typed missing from the wheel" >&2; exit 1; }

step "twine check"
"$PY" -m twine check --strict "$SDIST" "$WHEEL"

step "wheel smoke test (fresh venv, dependencies from .venv, no download)"
"$PY" -m venv --without-pip "$TMP/venv"
SITE="$("$TMP/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
DEPS="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
# A plain path line: .venv's site-packages go on sys.path after the fresh venv's own, without running
# .venv's .pth files (so its editable install of this source tree stays out of the way).
echo "$DEPS" > "$SITE/_lightning_cost_deps.pth"
"$PY" -m pip --python "$TMP/venv/bin/python" install -q --disable-pip-version-check --no-deps --no-index "$WHEEL"
(cd "$TMP" && "$TMP/venv/bin/python" - "$TMP/venv" <<'EOF'
import os, sys
import lightning_cost
from lightning_cost import SymmetryTeleportCallback  # noqa: F401
from lightning_cost.aggregators import build_aggregator

build_aggregator("upgrad")
where = os.path.realpath(lightning_cost.__file__)
venv = os.path.realpath(sys.argv[1])
assert where.startswith(venv + os.sep), f"lightning_cost imported from {where}, not from the fresh venv {venv}"
print(f"lightning_cost {lightning_cost.__version__} from {where}")
EOF
)
printf '\ncheck.sh: all checks passed\n'
