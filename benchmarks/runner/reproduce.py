"""Retrain cached runs with today's code and say whether they come out bit for bit the same.

    python -m benchmarks.runner.reproduce --config benchmarks/configs/verdict/yeast.yaml \\
        --runs fairgrad:none:0 fairgrad:rescale:0 [--retrain-derived] [--json reproduce.json]

A grid's cache is keyed by settings, not by code (:mod:`benchmarks.runner.provenance`), so a folder
can hold runs that today's code would not reproduce. Each chosen run (``method:variant:seed``) is
trained again in a scratch copy of its folder (the cache itself is not touched; a COST run reads its
base from the copy, as in the grid) and compared with its cached record: the final weights'
sha256, the test metrics, the selected epoch and the teleports. A derived run (``derived_from``) is
derived again unless ``--retrain-derived``, which trains it and so checks the derivation too.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import load_json, write_json

__all__ = ["compare_records", "reproduce", "main"]


def compare_records(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """What differs between a cached record and its retrained one."""
    metrics = sorted(set(old["test"]) | set(new["test"]))
    diffs = [abs(float(new["test"].get(k, math.nan)) - float(old["test"].get(k, math.nan))) for k in metrics]
    finite = [d for d in diffs if math.isfinite(d)]
    return {"identical": old.get("weights_sha256") is not None and old.get("weights_sha256") == new.get("weights_sha256"),
            "max_abs_test_diff": max(finite) if finite else None,
            "best_epoch": [old.get("best_epoch"), new.get("best_epoch")],
            "epochs_run": [old.get("epochs_run"), new.get("epochs_run")],
            "teleports": [old.get("teleports"), new.get("teleports")],
            "cached_code": (old.get("provenance") or {}).get("code"),
            "code": (new.get("provenance") or {}).get("code")}


def _parse(spec: str) -> tuple[str, str, int]:
    parts = spec.split(":")
    if len(parts) != 3 or not parts[2].isdigit():
        raise ValueError(f"--runs takes method:variant:seed, got {spec!r}")
    return parts[0], parts[1], int(parts[2])


def _scratch_copy(src: Path, dst: Path) -> None:
    for sub in ("runs", "baselines"):
        if (src / sub).is_dir():
            shutil.copytree(src / sub, dst / sub, ignore=shutil.ignore_patterns("*.claim"))


def _chosen(jobs: list[Any], wanted: list[tuple[str, str, int]], src: Path) -> list[Any]:
    from benchmarks.runner.grid import fingerprint

    by = {(j.method, j.cost, j.seed): j for j in jobs if j.kind == "run"}
    chosen = []
    for w in wanted:
        name, job = ":".join(map(str, w)), by.get(w)
        if job is None:
            raise ValueError(f"{name}: the config plans no such run")
        cached = load_json(src / "runs" / job.path.name)
        if cached is None:
            raise ValueError(f"{name}: no cached record in {src / 'runs'}")
        if cached.get("config_hash") != fingerprint(job.key):
            raise ValueError(f"{name}: the cached record has other settings than the config plans")
        chosen.append(job)
    return chosen


def reproduce(cfg: Any, wanted: list[tuple[str, str, int]], retrain_derived: bool = False) -> list[dict[str, Any]]:
    """Retrain the ``wanted`` runs of ``cfg``'s cached folder in a scratch copy; one comparison each."""
    from rich.console import Console

    from benchmarks.registry import dataset_title, make_datamodule
    from benchmarks.runner.grid import _run_jobs, data_fingerprint, out_dir, plan_jobs

    src, title = out_dir(cfg), dataset_title(cfg.dataset, cfg.data_kw)
    dm = make_datamodule(cfg.dataset, **cfg.data_kw)
    with tempfile.TemporaryDirectory(prefix="reproduce-") as tmp:
        scratch = Path(tmp)
        _scratch_copy(src, scratch)
        run_cfg = dataclasses.replace(cfg, out=str(scratch), derive_silent=cfg.derive_silent and not retrain_derived)
        jobs = plan_jobs(run_cfg, scratch, [s.name for s in dm.task_specs] if cfg.baselines else [],
                         data_fingerprint(dm.data_files()))
        chosen = _chosen(jobs, wanted, src)
        for job in chosen:
            job.path.unlink()
        failed = _run_jobs(jobs, chosen, dm, run_cfg, title, scratch, Console(width=160))
        if failed:
            raise RuntimeError("; ".join(f"{label}: {err}" for label, err in failed))
        return [{"run": f"{j.method}:{j.cost}:{j.seed}", **compare_records(load_json(src / "runs" / j.path.name),
                                                                           load_json(j.path))} for j in chosen]


def _print(results: list[dict[str, Any]]) -> None:
    for r in results:
        diff = "—" if r["max_abs_test_diff"] is None else f"{r['max_abs_test_diff']:.2e}"
        print(f"{r['run']}: {'identical' if r['identical'] else 'DIFFERS'} | max |test diff| {diff} | "
              f"best epoch {r['best_epoch'][0]} -> {r['best_epoch'][1]} | epochs {r['epochs_run'][0]} -> "
              f"{r['epochs_run'][1]} | teleports {r['teleports'][0]} -> {r['teleports'][1]} | code "
              f"{r['cached_code'] or 'unrecorded'} -> {r['code']}")


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    from benchmarks.runner.config import RunnerConfig, config_from_argv

    p = argparse.ArgumentParser(prog="python -m benchmarks.runner.reproduce", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="the grid's YAML config (its out folder holds the cache)")
    p.add_argument("--runs", nargs="+", required=True, help="method:variant:seed, e.g. fairgrad:none:0")
    p.add_argument("--retrain-derived", action="store_true", help="train derived runs instead of deriving them again")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--json", help="write the comparisons here")
    args = p.parse_args(argv)
    try:
        wanted = [_parse(s) for s in args.runs]
    except ValueError as err:
        p.error(str(err))
    settings, _ = config_from_argv(["--config", args.config, "--workers", str(args.workers), "--progress", "false"])
    import torch

    cfg = RunnerConfig(**settings)
    torch.set_num_threads(cfg.threads)
    results = reproduce(cfg, wanted, args.retrain_derived)
    _print(results)
    if args.json:
        write_json(Path(args.json), {"config": args.config, "runs": results})
    return results


if __name__ == "__main__":
    main()
