"""One benchmark runner: any data set x method x COST variant x seeds, with caching and tables.

Usage::

    python -m benchmarks.run --dataset multimnist --methods ls fairgrad --cost none,on \\
        --seeds 0 1 2 --epochs 5 --out results/multimnist
    python -m benchmarks.run --config benchmarks/configs/main.yaml          # a YAML config
    python -m benchmarks.run --config benchmarks/configs/main.yaml --seeds 0 1   # + overrides

What it does, in order:

1. Single-task baselines (Delta-m%, eq. 14, needs them): one :class:`~benchmarks.lit.SingleTaskModule`
   per task and per ``baseline_seeds`` seed, stored as ``<out>/baselines/<task>__seed<s>.json``.
2. Every ``(method, cost, seed)``: :class:`~benchmarks.lit.MTLBenchModule`, with a
   :class:`~lightning_cost.SymmetryTeleportCallback` when ``cost`` is not ``none``; stored as
   ``<out>/runs/<method>__cost-<cost>__seed<s>.json``.
3. ``<out>/runs.csv`` (one row per run), ``<out>/baselines.csv``, ``<out>/table.md`` (mean ± std over
   seeds) and ``<out>/summary.png`` (Delta-m% per method, with / without COST); the table is printed.

Model selection: the epoch with the best ``val/score`` (mean validation metric over tasks, signed so that
higher is better) is restored from a checkpoint (``ModelCheckpoint``) and evaluated once on the test set.
The test set is never used for selection.

Caching: a run whose JSON exists *with the same configuration* is skipped (a changed configuration
re-runs it; ``--rerun true`` re-runs everything). ``--report-only true`` only rebuilds the tables.

COST variants (``--cost``, comma- or space-separated): ``none`` (no teleport), ``on`` (COST with
``--use-lt/--use-lg/--use-htr``, all on by default), or a ``+``-joined subset of ``lt``, ``lg``, ``htr``
naming the components that are on (paper Table 4: ``--cost none,lt,lg,lt+lg,lt+lg+htr``). ``--cost-kw``
passes any other :class:`SymmetryTeleportCallback` argument (``{"warmup_epochs": 1, "gamma": 0.05}``).
Table 5 (COST on other aggregators): ``--methods cagrad nashmtl fairgrad --cost none,on``.

Seeds vary the model initialisation and the training shuffle; the data split is fixed by
``data_kw.seed`` (default 0) so that every run and every baseline is tested on the same test set.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np

__all__ = ["main", "build_parser", "run_benchmark", "parse_cost", "summarize"]

log = logging.getLogger("benchmarks.run")

_COMPONENTS = ("lt", "lg", "htr")


# --------------------------------------------------------------------------- arguments


def build_parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    p = ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0],
                       default_env=False)
    p.add_argument("--config", action=ActionConfigFile, help="a YAML file with any of these options")
    p.add_argument("--dataset", type=str, default="multimnist", help="benchmarks.BENCHMARKS name")
    p.add_argument("--methods", type=str, nargs="+", default=["ls"], help="lightning_cost.aggregators names")
    p.add_argument("--cost", type=str | bool, nargs="+", default=["none"],
                   help="COST variants: none, on, or '+'-joined lt/lg/htr; comma- or space-separated")
    p.add_argument("--cost-methods", type=str | None, nargs="+", default=None,
                   help="methods that also run the COST variants other than none (default: all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--baseline-seeds", type=int | None, nargs="+", default=None,
                   help="seeds of the single-task baselines (default: the first seed)")
    p.add_argument("--baselines", type=bool, default=True, help="train the single-task baselines")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int | None, default=None, help="default: the DataModule's")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--regression-loss", type=str, default="mse")
    p.add_argument("--lr-scheduler", type=dict | None, default=None,
                   help='optional lr schedule: {"name": "step", "step_size": 100, "gamma": 0.5} or '
                        '{"name": "plateau", "factor": 0.7, "patience": 5, "min_lr": 1e-5} (on val/score)')
    p.add_argument("--data-kw", type=dict, default={}, help="DataModule arguments (num_train, ...)")
    p.add_argument("--model-kw", type=dict, default={}, help="benchmarks.make_model arguments")
    p.add_argument("--method-kw", type=dict, default={}, help="{method: {hyper-parameter: value}}")
    p.add_argument("--cost-kw", type=dict, default={}, help="SymmetryTeleportCallback arguments")
    p.add_argument("--use-lt", type=bool, default=True, help="COST 'on': L_t term (eq. 7)")
    p.add_argument("--use-lg", type=bool, default=True, help="COST 'on': L_g term (eq. 9)")
    p.add_argument("--use-htr", type=bool, default=True, help="COST 'on': HTR (eq. 12-13)")
    p.add_argument("--limit-train-batches", type=int | float | None, default=None)
    p.add_argument("--out", type=str, default="results/run")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--accelerator", type=str, default="cpu")
    p.add_argument("--progress", type=bool, default=True, help="Lightning's progress bar")
    p.add_argument("--rerun", type=bool, default=False, help="re-run runs whose results exist")
    p.add_argument("--report-only", type=bool, default=False, help="only rebuild the tables")
    p.add_argument("--keep-checkpoints", type=bool, default=False)
    return p


def parse_cost(values: Sequence[str | bool] | str | bool) -> list[str]:
    """Normalise COST variants: ``["none,on", True]`` -> ``["none", "on"]``; ``"lg+lt"`` -> ``"lt+lg"``."""
    if isinstance(values, (str, bool)):
        values = [values]
    out: list[str] = []
    for v in values:
        items = ["on" if v else "none"] if isinstance(v, bool) else [s.strip().lower() for s in str(v).split(",")]
        for s in items:
            if not s:
                continue
            if s in ("none", "off", "false", "no", "0"):
                s = "none"
            elif s in ("on", "true", "yes", "1", "cost"):
                s = "on"
            else:
                parts = {x.strip() for x in s.split("+")}
                bad = parts - set(_COMPONENTS)
                if bad or not parts & {"lt", "lg"}:
                    raise ValueError(f"bad COST variant {s!r}: use none, on, or a '+'-joined subset of "
                                     f"{_COMPONENTS} containing lt or lg")
                s = "+".join(c for c in _COMPONENTS if c in parts)
            if s not in out:
                out.append(s)
    return out


def cost_flags(variant: str, cfg: dict[str, Any]) -> dict[str, bool] | None:
    """``use_lt/use_lg/use_htr`` of a COST variant (``None``: no COST)."""
    if variant == "none":
        return None
    if variant == "on":
        return {"use_lt": bool(cfg["use_lt"]), "use_lg": bool(cfg["use_lg"]), "use_htr": bool(cfg["use_htr"])}
    parts = set(variant.split("+"))
    return {f"use_{c}": c in parts for c in _COMPONENTS}


# --------------------------------------------------------------------------- one training run


def _fingerprint(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _finite(x: Any) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return float("nan")
    return v


class _EpochRecorder(L.Callback):
    """Records the validation metrics of every epoch and the conflict ratio (eq. 4) of the steps."""

    def __init__(self, rule: str = "majority") -> None:
        from lightning_cost.teleport.trigger import ConflictTrigger

        self.trigger = ConflictTrigger(rule)
        self.epochs: list[dict[str, float]] = []
        self.checked = 0
        self.conflicting = 0

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rec = getattr(pl_module, "mtl_step", None)
        if rec is None or rec.jacobian is None or not rec.finite or rec.skipped:
            return  # loss weightings without a Jacobian: the ratio is not measured
        self.checked += 1
        self.conflicting += int(self.trigger(rec.jacobian, gramian=rec.gramian).fire)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Not ``on_validation_epoch_end``: callbacks run that hook *before* the module's, where the
        # module logs the epoch's metrics, so ``callback_metrics`` there still hold the previous
        # epoch's values. ``on_validation_end`` runs after they are published (as ModelCheckpoint's).
        if trainer.sanity_checking:
            return
        m: dict[str, Any] = {k: _finite(v) for k, v in trainer.callback_metrics.items()
                             if k.startswith(("val/", "train/"))}
        m["epoch"] = int(trainer.current_epoch)
        self.epochs.append(m)


def train_one(dm: Any, cfg: dict[str, Any], *, seed: int, method: str = "ls", cost: str = "none",
              task: str | None = None, ckpt_dir: Path) -> dict[str, Any]:
    """Train one model (``task`` given: a single-task baseline), select on validation, test it."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from benchmarks import make_model, module_classes
    from lightning_cost.teleport.callback import SymmetryTeleportCallback

    L.seed_everything(seed, workers=True, verbose=False)
    dm.seed = seed  # the split is already built (data_kw seed); this only re-seeds the train shuffle
    specs = dm.task_specs
    net = make_model(dm, **cfg["model_kw"])
    common = dict(lr=cfg["lr"], weight_decay=cfg["weight_decay"], regression_loss=cfg["regression_loss"])
    mtl_cls, stl_cls = module_classes(dm)
    if task is not None:
        module: L.LightningModule = stl_cls(net, specs, task, **common)
        eval_specs = [s for s in specs if s.name == task]
    else:
        module = mtl_cls(net, specs, method=method, method_kw=cfg["method_kw"].get(method, {}), **common)
        eval_specs = list(specs)
    if cfg.get("lr_scheduler"):
        module.lr_scheduler = dict(cfg["lr_scheduler"])
    # every reported metric and its direction (several per task for the dense benchmarks)
    directions = getattr(module, "metric_directions", None) or {
        f"{s.name}/{s.metric}": bool(s.higher_is_better) for s in eval_specs}
    recorder = _EpochRecorder()
    callbacks: list[Any] = [recorder]
    teleport = None
    flags = cost_flags(cost, cfg) if task is None else None
    if flags is not None:
        kw = {"seed": seed, **cfg["cost_kw"], **flags}
        teleport = SymmetryTeleportCallback(**kw)
        callbacks.append(teleport)
    if ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    ckpt = ModelCheckpoint(dirpath=str(ckpt_dir), monitor="val/score", mode="max", save_top_k=1,
                           filename="best", save_weights_only=True, enable_version_counter=False)
    callbacks.append(ckpt)
    trainer = L.Trainer(
        max_epochs=cfg["epochs"], accelerator=cfg["accelerator"], devices=1, logger=False,
        callbacks=callbacks, enable_progress_bar=cfg["progress"], enable_model_summary=False,
        num_sanity_val_steps=0, deterministic=False,
        limit_train_batches=cfg["limit_train_batches"] if cfg["limit_train_batches"] is not None else 1.0,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        t0 = time.perf_counter()
        trainer.fit(module, datamodule=dm)
        wall = time.perf_counter() - t0
        best = ckpt.best_model_path
        tested = trainer.test(module, datamodule=dm, ckpt_path=best if best else None, verbose=False)[0]
    if not cfg["keep_checkpoints"]:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    test = {k: _finite(tested.get(f"test/{k}")) for k in directions}
    scores = [e.get("val/score", float("nan")) for e in recorder.epochs]
    best_i = int(np.nanargmax(scores)) if scores and not all(math.isnan(s) for s in scores) else len(scores) - 1
    best_val = recorder.epochs[best_i] if recorder.epochs else {}
    if teleport is not None:
        checked = sum(e["checked"] for e in teleport.epoch_stats)
        conflicting = sum(e["conflicting"] for e in teleport.epoch_stats)
        teleports, rejected = int(teleport.num_teleports), int(teleport.num_rejected)
        teleport_seconds = float(sum(h.get("seconds", 0.0) for h in teleport.history))
    else:
        checked, conflicting = recorder.checked, recorder.conflicting
        teleports, rejected, teleport_seconds = 0, 0, 0.0
    return {
        "test": test,
        "higher_is_better": dict(directions),
        "val": {k[4:]: v for k, v in best_val.items() if k.startswith("val/")},
        "best_epoch": int(best_val.get("epoch", -1)),
        "epochs": recorder.epochs,
        "wall_time_s": wall,
        "teleports": teleports,
        "rejected_teleports": rejected,
        "teleport_seconds": teleport_seconds,
        "checked_steps": checked,
        "trigger_ratio": conflicting / checked if checked else float("nan"),
        "skipped_steps": int(getattr(module, "mtl_skipped_steps", 0)),
        "teleport_history": teleport.history if teleport is not None else [],
    }


# --------------------------------------------------------------------------- the grid


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_json_default))
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def _load_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_benchmark(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run (or reuse) the baselines and the grid, write the reports; returns :func:`summarize`'s output."""
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 160)
    out = Path(cfg["out"])
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "baselines").mkdir(parents=True, exist_ok=True)
    cfg = dict(cfg)
    cfg["cost"] = parse_cost(cfg["cost"])
    cfg["methods"] = [m.strip().lower() for m in cfg["methods"]]
    seeds = list(cfg["seeds"])
    cost_methods = [m.strip().lower() for m in cfg["cost_methods"]] if cfg.get("cost_methods") else None
    baseline_seeds = list(cfg["baseline_seeds"] or seeds[:1])
    data_kw = dict(cfg["data_kw"])
    if cfg["batch_size"] is not None:
        data_kw["batch_size"] = cfg["batch_size"]

    from lightning_cost.aggregators import aggregator_class

    for m in cfg["methods"]:
        aggregator_class(m)  # fails early (KeyError with the list) on an unknown name

    common = {k: cfg[k] for k in ("dataset", "epochs", "lr", "weight_decay", "regression_loss", "model_kw",
                                  "limit_train_batches")}
    common["data_kw"] = data_kw
    if cfg.get("lr_scheduler"):  # only when set, so that the cached runs of other configs keep their keys
        common["lr_scheduler"] = cfg["lr_scheduler"]
    dm = None

    def datamodule() -> Any:
        nonlocal dm
        if dm is None:
            from benchmarks import make_datamodule

            dm = make_datamodule(cfg["dataset"], **data_kw)
            dm.setup()
        return dm

    jobs: list[tuple[str, Path, dict[str, Any], dict[str, Any]]] = []
    if cfg["baselines"]:
        for task in _task_names(cfg, datamodule):
            for s in baseline_seeds:
                key = {**common, "task": task, "seed": s}
                jobs.append(("baseline", out / "baselines" / f"{task}__seed{s}.json", key,
                             {"task": task, "seed": s}))
    for m in cfg["methods"]:
        for c in cfg["cost"]:
            if c != "none" and cost_methods is not None and m not in cost_methods:
                continue
            for s in seeds:
                flags = cost_flags(c, cfg)
                key = {**common, "method": m, "method_kw": cfg["method_kw"].get(m, {}), "cost": c, "seed": s,
                       "cost_kw": cfg["cost_kw"] if flags else {}, "cost_flags": flags}
                jobs.append(("run", out / "runs" / f"{m}__cost-{c}__seed{s}.json", key,
                             {"method": m, "cost": c, "seed": s}))

    if not cfg["report_only"]:
        todo = []
        for kind, path, key, args in jobs:
            old = _load_json(path)
            if old is not None and not cfg["rerun"] and old.get("config_hash") == _fingerprint(key):
                continue
            todo.append((kind, path, key, args))
        console.print(f"[bold]{cfg['dataset']}[/]: {len(jobs) - len(todo)} of {len(jobs)} runs already done, "
                      f"{len(todo)} to run -> {out}")
        for i, (kind, path, key, args) in enumerate(todo, 1):
            label = (f"single-task {args['task']}" if kind == "baseline"
                     else f"{args['method']} cost={args['cost']}") + f" seed {args['seed']}"
            console.rule(f"[{i}/{len(todo)}] {cfg['dataset']}: {label}")
            res = train_one(datamodule(), cfg, ckpt_dir=out / "ckpt" / path.stem,
                            **{"task": args.get("task"), "method": args.get("method", "ls"),
                               "cost": args.get("cost", "none"), "seed": args["seed"]})
            res.update({"dataset": cfg["dataset"], "kind": kind, **args, "config": key,
                        "config_hash": _fingerprint(key)})
            _write_json(path, res)
            console.print(f"  done in {res['wall_time_s']:.1f}s: test "
                          + ", ".join(f"{k}={v:.4f}" for k, v in res["test"].items())
                          + (f", teleports={res['teleports']}" if args.get("cost", "none") != "none" else ""))
        shutil.rmtree(out / "ckpt", ignore_errors=True)

    runs = [r for _, p, _, _ in jobs if p.parent.name == "runs" and (r := _load_json(p)) is not None]
    bases = [r for _, p, _, _ in jobs if p.parent.name == "baselines" and (r := _load_json(p)) is not None]
    summary = summarize(runs, bases, cfg["dataset"])
    write_reports(summary, out, console)
    return summary


