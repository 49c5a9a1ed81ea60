"""The grid-cost estimate (``python -m benchmarks.perf.grid_cost``) on a user's own file, as a newcomer runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_grid_cost_estimates_a_grid_on_a_users_file(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

    def run(*args: str) -> None:
        proc = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    run(str(ROOT / "examples" / "own_data.py"))  # writes my_tasks.npz
    config = tmp_path / "grid.yaml"
    config.write_text("dataset: multilabel\ndata_kw: {path: my_tasks.npz, batch_size: 64}\nmethods: [ls, mgda]\n"
                      "cost: [none]\nseeds: [0, 1]\nepochs: 3\nthreads: 1\nout: results/grid\n")
    run("-m", "benchmarks.perf.grid_cost", "--configs", str(config), "--steps", "2", "--finished", "--out", "est")
    res = json.loads((tmp_path / "est" / "grid_cost.json").read_text())
    (est,) = res["configs"]
    assert est["runs"] == 4 and est["epochs"] == 3 and set(est["step_ms"]) == {"ls", "mgda"}
    assert all(v > 0 for v in est["step_ms"].values()) and est["cpu_hours_cap"] > 0
    assert res["calibration"]["runs"] == 0 and est["cpu_hours_stopped"] == est["cpu_hours_cap"]
