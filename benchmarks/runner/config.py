"""The runner's settings: the command line / YAML parser and the validated :class:`RunnerConfig`.

Dict options (``--data-kw``, ``--model-kw``, ``--method-kw``, ``--cost-kw``, ``--cost-variants``) given
on the command line are merged into the config file's (key by key, nested dicts too) instead of
replacing them. Without ``--baseline-seeds`` the single-task baselines train with the config file's
first seed (the first of ``--seeds`` when there is no config file), so that ``--seeds 1`` adds seed 1
runs without a second set of baselines.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from benchmarks.runner.variants import DEFAULT_COST_VARIANTS, cost_spec, deep_merge, parse_cost

__all__ = ["RESULTS_ENV_VAR", "DICT_OPTIONS", "VerdictMargin", "RunnerConfig", "build_parser", "config_from_argv", "default_out"]

RESULTS_ENV_VAR = "LIGHTNING_COST_RESULTS"
DICT_OPTIONS = ("data_kw", "model_kw", "method_kw", "cost_kw", "cost_variants")


@dataclass(frozen=True)
class VerdictMargin:
    """The equivalence margin of a data set's verdict: ``delta`` in Delta-m% points (a COST row whose
    paired interval against its base lies inside ``[-delta, delta]`` has "no effect") and ``why``,
    the justification, written in the config before the grid runs
    (:func:`benchmarks.runner.verdict.propose_margin` proposes one)."""

    delta: float
    why: str

    def __post_init__(self) -> None:
        if not isinstance(self.delta, (int, float)) or not math.isfinite(self.delta) or self.delta <= 0:
            raise ValueError(f"verdict_margin.delta must be a finite number > 0 (Delta-m% points), got {self.delta!r}")
        if not isinstance(self.why, str) or not self.why.strip():
            raise ValueError("verdict_margin.why must say how the margin was chosen")
        object.__setattr__(self, "delta", float(self.delta))


@dataclass
class RunnerConfig:
    """What the runner trains and how (one field per option of :func:`build_parser`).

    ``seeds`` are the seeds of every method's runs; ``cost_seeds`` (default: ``seeds``) replace them for
    the COST rows and their base rows (the ``none`` runs of ``cost_methods``), which are paired seed
    by seed. ``epochs`` is the most epochs a run trains; with ``patience`` set, a run stops once
    ``val/score`` has not improved by ``min_delta`` for that many epochs. The budget is the same for
    single-task baselines and multi-task runs. ``verdict_margin`` (a :class:`VerdictMargin` or its
    dict; ``None``: "no effect" is never concluded) changes no run, only the verdict. A preset of
    ``cost_variants`` with the key ``control_of: <preset>`` is the matched control of that preset.
    ``workers`` runs train at once in their own processes (or
    with ``ray``, an address, as Ray tasks), each with ``threads`` torch threads (:mod:`.workers`).
    """

    dataset: str = "multimnist"
    methods: list[str] = field(default_factory=lambda: ["ls"])
    cost: list[Any] = field(default_factory=lambda: ["none"])
    cost_variants: dict[str, Any] = field(default_factory=dict)
    cost_methods: list[str] | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    cost_seeds: list[int] | None = None
    baseline_seeds: list[int] | None = None
    baselines: bool = True
    epochs: int = 5
    patience: int | None = None
    min_delta: float = 0.0
    batch_size: int | None = None
    lr: float = 1e-3
    weight_decay: float = 0.0
    regression_loss: str = "mse"
    lr_scheduler: dict[str, Any] | None = None
    data_kw: dict[str, Any] = field(default_factory=dict)
    model_kw: dict[str, Any] = field(default_factory=dict)
    method_kw: dict[str, Any] = field(default_factory=dict)
    cost_kw: dict[str, Any] = field(default_factory=dict)
    limit_train_batches: int | float | None = None
    out: str | None = None
    threads: int = 2
    workers: int = 1
    ray: str | None = None
    accelerator: str = "cpu"
    progress: bool | None = None
    rerun: bool = False
    rerun_other_code: bool = False
    report_only: bool = False
    keep_checkpoints: bool = False
    derive_silent: bool = True
    verdict_margin: VerdictMargin | dict[str, Any] | None = None

    def __post_init__(self) -> None:
        from lightning_cost.aggregators import aggregator_class

        self.methods = [m.strip().lower() for m in self.methods]
        for m in self.methods + list(self.cost_methods or []):
            aggregator_class(m)  # KeyError naming the available methods
        self.cost_methods = [m.strip().lower() for m in self.cost_methods] if self.cost_methods else None
        self.cost_variants = deep_merge(DEFAULT_COST_VARIANTS, self.cost_variants or {})
        self.cost = parse_cost(self.cost, self.cost_variants)
        if not self.seeds or (self.cost_seeds is not None and not self.cost_seeds):
            raise ValueError("seeds and cost_seeds need at least one seed each")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 epochs (or null: no early stopping), got {self.patience}")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.ray is not None and importlib.util.find_spec("ray") is None:
            raise ValueError("--ray needs Ray, which is not installed: pip install 'lightning-cost[ray]' "
                             "(the optional extra 'ray')")
        if self.batch_size is not None:
            self.data_kw = {**self.data_kw, "batch_size": self.batch_size}
        if isinstance(self.verdict_margin, dict):
            extra = set(self.verdict_margin) - {"delta", "why"}
            if extra:
                raise ValueError(f"verdict_margin takes delta and why, not {', '.join(sorted(extra))}")
            self.verdict_margin = VerdictMargin(**self.verdict_margin)
        self._check_controls()

    def _check_controls(self) -> None:
        """``control_of`` names another preset that is no control itself; one control per preset."""
        seen: dict[str, str] = {}
        for name in self.cost_variants:
            of = self.control_of(name)
            if of is None:
                continue
            if of == name or of not in self.cost_variants or self.control_of(of) is not None:
                raise ValueError(f"COST variant {name!r}: control_of {of!r} must name another preset that is not a control")
            if of in seen:
                raise ValueError(f"COST variant {of!r} has two controls: {seen[of]!r} and {name!r}")
            seen[of] = name

    # ------------------------------------------------------------------ derived
    def has_cost(self, method: str) -> bool:
        """Whether ``method`` also runs the COST variants other than ``none``."""
        return any(c != "none" for c in self.cost) and (self.cost_methods is None or method in self.cost_methods)

    def seeds_for(self, method: str, cost: str) -> list[int]:
        """``cost_seeds`` for COST rows and their paired base rows, ``seeds`` for the others."""
        paired = cost != "none" or self.has_cost(method)
        return list(self.cost_seeds) if paired and self.cost_seeds is not None else list(self.seeds)

    def runs(self) -> list[tuple[str, str, int]]:
        """Every ``(method, cost, seed)`` of the grid, in config order."""
        out = []
        for m in self.methods:
            for c in self.cost:
                if c == "none" or self.has_cost(m):
                    out += [(m, c, s) for s in self.seeds_for(m, c)]
        return out

    def control_of(self, cost: str) -> str | None:
        """The preset that COST variant ``cost`` is the matched control of (``None``: not a control)."""
        preset = self.cost_variants.get(cost)
        return preset.get("control_of") if isinstance(preset, dict) else None

    def spec(self, cost: str) -> dict[str, Any] | None:
        """The callback arguments of COST variant ``cost`` (``None`` for ``none``)."""
        return cost_spec(cost, self.cost_kw, self.cost_variants)

    def baseline_seed_list(self) -> list[int]:
        return list(self.baseline_seeds) if self.baseline_seeds else list(self.seeds[:1])


def default_out(title: str) -> Path:
    """Where results go without ``--out``: ``$LIGHTNING_COST_RESULTS/<title>``, else
    ``<cache dir>/results/<title>`` (``~/.cache/lightning_cost``): outside the source tree."""
    from benchmarks.data.base import default_cache_dir

    env = os.environ.get(RESULTS_ENV_VAR)
    return (Path(env).expanduser() if env else default_cache_dir() / "results") / title


def build_parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    p = ArgumentParser(prog="python -m benchmarks.run", default_env=False,
                       description="Train any data set x method x COST variant x seeds; tables and statistics.")
    p.add_argument("--config", action=ActionConfigFile, help="a YAML file with any of these options")
    _add_grid_options(p)
    _add_training_options(p)
    _add_execution_options(p)
    _add_verdict_options(p)
    return p


def _add_grid_options(p: Any) -> None:
    """What the grid runs: the data set, methods, COST variants, seeds and baselines."""
    p.add_argument("--dataset", type=str, default="multimnist",
                   help="a benchmarks.BENCHMARKS name, or a format (multilabel, molecules, mnist_composite) "
                        "with data_kw path")
    p.add_argument("--methods", type=str, nargs="+", default=["ls"], help="lightning_cost.aggregators names")
    p.add_argument("--cost", type=str | bool, nargs="+", default=["none"],
                   help="COST variants to run: none and preset names of cost_variants; comma- or space-separated")
    p.add_argument("--cost-variants", type=dict, default={}, help="{name: SymmetryTeleportCallback arguments}")
    p.add_argument("--cost-methods", type=str | None, nargs="+", default=None,
                   help="methods that also run the COST variants other than none (default: all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--cost-seeds", type=int | None, nargs="+", default=None,
                   help="seeds of the COST rows and their base rows (default: --seeds)")
    p.add_argument("--baseline-seeds", type=int | None, nargs="+", default=None,
                   help="seeds of the single-task baselines (default: the config file's first seed)")
    p.add_argument("--baselines", type=bool, default=True, help="train the single-task baselines")


def _add_training_options(p: Any) -> None:
    """How each run trains: epochs, early stopping, optimizer, loss, and the DataModule's, model's,
    methods' and callbacks' arguments."""
    p.add_argument("--epochs", type=int, default=5, help="the most epochs a run trains")
    p.add_argument("--patience", type=int | None, default=None,
                   help="early stopping: epochs without a val/score improvement (default: none)")
    p.add_argument("--min-delta", type=float, default=0.0, help="early stopping: the least improvement that counts")
    p.add_argument("--batch-size", type=int | None, default=None, help="default: the DataModule's")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--regression-loss", type=str, default="mse")
    p.add_argument("--lr-scheduler", type=dict | None, default=None,
                   help='{"name": "step", "step_size": 100, "gamma": 0.5} or '
                        '{"name": "plateau", "factor": 0.7, "patience": 5, "min_lr": 1e-5} (on val/score)')
    p.add_argument("--data-kw", type=dict, default={}, help="DataModule arguments (path, num_train, ...)")
    p.add_argument("--model-kw", type=dict, default={}, help="benchmarks.make_model arguments")
    p.add_argument("--method-kw", type=dict, default={}, help="{method: {hyper-parameter: value}}")
    p.add_argument("--cost-kw", type=dict, default={}, help="callback arguments shared by every COST variant")
    p.add_argument("--limit-train-batches", type=int | float | None, default=None)


def _add_execution_options(p: Any) -> None:
    """Where the results go and how the jobs run: threads, workers, Ray, accelerator, progress, re-runs."""
    p.add_argument("--out", type=str | None, default=None,
                   help=f"results folder (default: ${RESULTS_ENV_VAR}/<data set> or ~/.cache/lightning_cost/results/)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (of each worker)")
    p.add_argument("--workers", type=int, default=1,
                   help="runs at once, each in its own process; runners sharing --out never run a job twice")
    p.add_argument("--ray", type=str | None, default=None,
                   help="run the jobs as Ray tasks on the cluster at this address ('local': start one here); "
                        "needs the extra 'ray'")
    p.add_argument("--accelerator", type=str, default="cpu")
    p.add_argument("--progress", type=bool | None, default=None,
                   help="Lightning's progress bar (default: on a terminal; one line per epoch otherwise)")
    p.add_argument("--rerun", type=bool, default=False, help="re-run runs whose results exist")
    p.add_argument("--rerun-other-code", type=bool, default=False,
                   help="re-run the runs whose record names no or another code version than this one "
                        "(benchmarks.runner.provenance), so that every pair in the folder shares its code")
    p.add_argument("--report-only", type=bool, default=False, help="only rebuild the tables")
    p.add_argument("--keep-checkpoints", type=bool, default=False)
    p.add_argument("--derive-silent", type=bool, default=True,
                   help="write a COST run that provably never acts as its base run's record instead of training it "
                        "(benchmarks.runner.derive)")


def _add_verdict_options(p: Any) -> None:
    """The verdict: its equivalence margin, the folders it collects, where it writes."""
    p.add_argument("--verdict-margin", type=dict | None, default=None,
                   help='the verdict\'s equivalence margin: {"delta": <Delta-m%% points>, "why": "<how it was chosen>"}')
    p.add_argument("--verdict", type=str | None, nargs="+", default=None,
                   help="collect these finished result folders into a verdict and exit")
    p.add_argument("--verdict-out", type=str, default="docs/results/verdict")
    p.add_argument("--readme", type=str | None, default=None,
                   help="with --verdict: also write the headline table into this README, between its verdict markers")


def _config_files(argv: Sequence[str]) -> list[Path]:
    files = []
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            files.append(Path(argv[i + 1]))
        elif a.startswith("--config="):
            files.append(Path(a.split("=", 1)[1]))
    return files


def _file_values(argv: Sequence[str]) -> dict[str, Any]:
    """The options the ``--config`` files set (later files win), dashes in names as underscores."""
    import yaml

    values: dict[str, Any] = {}
    for f in _config_files(argv):
        values.update({k.replace("-", "_"): v for k, v in (yaml.safe_load(f.read_text()) or {}).items()})
    return values


def _given(argv: Sequence[str], option: str) -> bool:
    flag = "--" + option.replace("_", "-")
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def _cli_value(argv: Sequence[str], option: str) -> Any:
    """The last value given for a dict option on the command line."""
    flag = "--" + option.replace("_", "-")
    value = None
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    import yaml

    return yaml.safe_load(value) if isinstance(value, str) else value


def config_from_argv(argv: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(settings, extras)``: the parsed options as :class:`RunnerConfig` fields, with the dict options
    merged over the config file's and the baseline seeds resolved; ``extras`` the other options."""
    argv = list(argv)
    ns = build_parser().parse_args(argv)
    raw = {k.replace("-", "_"): v for k, v in vars(ns).items() if k != "config"}
    raw = json.loads(json.dumps(raw, default=lambda o: vars(o) if hasattr(o, "__dict__") else str(o)))
    from_file = _file_values(argv)
    for k in DICT_OPTIONS:
        if _given(argv, k) and isinstance(from_file.get(k), dict):
            raw[k] = deep_merge(from_file[k], _cli_value(argv, k) or {})
    if raw.get("baseline_seeds") is None:
        first = (from_file.get("seeds") or raw["seeds"])[:1]
        raw["baseline_seeds"] = [int(s) for s in first]
    names = {f.name for f in fields(RunnerConfig)}
    return {k: v for k, v in raw.items() if k in names}, {k: v for k, v in raw.items() if k not in names}
