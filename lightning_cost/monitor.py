"""``ConflictMonitor``: would COST act on my model? A cheap, read-only look at the task conflict.

Add it to the callbacks of your own training run; it changes nothing in the update. Every
``every_n_steps`` optimizer steps it reads the step's per-task gradients of the shared parameters
(the multi-task core's :class:`~lightning_cost.StepRecord`: the Jacobian ``J`` or, on the Gramian
engine, only ``G = J J^T``) and computes, from ``G`` alone,

* ``||g_i|| = sqrt(G_ii)``,
* ``cos(g_i, g_0)`` with ``g_0`` the mean task gradient (``<g_i, g_0> = (G 1)_i / K``,
  ``||g_0||^2 = 1^T G 1 / K^2``; :func:`~lightning_cost.teleport.trigger.conflict_cosines_from_gram`),
* whether each trigger rule of :class:`~lightning_cost.SymmetryTeleportCallback` would fire
  (:class:`~lightning_cost.teleport.trigger.ConflictTrigger`: ``"majority"``, the paper's eq. 4, at least
  ``ceil(K/2)`` tasks with ``cos < 0``; ``"any"``, the authors' code, one task with ``cos <= 0``),

and logs them to the trainer's loggers (``conflict/cos/<task>``, ``conflict/grad_norm/<task>``,
``conflict/fires_majority``, ``conflict/fires_any``, ``conflict/share_majority``,
``conflict/share_any``: the running share of monitored steps on which the rule fires;
``conflict/num_conflicting``: the number of tasks with ``cos < 0``; ``log="module"``: through
``pl_module.log`` instead, so they also reach ``trainer.callback_metrics``, at about 0.3 ms a value
on a CPU). At the end of
training, global rank 0 writes a Fig. 5a-style plot (per-task ``cos(g_i, g_0)`` over the steps, the
0 line, the steps where each rule fires) and :meth:`ConflictMonitor.summary` gives the totals.

Cost: with a gradient aggregator the per-task gradients are computed anyway and the monitor adds
``K x K`` work (plus ``J J^T`` when only ``J`` is there). With a loss weighting (LS, ...) the core
computes no Jacobian, so the monitor requests it on monitored steps only; the other steps cost a
modulo check. Under DDP the record is identical on every rank, so every rank logs the same values.

Put it *after* a :class:`~lightning_cost.SymmetryTeleportCallback` with ``check_every > 1`` in the
callback list (that callback sets the Jacobian request on every batch); a monitored step that has
no per-task gradients is counted in ``steps_unavailable`` and skipped.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_cost.aggregators import gramian as compute_gramian
from lightning_cost.protocol import MultiTaskModule, StepRecord
from lightning_cost.teleport._checks import check_bool, check_choice, check_int
from lightning_cost.teleport.trigger import ConflictTrigger, TriggerResult, conflict_cosines_from_gram

__all__ = ["ConflictMonitor", "ConflictStats", "conflict_stats", "record_gramian"]

#: the rules the monitor evaluates, in the order of its flags and shares
RULES: tuple[Literal["majority", "any"], ...] = ("majority", "any")
_TRIGGERS = {rule: ConflictTrigger(rule) for rule in RULES}
DEFAULT_PLOT_NAME = "conflict_monitor.png"
LOG_MODES = ("logger", "module", "off")


@dataclass(frozen=True)
class ConflictStats:
    """The conflict of one step's task gradients: ``norms`` and ``cosines`` are ``[K]`` float64
    (a task with a zero gradient has cosine NaN), ``rules`` each rule's trigger decision."""

    norms: Tensor
    cosines: Tensor
    rules: dict[str, TriggerResult]

    def fires(self, rule: str) -> bool:
        return self.rules[rule].fire


