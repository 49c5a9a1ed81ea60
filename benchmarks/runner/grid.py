"""The grid: single-task baselines and every ``(method, COST variant, seed)``, cached run by run.

Files under ``<out>``: ``baselines/<task>__seed<s>.json`` and ``runs/<method>__cost-<variant>__seed<s>.json``,
then the reports (:mod:`benchmarks.runner.report`) and ``verdict_config.json`` (what the verdict,
:mod:`benchmarks.runner.verdict`, reads from the config: the equivalence margin). A run whose JSON exists with the same cache key is
skipped; the key holds every setting that changes the run and the sha256 of the data file(s)
(:func:`data_fingerprint`), so an edited data file re-runs everything that read it.

The runs left train in this process or, with ``workers`` / ``ray``, in worker processes or Ray tasks
(:mod:`benchmarks.runner.workers`); runners started at once on the same ``<out>`` share the jobs through
claim files (:mod:`benchmarks.runner.claims`), so a grid is never split by hand. A run that fails is
reported at the end (``summary["failed"]``) and the others are kept.

A COST run whose warm-up is relative to its base run (:mod:`benchmarks.runner.relative`) waits for
that base run while it is in flight, and one that provably never acts is derived from it
(:mod:`benchmarks.runner.derive`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import load_json, write_json
from benchmarks.runner.config import RunnerConfig, default_out
from benchmarks.runner.relative import needs_base, resolve_warmup

__all__ = ["Job", "data_fingerprint", "plan_jobs", "run_benchmark", "fingerprint", "out_dir", "write_verdict_config"]

#: bumped when a run's record or protocol changes, so that older results are not reused
PROTOCOL = 2


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able object (the cache key of a run)."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _folder_digest(folder: Path) -> str:
    """A folder's fingerprint from its listing (relative names, sizes, modification times): the
    paper's image folders are too large to read for every run."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(folder)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return "listing:" + h.hexdigest()


def data_fingerprint(files: list[Path]) -> dict[str, str]:
    """``{file name: sha256}`` of the data a DataModule reads (folders: a listing digest)."""
    from benchmarks.data.base import file_sha256

    out = {}
    for f in files:
        f = Path(f)
        if f.is_dir():
            out[f.name] = _folder_digest(f)
        elif f.is_file():
            out[f.name] = file_sha256(f)
    return out


@dataclass(frozen=True)
class Job:
    """One run of the grid: ``kind`` is ``"baseline"`` (``task`` set) or ``"run"``."""

    kind: str
    path: Path
    key: dict[str, Any]
    seed: int
    method: str = "ls"
    cost: str = "none"
    task: str | None = None
    control_of: str | None = None  # the preset this run's variant is the matched control of
    twin: Path | None = None  # an earlier control run that trains exactly this run (its record is copied)

    @property
    def label(self) -> str:
        what = f"single-task {self.task}" if self.kind == "baseline" else f"{self.method} cost={self.cost}"
        return f"{what} seed {self.seed}"


def _common_key(cfg: RunnerConfig, data: dict[str, str]) -> dict[str, Any]:
    key = {"protocol": PROTOCOL, "dataset": cfg.dataset, "data_kw": cfg.data_kw, "data_sha256": data,
           "epochs": cfg.epochs, "patience": cfg.patience, "min_delta": cfg.min_delta, "lr": cfg.lr,
           "weight_decay": cfg.weight_decay, "regression_loss": cfg.regression_loss, "model_kw": cfg.model_kw,
           "limit_train_batches": cfg.limit_train_batches}
    if cfg.lr_scheduler:
        key["lr_scheduler"] = cfg.lr_scheduler
    return key


