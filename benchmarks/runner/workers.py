"""Where a grid's runs train: in this process (``--workers 1``), in ``--workers N`` processes, or as Ray tasks
(``--ray ADDRESS``), all writing to the one cache of the results folder.

This process schedules: it claims a job (:mod:`benchmarks.runner.claims`) when a worker is free, hands
it to the worker, writes the result the worker sends back (atomically: a temporary file, then a rename)
and removes the claim. Jobs another runner holds are looked at again until their result is there (the
other runner finished them) or their claim is gone (it failed or was killed: they run here). A job that
raises is reported with its name at the end; the others go on. Workers are started with ``spawn`` (torch
is not fork-safe), set ``threads`` torch threads and build the data module once per process, so a
job trains exactly as in this process: same results, bit for bit.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import multiprocessing
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from benchmarks.runner.claims import claim, release
from benchmarks.runner.config import RunnerConfig

__all__ = ["make_backend", "run_jobs", "train_job"]

#: seconds between two looks at jobs that another runner holds
POLL_S = 1.0

_DATA: dict[str, Any] = {}  # a worker process's data module, by data set and arguments


def _worker_datamodule(cfg: RunnerConfig, data_sha256: dict[str, str]) -> Any:
    """The data module of this worker process, built and set up on its first job; the data must be the
    files the grid was planned on (a Ray node could hold other copies)."""
    from benchmarks.registry import make_datamodule
    from benchmarks.runner.grid import data_fingerprint, fingerprint

    key = fingerprint([cfg.dataset, cfg.data_kw])
    if key not in _DATA:
        dm = make_datamodule(cfg.dataset, **cfg.data_kw)
        if data_fingerprint(dm.data_files()) != data_sha256:
            raise RuntimeError(f"the data files of {cfg.dataset} on this worker differ from the planned ones")
        dm.setup()
        _DATA[key] = dm
    return _DATA[key]


def _timed_run(dm: Any, cfg: RunnerConfig, job: Any, label: str | None, ckpt_dir: Path) -> tuple[dict, float]:
    """``train_one``'s result and its seconds (a worker's start-up and queueing left out, for the time left)."""
    from benchmarks.runner.grid import base_record, derive_if_silent, resolved_spec, twin_record
    from benchmarks.runner.provenance import provenance
    from benchmarks.runner.relative import needs_base
    from benchmarks.runner.train import train_one

    t0 = time.perf_counter()
    copied = twin_record(job)
    if copied is not None:
        return copied, time.perf_counter() - t0
    base = base_record(job)
    spec = resolved_spec(job, cfg, base)
    res = derive_if_silent(job, cfg, base, spec)
    if res is None:  # trained here: the record says by what code (a derived one keeps its base's)
        res = train_one(dm, cfg, seed=job.seed, method=job.method, cost=job.cost, task=job.task, ckpt_dir=ckpt_dir,
                        label=label, spec=spec)
        res["provenance"] = provenance()
    if spec is not None and needs_base(cfg.spec(job.cost)):
        res["resolved_schedule"] = spec.get("schedule")
    return res, time.perf_counter() - t0


def train_job(cfg: RunnerConfig, job: Any, label: str | None, ckpt_dir: Path) -> tuple[dict[str, Any], float]:
    """Train ``job`` in a worker process, with the worker's data module: the result and its seconds."""
    import torch

    torch.set_num_threads(cfg.threads)
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return _timed_run(_worker_datamodule(cfg, job.key["data_sha256"]), cfg, job, label, ckpt_dir)


class _Inline:
    """Runs a job in this process, with the data module the grid already set up (``--workers 1``)."""

    slots = 1

    def __init__(self, dm: Any, cfg: RunnerConfig) -> None:
        self.dm, self.cfg = dm, cfg

    def submit(self, job: Any, label: str | None, ckpt_dir: Path) -> Future:
        done: Future = Future()
        try:
            done.set_result(_timed_run(self.dm, self.cfg, job, label, ckpt_dir))
        except Exception as err:  # reported with the job's name; the grid goes on
            done.set_exception(err)
        return done

    def close(self) -> None:
        pass


