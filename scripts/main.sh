#!/usr/bin/env bash
# Set up the environment and run the main job: FairGrad on MultiMNIST with forced teleports (LoRA,
# exact rescaling) next to their matched controls (the same steps and state change, no move) and a random move, 3 paired
# seeds; prints the tables and writes results/main/{runs.csv,table.md,summary.png}.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e ".[bench,nashmtl]"
exec .venv/bin/python -m benchmarks.run --config benchmarks/configs/main.yaml "$@"
