"""One training run: a model, its callbacks, early stopping on validation, the test of the selected epoch.

Protocol: the epoch with the best ``val/score`` (mean validation metric over tasks, signed so that
higher is better) is restored from a checkpoint and evaluated once on the test set; the test set
never selects. ``patience`` stops a run early on ``val/score``; the budget (max epochs, patience,
lr schedule) is the same for single-task baselines and multi-task runs.

Paired seeds: every run of seed ``s`` builds its callbacks first and only then seeds everything and
builds the model, so a "+ COST" run starts from the base run's initialisation and sees the same data
order and dropout draws; nothing the COST run adds touches the global random state before training.
Where the trigger never fires, a gradient method's "+ COST" run is its base run bit for bit (a loss
weighting with COST takes its update from the per-task Jacobian the trigger needs instead of one
backward, which rounds differently).
"""

from __future__ import annotations

import hashlib
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from benchmarks.common import quiet
from benchmarks.runner.config import RunnerConfig
from benchmarks.runner.conflicts import RULES, ConflictCounter
from benchmarks.runner.stats import teleports_before_best
from benchmarks.runner.variants import build_teleport, teleport_counts, teleport_records
from lightning_cost import TrainingStalledError

__all__ = ["ValidationCurve", "train_one", "weights_sha256"]