class _Pool:
    """``--workers N`` spawned processes; a pool whose process died is replaced for the next jobs."""

    def __init__(self, cfg: RunnerConfig) -> None:
        self.cfg, self.slots = cfg, cfg.workers
        self._pool = self._new()

    def _new(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.slots, mp_context=multiprocessing.get_context("spawn"))

    def submit(self, job: Any, label: str | None, ckpt_dir: Path) -> Future:
        try:
            return self._pool.submit(train_job, self.cfg, job, label, ckpt_dir)
        except BrokenProcessPool:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new()
            return self._pool.submit(train_job, self.cfg, job, label, ckpt_dir)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class _Ray:
    """Ray tasks of ``threads`` CPUs each on the cluster at ``address`` (``local``: a new local instance);
    as many at once as ``--workers`` when given, else as the cluster's CPUs hold."""

    def __init__(self, cfg: RunnerConfig, address: str) -> None:
        import ray

        root = str(Path(__file__).resolve().parents[2])  # a local instance's workers import benchmarks from here
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
                 runtime_env={"env_vars": {"PYTHONPATH": root}} if address == "local" else None)
        self._ray, self.cfg = ray, cfg
        self._task = ray.remote(num_cpus=cfg.threads)(train_job)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.slots = cfg.workers if cfg.workers > 1 else max(1, cpus // cfg.threads)

    def submit(self, job: Any, label: str | None, ckpt_dir: Path) -> Future:
        return self._task.remote(self.cfg, job, label, ckpt_dir).future()

    def close(self) -> None:
        self._ray.shutdown()


def make_backend(cfg: RunnerConfig, dm: Any, live: bool) -> Any:
    """Where the jobs train. Workers print no per-epoch lines under a ``live`` progress bar, and never show
    Lightning's bar (several at once would garble the terminal)."""
    if cfg.ray is None and cfg.workers == 1:
        dm.setup()
        return _Inline(dm, cfg)
    worker_cfg = copy.copy(cfg)
    worker_cfg.progress = False
    return _Ray(worker_cfg, cfg.ray) if cfg.ray is not None else _Pool(worker_cfg)


def _error(err: BaseException) -> str:
    if isinstance(err, BrokenProcessPool):
        return "its worker process died (killed, or out of memory)"
    return f"{type(err).__name__}: {err}"


def run_jobs(todo: list[Any], backend: Any, progress: Any, *, done_elsewhere: Callable[[Any], bool],
             record: Callable[[Any, dict[str, Any]], str], label: Callable[[Any], str], live: bool,
             ckpt_root: Path, blocked: Callable[[Any], bool] = lambda job: False) -> list[tuple[str, str]]:
    """Run ``todo`` on ``backend``: ``record(job, result)`` writes a result and returns its summary line;
    ``done_elsewhere(job)`` says whether another runner wrote it meanwhile; ``blocked(job)`` whether it
    waits for a job in flight (a COST run for its base run; it starts anyway once nothing else runs).
    Returns ``(job label, error)`` of the jobs that failed."""
    queue, waiting = deque(todo), []
    running: dict[Future, tuple[Any, str]] = {}
    failed: list[tuple[str, str]] = []
    try:
        while queue or waiting or running:
            while queue and len(running) < backend.slots:
                job = queue.popleft()
                if done_elsewhere(job):
                    progress.finished_elsewhere(job.label)
                    continue
                if running and blocked(job):
                    waiting.append(job)
                    continue
                held = claim(job.path, label(job))
                if held is None:
                    waiting.append(job)
                    continue
                if done_elsewhere(job):  # finished between the look above and the claim
                    release(job.path, held)
                    progress.finished_elsewhere(job.label)
                    continue
                if isinstance(backend, _Inline):
                    progress.starting(job.label)
                future = backend.submit(job, None if live else label(job), ckpt_root / job.path.stem)
                running[future] = (job, held)
            if running:
                finished, _ = wait(running, timeout=POLL_S if waiting else None, return_when=FIRST_COMPLETED)
                for future in finished:
                    job, held = running.pop(future)
                    _finish(job, held, future, progress, record, failed)
            elif waiting:
                time.sleep(POLL_S)
            if not queue:
                queue.extend(waiting)
                waiting.clear()
    finally:
        for job, held in running.values():  # interrupted: the claims of unfinished jobs go
            release(job.path, held)
        with contextlib.suppress(Exception):
            backend.close()
    return failed


def _finish(job: Any, held: str, future: Future, progress: Any, record: Callable[[Any, dict[str, Any]], str],
            failed: list[tuple[str, str]]) -> None:
    try:
        err = future.exception()
        if err is None:
            res, seconds = future.result()
            progress.finished(job.label, seconds, record(job, res))
        else:
            failed.append((job.label, _error(err)))
            progress.failed(job.label, _error(err))
    finally:
        release(job.path, held)
