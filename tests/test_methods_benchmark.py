"""The every-method benchmark: its configs, the step-time script on a tiny model, and the METHODS.md report
(benchmarks/configs/methods, benchmarks.perf.methods, benchmarks.runner.methods_table)."""

import json
import math
from pathlib import Path

import pytest
import yaml

from benchmarks.perf import methods as perf
from benchmarks.runner import methods_table
from benchmarks.runner.config import RunnerConfig, config_from_argv
from lightning_cost.aggregators import AVAILABLE, PEERS, REGISTERED

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "benchmarks" / "configs"
SAME = ("dataset", "data_kw", "epochs", "patience", "lr", "lr_scheduler", "method_kw", "threads")


def _config(path: Path) -> RunnerConfig:
    settings, _ = config_from_argv(["--config", str(path)])
    return RunnerConfig(**settings)


@pytest.mark.parametrize("name", ["yeast", "birds", "tox21", "multimnist"])
def test_config_lists_every_registered_method_with_its_data_set_settings(name):
    cfg = _config(CONFIGS / "methods" / f"{name}.yaml")
    assert cfg.methods == list(REGISTERED) and len(cfg.methods) == 32 == len(AVAILABLE) + len(PEERS)
    assert cfg.cost == ["none"] and cfg.seeds == [0, 1, 2] and cfg.out == f"docs/results/methods/{name}"
    assert len(cfg.runs()) == 96 and cfg.method_kw == {"fairgrad": {"alpha": 2.0}}
    reference = CONFIGS / ("multimnist.yaml" if name == "multimnist" else f"verdict/{name}.yaml")
    ref = yaml.safe_load(reference.read_text())
    mine = yaml.safe_load((CONFIGS / "methods" / f"{name}.yaml").read_text())
    for key in SAME:
        assert mine.get(key) == ref.get(key), key
    if name == "multimnist":
        assert cfg.data_kw == {"num_train": 8000, "num_val": 2000, "batch_size": 256} and cfg.epochs == 2


def test_schedule_interleaves_ls():
    assert perf.schedule(["ls", "a", "b", "c"], 2) == ["ls", "a", "b", "ls", "c", "ls"]
    assert perf.schedule(["a"], 4) == ["ls", "a", "ls"]


def test_perf_script_on_a_tiny_model_gives_finite_ratios(tmp_path):
    perf.main(["--datasets", "fingerprint_mlp", "--tiny", "--methods", "ls", "mgda", "--steps", "2", "--warmup", "1",
               "--out", str(tmp_path)])
    res = json.loads((tmp_path / "methods_perf.json").read_text())
    rows = res["setups"][0]["methods"]
    assert res["setups"][0]["order"] == ["ls", "mgda", "ls"] and res["machine"]["threads"] == 1
    assert rows["ls"]["time_ratio_vs_ls"] == 1.0 and rows["ls"]["rss_diff_mib_vs_ls"] == 0.0
    assert math.isfinite(rows["mgda"]["time_ratio_vs_ls"]) and rows["mgda"]["time_ratio_vs_ls"] > 0
    assert rows["mgda"]["timed_steps"] == 2 and rows["mgda"]["peak_rss_mib"] > 0
    assert "| mgda |" in (tmp_path / "methods_perf.md").read_text()


def _run(method, seed, t1, t2):
    return {"dataset": "toy", "kind": "run", "method": method, "cost": "none", "seed": seed,
            "test": {"t1/auc": t1, "t2/auc": t2}, "higher_is_better": {"t1/auc": True, "t2/auc": True},
            "wall_time_s": 1.0, "teleports": 0, "teleports_before_best": 0, "best_epoch": 0, "epochs_run": 1}


def _write(folder: Path, sub: str, name: str, record: dict) -> None:
    (folder / sub).mkdir(parents=True, exist_ok=True)
    (folder / sub / name).write_text(json.dumps(record))


def _perf_record():
    row = {"step_s": 0.02, "time_ratio_vs_ls": 2.0, "peak_rss_mib": 900.0, "rss_diff_mib_vs_ls": 50.0, "skipped_steps": 0}
    ls = {"step_s": 0.01, "time_ratio_vs_ls": 1.0, "peak_rss_mib": 850.0, "rss_diff_mib_vs_ls": 0.0, "skipped_steps": 0}
    return {"command": "python -m benchmarks.perf.methods", "note": "", "steps": 2, "warmup": 1,
            "machine": {"cpu": "test CPU", "cores": 2, "threads": 1, "torch": "x", "python": "y", "load_avg_start": [0.1]},
            "setups": [{"setup": "toy", "steps": 2, "warmup": 1, "ls_runs_s": [0.01], "ls_drift": 1.0,
                        "methods": {"ls": ls, "mgda": row}}]}


def test_report_merges_hand_made_runs_and_perf(tmp_path):
    folder = tmp_path / "toy"
    for method, seed, t1, t2 in [("ls", 0, 0.9, 0.6), ("ls", 1, 0.86, 0.58), ("mgda", 0, 0.8, 0.5),
                                 ("pcgrad", 0, 0.7, 0.55)]:
        _write(folder, "runs", f"{method}__cost-none__seed{seed}.json", _run(method, seed, t1, t2))
    for task, value in (("t1", 0.8), ("t2", 0.5)):
        base = {"task": task, "seed": 0, "test": {f"{task}/auc": value}, "higher_is_better": {f"{task}/auc": True},
                "wall_time_s": 1.0}
        _write(folder, "baselines", f"{task}__seed0.json", base)
    (tmp_path / "methods_perf.json").write_text(json.dumps(_perf_record()))
    text = methods_table.main(["--out", str(tmp_path), "--datasets", "toy", "--min-methods", "3"])
    # ls: Delta-m% -16.25 and -11.75 over the seeds; ranks t1 (1, 2, 3), t2 (1, 3, 2)
    assert "| ls | -14.00 ± 3.18 | 2 | 1.00 | 1.00 | +0 |" in text
    assert "| mgda | 0.00 ± 0.00 | 1 | 2.50 | 2.00 | +50 |" in text
    assert "| pcgrad | 1.25 ± 0.00 | 1 | 2.50 | - | - |" in text
    assert "test CPU" in text and (tmp_path / "METHODS.md").read_text() == text
    overall = text.split("## Overall mean rank")[1]
    assert "| ls | 1.00 | 1 |" in overall and "toy (3 methods ranked)" in overall


def test_overall_mr_is_the_mean_over_data_sets():
    got = methods_table.overall_mr({"d1": {"ls": 1.0, "mgda": 2.0}, "d2": {"ls": 3.0, "mgda": 1.0, "pcgrad": 2.0}})
    assert got == [("mgda", 1.5, 2), ("ls", 2.0, 2), ("pcgrad", 2.0, 1)]


def test_report_without_runs_says_how_to_make_them(tmp_path):
    text = methods_table.main(["--out", str(tmp_path), "--datasets", "yeast"])
    assert "No grid run cached yet" in text and "benchmarks/configs/methods/yeast.yaml" in text


def test_a_method_undefined_at_this_k_says_so_in_the_table():
    from benchmarks.runner.methods_table import why_not_run

    assert why_not_run("krum", 2).startswith("undefined at K = 2") and "needs at least 3 tasks" in why_not_run("krum", 2)
    assert "trim_number=1" in why_not_run("trimmedmean", 2)
    assert why_not_run("krum", 6).startswith("no run finished")  # defined there: the failure was in training
    assert why_not_run("si", 2).startswith("no run finished")  # a loss weighting: no Jacobian to probe