def _number(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


class ValidationCurve(L.Callback):
    """Records every epoch's validation (and epoch-mean training) metrics; with ``label``, prints one
    line per epoch (run, epoch, ``val/score``, elapsed seconds) for logs that are not a terminal."""

    def __init__(self, label: str | None = None) -> None:
        self.label = label
        self.epochs: list[dict[str, float]] = []
        self._start = time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Not ``on_validation_epoch_end``: callbacks run that hook *before* the module's, where the
        # module logs the epoch's metrics, so ``callback_metrics`` there still hold the previous
        # epoch's values. ``on_validation_end`` runs after they are published (as ModelCheckpoint's).
        if trainer.sanity_checking:
            return
        m: dict[str, Any] = {k: _number(v) for k, v in trainer.callback_metrics.items()
                             if k.startswith(("val/", "train/"))}
        m["epoch"] = int(trainer.current_epoch)
        self.epochs.append(m)
        if self.label:
            print(f"{self.label} | epoch {m['epoch']} | val/score {m.get('val/score', float('nan')):.4f} | "
                  f"{time.perf_counter() - self._start:.1f} s", flush=True)

    def best(self) -> dict[str, float]:
        """The epoch with the highest finite ``val/score`` (the last epoch when none is finite)."""
        scored = [e for e in self.epochs if math.isfinite(e.get("val/score", float("nan")))]
        if scored:
            return max(scored, key=lambda e: e["val/score"])  # the first of equal scores, as ModelCheckpoint
        return self.epochs[-1] if self.epochs else {}


def weights_sha256(module: L.LightningModule) -> str:
    """sha256 of every tensor of the module's ``state_dict`` (names, shapes, bytes): equal digests
    mean bit-identical weights and buffers."""
    h = hashlib.sha256()
    for name, value in module.state_dict().items():
        h.update(name.encode())
        _hash_value(h, value)
    return h.hexdigest()


def _hash_value(h: Any, value: Any) -> None:
    """Tensors by shape and bytes; the extra state of a module (an aggregator's generator state, say:
    dicts, lists, numbers) by its tensors and the ``repr`` of the rest."""
    if torch.is_tensor(value):
        h.update(str(tuple(value.shape)).encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    elif isinstance(value, dict):
        for k in sorted(value, key=str):
            h.update(str(k).encode())
            _hash_value(h, value[k])
    elif isinstance(value, (list, tuple)):
        for v in value:
            _hash_value(h, v)
    else:
        h.update(repr(value).encode())


def _module(dm: Any, cfg: RunnerConfig, method: str, task: str | None) -> tuple[L.LightningModule, dict[str, bool]]:
    """The LightningModule of a run and ``{"<task>/<metric>": higher is better}`` of what it reports."""
    from benchmarks.registry import make_model, module_classes

    specs = dm.task_specs
    net = make_model(dm, **cfg.model_kw)
    common = dict(lr=cfg.lr, weight_decay=cfg.weight_decay, regression_loss=cfg.regression_loss)
    mtl_cls, stl_cls = module_classes(dm)
    if task is not None:
        module: L.LightningModule = stl_cls(net, specs, task, **common)
        eval_specs = [s for s in specs if s.name == task]
    else:
        module = mtl_cls(net, specs, method=method, method_kw=cfg.method_kw.get(method, {}), **common)
        eval_specs = list(specs)
    if cfg.lr_scheduler:
        module.lr_scheduler = dict(cfg.lr_scheduler)
    directions = getattr(module, "metric_directions", None) or {
        f"{s.name}/{s.metric}": bool(s.higher_is_better) for s in eval_specs}
    return module, directions


def _selection_callbacks(cfg: RunnerConfig, ckpt_dir: Path) -> tuple[Any, list[L.Callback]]:
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    if ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    ckpt = ModelCheckpoint(dirpath=str(ckpt_dir), monitor="val/score", mode="max", save_top_k=1,
                           filename="best", save_weights_only=True, enable_version_counter=False)
    stops = [EarlyStopping(monitor="val/score", mode="max", patience=cfg.patience, min_delta=cfg.min_delta)
             ] if cfg.patience else []
    return ckpt, [*stops, ckpt]


def _progress_bar(cfg: RunnerConfig) -> bool:
    return bool(cfg.progress) if cfg.progress is not None else sys.stdout.isatty()


def train_one(dm: Any, cfg: RunnerConfig, *, seed: int, method: str = "ls", cost: str = "none",
              task: str | None = None, ckpt_dir: Path, label: str | None = None,
              spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train one model (``task`` given: a single-task baseline), select on validation, test it.
    ``spec``: the COST variant's callback arguments when resolved for this run (default: the config's)."""
    spec = (spec if spec is not None else cfg.spec(cost)) if task is None else None
    teleport = build_teleport(spec, seed) if spec is not None else None
    counter, curve = ConflictCounter(), ValidationCurve(None if _progress_bar(cfg) else label)
    ckpt, selection = _selection_callbacks(cfg, ckpt_dir)
    callbacks = [curve, counter, *([teleport] if teleport is not None else []), *selection]
    L.seed_everything(seed, workers=True, verbose=False)  # after every callback is built: paired seeds
    dm.seed = seed  # the split is already built (data_kw seed); this only re-seeds the train shuffle
    module, directions = _module(dm, cfg, method, task)
    trainer = L.Trainer(
        max_epochs=cfg.epochs, accelerator=cfg.accelerator, devices=1, logger=False, callbacks=callbacks,
        enable_progress_bar=_progress_bar(cfg), enable_model_summary=False, num_sanity_val_steps=0,
        limit_train_batches=cfg.limit_train_batches if cfg.limit_train_batches is not None else 1.0)
    stopped = ""
    with quiet():
        t0 = time.perf_counter()
        try:
            trainer.fit(module, datamodule=dm)
        except TrainingStalledError as err:  # diverged or stuck: kept, tested like any run, and noted
            stopped = str(err)
        wall = time.perf_counter() - t0
        digest = weights_sha256(module)
        tested = trainer.test(module, datamodule=dm, ckpt_path=ckpt.best_model_path or None, verbose=False)[0]
    if not cfg.keep_checkpoints:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    result = _result(curve, counter, teleport, directions, tested)
    result["total_steps"] = float(trainer.estimated_stepping_batches)  # what a warmup_fraction is a share of
    result.update(wall_time_s=wall, weights_sha256=digest, stopped=stopped, skipped_steps=int(getattr(module, "mtl_skipped_steps", 0)),
                  undefined_auroc=dm.undefined_auroc_tasks() if hasattr(dm, "undefined_auroc_tasks") else {})
    return result


def _result(curve: ValidationCurve, counter: ConflictCounter, teleport: Any, directions: dict[str, bool],
            tested: dict[str, Any]) -> dict[str, Any]:
    """The run's record: test metrics, validation curves with the per-epoch trigger ratios, teleports
    (and how many of them came before the selected checkpoint, which is what the test measures)."""
    per_epoch = {e["epoch"]: e for e in counter.per_epoch()}
    epochs = [{**e, **{k: v for k, v in per_epoch.get(e["epoch"], {}).items() if k != "epoch"}} for e in curve.epochs]
    best = curve.best()
    history = teleport_records(teleport) if teleport is not None else []
    accepted, rejected = teleport_counts(teleport) if teleport is not None else (0, 0)
    return {
        "test": {k: _number(tested.get(f"test/{k}")) for k in directions},
        "higher_is_better": dict(directions),
        "val": {k[4:]: v for k, v in best.items() if k.startswith("val/")},
        "best_epoch": int(best.get("epoch", -1)),
        "epochs_run": len(curve.epochs),
        "epochs": epochs,
        "checked_steps": counter.checked,
        **{f"trigger_ratio_{rule}": counter.ratio(rule) for rule in RULES},
        "fired_steps": {rule: [[s.step, s.epoch] for s in counter.steps if s.fired[rule]] for rule in RULES},
        "teleports": accepted,
        "rejected_teleports": rejected,
        "teleports_before_best": teleports_before_best(history, int(best.get("epoch", -1)), accepted),
        "teleport_seconds": float(sum(_number(h.get("seconds", 0.0)) for h in history)),
        "teleport_history": history,
    }