def _task_names(cfg: dict[str, Any], datamodule: Any) -> list[str]:
    return [s.name for s in datamodule().task_specs]


# --------------------------------------------------------------------------- reports


def _delta_m(values: dict[str, float], baseline: dict[str, float], hib: dict[str, bool]) -> float:
    from lightning_cost.metrics import delta_m

    keys = [k for k in baseline if k in values and math.isfinite(values[k]) and math.isfinite(baseline[k])
            and baseline[k] != 0]
    if not keys:
        return float("nan")
    return delta_m({k: values[k] for k in keys}, {k: baseline[k] for k in keys}, {k: hib[k] for k in keys})


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    a = np.asarray([x for x in xs if x is not None and math.isfinite(x)], dtype=float)
    if a.size == 0:
        return float("nan"), float("nan")
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def summarize(runs: list[dict[str, Any]], baselines: list[dict[str, Any]], dataset: str) -> dict[str, Any]:
    """Per-run rows (with Delta-m% vs the mean single-task baseline) and mean ± std rows per method+cost."""
    from lightning_cost.metrics import mean_rank

    hib: dict[str, bool] = {}
    for r in runs + baselines:
        hib.update(r["higher_is_better"])
    metrics = list(hib)
    base: dict[str, float] = {}
    for k in metrics:
        vals = [b["test"][k] for b in baselines if k in b["test"]]
        base[k] = _mean_std(vals)[0] if vals else float("nan")
    base_rows = []
    for b in baselines:
        base_rows.append({"dataset": dataset, "task": b["task"], "seed": b["seed"], **b["test"],
                          "best_epoch": b.get("best_epoch"), "wall_time_s": b["wall_time_s"]})
    rows = []
    for r in runs:
        row = {"dataset": dataset, "method": r["method"], "cost": r["cost"], "seed": r["seed"]}
        row.update({k: r["test"].get(k, float("nan")) for k in metrics})
        row.update({
            "delta_m": _delta_m(r["test"], base, hib) if baselines else float("nan"),
            "best_epoch": r.get("best_epoch"),
            "wall_time_s": r["wall_time_s"],
            "teleports": r["teleports"],
            "trigger_ratio": r["trigger_ratio"],
        })
        rows.append(row)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["cost"]), []).append(row)
    agg = []
    for (m, c), rs in groups.items():
        a: dict[str, Any] = {"method": m, "cost": c, "n": len(rs)}
        for k in metrics + ["delta_m", "wall_time_s", "teleports", "trigger_ratio"]:
            a[k] = _mean_std([x[k] for x in rs])
        agg.append(a)
    # mean rank over the metrics finite for every method (the single-task baseline is not ranked)
    ok = [k for k in metrics if all(math.isfinite(a[k][0]) for a in agg)]
    if agg and ok:
        names = {f"{a['method']}|{a['cost']}": {k: a[k][0] for k in ok} for a in agg}
        mr = mean_rank(names, {k: hib[k] for k in ok})
        for a in agg:
            a["mr"] = mr[f"{a['method']}|{a['cost']}"]
    else:
        for a in agg:
            a["mr"] = float("nan")
    return {"dataset": dataset, "metrics": metrics, "higher_is_better": hib, "baseline": base,
            "baseline_rows": base_rows, "rows": rows, "agg": agg,
            "baseline_wall": _mean_std([b["wall_time_s"] for b in baselines])}


