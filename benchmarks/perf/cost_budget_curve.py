"""Section ``budget`` of the COST-cost benchmark: FairGrad + COST against FairGrad over the number of
forced teleports per epoch, each point a timed run of the runner's training (with cached baselines)."""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import finite_mean, finite_median, load_json, quiet, quiet_trainer, write_json
from benchmarks.perf.cost_budget_config import runner_config
from benchmarks.perf.levers import PRESET, summarize_history
from benchmarks.runner.config import RunnerConfig
from benchmarks.runner.variants import build_teleport, deep_merge

TARGET_RATIO = 1.25  # the aim: COST <= 1.25x its base method's training time on MultiMNIST

_mean, _median = finite_mean, finite_median

# --------------------------------------------------------------------------- 1. the budget curve


def parse_inner(spec: str | int) -> tuple[int, float | None, bool]:
    """``"10"`` -> ``(10, None, True)`` (inner lr = the outer lr, HTR on); ``"3@3e-3"`` -> ``(3, 0.003, True)``;
    a ``":nohtr"`` suffix turns HTR (eqs. 12-13) off: ``"1@1e-2:nohtr"`` -> ``(1, 0.01, False)``."""
    body, _, flag = str(spec).partition(":")
    if flag not in ("", "nohtr"):
        raise ValueError(f"bad inner-steps spec {spec!r}: T[@LR][:nohtr]")
    steps, _, lr = body.partition("@")
    return int(steps), (float(lr) if lr else None), flag != "nohtr"


def _inner_label(spec: str | int) -> str:
    steps, lr, htr = parse_inner(spec)
    return f"T{steps}" + (f"@{lr:g}" if lr is not None else "") + ("" if htr else "-nohtr")


def inner_name(spec: str | int) -> str:
    steps, lr, htr = parse_inner(spec)
    return f"{steps} inner steps" + (f", lr {lr:g}" if lr is not None else "") + ("" if htr else ", no HTR")


