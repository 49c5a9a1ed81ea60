"""The benchmark runner (benchmarks.run) end to end on tiny real runs: files, columns, caching."""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("jsonargparse")
pytest.importorskip("matplotlib")
pytest.importorskip("rich")

from benchmarks import run as runner  # noqa: E402
from benchmarks.data import default_data_root  # noqa: E402

torch.set_num_threads(2)

RUN_COLS = ["dataset", "method", "cost", "seed", "delta_m", "best_epoch", "wall_time_s", "teleports",
            "trigger_ratio"]


def _need(rel: str) -> None:
    if not (default_data_root() / rel).exists():
        pytest.skip(f"data file {rel} not available")


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _mtimes(out: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in sorted((out / "runs").glob("*.json"))
            + sorted((out / "baselines").glob("*.json"))}


def test_parse_cost_variants() -> None:
    assert runner.parse_cost(["none,on"]) == ["none", "on"]
    assert runner.parse_cost([True, False]) == ["on", "none"]  # YAML's bare on/off
    assert runner.parse_cost("htr+lt, lg") == ["lt+htr", "lg"]
    assert runner.cost_flags("lt+htr", {}) == {"use_lt": True, "use_lg": False, "use_htr": True}
    assert runner.cost_flags("none", {}) is None
    with pytest.raises(ValueError):
        runner.parse_cost("htr")  # needs lt or lg
    with pytest.raises(ValueError):
        runner.parse_cost("bogus")


def test_multimnist_tiny_run_and_cache(tmp_path: Path) -> None:
    _need("mnist.npz")
    out = tmp_path / "mm"
    argv = [
        "--dataset", "multimnist", "--methods", "ls", "fairgrad", "--cost", "none,on", "--cost-methods", "fairgrad",
        "--seeds", "0", "--epochs", "1", "--threads", "2", "--progress", "false", "--out", str(out),
        "--data-kw", '{"num_train": 1000, "num_val": 300, "num_test": 500, "batch_size": 128}',
        "--cost-kw", '{"inner_steps": 2, "num_perturbations": 2}',
    ]
    summary = runner.main(argv)
    for name in ("runs.csv", "baselines.csv", "table.md", "summary.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    rows = _rows(out / "runs.csv")
    assert {(r["method"], r["cost"]) for r in rows} == {("ls", "none"), ("fairgrad", "none"), ("fairgrad", "on")}
    for r in rows:
        for c in RUN_COLS + ["left/accuracy", "right/accuracy"]:
            assert c in r, c
        assert r["dataset"] == "multimnist"
        assert math.isfinite(float(r["delta_m"]))
        assert 0.0 <= float(r["left/accuracy"]) <= 1.0
        assert float(r["wall_time_s"]) > 0
    # every epoch's validation is recorded under its own epoch (not the previous one's), and the
    # reported best validation score is the one ModelCheckpoint selected the tested weights on
    for f in (out / "runs").glob("*.json"):
        run = json.loads(f.read_text())
        assert [e["epoch"] for e in run["epochs"]] == [0]
        assert "val/score" in run["epochs"][0] and run["best_epoch"] == 0
        assert run["val"]["score"] == run["epochs"][0]["val/score"]
    fair = next(r for r in rows if r["method"] == "fairgrad" and r["cost"] == "none")
    assert 0.0 <= float(fair["trigger_ratio"]) <= 1.0  # measured from the aggregator's Jacobian
    assert len(_rows(out / "baselines.csv")) == 2  # one single-task model per task
    table = (out / "table.md").read_text()
    for s in ("STL", "fairgrad + COST", "Δm%", "MR", "teleports", "left/accuracy"):
        assert s in table, s
    assert all(math.isfinite(a["delta_m"][0]) and math.isfinite(a["mr"]) for a in summary["agg"])

    # re-running skips every finished run: result files untouched, and fast
    before = _mtimes(out)
    assert len(before) == 5
    t0 = time.perf_counter()
    runner.main(argv)
    assert time.perf_counter() - t0 < 15
    assert _mtimes(out) == before

    # a changed configuration re-runs only the affected runs (here: the COST one)
    runner.main([*argv[:-1], '{"inner_steps": 3, "num_perturbations": 2}'])
    after = _mtimes(out)
    changed = {k for k in after if after[k] != before[k]}
    assert changed == {"fairgrad__cost-on__seed0.json"}


def test_yaml_config_and_yeast_tiny(tmp_path: Path) -> None:
    _need("multilabel/yeast.npz")
    cfg = tmp_path / "yeast.yaml"
    out = tmp_path / "yeast"
    cfg.write_text(
        "dataset: yeast\n"
        "methods: [ls]\n"
        "cost: [none, on]\n"  # YAML reads a bare `on` as true
        "seeds: [0]\n"
        "epochs: 1\n"
        "limit_train_batches: 3\n"
        "baselines: false\n"
        "data_kw: {batch_size: 64}\n"
        "cost_kw: {inner_steps: 2, num_perturbations: 2}\n"
        f"out: {out}\n"
        "progress: false\n"
    )
    summary = runner.main(["--config", str(cfg)])
    rows = _rows(out / "runs.csv")
    assert len(rows) == 2 and {r["cost"] for r in rows} == {"none", "on"}
    metric_cols = [c for c in rows[0] if c.endswith("/auroc")]
    assert len(metric_cols) == 14
    assert all(0.0 <= float(r[c]) <= 1.0 for r in rows for c in metric_cols if math.isfinite(float(r[c])))
    on = next(r for r in rows if r["cost"] == "on")
    assert int(on["teleports"]) >= 0 and 0.0 <= float(on["trigger_ratio"]) <= 1.0
    assert len(summary["agg"]) == 2


def test_tox21_tiny(tmp_path: Path) -> None:
    _need("molecules/tox21.csv.gz")
    pytest.importorskip("rdkit")
    out = tmp_path / "tox21"
    runner.main([
        "--dataset", "tox21", "--methods", "fairgrad", "--cost", "none", "--seeds", "0", "--epochs", "1",
        "--limit-train-batches", "2", "--baselines", "false", "--progress", "false", "--out", str(out),
    ])
    rows = _rows(out / "runs.csv")
    assert len(rows) == 1
    aurocs = [float(v) for k, v in rows[0].items() if k.endswith("/auroc")]
    assert len(aurocs) == 12 and all(0.0 <= a <= 1.0 for a in aurocs if math.isfinite(a))
    assert rows[0]["delta_m"] in ("nan", "")  # no baselines: no Delta-m
    assert (out / "table.md").is_file() and (out / "summary.png").is_file()


def test_configs_parse() -> None:
    cfg = Path(__file__).resolve().parents[1] / "benchmarks" / "configs"
    parser = runner.build_parser()
    for f in sorted(cfg.glob("*.yaml")):
        ns = parser.parse_args(["--config", str(f)])
        runner.parse_cost(ns.cost)
