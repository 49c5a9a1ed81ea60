"""A small real run of the teleport-statistics script (paper Fig. 5a and Fig. 8)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from benchmarks.data import default_data_root  # noqa: E402
from benchmarks.teleport import stats as teleport_stats  # noqa: E402


def test_two_datasets_both_rules_forced_teleports(tmp_path: Path) -> None:
    for rel in ("mnist.npz", "multilabel/yeast.npz"):
        if not (default_data_root() / rel).exists():
            pytest.skip(f"data file {rel} not available")
    argv = ["--datasets", "multimnist", "yeast", "--epochs", "2", "--force-every", "6", "--min-steps-between", "1",
            "--data-kw", json.dumps({"multimnist": {"num_train": 640, "num_val": 100, "num_test": 100},
                                     "yeast": {"batch_size": 256}}),
            "--cost-kw", json.dumps({"teleporter": {"inner_steps": 2, "min_gain": None}}), "--out", str(tmp_path)]
    results = teleport_stats.main(argv)
    assert [(r["dataset"], r["rule"]) for r in results] == [
        ("multimnist", "majority"), ("multimnist", "any"), ("yeast", "majority"), ("yeast", "any")]
    for r in results:
        k = r["num_tasks"]
        assert k == (2 if r["dataset"] == "multimnist" else 14)
        assert r["threshold"] == (math.ceil(k / 2) if r["rule"] == "majority" else 1)
        assert len(r["trigger_ratio_per_epoch"]) == 2
        assert all(0.0 <= v <= 1.0 for v in r["trigger_ratio_per_epoch"])
        hist = r["conflicting_tasks_histogram"]
        # one count per optimizer step that was not a teleport (the teleporting batch takes no step)
        assert sum(hist.values()) == r["steps"]
        assert all(0 <= int(n) <= k for n in hist)
        # the forced teleports happened and were measured before and after
        assert r["teleports"] >= 1 and r["accepted"] >= 1
        assert r["grad_norm_before_mean"] > 0 and r["grad_norm_after_mean"] > 0
        assert -1.0 <= r["min_cos_after_mean"] <= 1.0
        assert r["loss_drift_mean"] >= 0
    saved = json.loads((tmp_path / "teleport_stats.json").read_text())
    assert len(saved["results"]) == 4
    for name in ("fig5a_trigger_ratio.png", "fig8_before_after.png"):
        assert (tmp_path / name).stat().st_size > 5000, name


def test_conflict_counter_counts_both_rules_from_j_or_its_gramian() -> None:
    """Hand-worked cases. Step 0 (K = 3): g0 = (1, 1); row 0 points with the mean, rows 1 and 2 against it,
    so 2 >= ceil(3/2) tasks conflict under both rules. Step 1 (K = 3): g0 = (0, 1/3); rows 0 and 2 are
    orthogonal to it (cos = 0): not a conflict for eq. 4 (cos < 0), a conflict for the any-task rule
    (cos <= 0)."""
    from types import SimpleNamespace

    import torch

    from benchmarks.runner.conflicts import ConflictCounter

    counter = ConflictCounter()
    cases = [torch.tensor([[4.0, 4.0], [-1.0, 0.0], [0.0, -1.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])]
    for step, j in enumerate(cases):
        for gramian in (None, j @ j.T):
            rec = SimpleNamespace(jacobian=j, gramian=gramian, skipped=False, finite=True,
                                  representation_jacobian=None)
            trainer = SimpleNamespace(global_step=step, current_epoch=step)
            counter.on_before_optimizer_step(trainer, SimpleNamespace(mtl_step=rec), None)
    assert [s.conflicting for s in counter.steps] == [{"majority": 2, "any": 2}] * 2 + [{"majority": 0, "any": 2}] * 2
    assert [s.fired for s in counter.steps] == [{"majority": True, "any": True}] * 2 + [
        {"majority": False, "any": True}] * 2
    assert counter.ratio("majority") == 0.5 and counter.ratio("any") == 1.0
    assert counter.per_epoch() == [
        {"epoch": 0, "checked": 2, "fired_majority": 2, "trigger_ratio_majority": 1.0, "fired_any": 2,
         "trigger_ratio_any": 1.0},
        {"epoch": 1, "checked": 2, "fired_majority": 0, "trigger_ratio_majority": 0.0, "fired_any": 2,
         "trigger_ratio_any": 1.0}]
    assert counter.histogram("majority") == {0: 2, 2: 2}
    # a step without a Jacobian (a loss weighting not asked for one) or a skipped step is not counted
    for rec in (SimpleNamespace(jacobian=None, gramian=None, skipped=False, finite=True),
                SimpleNamespace(jacobian=cases[0], gramian=None, skipped=True, finite=True)):
        counter.on_before_optimizer_step(SimpleNamespace(global_step=9, current_epoch=2), SimpleNamespace(mtl_step=rec),
                                         None)
    assert counter.checked == 4