def plan_jobs(cfg: RunnerConfig, out: Path, task_names: list[str], data: dict[str, str]) -> list[Job]:
    """Every baseline and run of the configuration, with its result file and cache key."""
    common = _common_key(cfg, data)
    jobs = []
    if cfg.baselines:
        for task in task_names:
            for s in cfg.baseline_seed_list():
                jobs.append(Job("baseline", out / "baselines" / f"{task}__seed{s}.json",
                                {**common, "task": task, "seed": s}, s, task=task))
    for m, c, s in cfg.runs():
        key = {**common, "method": m, "method_kw": cfg.method_kw.get(m, {}), "cost": c, "cost_spec": cfg.spec(c),
               "seed": s}
        if _gramian_method(m):  # runs on the Gramian engine: equal to the Jacobian engine's up to rounding only
            key["engine"] = "gramian"
        lora = lora_settings(cfg.spec(c))
        if lora is not None:  # the library's defaults too: a changed default retrains, never reuses a stale run
            key["lora"] = lora
        jobs.append(Job("run", out / "runs" / f"{m}__cost-{c}__seed{s}.json", key, s, method=m, cost=c,
                        control_of=cfg.control_of(c), twin=_twin(key, jobs) if cfg.control_of(c) else None))
    return jobs


def _training_settings(key: dict[str, Any]) -> dict[str, Any]:
    """What a run's training depends on: its key without the variant's name and the preset it controls."""
    spec = key.get("cost_spec")
    return {**{k: v for k, v in key.items() if k != "cost"},
            "cost_spec": {k: v for k, v in spec.items() if k != "control_of"} if isinstance(spec, dict) else spec}


def _twin(key: dict[str, Any], planned: list[Job]) -> Path | None:
    """The result file of an earlier planned control run with the same training settings (two variants
    that differ only in their teleporter share one matched control: it never moves the weights)."""
    mine = _training_settings(key)
    return next((j.path for j in planned if j.control_of and _training_settings(j.key) == mine), None)


def twin_record(job: Job) -> dict[str, Any] | None:
    """The record of a control run copied from its finished twin (:func:`_twin`), or ``None``."""
    if job.twin is None:
        return None
    twin = load_json(job.twin)
    if twin is None or twin.get("config") is None or _training_settings(twin["config"]) != _training_settings(job.key):
        return None
    out = {k: v for k, v in twin.items() if k not in ("config", "config_hash", "cost", "control_of")}
    return {**out, "copied_from": job.twin.name}


def lora_settings(spec: dict[str, Any] | None) -> dict[str, Any] | None:
    """Every setting of the LoRA teleporter a COST spec builds, defaults included (``None``: another
    teleporter or no COST)."""
    from lightning_cost.teleport.lora import LoRAConfig
    from lightning_cost.teleport.registry import split_spec

    tele = None if spec is None else spec.get("teleporter", "lora")
    if not isinstance(tele, (str, dict)):
        return None
    name, settings = split_spec(tele)
    return dataclasses.asdict(LoRAConfig(**settings)) if name == "lora" else None


def base_key_of(job: Job) -> dict[str, Any]:
    """The cache key of a COST job's base run: the same settings without COST."""
    from benchmarks.runner.derive import COST_KEYS

    return {k: v for k, v in job.key.items() if k not in COST_KEYS} | {"cost": "none", "cost_spec": None}


def base_record(job: Job) -> tuple[dict[str, Any], str] | None:
    """The finished base run of a COST job (same settings, cost ``none``) and its file name, or ``None``."""
    if job.kind != "run" or job.cost == "none":
        return None
    base_key = base_key_of(job)
    base_path = job.path.with_name(f"{job.method}__cost-none__seed{job.seed}.json")
    base = load_json(base_path)
    return (base, base_path.name) if base is not None and base.get("config_hash") == fingerprint(base_key) else None


def _waits_for_base(job: Job, cfg: RunnerConfig) -> bool:
    """A COST run whose base run is not finished yet (it reads the base's record), or a control run
    whose twin is not."""
    if job.twin is not None:
        return twin_record(job) is None
    return job.kind == "run" and job.cost != "none" and cfg.derive_silent | needs_base(cfg.spec(job.cost)) \
        and base_record(job) is None