def _fmt(ms: tuple[float, float], digits: int = 4, n: int = 1) -> str:
    m, s = ms
    if not math.isfinite(m):
        return "—"
    return f"{m:.{digits}f} ± {s:.{digits}f}" if n > 1 else f"{m:.{digits}f}"


def _label(method: str, cost: str) -> str:
    return method if cost == "none" else f"{method} + COST" + ("" if cost == "on" else f" ({cost})")


def table_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    metrics = summary["metrics"]
    arrows = ["↑" if summary["higher_is_better"][k] else "↓" for k in metrics]
    header = ["Method"] + [f"{k} {a}" for k, a in zip(metrics, arrows, strict=True)] + [
        "Δm% ↓", "MR ↓", "wall s", "teleports", "trigger ratio", "seeds"]
    body = []
    if summary["baseline_rows"]:
        b = summary["baseline"]
        body.append(["STL (single-task)"] + [_fmt((b[k], 0.0)) for k in metrics]
                    + ["0.00", "—", _fmt(summary["baseline_wall"], 1), "—", "—",
                       str(len({r['seed'] for r in summary['baseline_rows']}))])
    for a in summary["agg"]:
        n = a["n"]
        body.append([_label(a["method"], a["cost"])] + [_fmt(a[k], 4, n) for k in metrics] + [
            _fmt(a["delta_m"], 2, n), f"{a['mr']:.2f}" if math.isfinite(a["mr"]) else "—",
            _fmt(a["wall_time_s"], 1, n), _fmt(a["teleports"], 1, n), _fmt(a["trigger_ratio"], 2, n), str(n)])
    return header, body


