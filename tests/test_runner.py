"""The benchmark runner (benchmarks.runner): options, presets, tiny real runs, caching, pairing, reports."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("jsonargparse")
pytest.importorskip("matplotlib")
pytest.importorskip("rich")

from benchmarks import run as runner  # noqa: E402
from benchmarks.data import default_data_root  # noqa: E402
from benchmarks.runner.config import RunnerConfig, config_from_argv, default_out  # noqa: E402
from benchmarks.runner.variants import DEFAULT_COST_VARIANTS, cost_spec, deep_merge, parse_cost  # noqa: E402

RUN_COLS = ["dataset", "method", "cost", "seed", "delta_m", "best_epoch", "epochs_run", "wall_time_s", "teleports",
            "trigger_ratio_majority", "trigger_ratio_any"]
CONFIGS = Path(__file__).resolve().parents[1] / "benchmarks" / "configs"
TINY_MM = {"num_train": 600, "num_val": 200, "num_test": 300, "batch_size": 128}


def _need(rel: str) -> None:
    if not (default_data_root() / rel).exists():
        pytest.skip(f"data file {rel} not available")


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _mtimes(out: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in sorted((out / "runs").glob("*.json"))
            + sorted((out / "baselines").glob("*.json"))}


# --------------------------------------------------------------------------- options and presets


def test_cost_variants_are_presets_merged_over_cost_kw() -> None:
    variants = deep_merge(DEFAULT_COST_VARIANTS, {"mine": {"schedule": {"max_per_epoch": 0}}})
    assert parse_cost(["none,paper", "mine"], variants) == ["none", "paper", "mine"]
    assert parse_cost("paper, paper", variants) == ["paper"]
    with pytest.raises(ValueError, match="unknown COST variant 'on'"):
        parse_cost(["on"], variants)  # the old name is not a preset
    with pytest.raises(ValueError, match="boolean"):
        parse_cost([True], variants)  # YAML's bare `on`
    shared = {"teleporter": {"name": "lora", "inner_steps": 10, "gamma": 0.05}, "schedule": {"warmup_epochs": 1}}
    assert cost_spec("none", shared, variants) is None
    assert cost_spec("paper", shared, variants) == shared
    # the preset's own values win, dicts are merged key by key
    assert cost_spec("authors", shared, variants) == {
        "teleporter": {"name": "lora", "inner_steps": 100, "gamma": 0.05}, "trigger": "any",
        "schedule": {"warmup_epochs": 1, "warmup_fraction": 0.25, "max_per_epoch": 1}, "transfer": "restart_if_opposed"}


def test_every_preset_builds_its_callback() -> None:
    """The one place a preset becomes a callback: each default preset, merged over a shared cost_kw, builds a
    callback with the teleporter, trigger, schedule and transfer it names."""
    from benchmarks.runner.variants import build_teleport

    shared = {"schedule": {"warmup_epochs": 1}}
    built = {name: build_teleport(cost_spec(name, shared, DEFAULT_COST_VARIANTS), seed=5)
             for name in DEFAULT_COST_VARIANTS}
    assert all(cb.seed == 5 and cb.schedule.warmup_epochs == 1 for cb in built.values())
    paper, authors, rescale = built["paper"], built["authors"], built["rescale"]
    assert (paper.teleporter.name, paper.trigger.rule, paper.transfer.policy) == ("lora", "majority", "htr")
    assert (authors.teleporter.name, authors.trigger.rule, authors.teleporter.config.inner_steps) == ("lora", "any", 100)
    assert (authors.schedule.warmup_fraction, authors.schedule.max_per_epoch) == (0.25, 1)
    assert (rescale.teleporter.name, rescale.teleporter.config.objective, rescale.transfer.policy) == (
        "rescale", "conflict", "transport")
    with pytest.raises((TypeError, ValueError)):
        build_teleport({"schedule": {"every_other": 1}}, 0)  # the callback's own validation


def test_teleport_records_reads_dict_and_dataclass_histories() -> None:
    from dataclasses import dataclass
    from types import SimpleNamespace

    from benchmarks.runner.variants import teleport_records

    @dataclass
    class Record:
        step: int
        accepted: bool
        seconds: float

    assert teleport_records(SimpleNamespace(history=[Record(3, True, 0.5)])) == [
        {"step": 3, "accepted": True, "seconds": 0.5}]
    assert teleport_records(SimpleNamespace(history=[{"step": 4, "accepted": False}])) == [
        {"step": 4, "accepted": False}]
    from lightning_cost.teleport import GradientStats, TeleportRecord

    rec = TeleportRecord(step=2, epoch=0, teleporter="lora", accepted=True,
                         before=GradientStats([1.0, 2.0], 1.5, [0.5, 0.9], 0.5, 0))
    (d,) = teleport_records(SimpleNamespace(history=[rec]))
    assert d["before"]["mean_norm"] == 1.5 and d["after"] is None and d["teleporter"] == "lora"


def test_command_line_dicts_merge_into_the_config_files(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dataset: yeast\nseeds: [0, 1, 2]\ndata_kw: {batch_size: 64, fractions: [0.6, 0.2, 0.2]}\n"
                   "cost_kw: {teleporter: {inner_steps: 10, gamma: 0.05}, schedule: {warmup_epochs: 2}}\n"
                   "method_kw: {fairgrad: {alpha: 2.0}}\nmodel_kw: {hidden: [32, 16]}\n")
    settings, _ = config_from_argv(["--config", str(cfg), "--data-kw", '{"batch_size": 32}',
                                    "--cost-kw", '{"teleporter": {"inner_steps": 2}}',
                                    "--method-kw", '{"cagrad": {"c": 0.5}}', "--model-kw", "{batchnorm: false}"])
    assert settings["data_kw"] == {"batch_size": 32, "fractions": [0.6, 0.2, 0.2]}
    assert settings["cost_kw"] == {"teleporter": {"inner_steps": 2, "gamma": 0.05}, "schedule": {"warmup_epochs": 2}}
    assert settings["method_kw"] == {"fairgrad": {"alpha": 2.0}, "cagrad": {"c": 0.5}}
    assert settings["model_kw"] == {"hidden": [32, 16], "batchnorm": False}
    # not given on the command line: the file's dict as it is
    settings, _ = config_from_argv(["--config", str(cfg)])
    assert settings["data_kw"] == {"batch_size": 64, "fractions": [0.6, 0.2, 0.2]}


def test_baselines_default_to_the_config_files_first_seed(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dataset: yeast\nseeds: [0, 1, 2]\n")
    settings, _ = config_from_argv(["--config", str(cfg), "--seeds", "1"])
    assert settings["seeds"] == [1] and settings["baseline_seeds"] == [0]
    settings, _ = config_from_argv(["--config", str(cfg), "--seeds", "1", "--baseline-seeds", "1"])
    assert settings["baseline_seeds"] == [1]
    settings, _ = config_from_argv(["--dataset", "yeast", "--seeds", "3", "4"])  # no config file
    assert settings["baseline_seeds"] == [3]


def test_cost_seeds_cover_cost_rows_and_their_bases() -> None:
    cfg = RunnerConfig(dataset="yeast", methods=["ls", "fairgrad"], cost=["none", "paper"], cost_methods=["fairgrad"],
                       seeds=[0, 1, 2], cost_seeds=[0, 1, 2, 3, 4])
    runs = cfg.runs()
    assert [s for m, c, s in runs if m == "ls"] == [0, 1, 2]
    assert [s for m, c, s in runs if (m, c) == ("fairgrad", "none")] == [0, 1, 2, 3, 4]
    assert [s for m, c, s in runs if (m, c) == ("fairgrad", "paper")] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="patience"):
        RunnerConfig(patience=0)


def test_unknown_data_set_is_one_line_without_a_traceback(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        runner.main(["--dataset", "no_such_set", "--out", "unused"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    for word in ("no_such_set", "formats", "multilabel", "molecules", "mnist_composite", "yeast", "toxcast40"):
        assert word in err, word


def test_results_default_outside_the_source_tree(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("LIGHTNING_COST_RESULTS", raising=False)
    monkeypatch.setenv("LIGHTNING_COST_CACHE", str(tmp_path / "cache"))
    assert default_out("yeast") == tmp_path / "cache" / "results" / "yeast"
    monkeypatch.setenv("LIGHTNING_COST_RESULTS", str(tmp_path / "res"))
    assert default_out("my") == tmp_path / "res" / "my"
    src = Path(__file__).resolve().parents[1]
    assert src not in default_out("x").parents


def test_configs_parse_and_every_variant_builds_its_callback() -> None:
    from benchmarks.runner.relative import needs_base, resolve_warmup
    from benchmarks.runner.variants import build_teleport

    files = sorted(CONFIGS.rglob("*.yaml"))
    assert len(files) >= 19
    for f in files:
        settings, _ = config_from_argv(["--config", str(f)])
        cfg = RunnerConfig(**settings)
        for c in cfg.cost:
            if c != "none":
                spec = cfg.spec(c)
                if needs_base(spec):  # a warm-up relative to the base run: resolved from a base record
                    spec = resolve_warmup(spec, {"total_steps": 100.0, "config": {"epochs": 10}, "best_epoch": 3})
                build_teleport(spec, 0)  # the callback validates every setting of the preset


def test_verdict_configs_choose_full_sets_and_the_grid() -> None:
    names = ["multimnist", "multifashion", "multifashion_mnist", "yeast", "birds", "tox21", "qm8", "toxcast40"]
    variants = ["paper", "authors", "rescale", "flatness"]
    for name in names:
        settings, _ = config_from_argv(["--config", str(CONFIGS / "verdict" / f"{name}.yaml")])
        cfg = RunnerConfig(**settings)
        scheduled = ["rescale_scheduled", "flatness_scheduled"] if name != "toxcast40" else []
        assert cfg.dataset == name and cfg.cost == ["none", *(v + s for v in variants + scheduled for s in ("", "_control"))]
        for v in variants + scheduled:  # each variant's matched control: the same preset, a teleporter that does not move
            control = cfg.spec(f"{v}_control")
            assert cfg.control_of(f"{v}_control") == v and control["teleporter"] == {"name": "null"}
            assert {k: x for k, x in control.items() if k not in ("teleporter", "control_of")} == \
                {k: x for k, x in cfg.spec(v).items() if k != "teleporter"}
        for v in ("rescale", "flatness", *scheduled):  # the exact rescaling in the box [2/3, 3/2]
            assert cfg.spec(v)["teleporter"]["max_scale"] == 1.5 and cfg.spec(v)["transfer"] == "transport"
        for v in scheduled:  # one forced attempt per epoch from the same warm-up, whatever the trigger says
            schedule = cfg.spec(v)["schedule"]
            assert schedule["on_trigger"] is False and schedule["every"] > 0 and schedule["max_per_epoch"] == 1
            assert {k: x for k, x in schedule.items() if k not in ("every", "on_trigger")} == \
                cfg.spec(v.removesuffix("_scheduled"))["schedule"]
        cheap = name in ("yeast", "birds", "tox21")  # a run takes under a minute: 10 seeds and context methods
        assert cfg.cost_seeds == list(range(10 if cheap else 5)) and cfg.seeds == [0, 1, 2]
        assert cfg.methods == (["ls", "mgda", "pcgrad", "cagrad", "nashmtl", "famo", "fairgrad"] if cheap
                               else ["fairgrad"])
        assert cfg.cost_methods == (["fairgrad", "cagrad", "nashmtl"] if cheap else ["fairgrad"])
        assert cfg.patience is not None and cfg.epochs > cfg.patience
        if name.startswith("multi"):  # every training image: no num_train prefix, the validation split cut out of train
            assert cfg.data_kw.get("num_train") is None and cfg.data_kw["num_val"] > 0
            assert cfg.data_kw.get("num_test") is None


# --------------------------------------------------------------------------- tiny real runs


def test_multimnist_tiny_run_cache_curves_and_trigger_ratios(tmp_path: Path, capsys) -> None:
    _need("mnist.npz")
    out = tmp_path / "mm"
    argv = ["--dataset", "multimnist", "--methods", "ls", "fairgrad", "--cost", "none,paper", "--cost-methods",
            "fairgrad", "--cost-variants", '{"paper": {}}', "--seeds", "0", "--epochs", "2", "--threads", "1",
            "--progress", "false", "--out", str(out), "--data-kw", json.dumps(TINY_MM), "--derive-silent", "false"]
    summary = runner.main(argv)
    for name in ("runs.csv", "baselines.csv", "table.md", "summary.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    rows = _rows(out / "runs.csv")
    assert {(r["method"], r["cost"]) for r in rows} == {("ls", "none"), ("fairgrad", "none"), ("fairgrad", "paper")}
    for r in rows:
        assert all(c in r for c in RUN_COLS + ["left/accuracy", "right/accuracy"])
        assert math.isfinite(float(r["delta_m"])) and 0.0 <= float(r["left/accuracy"]) <= 1.0
    # one progress line per epoch of every run (stdout is not a terminal here)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "| epoch " in ln and "val/score" in ln]
    assert len(lines) == 5 * 2
    for f in (out / "runs").glob("*.json"):
        run = json.loads(f.read_text())
        assert [e["epoch"] for e in run["epochs"]] == [0, 1] and run["epochs_run"] == 2
        best = max(run["epochs"], key=lambda e: e["val/score"])
        assert run["best_epoch"] == best["epoch"] and run["val"]["score"] == best["val/score"]
        if run["method"] == "ls":  # a loss weighting without COST has no per-task gradients: nothing counted
            assert run["checked_steps"] == 0 and math.isnan(run["trigger_ratio_majority"])
            continue
        # a gradient method: both rules counted on every step (600 / 128 -> 5 steps per epoch), per epoch too
        assert run["checked_steps"] == 10
        for e in run["epochs"]:
            assert e["checked"] == 5 and 0 <= e["trigger_ratio_majority"] <= e["trigger_ratio_any"] <= 1
    table = (out / "table.md").read_text()
    for s in ("STL", "fairgrad + COST (paper)", "Δm%", "MR", "trigger ratio (majority)", "trigger ratio (any)"):
        assert s in table, s
    assert all(math.isfinite(a["delta_m"][0]) and math.isfinite(a["mr"]) for a in summary["agg"])

    # re-running skips every finished run: result files untouched, and fast
    before = _mtimes(out)
    assert len(before) == 5
    t0 = time.perf_counter()
    runner.main(argv)
    assert time.perf_counter() - t0 < 15
    assert _mtimes(out) == before
    # a changed setting re-runs only the runs it affects (FairGrad's two)
    runner.main([*argv, "--method-kw", '{"fairgrad": {"alpha": 1.0}}'])
    after = _mtimes(out)
    assert {k for k in after if after[k] != before[k]} == {"fairgrad__cost-none__seed0.json",
                                                           "fairgrad__cost-paper__seed0.json"}


def test_cost_run_that_never_teleports_equals_its_base_run(tmp_path: Path) -> None:
    """Paired seeds: same initialisation, same data order, so a COST run whose trigger stays silent is
    the base run, bit for bit (weights, validation curve, test metrics), and the runner derives it."""
    _need("mnist.npz")
    out = tmp_path / "pair"
    argv = ["--dataset", "multimnist", "--methods", "fairgrad", "--cost", "none,paper", "--cost-variants",
            '{"paper": {}}', "--seeds", "3", "--epochs", "2", "--threads", "1", "--progress", "false",
            "--baselines", "false", "--data-kw", json.dumps(TINY_MM)]
    runner.main([*argv, "--out", str(out), "--derive-silent", "false"])
    base = json.loads((out / "runs" / "fairgrad__cost-none__seed3.json").read_text())
    cost = json.loads((out / "runs" / "fairgrad__cost-paper__seed3.json").read_text())
    assert cost["teleports"] == 0 and cost["rejected_teleports"] == 0  # the trigger never fired (K = 2)
    assert cost["weights_sha256"] == base["weights_sha256"] and "derived_from" not in cost
    assert cost["test"] == base["test"] and cost["epochs"] == base["epochs"]
    assert base["fired_steps"] == {"majority": [], "any": []} and base["total_steps"] == 10
    # the same run derived from the base record: the trained run's numbers, and no training
    derived_out = tmp_path / "derived"
    runner.main([*argv, "--out", str(derived_out)])
    derived = json.loads((derived_out / "runs" / "fairgrad__cost-paper__seed3.json").read_text())
    assert derived["derived_from"] == "fairgrad__cost-none__seed3.json"
    for k in ("weights_sha256", "test", "epochs", "val", "best_epoch", "teleports", "teleports_before_best",
              "trigger_ratio_any", "fired_steps"):
        assert derived[k] == cost[k], k
    assert derived["config_hash"] == cost["config_hash"] and derived["cost"] == "paper"
    # a different seed is a different run (the digest sees it)
    runner.main(["--dataset", "multimnist", "--methods", "fairgrad", "--seeds", "4", "--epochs", "1", "--threads",
                 "1", "--progress", "false", "--baselines", "false", "--out", str(out), "--data-kw", json.dumps(TINY_MM)])
    other = json.loads((out / "runs" / "fairgrad__cost-none__seed4.json").read_text())
    assert other["weights_sha256"] != base["weights_sha256"]


def test_a_run_that_stalls_is_kept_tested_and_noted_and_the_grid_goes_on(tmp_path: Path, monkeypatch) -> None:
    from lightning_cost import TrainingStalledError
    from lightning_cost.aggregators import FairGrad

    _need("mnist.npz")
    calls = {"n": 0}
    original = FairGrad.weights  # called on both engines (aggregate calls it too)

    def stall_at_step_7(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:
            raise TrainingStalledError("FairGrad: 50 consecutive training steps were skipped; (a test)")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FairGrad, "weights", stall_at_step_7)
    out = tmp_path / "stall"
    summary = runner.main(["--dataset", "multimnist", "--methods", "fairgrad", "ls", "--seeds", "0", "--epochs", "2",
                           "--threads", "1", "--progress", "false", "--out", str(out), "--data-kw", json.dumps(TINY_MM)])
    stalled = json.loads((out / "runs" / "fairgrad__cost-none__seed0.json").read_text())
    assert stalled["stopped"].startswith("FairGrad: 50 consecutive") and stalled["epochs_run"] == 1
    assert all(math.isfinite(v) for v in stalled["test"].values())  # tested at its best validated epoch
    assert (out / "runs" / "ls__cost-none__seed0.json").is_file()  # the grid went on
    assert any("fairgrad cost=none seed 0 stopped" in n for n in summary["notes"])
    assert "stopped before its last epoch" in (out / "table.md").read_text()


def test_early_stopping_ends_runs_and_baselines_alike(tmp_path: Path) -> None:
    _need("multilabel/yeast.npz")
    out = tmp_path / "es"
    # lr 0 and no BatchNorm statistics: val/score never improves after epoch 0, so patience 1 stops every
    # run after epoch 1
    summary = runner.main(["--dataset", "yeast", "--methods", "mgda", "--epochs", "6", "--patience", "1", "--lr", "0",
                           "--model-kw", "{batchnorm: false}",
                           "--threads", "1", "--progress", "false", "--out", str(out),
                           "--data-kw", '{"batch_size": 256}'])
    (row,) = summary["rows"]
    assert row["epochs_run"] == 2 and row["best_epoch"] == 0
    assert [r["epochs_run"] for r in summary["baseline_rows"]] == [2] * 14
    run = json.loads((out / "runs" / "mgda__cost-none__seed0.json").read_text())
    assert len(run["epochs"]) == 2 and run["epochs"][0]["val/score"] == run["epochs"][1]["val/score"]


def test_yaml_config_and_yeast_tiny(tmp_path: Path) -> None:
    _need("multilabel/yeast.npz")
    cfg = tmp_path / "yeast.yaml"
    out = tmp_path / "yeast"
    cfg.write_text("dataset: yeast\nmethods: [ls]\ncost: [none, paper]\ncost_variants: {paper: {}}\nseeds: [0]\n"
                   f"epochs: 1\nlimit_train_batches: 3\nbaselines: false\ndata_kw: {{batch_size: 64}}\nout: {out}\n"
                   "progress: false\n")
    summary = runner.main(["--config", str(cfg)])
    rows = _rows(out / "runs.csv")
    assert len(rows) == 2 and {r["cost"] for r in rows} == {"none", "paper"}
    metric_cols = [c for c in rows[0] if c.endswith("/auroc")]
    assert len(metric_cols) == 14
    on = next(r for r in rows if r["cost"] == "paper")
    assert int(on["teleports"]) >= 0 and 0.0 <= float(on["trigger_ratio_majority"]) <= 1.0  # COST asks for J
    assert len(summary["agg"]) == 2


def test_tox21_tiny(tmp_path: Path) -> None:
    _need("molecules/tox21.csv.gz")
    pytest.importorskip("rdkit")
    out = tmp_path / "tox21"
    runner.main(["--dataset", "tox21", "--methods", "fairgrad", "--cost", "none", "--seeds", "0", "--epochs", "1",
                 "--limit-train-batches", "2", "--baselines", "false", "--progress", "false", "--out", str(out)])
    rows = _rows(out / "runs.csv")
    assert len(rows) == 1
    aurocs = [float(v) for k, v in rows[0].items() if k.endswith("/auroc")]
    assert len(aurocs) == 12 and all(0.0 <= a <= 1.0 for a in aurocs if math.isfinite(a))
    assert rows[0]["delta_m"] in ("nan", "")  # no baselines: no Delta-m


def _my_multilabel(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(120, 5)).astype(np.float32)
    y = (x[:, :3] + 0.5 * rng.normal(size=(120, 3)) > 0).astype(np.float32)
    np.savez(path, X=x, Y=y, labels=np.array(["a", "b", "c"]))
    return path


def test_own_file_by_format_titled_by_its_stem_and_keyed_by_its_content(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LIGHTNING_COST_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("LIGHTNING_COST_CACHE", str(tmp_path / "cache"))
    data = _my_multilabel(tmp_path / "my_table.npz")
    argv = ["--dataset", "multilabel", "--data-kw", json.dumps({"path": str(data), "batch_size": 32}), "--methods",
            "ls", "--epochs", "1", "--threads", "1", "--progress", "false"]
    summary = runner.main(argv)
    out = tmp_path / "results" / "my_table"
    assert summary["dataset"] == "my_table" and (out / "table.md").read_text().startswith("## my_table")
    assert summary["metrics"] == ["a/auroc", "b/auroc", "c/auroc"]
    run = json.loads((out / "runs" / "ls__cost-none__seed0.json").read_text())
    import hashlib

    assert run["config"]["data_sha256"] == {"my_table.npz": hashlib.sha256(data.read_bytes()).hexdigest()}
    before = _mtimes(out)
    runner.main(argv)
    assert _mtimes(out) == before  # same content: cached
    _my_multilabel(data, seed=1)  # new content: every run that read it runs again
    runner.main(argv)
    after = _mtimes(out)
    assert all(after[k] != before[k] for k in before)


# --------------------------------------------------------------------------- statistics and reports


@pytest.mark.parametrize("method", ["pcgrad", "rlw", "nashmtl", "graddrop"])
def test_weights_digest_covers_an_aggregators_extra_state(method: str) -> None:
    import copy

    import torch
    from mtl_models import TinyMTL

    from benchmarks.runner.train import weights_sha256

    if method == "nashmtl":
        pytest.importorskip("cvxpy")
    model = TinyMTL(k=2, method=method)
    digest = weights_sha256(model)
    assert weights_sha256(copy.deepcopy(model)) == digest
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    assert weights_sha256(model) != digest


def test_t_interval_by_hand() -> None:
    from benchmarks.runner.stats import t_interval

    # mean 2.5, s = sqrt(5/3) = 1.290994, s / sqrt(4) = 0.645497; t(0.975, 3) = 3.182446 (tables)
    lo, hi = t_interval([1.0, 2.0, 3.0, 4.0])
    assert lo == pytest.approx(2.5 - 3.182446 * 0.645497, abs=1e-5)
    assert hi == pytest.approx(2.5 + 3.182446 * 0.645497, abs=1e-5)
    assert all(math.isnan(v) for v in t_interval([1.0]))
    assert t_interval([2.0, 2.0, float("nan")]) == (2.0, 2.0)


def test_paired_difference_by_hand() -> None:
    from benchmarks.runner.stats import paired_difference

    base = [{"seed": s, "delta_m": d, "wall_time_s": 10.0} for s, d in ((0, 10.0), (1, 12.0), (2, 11.0), (9, 5.0))]
    cost = [{"seed": s, "delta_m": d, "wall_time_s": w} for s, d, w in ((0, 9.0, 12.0), (1, 11.5, 11.0), (2, 10.0, 13.0))]
    p = paired_difference(cost, base)
    # differences -1, -0.5, -1: mean -0.833333, s = 0.288675, s / sqrt(3) = 0.166667, t(0.975, 2) = 4.302653
    assert p["seeds"] == [0, 1, 2] and p["diffs"] == [-1.0, -0.5, -1.0]
    assert p["mean"] == pytest.approx(-0.833333, abs=1e-6)
    assert p["ci95"][0] == pytest.approx(-0.833333 - 4.302653 * 0.166667, abs=1e-5)
    assert p["ci95"][1] == pytest.approx(-0.833333 + 4.302653 * 0.166667, abs=1e-5)
    assert p["time_ratio"] == pytest.approx((1.2 + 1.1 + 1.3) / 3)


def test_teleport_effect_by_hand() -> None:
    from benchmarks.runner.stats import teleport_effect

    def record(norms, mins, drift, accepted=True, moved=True):
        return {"accepted": accepted, "moved": moved, "loss_drift": drift,
                "before": {"mean_norm": norms[0], "min_cos": mins[0]}, "after": {"mean_norm": norms[1], "min_cos": mins[1]}}

    history = [record((1.0, 1.5), (0.1, 0.3), 1e-3), record((2.0, 2.2), (0.2, 0.1), 3e-3),
               record((1.0, 4.0), (0.0, 0.5), 2e-3), record((1.0, 9.0), (0.0, 0.9), 0.5, accepted=False),
               record((1.0, 9.0), (0.0, 0.9), 0.0, moved=False)]
    e = teleport_effect(history)  # medians of (1.5, 1.1, 4.0), (0.2, -0.1, 0.5), (1e-3, 3e-3, 2e-3)
    assert e["grad_norm_ratio"] == pytest.approx(1.5) and e["min_cos_change"] == pytest.approx(0.2)
    assert e["loss_drift"] == pytest.approx(2e-3)
    assert all(math.isnan(v) for v in teleport_effect([]).values())


def _fabricated_run(dataset: str, method: str, cost: str, seed: int, test: dict, hib: dict, *, teleports: int = 0,
                    wall: float = 10.0, undefined: dict | None = None) -> dict:
    return {"dataset": dataset, "kind": "run", "method": method, "cost": cost, "seed": seed, "test": test,
            "higher_is_better": hib, "best_epoch": 3, "epochs_run": 6, "wall_time_s": wall, "teleports": teleports,
            "trigger_ratio_majority": 0.0, "trigger_ratio_any": 0.25, "undefined_auroc": undefined or {}}


def _yeast_like_summary() -> dict:
    from benchmarks.runner.stats import summarize

    tasks = [f"Class{k}" for k in range(1, 15)]
    hib = {f"{t}/auroc": True for t in tasks}
    rng = np.random.default_rng(0)
    runs, bases = [], []
    for t in tasks:
        bases.append({"dataset": "yeast", "task": t, "seed": 0, "test": {f"{t}/auroc": 0.7},
                      "higher_is_better": {f"{t}/auroc": True}, "wall_time_s": 3.0, "epochs_run": 5})
    for method in ("ls", "cagrad", "nashmtl", "fairgrad"):
        for cost in ("none", "paper", "authors"):
            if method == "ls" and cost != "none":
                continue
            for seed in range(3):
                test = {k: float(0.7 + 0.01 * rng.normal()) for k in hib}
                runs.append(_fabricated_run("yeast", method, cost, seed, test, hib))
    return summarize(runs, bases, "yeast")


def test_console_tables_fit_the_width_at_14_tasks() -> None:
    from rich.console import Console

    from benchmarks.runner.report import print_tables

    summary = _yeast_like_summary()
    console = Console(width=120, record=True, file=io.StringIO())
    print_tables(summary, console)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 120
    assert "…" not in text  # no cell or header cut short
    for k in summary["metrics"]:
        assert f"{k} ↑" in text, k
    assert "nashmtl + COST (authors)" in text and "trigger ratio (majority)" in text


def test_undefined_metric_is_reported_not_dropped(tmp_path: Path) -> None:
    from benchmarks.runner.report import write_reports
    from benchmarks.runner.stats import summarize

    hib = {"a/auroc": True, "b/auroc": True}
    bases = [{"dataset": "birds", "task": t, "seed": 0, "test": {f"{t}/auroc": v}, "wall_time_s": 1.0,
              "higher_is_better": {f"{t}/auroc": True}} for t, v in (("a", 0.8), ("b", float("nan")))]
    undefined = {"test": ["b"]}
    runs = [_fabricated_run("birds", "ls", "none", s, {"a/auroc": 0.72, "b/auroc": float("nan")}, hib,
                            undefined=undefined) for s in (0, 1)]
    summary = summarize(runs, bases, "birds")
    assert summary["metrics"] == ["a/auroc", "b/auroc"]
    assert summary["rows"][0]["delta_m"] == pytest.approx(10.0)  # over a/auroc alone: -(0.72 - 0.8) / 0.8
    write_reports(summary, tmp_path)
    table = (tmp_path / "table.md").read_text()
    assert "b/auroc ↑" in table and "NaN" in table
    assert "ROC-AUC undefined in the test split" in table and "for b: reported as NaN" in table
    assert "b/auroc" in _rows(tmp_path / "runs.csv")[0]


def _write_folder(folder: Path, dataset: str, rows: list[tuple[str, str, int, float, int, float]],
                  hib: dict, stl: dict, undefined: dict | None = None) -> Path:
    """A finished runner folder: one single-task baseline per metric and the given runs, where each
    ``(method, cost, seed, accuracy, teleports, wall)`` scales every metric alike."""
    (folder / "runs").mkdir(parents=True)
    (folder / "baselines").mkdir()
    for k, v in stl.items():
        task = k.split("/")[0]
        (folder / "baselines" / f"{task}__seed0.json").write_text(json.dumps(
            {"dataset": dataset, "task": task, "seed": 0, "test": {k: v}, "higher_is_better": {k: hib[k]},
             "wall_time_s": 1.0, "epochs_run": 4}))
    for method, cost, seed, scale, teleports, wall in rows:
        test = {k: v * scale for k, v in stl.items()}
        run = _fabricated_run(dataset, method, cost, seed, test, hib, teleports=teleports, wall=wall,
                              undefined=undefined)
        (folder / "runs" / f"{method}__cost-{cost}__seed{seed}.json").write_text(json.dumps(run))
    return folder


def test_verdict_from_fabricated_folders(tmp_path: Path) -> None:
    hib = {"left/accuracy": True, "right/accuracy": True}
    stl = {"left/accuracy": 0.9, "right/accuracy": 0.8}
    rows = []
    for s, (base, helps, hurts, noisy) in enumerate([(0.90, 0.95, 0.80, 0.93), (0.91, 0.97, 0.82, 0.85),
                                                     (0.89, 0.94, 0.79, 0.95)]):
        rows += [("fairgrad", "none", s, base, 0, 10.0), ("fairgrad", "paper", s, helps, 2, 12.0),
                 ("fairgrad", "authors", s, hurts, 3, 15.0), ("fairgrad", "rescale", s, noisy, 1, 11.0),
                 ("cagrad", "none", s, base, 0, 10.0), ("cagrad", "paper", s, base, 0, 10.0)]
    a = _write_folder(tmp_path / "a", "multimnist", rows, hib, stl)
    bird_hib = {"x/auroc": True, "y/auroc": True}
    b = _write_folder(tmp_path / "b", "birds", [("ls", "none", 0, 1.0, 0, 5.0)], bird_hib,
                      {"x/auroc": 0.7, "y/auroc": float("nan")}, undefined={"test": ["y"]})
    out = tmp_path / "verdict"
    runner.main(["--verdict", str(a), str(b), "--verdict-out", str(out)])
    verdict = json.loads((out / "verdict.json").read_text())
    assert set(verdict) == {"datasets"} and set(verdict["datasets"]) == {"multimnist", "birds"}
    mm = verdict["datasets"]["multimnist"]
    assert set(mm) == {"stl", "margin", "rows", "code"} and mm["stl"] == stl and mm["margin"] is None
    keys = {"method", "cost", "control_of", "seeds", "delta_m_mean", "delta_m_ci95", "mr", "paired_vs_base_mean",
            "paired_vs_base_ci95", "paired_vs_control_mean", "paired_vs_control_ci95", "margin", "teleports_per_run",
            "teleports_before_best", "trigger_ratio", "time_ratio_vs_base", "outcome", "code"}
    assert all(set(r) == keys for d in verdict["datasets"].values() for r in d["rows"])
    by = {(r["method"], r["cost"]): r for r in mm["rows"]}
    # paper: accuracy x0.95/0.97/0.94 vs base x0.90/0.91/0.89, so Delta-m% drops by (5, 6, 5) points
    assert by[("fairgrad", "paper")]["paired_vs_base_mean"] == pytest.approx(-100 * (0.05 + 0.06 + 0.05) / 3)
    assert by[("fairgrad", "paper")]["paired_vs_base_ci95"][1] < 0
    assert by[("fairgrad", "authors")]["paired_vs_base_ci95"][0] > 0
    assert by[("fairgrad", "paper")]["time_ratio_vs_base"] == pytest.approx(1.2)
    assert by[("fairgrad", "none")]["paired_vs_base_mean"] is None and by[("fairgrad", "none")]["seeds"] == 3
    assert by[("fairgrad", "paper")]["trigger_ratio"] == {"majority": 0.0, "any": 0.25}
    assert verdict["datasets"]["birds"]["stl"] == {"x/auroc": 0.7, "y/auroc": None}
    md = (out / "VERDICT.md").read_text()
    # no matched control: a row below its base is inconclusive, never "helps"
    assert by[("fairgrad", "paper")]["outcome"] == "inconclusive"
    assert "multimnist: COST hurts for fairgrad + COST (authors); never acted for cagrad + COST (paper) (in none " \
           "of its 3 runs); inconclusive for fairgrad + COST (paper) (below its base, but no matched control yet), " \
           "fairgrad + COST (rescale)." in md and "'no effect' cannot be concluded" in md
    assert "## birds" in md and "ROC-AUC undefined in the test split" in md and "for y" in md


def test_relative_warmup_is_resolved_from_the_base_run_of_the_same_seed(tmp_path: Path) -> None:
    _need("mnist.npz")
    out = tmp_path / "rel"
    runner.main(["--dataset", "multimnist", "--methods", "fairgrad", "--cost", "none,late", "--cost-variants",
                 '{"late": {"trigger": "any", "schedule": {"warmup_of_base_best": 0.5, "max_per_epoch": 1}}}',
                 "--seeds", "0", "--epochs", "2", "--threads", "1", "--progress", "false", "--baselines", "false",
                 "--derive-silent", "false", "--out", str(out), "--data-kw", json.dumps(TINY_MM)])
    base = json.loads((out / "runs" / "fairgrad__cost-none__seed0.json").read_text())
    late = json.loads((out / "runs" / "fairgrad__cost-late__seed0.json").read_text())
    expected = int(0.5 * (base["best_epoch"] + 1) * 5)  # 5 steps per epoch
    assert late["resolved_schedule"] == {"warmup_steps": expected, "max_per_epoch": 1}
    assert all(t["step"] >= expected for t in late["teleport_history"])


def test_the_cache_key_holds_the_lora_teleporters_defaults(tmp_path: Path) -> None:
    """A LoRA variant's key spells out every LoRA setting, so a changed library default retrains it."""
    from benchmarks.runner.grid import base_record, plan_jobs
    from lightning_cost.teleport.lora import LoRAConfig

    variants = {"plain": {"transfer": "htr"}, "same": {"transfer": "htr", "teleporter": {"name": "lora",
                                                                                          "min_gain": 0.05}},
                "other": {"transfer": "htr", "teleporter": {"name": "lora", "min_gain": 0.2}},
                "moves": {"transfer": "transport", "teleporter": {"name": "rescale"}}}
    cfg = RunnerConfig(dataset="yeast", methods=["fairgrad"], cost=["none", *variants], cost_variants=variants,
                       seeds=[0], baselines=False)
    keys = {j.cost: j.key for j in plan_jobs(cfg, tmp_path, ["a", "b"], {"yeast": "0" * 64})}
    assert keys["plain"]["lora"] == dataclasses.asdict(LoRAConfig()) and keys["plain"]["lora"]["min_gain"] == 0.05
    assert keys["plain"]["lora"] == keys["same"]["lora"] and keys["other"]["lora"]["min_gain"] == 0.2
    assert "lora" not in keys["moves"] and "lora" not in keys["none"]
    base = next(j for j in plan_jobs(cfg, tmp_path, ["a", "b"], {"yeast": "0" * 64}) if j.cost == "none")
    from benchmarks.runner.grid import fingerprint
    cost_job = next(j for j in plan_jobs(cfg, tmp_path, ["a", "b"], {"yeast": "0" * 64}) if j.cost == "plain")
    base.path.parent.mkdir(parents=True, exist_ok=True)
    base.path.write_text(json.dumps({"config_hash": fingerprint(base.key)}))
    assert base_record(cost_job) is not None  # the base run is still found under the longer key