def conflict_stats(gram: Tensor) -> ConflictStats:
    """Norms, ``cos(g_i, g_0)`` and both trigger decisions from the ``K x K`` Gramian ``G = J J^T``."""
    cos = conflict_cosines_from_gram(gram)  # validates the shape
    norms = gram.double().diagonal().clamp_min(0.0).sqrt()
    return ConflictStats(norms=norms, cosines=cos, rules={rule: t.decide(cos) for rule, t in _TRIGGERS.items()})


def record_gramian(record: StepRecord | None) -> Tensor | None:
    """The step's Gramian of the shared parameters' task gradients: the recorded one, or ``J J^T``;
    ``None`` when the record is missing, skipped, non-finite or holds neither."""
    if record is None or record.skipped or not record.finite:
        return None
    if record.gramian is not None:
        return record.gramian
    if record.jacobian is not None:
        return compute_gramian(record.jacobian)
    return None


class ConflictMonitor(L.Callback):
    """Log how conflicting the task gradients are and how often COST's trigger would fire.

    Args:
        every_n_steps: monitor every N-th optimizer step (``trainer.global_step % N == 0``).
        plot: write the plot at the end of training (needs matplotlib; skipped with a warning without it).
        plot_path: where (a ``.png``, ``.pdf``, ...); ``None``: ``conflict_monitor.png`` under
            ``trainer.log_dir`` (the default root dir without a logger).
        log: ``"logger"``: write the values to ``trainer.loggers`` at the monitored step (cheap);
            ``"module"``: through ``pl_module.log`` (also in ``trainer.callback_metrics``, for
            callbacks such as ``EarlyStopping``, at Lightning's cost per value); ``"off"``: not logged.
            The history and summary are kept either way.
        prefix: the prefix of the logged names.
        name: distinguishes the checkpoint state of several instances.

    Example::

        monitor = ConflictMonitor(every_n_steps=10)
        trainer = L.Trainer(callbacks=[monitor], max_epochs=5)
        trainer.fit(model, loader)  # model: a MultiTaskMixin module
        print(monitor.summary())    # {'steps_monitored': ..., 'share_majority': ..., 'share_any': ..., ...}
    """

    def __init__(self, every_n_steps: int = 1, *, plot: bool = True, plot_path: str | os.PathLike | None = None,
                 log: Literal["logger", "module", "off"] = "logger", prefix: str = "conflict",
                 name: str | None = None) -> None:
        super().__init__()
        check_int("every_n_steps", every_n_steps, 1)
        check_bool("plot", plot)
        check_choice("log", log, LOG_MODES)
        if plot_path is not None and not isinstance(plot_path, (str, os.PathLike)):
            raise TypeError(f"plot_path must be a path or None, got {plot_path!r} ({type(plot_path).__name__})")
        if plot_path is not None and not str(plot_path):
            raise ValueError("plot_path must not be empty (None: the default under trainer.log_dir)")
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"prefix must be a non-empty string, got {prefix!r}")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a string or None, got {name!r} ({type(name).__name__})")
        self.every_n_steps, self.plot, self.prefix, self.name = every_n_steps, plot, prefix, name
        self.log_mode = log  # not ``self.log``: Lightning sets a callback's ``log`` to the module's
        self.plot_path: Path | None = Path(plot_path) if plot_path is not None else None
        self.written_plot: Path | None = None
        self.task_names: list[str] = []
        self._reset_history()
        self._requested = False  # whether the monitor turned the module's Jacobian request on for this step
        self._toggle = False  # whether the module needs the request at monitored steps only

    def _reset_history(self) -> None:
        self.steps: list[int] = []
        self.cosines: list[list[float]] = []
        self.norms: list[list[float]] = []
        self.fired: dict[str, list[bool]] = {rule: [] for rule in RULES}
        self.steps_unavailable = 0
        self._counts: dict[str, int] = dict.fromkeys(RULES, 0)
        self._min_cos: list[float] = []

    # ------------------------------------------------------------------ setup
    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name) if self.name else type(self).__qualname__

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not isinstance(pl_module, MultiTaskModule):
            raise TypeError("ConflictMonitor needs a LightningModule implementing lightning_cost.MultiTaskModule "
                            "(e.g. one built with MultiTaskMixin)")
        names = [str(t) for t in pl_module.task_names]
        if self.task_names and self.task_names != names:
            raise ValueError(f"this ConflictMonitor has recorded tasks {self.task_names}, but the module has {names}: "
                             "use one monitor per model")
        self.task_names = names
        if not self._min_cos:
            self._min_cos = [math.inf] * len(names)
        # a module that says whether it computes the Jacobian gets it requested on monitored steps only
        self._toggle = hasattr(pl_module, "needs_jacobian")
        if not self._toggle:
            pl_module.request_jacobian(True)

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        names = [str(t) for t in pl_module.task_names]  # after a resume: the checkpoint's tasks
        if self.task_names != names:
            raise ValueError(f"ConflictMonitor resumed with tasks {self.task_names}, but the module has {names}")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._release(pl_module)

    def _release(self, pl_module: Any) -> None:
        if self._requested:
            pl_module.request_jacobian(False)
            self._requested = False

    # ------------------------------------------------------------------ hooks
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any,
                             batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps or not self._toggle:
            return
        if not pl_module.needs_jacobian:  # a loss weighting: compute the per-task gradients this step only
            pl_module.request_jacobian(True)
            self._requested = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._requested and trainer.global_step % self.every_n_steps:
            self._release(pl_module)  # the monitored step was taken and the next one is not monitored

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        step = trainer.global_step
        if step % self.every_n_steps:
            return
        gram = record_gramian(getattr(pl_module, "mtl_step", None))
        if gram is None:
            self.steps_unavailable += 1
            return
        stats = conflict_stats(gram)
        self._add(step, stats)
        if self.log_mode != "off":
            self._log(trainer, pl_module, stats)

    def _add(self, step: int, stats: ConflictStats) -> None:
        self._append(step, stats.cosines.tolist(), stats.norms.tolist(), {r: stats.fires(r) for r in RULES})

    def _append(self, step: int, cos: list[float], norms: list[float], fires: dict[str, bool]) -> None:
        self.steps.append(int(step))
        self.cosines.append(cos)
        self.norms.append(norms)
        for rule in RULES:
            self.fired[rule].append(bool(fires[rule]))
            self._counts[rule] += bool(fires[rule])
        self._min_cos = [m if math.isnan(c) else min(m, c) for m, c in zip(self._min_cos, cos, strict=True)]

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule, stats: ConflictStats) -> None:
        p, n = self.prefix, len(self.steps)
        values: dict[str, float] = {}
        for task, cos, norm in zip(self.task_names, self.cosines[-1], self.norms[-1], strict=True):
            values[f"{p}/cos/{task}"] = cos
            values[f"{p}/grad_norm/{task}"] = norm
        for rule in RULES:
            values[f"{p}/fires_{rule}"] = float(stats.fires(rule))
            values[f"{p}/share_{rule}"] = self._counts[rule] / n
        values[f"{p}/num_conflicting"] = float(stats.rules["majority"].num_conflicting)
        if self.log_mode == "module":
            for key, value in values.items():
                pl_module.log(key, value, on_step=True, on_epoch=False)
        elif trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(values, step=trainer.global_step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._release(pl_module)
        if not self.plot:
            return
        path = self.plot_path if self.plot_path is not None else \
            Path(trainer.log_dir or trainer.default_root_dir) / DEFAULT_PLOT_NAME  # log_dir: on every rank
        if not trainer.is_global_zero:
            return
        try:
            self.written_plot = self.write_plot(path)
        except ImportError:
            rank_zero_warn("ConflictMonitor: matplotlib is not installed, no plot written (pip install matplotlib)")

    # ------------------------------------------------------------------ results
    def summary(self) -> dict[str, Any]:
        """``steps_monitored``, ``share_majority`` and ``share_any`` (``None`` before any monitored step),
        ``min_cos`` per task (``None`` where never defined), ``steps_unavailable``, ``every_n_steps``."""
        n = len(self.steps)
        out: dict[str, Any] = {"steps_monitored": n, "steps_unavailable": self.steps_unavailable,
                               "every_n_steps": self.every_n_steps, "num_tasks": len(self.task_names)}
        for rule in RULES:
            out[f"share_{rule}"] = self._counts[rule] / n if n else None
            out[f"steps_{rule}"] = self._counts[rule]
        out["min_cos"] = {t: (m if math.isfinite(m) else None) for t, m in zip(self.task_names, self._min_cos,
                                                                               strict=True)}
        return out

    def write_plot(self, path: str | os.PathLike) -> Path:
        """Write the per-task ``cos(g_i, g_0)`` over the monitored steps, the 0 line and the steps where
        each rule fires, to ``path`` (its suffix picks the format)."""
        from matplotlib import colormaps
        from matplotlib.figure import Figure  # no pyplot: the caller's backend is left alone

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig = Figure(figsize=(8.5, 4.2))
        top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [4, 1]})
        palette = colormaps["tab20" if len(self.task_names) > 10 else "tab10"]
        for i, task in enumerate(self.task_names):
            top.plot(self.steps, [c[i] for c in self.cosines], lw=1.0, label=task, color=palette(i % palette.N))
        top.axhline(0.0, color="black", lw=0.8, ls="--")
        top.set_ylabel(r"$\cos(g_i, g_0)$")
        top.set_ylim(-1.05, 1.05)
        k = len(self.task_names)
        top.set_title(f"Task conflict (K={k}): majority rule {_pct(self._share('majority'))}, "
                      f"any rule {_pct(self._share('any'))} of {len(self.steps)} monitored steps", fontsize=9)
        if k:
            top.legend(fontsize=7, ncol=max(1, math.ceil(k / 12)), loc="upper left", bbox_to_anchor=(1.01, 1.0))
        for row, (rule, color) in enumerate(zip(RULES, ("tab:red", "tab:orange"), strict=True)):
            fired = [s for s, f in zip(self.steps, self.fired[rule], strict=True) if f]
            bottom.scatter(fired, [row] * len(fired), marker="|", s=60, color=color)
        bottom.set_yticks(range(len(RULES)), [f"{r} fires" for r in RULES], fontsize=8)
        bottom.set_ylim(-0.6, len(RULES) - 0.4)
        bottom.set_xlabel("optimizer step")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        return path

    def _share(self, rule: str) -> float | None:
        return self._counts[rule] / len(self.steps) if self.steps else None

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        return {"settings": {"every_n_steps": self.every_n_steps, "prefix": self.prefix},
                "task_names": list(self.task_names), "steps": list(self.steps),
                "cosines": [list(c) for c in self.cosines], "norms": [list(n) for n in self.norms],
                "fired": {rule: list(f) for rule, f in self.fired.items()},
                "steps_unavailable": self.steps_unavailable}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        settings = state_dict.get("settings", {})
        if settings.get("every_n_steps", self.every_n_steps) != self.every_n_steps:
            rank_zero_warn(f"ConflictMonitor resumed with every_n_steps={self.every_n_steps} (was "
                           f"{settings['every_n_steps']}); its history is kept")
        self._reset_history()
        self.task_names = list(state_dict["task_names"])
        self._min_cos = [math.inf] * len(self.task_names)
        self.steps_unavailable = int(state_dict.get("steps_unavailable", 0))
        for i, step in enumerate(state_dict["steps"]):
            self._append(step, [float(c) for c in state_dict["cosines"][i]],
                         [float(v) for v in state_dict["norms"][i]],
                         {rule: state_dict["fired"][rule][i] for rule in RULES})


def _pct(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.0f}%"