def point_spec(cfg: RunnerConfig, budget: int | None, inner: str | int | None, steps_per_epoch: int) -> dict:
    """The callback arguments of one point: cost_budget.yaml's preset with ``inner`` (``T[@LR][:nohtr]``) inner
    steps and, when ``budget`` is given, ``budget`` forced teleports per epoch, evenly spaced."""
    over: dict[str, Any] = {}
    if inner is not None:
        steps, lr, htr = parse_inner(inner)
        # one inner loop of exactly T steps (no gain search), so the curve is the cost of T steps
        over["teleporter"] = {"inner_steps": steps, "min_gain": None, **({"inner_lr": lr} if lr is not None else {})}
        if not htr:
            over["transfer"] = "keep"
    if budget is not None:
        over["schedule"] = {"max_per_epoch": int(budget),
                            "every": max(1, steps_per_epoch // budget) if budget else 0}
    return deep_merge(cfg.spec(PRESET), over)


def _baselines(dm: Any, cfg: RunnerConfig, seeds: Sequence[int], out: Path, source: Path | None,
               log: Callable[[str], None]) -> dict[str, Any]:
    """Single-task test metrics per task, mean over seeds (cached in ``out/baselines``)."""
    from benchmarks.runner.grid import fingerprint
    from benchmarks.runner.train import train_one

    key = {"dataset": cfg.dataset, "data_kw": cfg.data_kw, "epochs": cfg.epochs, "lr": cfg.lr,
           "weight_decay": cfg.weight_decay, "model_kw": cfg.model_kw, "limit_train_batches": cfg.limit_train_batches}
    rows = []
    for t in (s.name for s in dm.task_specs):
        for seed in seeds:
            path = (source or out / "baselines") / f"{t}__seed{seed}.json"
            r = load_json(path)
            if source is not None and r is None:
                raise FileNotFoundError(f"no baseline {path.name} in {source}")
            if source is None and (r is None or r.get("config_hash") != fingerprint({**key, "task": t, "seed": seed})):
                log(f"  single-task baseline {t} seed {seed} ...")
                with quiet(everything=True):
                    r = train_one(dm, cfg, seed=seed, task=t, ckpt_dir=out / "ckpt" / f"stl_{t}_{seed}")
                r["config_hash"] = fingerprint({**key, "task": t, "seed": seed})
                write_json(path, {k: v for k, v in r.items() if k != "teleport_history"})
            rows.append(r)
    hib: dict[str, bool] = {}
    for r in rows:
        hib.update(r["higher_is_better"])
    base = {k: _mean([r["test"][k] for r in rows if k in r["test"]]) for k in hib}
    return {"metrics": base, "higher_is_better": hib, "wall_s": _mean([r["wall_time_s"] for r in rows]),
            "seeds": list(seeds)}


def _warm_up(dm: Any) -> None:
    """One-off costs (PEFT's import, the first Trainer, first-call allocations) before anything is timed."""
    import peft.tuners.lora  # noqa: F401

    from benchmarks.models.modules import MTLBenchModule
    from benchmarks.registry import make_model

    model = MTLBenchModule(make_model(dm), dm.task_specs, method="fairgrad", method_kw={"alpha": 2.0})
    tele = build_teleport({"teleporter": {"inner_steps": 1}, "schedule": {"every": 2, "max_per_epoch": None}}, 0)
    with quiet(everything=True):
        quiet_trainer([tele], max_steps=3).fit(model, dm.train_dataloader())


def _points(budgets: Sequence[int], inner: Sequence[str]) -> list[dict[str, Any]]:
    """FairGrad, COST as configured, COST with the trigger checked but no teleport, and every forced point."""
    points: list[dict[str, Any]] = [{"label": "fairgrad", "cost": "none", "budget": None, "inner_steps": None},
                                    {"label": "cost-default", "cost": PRESET, "budget": None, "inner_steps": None}]
    if 0 in budgets:  # no teleport: the inner settings do not matter, one run
        points.append({"label": "cost-b0", "cost": PRESET, "budget": 0, "inner_steps": None})
    for t in inner:
        points += [{"label": f"cost-{_inner_label(t)}-b{b}", "cost": PRESET, "budget": b, "inner_steps": str(t)}
                   for b in budgets if b]
    return points


def _run_point(dm: Any, cfg: RunnerConfig, p: dict[str, Any], seed: int, rep: int, steps_per_epoch: int,
               base: dict[str, Any], out: Path, rerun: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """One point of the curve (cached in ``out/runs``): FairGrad with the point's callback, timed."""
    import dataclasses

    from benchmarks.runner.stats import run_delta_m
    from benchmarks.runner.train import train_one

    path = out / "runs" / f"{p['label']}__seed{seed}__rep{rep}.json"
    spec = point_spec(cfg, p["budget"], p["inner_steps"], steps_per_epoch) if p["cost"] != "none" else None
    key = json.loads(json.dumps({"cfg": dataclasses.asdict(cfg), "spec": spec, "point": p, "seed": seed, "rep": rep},
                                default=str))
    old = load_json(path)
    if old is not None and old.get("key") == key and not rerun:
        return old
    log(f"  [rep {rep} seed {seed}] {p['label']} ...")
    c = dataclasses.replace(cfg, cost_variants={**cfg.cost_variants, "point": spec or {}}, cost=["none", "point"])
    with quiet(everything=True):
        r = train_one(dm, c, seed=seed, method="fairgrad", cost="point" if spec else "none",
                      ckpt_dir=out / "ckpt" / path.stem)
    row = {**p, "seed": seed, "rep": rep, "key": key, "wall_s": r["wall_time_s"], "test": r["test"],
           "delta_m": run_delta_m(r["test"], base["metrics"], base["higher_is_better"]),
           "teleports": r["teleports"], "rejected": r["rejected_teleports"], "teleport_s": r["teleport_seconds"],
           "trigger_ratio": r[f"trigger_ratio_{_rule(spec)}"],
           "checked_steps": r["checked_steps"], "skipped_steps": r["skipped_steps"],
           **summarize_history(r["teleport_history"])}
    log(f"    {row['wall_s']:.1f}s, teleports {row['teleports']}, delta_m {row['delta_m']:.2f}")
    write_json(path, row)
    return row


def _rule(spec: dict[str, Any] | None) -> str:
    """The trigger rule a callback spec uses (``majority`` unless it says otherwise)."""
    trigger = (spec or {}).get("trigger", "majority")
    return trigger if isinstance(trigger, str) else trigger.get("rule", "majority")


def _point_summary(p: dict[str, Any], rs: list[dict[str, Any]], fg_dm: float) -> dict[str, Any]:
    first = [r for r in rs if r["rep"] == 0]
    dm_mean = _mean([r["delta_m"] for r in first])
    return {
        **p,
        "teleports_per_epoch": p["budget"],
        "time_ratio": _median([r["time_ratio"] for r in rs]),
        "time_ratio_min": min(r["time_ratio"] for r in rs),
        "time_ratio_max": max(r["time_ratio"] for r in rs),
        "time_ratio_teleport": _median([r["time_ratio_teleport"] for r in rs]),
        "wall_s": _median([r["wall_s"] for r in rs]),
        "teleport_s": _median([r["teleport_s"] for r in rs]),
        "teleport_share": _median([r["teleport_s"] / r["wall_s"] for r in rs]),
        **{k: _mean([r[k] for r in first]) for k in ("teleports", "rejected", "trigger_ratio", "loss_drift_mean",
                                                      "displacement_rel_mean", "grad_norm_ratio_mean",
                                                      "teleport_s_mean")},
        "delta_m": dm_mean,
        "delta_m_gain_vs_fairgrad": fg_dm - dm_mean,
        "test": {k: _mean([r["test"][k] for r in first]) for k in first[0]["test"]},
        "n": len(rs),
    }


def _time_ratios(runs: list[dict[str, Any]]) -> None:
    """Each run's time over the FairGrad run of the same seed and repeat, and (less noisy) FairGrad's
    median time plus the run's own measured teleport seconds over FairGrad's."""
    ref = {(r["seed"], r["rep"]): r["wall_s"] for r in runs if r["label"] == "fairgrad"}
    fg_wall = _median(list(ref.values()))
    for r in runs:
        r["time_ratio"] = r["wall_s"] / ref[(r["seed"], r["rep"])]
        r["time_ratio_teleport"] = (fg_wall + r["teleport_s"]) / fg_wall


def bench_budget(args: argparse.Namespace, sizes: dict[str, Any], out: Path, log: Callable[[str], None]) -> dict:
    from benchmarks.registry import make_datamodule

    cfg = runner_config(args.quick, args.threads)
    dm = make_datamodule(cfg.dataset, **cfg.data_kw)
    dm.setup()
    steps_per_epoch = len(dm.train_dataloader())
    budgets = list(args.budgets if args.budgets is not None else sizes["budgets"])
    inner = list(args.inner_steps if args.inner_steps is not None else sizes["inner_steps"])
    seeds = list(args.seeds)
    log(f"budget: {cfg.dataset} {cfg.data_kw}, {cfg.epochs} epoch(s) x {steps_per_epoch} steps, "
        f"budgets {budgets}, inner steps {inner}, seeds {seeds}, repeats {args.repeats}")
    base = _baselines(dm, cfg, seeds, out, args.baselines_from, log)
    _warm_up(dm)
    points = _points(budgets, inner)
    runs: list[dict[str, Any]] = []
    for rep in range(args.repeats):
        for seed in seeds:
            order = list(points)
            random.Random(1000 * rep + seed).shuffle(order)
            runs += [_run_point(dm, cfg, p, seed, rep, steps_per_epoch, base, out, args.rerun, log) for p in order]
    import shutil

    shutil.rmtree(out / "ckpt", ignore_errors=True)
    _time_ratios(runs)
    fg_dm = _mean([r["delta_m"] for r in runs if r["label"] == "fairgrad" and r["rep"] == 0])
    summary = [_point_summary(p, [r for r in runs if r["label"] == p["label"]], fg_dm) for p in points]
    default = next(s for s in summary if s["label"] == "cost-default")
    return {
        "config": {"dataset": cfg.dataset, "data_kw": cfg.data_kw, "epochs": cfg.epochs, "lr": cfg.lr,
                   "method_kw": cfg.method_kw, "cost_spec": cfg.spec(PRESET)},
        "steps_per_epoch": steps_per_epoch, "budgets": budgets, "inner_steps": inner, "seeds": seeds,
        "repeats": args.repeats, "baseline": base, "points": summary, "runs": runs,
        "target": {"time_ratio_max": TARGET_RATIO, "default_time_ratio": default["time_ratio"],
                   "default_teleports": default["teleports"],
                   "default_pass": bool(default["time_ratio"] <= TARGET_RATIO),
                   "forced_points_within_target": [s["label"] for s in summary
                                                   if s["budget"] is not None and s["time_ratio"] <= TARGET_RATIO]},
    }