def test_two_variants_that_differ_only_in_their_teleporter_share_one_trained_control(tmp_path: Path) -> None:
    """The matched controls of two variants that differ only in the teleporter are the same run (the null
    teleporter never moves): the second is planned as the first's twin and its record copied, not trained."""
    from benchmarks.runner.grid import plan_jobs

    _need("mnist.npz")
    moves = {"schedule": {"every": 3, "on_trigger": False}, "transfer": "transport"}
    variants = {"a": {**moves, "teleporter": {"name": "rescale", "objective": "conflict"}},
                "b": {**moves, "teleporter": {"name": "rescale", "objective": "grad_norm"}},
                "a_control": {"control_of": "a"}, "b_control": {"control_of": "b"},
                "c_control": {"control_of": "c"}, "c": {**moves, "transfer": "htr"}}
    cfg = RunnerConfig(dataset="multimnist", methods=["fairgrad"], cost=["none", *variants], cost_variants=variants,
                       seeds=[0], baselines=False)
    jobs = {j.cost: j for j in plan_jobs(cfg, tmp_path, ["l", "r"], {"mnist": "0" * 64})}
    assert jobs["b_control"].twin == jobs["a_control"].path and jobs["a_control"].twin is None
    assert jobs["c_control"].twin is None  # another transfer: another run
    out = tmp_path / "twins"
    runner.main(["--dataset", "multimnist", "--methods", "fairgrad", "--cost", "none,a,b,a_control,b_control",
                 "--cost-variants", json.dumps(variants), "--seeds", "0", "--epochs", "1", "--threads", "1",
                 "--progress", "false", "--baselines", "false", "--data-kw", json.dumps(TINY_MM), "--out", str(out)])
    first = json.loads((out / "runs" / "fairgrad__cost-a_control__seed0.json").read_text())
    second = json.loads((out / "runs" / "fairgrad__cost-b_control__seed0.json").read_text())
    assert first["teleports"] >= 1 and "copied_from" not in first  # the control acted (state transfer) and trained
    assert second["copied_from"] == "fairgrad__cost-a_control__seed0.json"
    assert second["weights_sha256"] == first["weights_sha256"] and second["test"] == first["test"]
    assert second["cost"] == "b_control" and second["control_of"] == "b" and second["config"]["cost"] == "b_control"