def resolved_spec(job: Job, cfg: RunnerConfig, base: tuple[dict[str, Any], str] | None) -> dict[str, Any] | None:
    """The job's callback arguments, a warm-up relative to the base run resolved
    (:mod:`benchmarks.runner.relative`); ``None`` for a run without COST."""
    spec = cfg.spec(job.cost) if job.kind == "run" else None
    return resolve_warmup(spec, base[0] if base else None) if spec is not None and needs_base(spec) else spec


def derive_if_silent(job: Job, cfg: RunnerConfig, base: tuple[dict[str, Any], str] | None,
                     spec: dict[str, Any] | None) -> dict[str, Any] | None:
    """The record of a COST run that provably never acts, from its finished base run
    (:mod:`benchmarks.runner.derive`), or ``None``: train it."""
    from benchmarks.runner.derive import derived_record
    from lightning_cost.aggregators import LossWeighting, aggregator_class

    if not cfg.derive_silent or base is None or spec is None:
        return None
    needs_gradients = not issubclass(aggregator_class(job.method), LossWeighting)
    base_key = base_key_of(job)
    return derived_record(base[0], {**job.key, "cost_spec": spec}, base_key, base[1], needs_gradients)


def _gramian_method(name: str) -> bool:
    from lightning_cost.aggregators import GramianAggregator, aggregator_class

    return issubclass(aggregator_class(name), GramianAggregator)


def out_dir(cfg: RunnerConfig) -> Path:
    from benchmarks.registry import dataset_title

    return Path(cfg.out).expanduser() if cfg.out else default_out(dataset_title(cfg.dataset, cfg.data_kw))


def _fresh(job: Job, since: float | None = None) -> bool:
    """Whether ``job``'s result file holds its current cache key (written at or after ``since`` if given)
    and still agrees with the records it was made from (:func:`_outdated_by_source`)."""
    old = load_json(job.path)
    if old is None or old.get("config_hash") != fingerprint(job.key) or _outdated_by_source(job, old):
        return False
    return since is None or job.path.stat().st_mtime >= since


def _outdated_by_source(job: Job, record: dict[str, Any]) -> bool:
    """Whether a record made from another one no longer matches it: a derived run (or a copied control)
    whose base (or twin) now holds other weights, or a run whose warm-up, resolved from its base run's
    checkpoint, is not what the base run's record resolves to now. The cache key cannot see this (it
    holds settings, not other runs' results); a source that is missing says nothing."""
    if job.kind != "run" or job.cost == "none":
        return False
    if "copied_from" in record:
        twin = load_json(job.twin) if job.twin is not None else None
        return twin is not None and twin.get("weights_sha256") != record.get("weights_sha256")
    base = base_record(job)
    if base is None:
        return False
    if "derived_from" in record and base[0].get("weights_sha256") != record.get("weights_sha256"):
        return True
    spec = job.key.get("cost_spec")
    if spec is None or not (needs_base(spec) and "resolved_schedule" in record):
        return False
    try:
        return resolve_warmup(spec, base[0]).get("schedule") != record["resolved_schedule"]
    except ValueError:  # a base record too old to resolve from: nothing to compare
        return False


def _todo(jobs: list[Job], rerun: bool) -> list[Job]:
    return [job for job in jobs if rerun or not _fresh(job)]


def _drop_other_code(jobs: list[Job], console: Any) -> None:
    """Removes the records that name no or another code version than this process's, before anything
    is planned: the runs that read them (a COST run its base, a control its twin) then wait for their
    retrained records instead of reading the old ones."""
    from benchmarks.runner.provenance import provenance

    code = provenance()["code"]
    stale = [j for j in jobs if (r := load_json(j.path)) is not None and (r.get("provenance") or {}).get("code") != code]
    for job in stale:
        job.path.unlink()
    if stale:
        console.print(f"{len(stale)} records were trained by other code than {code}: they run again")


def _record(job: Job, res: dict[str, Any], title: str) -> str:
    """Write a finished job's result (atomically) and return its one-line summary."""
    res.update({"dataset": title, "kind": job.kind, "seed": job.seed, "config": job.key,
                "config_hash": fingerprint(job.key),
                **({"task": job.task} if job.task else {"method": job.method, "cost": job.cost,
                                                         "control_of": job.control_of})})
    write_json(job.path, res)
    return (f"{res['epochs_run']} epochs (best {res['best_epoch']}): "
            "test " + ", ".join(f"{k}={v:.4f}" for k, v in res["test"].items())
            + (f", teleports={res['teleports']}" if job.cost != "none" else ""))


