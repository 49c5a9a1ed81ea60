"""The COST-cost benchmark runs end to end, tiny, and writes a well-formed JSON, table and plot."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.data import default_data_root
from benchmarks.perf import cost_budget

# the real MNIST file, as the other data tests: skip (not error) where the data root lacks it
pytestmark = pytest.mark.skipif(not (default_data_root() / "mnist.npz").exists(),
                                reason="mnist.npz not in the data root")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_quick_budget_curve(tmp_path):
    cost_budget.main(["--quick", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "cost_budget.json").read_text())
    assert (tmp_path / "cost_budget.png").stat().st_size > 1000
    assert "FairGrad + COST vs FairGrad" in (tmp_path / "cost_budget.txt").read_text()
    assert res["meta"]["threads"] == 1 and res["meta"]["quick"]
    b = res["budget"]
    assert b["config"]["dataset"] == "multimnist" and b["steps_per_epoch"] >= 4
    base = b["baseline"]["metrics"]
    assert set(base) == {"left/accuracy", "right/accuracy"} and all(0 < v <= 1 for v in base.values())
    pts = {p["label"]: p for p in b["points"]}
    assert set(pts) == {"fairgrad", "cost-default", "cost-b0", "cost-T2-b1"}
    for p in pts.values():
        assert _finite(p["time_ratio"]) and p["time_ratio"] > 0 and _finite(p["wall_s"]) and p["wall_s"] > 0
        assert _finite(p["delta_m"]) and all(0 <= v <= 1 for v in p["test"].values())
    assert pts["fairgrad"]["time_ratio"] == 1.0 and pts["fairgrad"]["time_ratio_teleport"] == 1.0
    # no teleport: exactly FairGrad's training (the trigger only reads the step's Jacobian)
    for label in ("cost-default", "cost-b0"):
        assert pts[label]["teleports"] == 0 and pts[label]["delta_m"] == pts["fairgrad"]["delta_m"]
    one = pts["cost-T2-b1"]
    assert one["teleports"] == 1 and one["budget"] == 1 and one["inner_steps"] == "2"
    assert one["teleport_s"] > 0 and 0 < one["teleport_share"] < 1 and _finite(one["loss_drift_mean"])
    assert one["time_ratio_teleport"] > 1.0
    assert _finite(one["displacement_rel_mean"]) and one["displacement_rel_mean"] > 0
    t = b["target"]
    assert t["time_ratio_max"] == 1.25 and isinstance(t["default_pass"], bool) and _finite(t["default_time_ratio"])
    assert len(b["runs"]) == 4 and all(_finite(r["time_ratio"]) for r in b["runs"])


@pytest.mark.slow
def test_quick_levers_and_agreement(tmp_path):
    cost_budget.main(["--quick", "--out", str(tmp_path), "--sections", "levers", "agreement"])
    res = json.loads((tmp_path / "cost_budget.json").read_text())
    assert all(r["accepted"] >= 1 and r["teleport_s_mean"] > 0 for r in res["levers"]["inner_steps"])
    costs = res["levers"]["step_costs"]
    assert costs["yeast"]["K"] == 14
    for ds in ("multimnist", "yeast"):
        for variant in ("fairgrad+exact_trigger", "ls+exact_trigger", "ls+rep_trigger_flatten", "ls+rep_trigger_mean"):
            assert costs[ds][variant]["ratio"] > 0 and costs[ds][variant]["steps"] >= 2
    agree = res["agreement"]
    for ds in ("multimnist", "yeast", "synthetic"):
        assert agree[ds]["steps"] > 0
        for rule in ("majority", "any"):
            for reduce in ("flatten", "mean"):
                a = agree[ds][rule][reduce]
                assert a["both_fire"] + a["both_silent"] + a["exact_only"] + a["rep_only"] == pytest.approx(1.0)
