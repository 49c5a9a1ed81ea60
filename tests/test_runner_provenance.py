"""Which code trained a run: the fingerprint, its record in trained, derived and copied runs, the verdict's
count of code versions, ``--rerun-other-code`` and ``benchmarks.runner.reproduce``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("jsonargparse")
pytest.importorskip("rich")

from benchmarks import run as runner  # noqa: E402
from benchmarks.data import default_data_root  # noqa: E402
from benchmarks.runner.provenance import code_fingerprint, code_versions, provenance  # noqa: E402

TINY_MM = {"num_train": 600, "num_val": 200, "num_test": 300, "batch_size": 128}


def _need(rel: str) -> None:
    if not (default_data_root() / rel).exists():
        pytest.skip(f"data file {rel} not available")


def _tree(root: Path, body: str) -> Path:
    (root / "pkg").mkdir(parents=True, exist_ok=True)
    (root / "pkg" / "mod.py").write_text(body)
    return root


def test_the_fingerprint_ignores_comments_and_docstrings_and_sees_code(tmp_path: Path) -> None:
    plain = code_fingerprint(_tree(tmp_path / "a", 'def f(x):\n    return x + 1\n'), ["pkg"])
    noted = code_fingerprint(_tree(tmp_path / "b", '"""A module."""\n\ndef f(x):  # add one\n'
                                                   '    """Adds one."""\n    return x + 1\n'), ["pkg"])
    edited = code_fingerprint(_tree(tmp_path / "c", 'def f(x):\n    return x + 2\n'), ["pkg"])
    moved = code_fingerprint(_tree(tmp_path / "d", 'def f(x):\n    return x + 1\n'), ["pkg"])
    assert plain == noted == moved and plain != edited and len(plain) == 12
    (tmp_path / "d" / "pkg" / "other.py").write_text("y = 1\n")
    assert code_fingerprint(tmp_path / "d", ["pkg"]) != plain  # a new module is new code
    with pytest.raises(FileNotFoundError, match="missing"):
        code_fingerprint(tmp_path / "a", ["missing"])


def test_this_repositorys_training_code_has_one_fingerprint() -> None:
    p = provenance()
    assert p["code"] == code_fingerprint() and p["torch"] and p["lightning"]


def test_code_versions_counts_recorded_and_unrecorded_runs() -> None:
    runs = [{"provenance": {"code": "b"}}, {"provenance": {"code": "a"}}, {"provenance": {"code": "b"}}, {}]
    assert code_versions(runs) == {"versions": {"a": 1, "b": 2}, "unrecorded": 1}
    assert code_versions([]) == {"versions": {}, "unrecorded": 0}


def _grid(out: Path, *extra: str) -> list[str]:
    return ["--dataset", "multimnist", "--methods", "fairgrad", "--cost", "none,paper", "--cost-variants",
            '{"paper": {}}', "--seeds", "1", "--epochs", "1", "--threads", "1", "--progress", "false",
            "--data-kw", json.dumps(TINY_MM), "--out", str(out), *extra]


def _load(out: Path, name: str) -> dict:
    return json.loads((out / name).read_text())


def test_records_name_their_code_and_other_code_is_retrained(tmp_path: Path) -> None:
    _need("mnist.npz")
    out = tmp_path / "grid"
    runner.main(_grid(out))
    base, derived = _load(out, "runs/fairgrad__cost-none__seed1.json"), _load(out, "runs/fairgrad__cost-paper__seed1.json")
    stl = _load(out, "baselines/left__seed1.json")
    assert base["provenance"] == provenance() == stl["provenance"]
    assert derived["derived_from"] == "fairgrad__cost-none__seed1.json" and derived["provenance"] == base["provenance"]
    # the base was trained by other code: it is retrained and the run derived from it derived again;
    # the baselines, trained by this code, are kept as they are
    base["provenance"]["code"], base["test"]["left/accuracy"] = "0ld0ld0ld0ld", -1.0
    (out / "runs/fairgrad__cost-none__seed1.json").write_text(json.dumps(base))
    derived["provenance"]["code"] = "0ld0ld0ld0ld"
    (out / "runs/fairgrad__cost-paper__seed1.json").write_text(json.dumps(derived))
    kept = (out / "baselines/left__seed1.json").stat().st_mtime_ns
    runner.main(_grid(out, "--rerun-other-code", "true"))
    again, rederived = _load(out, "runs/fairgrad__cost-none__seed1.json"), _load(out, "runs/fairgrad__cost-paper__seed1.json")
    assert again["provenance"] == provenance() and again["test"]["left/accuracy"] >= 0
    assert again["weights_sha256"] == base["weights_sha256"]  # same settings, same code: the same run
    assert rederived["provenance"] == provenance() and rederived["test"] == again["test"]
    assert (out / "baselines/left__seed1.json").stat().st_mtime_ns == kept
    # the verdict counts the versions: one, recorded, everywhere
    verdict = runner.main(["--verdict", str(out), "--verdict-out", str(tmp_path / "v")])
    (mm,) = verdict["datasets"].values()
    assert mm["code"] == {"versions": {provenance()["code"]: 4}, "unrecorded": 0}
    assert all(r["code"]["unrecorded"] == 0 and len(r["code"]["versions"]) == 1 for r in mm["rows"])
    assert "more than one code version" not in (tmp_path / "v" / "VERDICT.md").read_text()


def test_reproduce_retrains_in_a_scratch_copy_and_says_what_differs(tmp_path: Path, capsys) -> None:
    from benchmarks.runner import reproduce

    _need("mnist.npz")
    out = tmp_path / "grid"
    runner.main(_grid(out, "--baselines", "false", "--cost", "none"))
    cfg = tmp_path / "grid.yaml"
    cfg.write_text(f"dataset: multimnist\nmethods: [fairgrad]\ncost: [none]\nseeds: [1]\nepochs: 1\nthreads: 1\n"
                   f"baselines: false\ndata_kw: {json.dumps(TINY_MM)}\nout: {out}\n")
    path = out / "runs/fairgrad__cost-none__seed1.json"
    cached = _load(out, "runs/fairgrad__cost-none__seed1.json")
    results = reproduce.main(["--config", str(cfg), "--runs", "fairgrad:none:1", "--json", str(tmp_path / "r.json")])
    assert results[0]["identical"] and results[0]["max_abs_test_diff"] == 0.0 and results[0]["code"] == provenance()["code"]
    assert json.loads((tmp_path / "r.json").read_text())["runs"] == results
    assert _load(out, "runs/fairgrad__cost-none__seed1.json") == cached  # the cache is not touched
    # a cached record that another code wrote (other weights, other numbers) is reported as differing
    cached.update(weights_sha256="f" * 64, test={k: v + 0.25 for k, v in cached["test"].items()})
    cached.pop("provenance")
    path.write_text(json.dumps(cached))
    (r,) = reproduce.main(["--config", str(cfg), "--runs", "fairgrad:none:1"])
    assert not r["identical"] and r["max_abs_test_diff"] == pytest.approx(0.25) and r["cached_code"] is None
    assert "fairgrad:none:1: DIFFERS" in capsys.readouterr().out
    with pytest.raises(ValueError, match="plans no such run"):
        reproduce.reproduce(reproduce_cfg(cfg), [("fairgrad", "paper", 1)])
    with pytest.raises(SystemExit):
        reproduce.main(["--config", str(cfg), "--runs", "fairgrad-none-1"])


def reproduce_cfg(path: Path):
    from benchmarks.runner.config import RunnerConfig, config_from_argv

    settings, _ = config_from_argv(["--config", str(path)])
    return RunnerConfig(**settings)


def test_the_verdict_notes_a_folder_trained_by_two_code_versions(tmp_path: Path) -> None:
    from benchmarks.runner.verdict import _add_code_versions, _code_notes

    runs = [{"method": "m", "cost": "none", "provenance": {"code": "a"}},
            {"method": "m", "cost": "v", "provenance": {"code": "b"}},
            {"method": "m", "cost": "v_control", "control_of": "v"},
            {"method": "m", "cost": "w", "provenance": {"code": "a"}},
            {"method": "n", "cost": "none", "provenance": {"code": "b"}}]
    rows = [{"method": "m", "cost": c, "control_of": "v" if c == "v_control" else None} for c in ("none", "v", "v_control", "w")]
    _add_code_versions(rows, runs)
    by = {r["cost"]: r["code"] for r in rows}
    assert by["v"] == {"versions": {"a": 1, "b": 1}, "unrecorded": 1}  # its own, its base, its control
    assert by["w"] == {"versions": {"a": 2}, "unrecorded": 0} and by["none"] == {"versions": {"a": 1}, "unrecorded": 0}
    note = _code_notes("set", code_versions(runs))
    assert len(note) == 1 and "a (2 runs), b (2 runs), unrecorded (1 runs" in note[0]
    assert _code_notes("set", {"versions": {"a": 3}, "unrecorded": 0}) == []


def test_a_record_made_from_a_base_that_changed_is_planned_again(tmp_path: Path) -> None:
    """A derived run whose base now holds other weights, and a run whose warm-up was resolved from a
    base checkpoint that is no longer the base's, are trained again; the rest of the cache is kept."""
    from benchmarks.runner.config import RunnerConfig, config_from_argv
    from benchmarks.runner.grid import _todo, plan_jobs

    _need("mnist.npz")
    out = tmp_path / "grid"
    variants = {"paper": {}, "late": {"schedule": {"warmup_of_base_best": 0.5, "every": 2, "on_trigger": False},
                                    "teleporter": {"name": "null"}}}  # forced attempts: trained, never derived
    argv = [*_grid(out, "--baselines", "false", "--epochs", "2"), "--cost", "none,paper,late",
            "--cost-variants", json.dumps(variants)]
    runner.main(argv)
    settings, _ = config_from_argv(argv)
    cfg = RunnerConfig(**settings)

    def todo() -> set[str]:
        return {j.cost for j in _todo(plan_jobs(cfg, out, [], _load(out, "runs/fairgrad__cost-none__seed1.json")
                                                ["config"]["data_sha256"]), False)}

    assert todo() == set()
    path = out / "runs/fairgrad__cost-none__seed1.json"
    base = _load(out, "runs/fairgrad__cost-none__seed1.json")
    late = _load(out, "runs/fairgrad__cost-late__seed1.json")
    assert "derived_from" not in late and late["teleports"] >= 1
    assert _load(out, "runs/fairgrad__cost-paper__seed1.json")["derived_from"] == path.name
    path.write_text(json.dumps({**base, "weights_sha256": "0" * 64}))  # the base retrained to other weights
    assert todo() == {"paper"}  # its best epoch is the same, so the relative warm-up still holds
    other_best = 1 - base["best_epoch"]  # two epochs: the other one
    path.write_text(json.dumps({**base, "best_epoch": other_best}))
    assert late["resolved_schedule"]["warmup_steps"] != int(0.5 * (other_best + 1) * 5)
    assert todo() == {"late"}
