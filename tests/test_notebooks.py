"""The notebooks in ``notebooks/`` execute end to end (tiny settings) and produce real results.

Each notebook is run in a fresh ``python3`` kernel through nbclient with ``LIGHTNING_COST_NB_TINY=1`` (seconds of
training, one torch thread) and its outputs written to a temporary folder; the last cell of each prints one JSON
line (``TOY_RESULT ...`` / ``MULTIMNIST_RESULT ...``) that the tests check.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
NAMES = ["toy.ipynb", "multimnist_walkthrough.ipynb"]


def _mnist() -> Path:
    env = os.environ.get("LIGHTNING_COST_DATA")
    return (Path(env).expanduser() if env else ROOT.parent / "shared" / "data") / "mnist.npz"


def _execute(name: str, cwd: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **env: str) -> Any:
    """Execute a notebook in a new kernel (which inherits this environment) and return it with its outputs."""
    monkeypatch.setenv("LIGHTNING_COST_NB_TINY", "1")
    monkeypatch.setenv("LIGHTNING_COST_NB_OUT", str(tmp_path))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=300,
                                     resources={"metadata": {"path": str(cwd)}})
    client.execute()  # raises CellExecutionError (with the traceback) if any cell fails
    return nb


def _stdout(nb: Any) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                   if o.output_type == "stream" and o.name == "stdout")


def _result(nb: Any, tag: str) -> dict[str, Any]:
    lines = [line for line in _stdout(nb).splitlines() if line.startswith(tag + " ")]
    assert len(lines) == 1, f"expected one {tag} line"
    return json.loads(lines[0][len(tag) + 1:])


def _images(nb: Any) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def _finite(values: Any) -> bool:
    if isinstance(values, (list, tuple)):
        return all(_finite(v) for v in values)
    return isinstance(values, (int, float)) and math.isfinite(values)


@pytest.mark.parametrize("name", NAMES)
def test_saved_without_outputs_and_with_a_size_knob(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4 and nb.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert 'os.environ.get("LIGHTNING_COST_NB_TINY") == "1"' in code[0].source
    assert "torch.set_num_threads(1)" in code[0].source


def test_toy_notebook(monkeypatch, tmp_path):
    # Run from the repository root; the "full sweep" cell reads the summary this run has just written.
    nb = _execute("toy.ipynb", ROOT, monkeypatch, tmp_path,
                  LIGHTNING_COST_TOY_SUMMARY=str(tmp_path / "toy" / "toy_summary.json"))
    res = _result(nb, "TOY_RESULT")
    methods, inits = res["methods"], res["inits"]
    assert methods == ["ls"] and len(inits) == 2 and res["steps"] == 150
    # The table: one row per method and flag; every run's numbers are finite.
    assert res["table_rows"] == 2 * len(methods)
    out = _stdout(nb)
    assert "LS +COST" in out and out.count("reached") >= 2  # printed twice: the sweep and the "full" summary
    assert len(res["final_losses"]) == len(res["final_pareto_distance"]) == 2 * len(methods) * len(inits)
    assert _finite(res["final_losses"]) and _finite(res["final_pareto_distance"]), (
        f"a run ended at a non-finite point: {res['final_losses']}")
    assert all(d > 0 for d in res["final_pareto_distance"])  # 150 steps do not reach the front
    assert set(res["counts"]) == set(methods)
    # From (9, -1) LS's gradients conflict with their mean: the callback teleports in 150 steps.
    assert res["teleports"]["ls"] >= 1
    assert "accepted of" in out and "sigma" in out
    # toy.png written by the library's plot and displayed, plus the landscape and the distance plots.
    png = (tmp_path / "toy" / "toy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) == res["figure_bytes"] > 10_000
    assert _images(nb) >= 3


@pytest.mark.skipif(not _mnist().is_file(), reason=f"MultiMNIST needs {_mnist()} (set LIGHTNING_COST_DATA)")
def test_multimnist_notebook(monkeypatch, tmp_path):
    # Run from notebooks/, as Jupyter would.
    nb = _execute("multimnist_walkthrough.ipynb", NOTEBOOKS, monkeypatch, tmp_path)
    res = _result(nb, "MULTIMNIST_RESULT")
    assert res["tiny"] is True and res["num_train"] == 384 and res["epochs"] == 1
    tasks = ["left", "right"]
    assert set(res["single_task"]) == set(tasks) and all(0 <= res["single_task"][t] <= 1 for t in tasks)
    table = res["methods"]
    assert list(table) == ["LS", "FairGrad", "FairGrad + COST", "FairGrad + forced teleports",
                           "FairGrad + forced, no HTR"]
    for name, row in table.items():
        assert set(row["acc"]) == set(tasks) and all(0 <= row["acc"][t] <= 1 for t in tasks), name
        assert _finite(row["delta_m"]) and row["wall_s"] > 0, name
    for name in ["FairGrad + COST", "FairGrad + forced teleports", "FairGrad + forced, no HTR"]:
        ratio = table[name]["trigger_ratio"]
        assert len(ratio) == res["epochs"] and all(0 <= r <= 1 for r in ratio)
    # With the trigger silent the callback leaves FairGrad's training untouched, bit for bit.
    if table["FairGrad + COST"]["teleports"] == 0 and table["FairGrad + COST"]["rejected"] == 0:
        assert res["fairgrad_cost_equals_fairgrad"] is True
    assert -1 <= res["trigger_min_cos_g0"] <= 1 and 0 <= res["trigger_pairwise_conflict_fraction"] <= 1
    # Forced teleports: 6 steps, one every 2 -> at steps 2 and 4, both within the 5 % loss tolerance.
    forced = res["forced"]
    assert forced["teleports"] == 2 and forced["accepted"] >= 1
    assert table["FairGrad + forced teleports"]["teleports"] == forced["accepted"]
    no_htr = table["FairGrad + forced, no HTR"]
    assert no_htr["teleports"] + no_htr["rejected"] == 2  # the same schedule
    assert all(0 <= d <= 0.05 for d in forced["loss_drift"])
    for before, after in zip(forced["cos_before"], forced["cos_after"], strict=True):
        assert len(before) == len(after) == 2 and all(-1 <= c <= 1 for c in before + after)
    assert all(r > 0 and math.isfinite(r) for r in forced["grad_norm_ratio"])
    assert _finite(forced["sigma"]) and all(s > 0 for s in forced["seconds"])
    assert "teleport/accepted" in forced["logged_columns"] and "teleport/loss_drift" in forced["logged_columns"]
    out = _stdout(nb)
    assert "single-task" in out and "Delta-m%" in out and "forced teleports, " in out
    assert _images(nb) >= 4  # samples, results, trigger inputs, forced teleports