def _live(cfg: RunnerConfig) -> bool:
    """A rich progress bar: runs in workers (this process shows Lightning's bar) on a terminal."""
    on = cfg.progress if cfg.progress is not None else sys.stdout.isatty()
    return bool(on) and (cfg.workers > 1 or cfg.ray is not None)


def _run_jobs(jobs: list[Job], todo: list[Job], dm: Any, cfg: RunnerConfig, title: str, out: Path,
              console: Any) -> list[tuple[str, str]]:
    """Run ``todo`` (:mod:`benchmarks.runner.workers`); returns ``(job label, error)`` of the failed ones."""
    from benchmarks.runner.progress import GridProgress
    from benchmarks.runner.workers import make_backend, run_jobs

    live, since = _live(cfg), time.time()
    backend = make_backend(cfg, dm, live)
    with GridProgress(console, title, len(jobs), len(jobs) - len(todo), backend.slots, live) as progress:
        failed = run_jobs(todo, backend, progress, done_elsewhere=lambda j: _fresh(j, since if cfg.rerun else None),
                          record=lambda j, r: _record(j, r, title), label=lambda j: f"{title}: {j.label}",
                          live=live, ckpt_root=out / "ckpt", blocked=lambda j: _waits_for_base(j, cfg))
    with contextlib.suppress(OSError):  # each run removed its own; another grid may still be writing here
        (out / "ckpt").rmdir()
    return failed


def write_verdict_config(cfg: RunnerConfig, out: Path) -> None:
    """``<out>/verdict_config.json``: the config's ``verdict_margin`` (``null`` without one), written by
    every call of the grid (``--report-only`` too): it changes no run, so it is not in the cache key."""
    margin = cfg.verdict_margin
    write_json(out / "verdict_config.json", {"verdict_margin": dataclasses.asdict(margin) if margin else None})


def run_benchmark(cfg: RunnerConfig) -> dict[str, Any]:
    """Run (or reuse) the baselines and the grid, write the reports; returns the summary
    (:func:`benchmarks.runner.stats.summarize`)."""
    from rich.console import Console

    from benchmarks.registry import dataset_title, make_datamodule
    from benchmarks.runner.report import write_reports
    from benchmarks.runner.stats import summarize

    console = Console(width=None if sys.stdout.isatty() else 160)
    title, out = dataset_title(cfg.dataset, cfg.data_kw), out_dir(cfg)
    dm = make_datamodule(cfg.dataset, **cfg.data_kw)
    data = data_fingerprint(dm.data_files())
    jobs = plan_jobs(cfg, out, [s.name for s in dm.task_specs] if cfg.baselines else [], data)
    failed: list[tuple[str, str]] = []
    if not cfg.report_only:
        if cfg.rerun_other_code:
            _drop_other_code(jobs, console)
        todo = _todo(jobs, cfg.rerun)
        console.print(f"[bold]{title}[/]: {len(jobs) - len(todo)} of {len(jobs)} runs already done, "
                      f"{len(todo)} to run -> {out}")
        failed = _run_jobs(jobs, todo, dm, cfg, title, out, console) if todo else []
    runs = [r for j in jobs if j.kind == "run" and (r := load_json(j.path)) is not None]
    bases = [r for j in jobs if j.kind == "baseline" and (r := load_json(j.path)) is not None]
    summary = summarize(runs, bases, title)
    write_reports(summary, out, console)
    write_verdict_config(cfg, out)
    if failed:
        summary["failed"] = [{"run": label, "error": err} for label, err in failed]
        console.print(f"[bold red]{len(failed)} run(s) failed[/] (their results are missing; run again to retry):")
        for label, err in failed:
            console.print(f"  {title}: {label}: {err}", highlight=False)
    return summary
