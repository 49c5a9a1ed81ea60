"""Small helpers every benchmark script shares: quiet training, number and table formatting, JSON
files, finite means. One copy each."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import statistics
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L

__all__ = ["quiet", "quiet_trainer", "BatchTimer", "fmt", "text_table", "write_json", "load_json", "finite_mean",
           "finite_median"]

_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_cost")
#: warnings a benchmark run triggers by design (CPU-only machine, tiny loaders, solver accuracy notes)
_EXPECTED = (".*does not have many workers.*", ".*GPU available but not used.*", ".*TPU available.*",
             ".*Solution may be inaccurate.*", ".*LeafSpec.*", ".*but have no `val_dataloader`.*")


@contextlib.contextmanager
def quiet(everything: bool = False) -> Iterator[None]:
    """Lightning's and lightning_cost's loggers at ERROR and the expected warnings ignored for the
    block (``everything=True``: every warning); levels and filters are restored after."""
    loggers = [logging.getLogger(n) for n in _LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        if everything:
            warnings.simplefilter("ignore")
        for pattern in _EXPECTED:
            warnings.filterwarnings("ignore", pattern)
        try:
            yield
        finally:
            for lg, lv in zip(loggers, levels, strict=True):
                lg.setLevel(lv)


def quiet_trainer(callbacks: Sequence[L.Callback] = (), **overrides: Any) -> L.Trainer:
    """A CPU ``Trainer`` for measurements: no logger, checkpoints, progress bar, summary or
    validation unless ``overrides`` ask for them."""
    opts: dict[str, Any] = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                                limit_val_batches=0)
    opts.update(overrides)
    return L.Trainer(callbacks=list(callbacks), **opts)


class BatchTimer(L.Callback):
    """Wall time of every training batch (``on_train_batch_start`` to ``_end``) with its ``global_step``."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, float]] = []
        self._step, self._t = 0, 0.0

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._step, self._t = trainer.global_step, time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.rows.append((self._step, time.perf_counter() - self._t))

    @property
    def ms(self) -> list[float]:
        """Every batch's time in milliseconds, in order."""
        return [1e3 * t for _, t in self.rows]


def fmt(v: Any, digits: int = 2) -> str:
    """One table cell: ``-`` for None and non-finite numbers; small and large floats in ``g`` format."""
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "-"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.{max(digits, 2)}g}"
        return f"{v:.{digits}f}"
    return str(v)


def text_table(title: str, header: Sequence[str], rows: Iterable[Sequence[Any]], digits: int = 2) -> str:
    """A right-aligned plain-text table under ``title`` (none when empty; cells through :func:`fmt`)."""
    cells = [[c if isinstance(c, str) else fmt(c, digits) for c in r] for r in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(header)]
    line = "  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))
    body = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join([*([title] if title else []), line, "-" * len(line), *body])


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(o)
    return str(o)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON atomically (a temporary file, then a rename): a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_json_default))
    os.replace(tmp, path)


def print_and_write(out_dir: str | os.PathLike | None, name: str, results: Any, text: str) -> None:
    """Print a benchmark's tables; with ``out_dir``, also write ``<name>.json`` and ``<name>.txt`` there."""
    print(text)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / f"{name}.json").write_text(json.dumps(results, indent=1))
        (Path(out_dir) / f"{name}.txt").write_text(text + "\n")


def load_json(path: str | os.PathLike) -> Any:
    """The JSON in ``path``, or ``None`` when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _finite(xs: Iterable[Any]) -> list[float]:
    return [float(x) for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]


def finite_mean(xs: Iterable[Any]) -> float:
    """Mean of the finite numbers in ``xs`` (NaN when there are none)."""
    vals = _finite(xs)
    return statistics.fmean(vals) if vals else float("nan")


def finite_median(xs: Iterable[Any]) -> float:
    """Median of the finite numbers in ``xs`` (NaN when there are none)."""
    vals = _finite(xs)
    return float(statistics.median(vals)) if vals else float("nan")
