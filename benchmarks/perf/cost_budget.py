"""What COST costs: FairGrad + COST vs FairGrad on a short MultiMNIST run, over the teleport budget.

    python -m benchmarks.perf.cost_budget [--quick] [--out DIR] [--seeds 0] [--repeats 1]
        [--budgets 0 1 2 4 8] [--inner-steps 10 3@3e-3 1@1e-2 1@1e-2:nohtr]
        [--sections budget levers agreement]

Sections (``--sections``, default ``budget``):

* ``budget``: the end-to-end training time (``trainer.fit``: training + the per-epoch validation) of
  FairGrad + COST against FairGrad on the settings of ``benchmarks/configs/cost_budget.yaml`` (
  8000 training composites, 2 epochs, batch 256, Adam lr 1e-3, FairGrad alpha 2), with Delta-m%
  (eq. 14, against single-task baselines trained the same way) beside it. The ceil(K/2) trigger never
  fires on MultiMNIST (K = 2) at these settings, so the budget axis *forces* teleports:
  schedule ``max_per_epoch = b`` and ``every = steps_per_epoch // b`` (evenly spaced, the
  callback's own option), for ``b`` in ``--budgets`` teleports per epoch, and one curve per
  ``--inner-steps`` value (``T[@LR][:nohtr]``: one inner loop of T steps at inner lr LR, without the LoRA
  teleporter's gain search, optionally without HTR). ``cost-default`` is COST exactly as cost_budget.yaml configures it (trigger-driven); ``cost-b0``
  checks the trigger and never teleports. Runs reuse :func:`benchmarks.runner.train.train_one` (the runner's
  module, callbacks, epoch selection and test). Each repeat runs every point once, in a shuffled
  order, and every time ratio divides by the FairGrad run *of the same repeat*; the table gives the
  median over repeats and seeds, and, less noisy, FairGrad's median time plus the run's own
  measured teleport seconds over FairGrad's. Delta-m% comes from the first repeat (training is
  deterministic per seed).
* ``levers``: COST's speed levers: (2a) inner steps x inner learning rate: seconds per teleport,
  loss drift, displacement, gradient-norm ratio, ``L_t``/``L_g`` over the inner loop; (2b) the step
  time of FairGrad + COST's trigger vs FairGrad (both use the one Jacobian), and of LS with the exact
  trigger and with the representation trigger, on MultiMNIST and Yeast.
* ``agreement``: how often the representation trigger (``trigger={"on": "representation"}``, both
  reductions) agrees with the exact one, step by step, on MultiMNIST (FairGrad, the budget's settings),
  Yeast (FairGrad, K = 14) and a synthetic regression problem where conflicts are frequent (LS, K = 4).

Writes ``DIR/cost_budget.json`` (everything, raw runs included), ``DIR/cost_budget.txt`` (the
tables) and ``DIR/cost_budget.png`` (time ratio and Delta-m% against the budget). Single-task
baselines are trained once and cached in ``DIR/baselines`` (``--baselines-from`` reads a runner's
``baselines/`` folder instead). One torch thread (``--threads``): the machines are shared, read ratios.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    finite_mean,
    finite_median,
    load_json,
    quiet,
    quiet_trainer,
    text_table,
    write_json,
)
from benchmarks.perf.levers import PRESET, summarize_history
from benchmarks.runner.config import RunnerConfig, config_from_argv
from benchmarks.runner.variants import build_teleport, deep_merge

BUDGET_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "cost_budget.yaml"
TARGET_RATIO = 1.25  # the aim: COST <= 1.25x its base method's training time on MultiMNIST

_mean, _median = finite_mean, finite_median

# --------------------------------------------------------------------------- configuration


def make_config(quick: bool) -> dict[str, Any]:
    """Sizes of every section; ``quick`` is a seconds-long smoke run (tests), not a measurement."""
    if quick:
        return dict(quick=True, data_kw={"num_train": 640, "num_val": 128, "num_test": 256, "batch_size": 64},
                    epochs=1, budgets=[0, 1], inner_steps=["2"],
                    lever_grid=[(2, None), (1, 5e-3)], step_reps=1,
                    step_batches=2, yeast_epochs=1, agree_mm_batches=4, agree_synth_steps=8)
    return dict(quick=False, data_kw=None, epochs=None, budgets=[0, 1, 2, 4, 8], inner_steps=["10", "3@3e-3", "1@1e-2", "1@1e-2:nohtr"],
                lever_grid=[(10, None), (5, 2e-3), (3, 3e-3), (3, None), (2, 5e-3), (1, 1e-2), (1, None)],
                lever_epoch_frac=1.0, step_reps=3, step_batches=15, yeast_epochs=5, agree_mm_batches=None,
                agree_synth_steps=150)


def runner_config(quick: bool, threads: int = 1) -> RunnerConfig:
    """The runner's configuration of the budget measurements (cost_budget.yaml through the runner's own parser)."""
    settings, _ = config_from_argv(["--config", str(BUDGET_CONFIG), "--progress", "false", "--threads", str(threads),
                                    "--out", "unused"])
    sizes = make_config(quick)
    if sizes["data_kw"] is not None:
        settings["data_kw"] = dict(sizes["data_kw"])
    if sizes["epochs"] is not None:
        settings["epochs"] = sizes["epochs"]
    return RunnerConfig(**settings)


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


def _inner_name(spec: str | int) -> str:
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


def plot_budget(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = res["points"]
    fg = next(p for p in pts if p["label"] == "fairgrad")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.5, 3.6))
    zero = [p for p in pts if p["label"] == "cost-b0"]
    for t in res["inner_steps"]:
        line = zero + sorted((p for p in pts if p["inner_steps"] == str(t)), key=lambda p: p["budget"])
        xs = [p["budget"] for p in line]
        name = _inner_name(t)
        (ln,) = ax1.plot(xs, [p["time_ratio"] for p in line], "o-", label=name)
        ax1.plot(xs, [p["time_ratio_teleport"] for p in line], "x--", color=ln.get_color(), lw=0.8)
        ax1.fill_between(xs, [p["time_ratio_min"] for p in line], [p["time_ratio_max"] for p in line], alpha=0.15)
        ax2.plot(xs, [p["delta_m"] for p in line], "o-", label=name)
    ax1.axhline(TARGET_RATIO, color="r", ls="--", lw=1, label=f"target {TARGET_RATIO}x")
    ax1.axhline(1.0, color="k", lw=0.8)
    ax1.set_xlabel("forced teleports per epoch")
    ax1.set_ylabel("training time / FairGrad's")
    ax1.set_title("FairGrad + COST: time (dashed: FG + teleport s)")
    ax1.legend(fontsize=8)
    ax2.axhline(fg["delta_m"], color="k", ls="--", lw=1, label="FairGrad")
    ax2.set_xlabel("forced teleports per epoch")
    ax2.set_ylabel("Δm% (lower is better)")
    ax2.set_title("FairGrad + COST: Δm%")
    ax2.legend(fontsize=8)
    fig.suptitle(f"MultiMNIST, {res['config']['epochs']} epochs x {res['steps_per_epoch']} steps, "
                 f"seeds {res['seeds']}, {res['repeats']} repeat(s)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- report


def _table(title: str, header: list[str], rows: list[list[Any]]) -> str:
    return text_table(title, header, rows, digits=3)


def render(res: dict[str, Any]) -> str:
    parts = []
    if "budget" in res:
        b = res["budget"]
        rows = [[p["label"], p["inner_steps"] if p["inner_steps"] is not None else "-",
                 p["budget"] if p["budget"] is not None else "trigger", p["teleports"], p["rejected"],
                 p["time_ratio"], p["time_ratio_teleport"], p["teleport_share"], p["teleport_s_mean"], p["delta_m"],
                 p["delta_m_gain_vs_fairgrad"], p["loss_drift_mean"]] for p in b["points"]]
        t = b["target"]
        parts.append(_table(
            f"1. FairGrad + COST vs FairGrad, MultiMNIST ({b['config']['epochs']} epochs x {b['steps_per_epoch']} "
            f"steps, seeds {b['seeds']}, {b['repeats']} repeat(s)); time = trainer.fit (train + val); "
            "'time x FG': median over repeats of the run's time over the same repeat's FairGrad run; "
            "'(FG+tele s)/FG': FairGrad's median time plus the run's measured teleport seconds (less noisy)",
            ["point", "inner", "tele/epoch", "teleports", "rejected", "time x FG", "(FG+tele s)/FG", "tele share",
             "s/teleport",
             "Δm%", "Δm% gain", "loss drift"], rows)
            + f"\n   target: COST default <= {TARGET_RATIO}x FairGrad: {t['default_time_ratio']:.3f}x "
              f"({'pass' if t['default_pass'] else 'FAIL'}; {t['default_teleports']:.0f} teleports: the trigger is "
              f"silent); forced points within the target: {t['forced_points_within_target']}")
    if "levers" in res:
        lv = res["levers"]
        rows = [[r["inner_steps"], r["inner_lr"], r["accepted"], r["teleport_s_mean"], r["loss_drift_mean"],
                 r["displacement_rel_mean"], r["grad_norm_ratio_mean"], r["lt_final_mean"], r["lg_gain_rel_mean"],
                 r["sigma_mean"]] for r in lv["inner_steps"]]
        parts.append(_table("2a. inner steps x inner lr (MultiMNIST FairGrad, forced teleports in one epoch)",
                            ["steps", "lr", "accepted", "s/teleport", "loss drift", "|dθ|/|θ|", "|g| after/before",
                             "L_t final", "L_g gain", "sigma"], rows))
        rows = []
        for ds, r in lv["step_costs"].items():
            for k, v in r.items():
                if isinstance(v, dict):
                    rows.append([ds, r["K"], k, v["unchecked_step_ms"], v["checked_step_ms"], v["ratio"]])
        parts.append(_table("2b. step time with the trigger checked vs not (check_every=2, same run)",
                            ["data", "K", "variant", "plain step ms", "checked step ms", "ratio"], rows))
    if "agreement" in res:
        rows = []
        for ds, r in res["agreement"].items():
            for rule in ("majority", "any"):
                if rule not in r:
                    continue
                for reduce in ("flatten", "mean"):
                    a = r[rule][reduce]
                    rows.append([ds, r.get("K"), r["steps"], rule, reduce, r[rule]["exact_fire_rate"],
                                 a["rep_fire_rate"], a["both_fire"], a["both_silent"], a["exact_only"], a["rep_only"],
                                 a["agreement"], r[f"task_sign_agreement_{reduce}"]])
        parts.append(_table("3. representation trigger vs exact trigger, per step",
                            ["data", "K", "steps", "rule", "reduce", "exact fires", "rep fires", "both fire",
                             "both silent", "exact only", "rep only", "agreement", "task signs agree"], rows))
    return "\n\n".join(parts)


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = make_config(args.quick)
    res: dict[str, Any] = {"meta": {
        "quick": args.quick, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": sys.version.split()[0], "machine": platform.machine(), "sections": list(args.sections),
        "command": "python -m benchmarks.perf.cost_budget " + " ".join(args.argv)}}
    start = time.perf_counter()
    if "budget" in args.sections:
        log("1. budget curve ...")
        res["budget"] = bench_budget(args, sizes, out, log)
        plot_budget(res["budget"], out / "cost_budget.png")
    cfg = runner_config(args.quick, args.threads)
    if "levers" in args.sections:
        from benchmarks.perf.levers import lever_inner_steps, lever_step_costs

        log("2. levers ...")
        res["levers"] = {"inner_steps": lever_inner_steps(sizes, cfg, log), "step_costs": lever_step_costs(sizes, cfg)}
    if "agreement" in args.sections:
        from benchmarks.perf.agreement import bench_agreement

        log("3. agreement ...")
        res["agreement"] = bench_agreement(sizes, cfg, log)
    res["meta"]["seconds"] = time.perf_counter() - start
    text = render(res)
    (out / "cost_budget.txt").write_text(text + "\n")
    write_json(out / "cost_budget.json", res)
    log("\n" + text)
    return res


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.perf.cost_budget", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run (tiny data; not a measurement)")
    p.add_argument("--out", default="results/cost_budget")
    p.add_argument("--sections", nargs="+", default=["budget"], choices=["budget", "levers", "agreement"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--repeats", type=int, default=1, help="timing repeats (each runs every point once)")
    p.add_argument("--budgets", type=int, nargs="+", default=None, help="forced teleports per epoch")
    p.add_argument("--inner-steps", nargs="+", default=None,
                   help="one budget curve per value: T[@LR][:nohtr] (T inner steps, inner lr LR (default: the "
                        "outer lr), ':nohtr' without HTR), e.g. 10 3@3e-3 1@1e-2:nohtr")
    p.add_argument("--baselines-from", type=Path, default=None,
                   help="read the single-task baselines from a runner's baselines/ folder instead of training them")
    p.add_argument("--rerun", action="store_true", help="ignore cached runs in --out")
    p.add_argument("--threads", type=int, default=1)
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    return run(args)


if __name__ == "__main__":
    main()
