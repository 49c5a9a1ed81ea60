"""The performance benchmark runs end to end and writes a well-formed perf.json."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.perf import bench
from lightning_cost.aggregators import AVAILABLE

TINY = dict(lenet_steps=2, lenet_warmup=1, lenet_ks=(2, 3), grad_reps=1, solve_reps=1, synth_k=5,
            teleports=1, trigger_p=20_000, trigger_ks=(2, 5), trigger_reps=1)


def _ratios(obj, path=""):
    """Every (path, value) whose key names a ratio, anywhere in the JSON."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if "ratio" in k and v is not None and not isinstance(v, (dict, list)):
                yield f"{path}.{k}", v
            yield from _ratios(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _ratios(v, f"{path}[{i}]")


def _check(res: dict, out_dir) -> None:
    on_disk = json.loads((out_dir / "perf.json").read_text())
    assert (out_dir / "perf.txt").read_text().strip()
    for key in ("meta", "methods", "pertask", "solve", "peers", "teleport", "trigger", "targets"):
        assert key in on_disk, key
    lenet = on_disk["methods"]["lenet_K2"]["methods"]
    assert set(lenet) == set(AVAILABLE)
    for m, r in lenet.items():
        assert r["step_ms"] > 0 and r["skipped_steps"] == 0, m
        assert math.isfinite(r["peak_rss_delta_mb"])
    for r in on_disk["pertask"]:
        for k in ("mixin_ms", "k_plain_ms", "k_retain_ms", "sum_backward_ms", "forward_ms", "mixin_loop_ms",
                  "mixin_batched_ms"):
            assert r[k] > 0
        assert math.isfinite(r["mixin_loop_peak_mb"]) and math.isfinite(r["mixin_batched_peak_mb"])
        assert isinstance(r["pass"], bool)
    assert {r["setup"] for r in on_disk["pertask"]} >= {"lenet_K2", "tox21mlp_K12"}
    solved = [r for r in on_disk["solve"] if "solve_ms" in r]
    assert not [r for r in on_disk["solve"] if "error" in r]
    assert {r["method"] for r in solved} == set(AVAILABLE)
    assert all(r["solve_ms"] > 0 and r["pct_of_step"] > 0 for r in solved)
    assert on_disk["teleport"]["teleports"] >= 1 and on_disk["teleport"]["teleport_ms_mean"] > 0
    assert all(r["conflict_cosines_ms"] > 0 and r["gramian_ms"] > 0 for r in on_disk["trigger"])
    assert all(r["gramian_rel_err"] < 1e-4 and r["cos_abs_err"] < 1e-5 for r in on_disk["trigger"] if r["K"] <= 10)
    assert {r["method"] for r in on_disk["peers"]} >= {"mgda", "pcgrad", "cagrad", "imtl"}
    ratios = list(_ratios(on_disk))
    assert len(ratios) > 20
    for path, v in ratios:
        assert isinstance(v, (int, float)) and math.isfinite(v) and v > 0, (path, v)
    assert res["meta"]["threads"] == 1


def test_quick_tiny(tmp_path):
    res = bench.run(quick=True, out_dir=tmp_path, log=lambda s: None, cfg_overrides=TINY)
    _check(res, tmp_path)


@pytest.mark.slow
def test_full(tmp_path):
    res = bench.run(quick=False, out_dir=tmp_path, log=lambda s: None)
    _check(res, tmp_path)
    assert {f"resnet18_K{k}" for k in (2, 3, 10)} <= set(res["methods"])