def write_reports(summary: dict[str, Any], out: Path, console: Any = None) -> None:
    """``runs.csv``, ``baselines.csv``, ``table.md``, ``summary.png``; prints the table."""
    metrics = summary["metrics"]
    cols = ["dataset", "method", "cost", "seed"] + metrics + [
        "delta_m", "best_epoch", "wall_time_s", "teleports", "trigger_ratio"]
    with open(out / "runs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in summary["rows"]:
            w.writerow(r)
    bcols = ["dataset", "task", "seed"] + metrics + ["best_epoch", "wall_time_s"]
    with open(out / "baselines.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=bcols, extrasaction="ignore", restval="")
        w.writeheader()
        for r in summary["baseline_rows"]:
            w.writerow(r)
    header, body = table_rows(summary)
    md = [f"## {summary['dataset']}: test metrics (mean ± std over seeds; epoch selected on validation)", "",
          "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(row) + " |" for row in body]
    md += ["", "Δm% (eq. 14) is relative to the mean of the single-task baselines (STL row); "
           "MR is the mean rank over the metrics among the multi-task rows. Wall time: training + validation."]
    (out / "table.md").write_text("\n".join(md) + "\n")
    _plot(summary, out / "summary.png")
    if console is not None:
        from rich.table import Table

        t = Table(title=f"{summary['dataset']} (test, selected on validation) -> {out / 'table.md'}")
        for h in header:
            t.add_column(h, justify="left" if h == "Method" else "right")
        for row in body:
            t.add_row(*row)
        console.print(t)


def _plot(summary: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: the caller's backend is left alone

    methods = list(dict.fromkeys(a["method"] for a in summary["agg"]))
    costs = list(dict.fromkeys(a["cost"] for a in summary["agg"]))
    by = {(a["method"], a["cost"]): a["delta_m"] for a in summary["agg"]}
    fig = Figure(figsize=(max(4.0, 1.2 * len(methods) * max(1, len(costs)) + 1.5), 3.6))
    ax = fig.subplots()
    width = 0.8 / max(1, len(costs))
    x = np.arange(len(methods))
    for j, c in enumerate(costs):
        means = [by.get((m, c), (float("nan"), 0.0))[0] for m in methods]
        stds = [by.get((m, c), (0.0, 0.0))[1] for m in methods]
        stds = [s if math.isfinite(s) else 0.0 for s in stds]
        ax.bar(x + (j - (len(costs) - 1) / 2) * width, means, width, yerr=stds, capsize=3,
               label="no COST" if c == "none" else ("COST" if c == "on" else f"COST ({c})"))
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xticks(x, methods)
    ax.set_ylabel("Δm% vs single-task (lower is better)")
    ax.set_title(f"{summary['dataset']}: Δm% per method")
    if costs:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# --------------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    ns = parser.parse_args(list(argv) if argv is not None else sys.argv[1:])
    cfg = {k.replace("-", "_"): v for k, v in vars(ns).items() if k != "config"}
    import torch

    torch.set_num_threads(max(1, int(cfg["threads"])))
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    return run_benchmark(cfg)


if __name__ == "__main__":
    main()
