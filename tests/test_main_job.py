"""The README's main job (``bash scripts/main.sh`` = ``python -m benchmarks.run --config benchmarks/configs/main.yaml``),
run small: every preset and control of the config trains, the forced teleports act, and the tables are written."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from benchmarks import run as runner
from benchmarks.data import default_data_root
from benchmarks.runner.config import RunnerConfig, config_from_argv

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "benchmarks" / "configs" / "main.yaml"


def test_main_sh_runs_the_main_config() -> None:
    script = (ROOT / "scripts" / "main.sh").read_text()
    assert "benchmarks/configs/main.yaml" in script and '"$@"' in script  # arguments reach the runner


def test_the_main_job_small(tmp_path: Path) -> None:
    if not (default_data_root() / "mnist.npz").exists():
        pytest.skip("data file mnist.npz not available")
    out = tmp_path / "main"
    small = ["--config", str(CONFIG), "--seeds", "0", "--epochs", "1", "--progress", "false", "--out", str(out),
             "--data-kw", json.dumps({"num_train": 512, "num_val": 256, "num_test": 256, "batch_size": 128}),
             "--cost-kw", json.dumps({"schedule": {"every": 2, "max_per_epoch": None, "on_trigger": False}})]
    cfg = RunnerConfig(**config_from_argv(small)[0])
    runner.main(small)
    for name in ("runs.csv", "baselines.csv", "table.md", "summary.png"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "runs.csv", newline="") as f:
        rows = {r["cost"]: r for r in csv.DictReader(f)}
    assert set(rows) == set(cfg.cost)
    moves = {c for c in cfg.cost if c != "none" and not c.endswith("control")}
    assert moves and all(int(rows[c]["teleports"]) > 0 for c in moves)  # the forced steps acted
    table = (out / "table.md").read_text()
    assert all(f"(control: {c})" in table for c in cfg.cost if c.endswith("control"))  # controls labelled as such
