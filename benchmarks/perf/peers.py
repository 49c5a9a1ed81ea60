"""What the performance benchmarks share: synthetic Jacobians, the cosine of two updates, and the
peers (TorchJD's aggregators, LibMTL's weightings) set up on a given Jacobian ``J``."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["synthetic_jacobian", "cosine", "torchjd_factories", "libmtl_module", "LIBMTL", "libmtl_on_jacobian"]


def synthetic_jacobian(k: int, p: int, seed: int = 0) -> Tensor:
    """K rows sharing a common direction plus independent noise (some pairs conflict), float32."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(p, generator=g)
    scales = torch.rand(k, 1, generator=g) * 2 + 0.1
    return scales * (0.3 * common + torch.randn(k, p, generator=g))


def cosine(a: Tensor | None, b: Tensor | None) -> float | None:
    """Cosine of two updates in float64 (``None`` when one is missing or zero)."""
    if a is None or b is None:
        return None
    a, b = a.double().flatten(), b.double().flatten()
    n = float(a.norm() * b.norm())
    return float(a @ b) / n if n > 0 else None


def torchjd_factories(k: int) -> dict[str, Callable[[], Any]]:
    """TorchJD's counterpart of each of our methods that has one (empty without TorchJD)."""
    try:
        import torchjd.aggregation as A
    except Exception:  # noqa: BLE001 - peer not installed
        return {}
    return {
        "mgda": lambda: A.MGDA(),
        "pcgrad": lambda: A.PCGrad(),
        "imtl": lambda: A.IMTLG(),
        "cagrad": lambda: A.CAGrad(c=0.4),
        "graddrop": lambda: A.GradDrop(),
        "nashmtl": lambda: A.NashMTL(n_tasks=k, max_norm=0.0),  # no clipping, as ours
        "fairgrad": lambda: A.FairGrad(alpha=2.0),
        "ls": lambda: A.Sum(),
        "rlw": lambda: A.Random(),
    }


def libmtl_module(mod: str) -> Any:
    """``LibMTL.weighting.<mod>`` imported without ``LibMTL/__init__`` (which fails: it imports
    ``torchvision.models.utils``, removed from torchvision)."""
    if "LibMTL" not in sys.modules:
        spec = importlib.util.find_spec("LibMTL")
        if spec is None or spec.submodule_search_locations is None:
            raise ImportError("LibMTL is not installed")
        stub = types.ModuleType("LibMTL")
        stub.__path__ = list(spec.submodule_search_locations)
        sys.modules["LibMTL"] = stub
    return importlib.import_module(f"LibMTL.weighting.{mod}")


#: ours -> (LibMTL module, class, kwargs of its backward, whether it works on J (else: on the losses))
LIBMTL: dict[str, tuple[str, str, dict[str, Any], bool]] = {
    "mgda": ("MGDA", "MGDA", {"mgda_gn": "none"}, True),
    "pcgrad": ("PCGrad", "PCGrad", {}, True),
    "cagrad": ("CAGrad", "CAGrad", {"calpha": 0.4, "rescale": 1}, True),
    "imtl": ("IMTL", "IMTL", {}, True),
    "ls": ("EW", "EW", {}, False),
    "dwa": ("DWA", "DWA", {"T": 2.0}, False),
    "rlw": ("RLW", "RLW", {"dist": "Normal"}, False),
    "uw": ("UW", "UW", {}, False),
}


def libmtl_on_jacobian(name: str, jac: Tensor, losses: Tensor) -> tuple[Callable[[], Tensor], Callable[[], None]]:
    """``(run, prepare)`` for one of LibMTL's Jacobian weightings on a given ``J``: its gradient
    computation returns ``J`` itself (not a copy: none of these weightings writes into it) and its
    ``.grad`` write-back is replaced by capturing the update, which ``run`` returns. ``prepare``
    clears the weighting's own gradients (untimed)."""
    mod, cls, kw, jacobian_based = LIBMTL[name]
    if not jacobian_based:
        raise ValueError(f"LibMTL's {cls} weights the losses, not J")
    w = getattr(libmtl_module(mod), cls)()
    w.task_num, w.device, w.rep_grad = jac.shape[0], torch.device("cpu"), False
    w.init_param()
    captured: list[Tensor] = []
    w._compute_grad_dim = lambda: None
    w._get_grads = lambda losses, mode="backward": jac
    w._compute_grad = lambda losses, mode, rep_grad=False: jac
    w._reset_grad = lambda new_grads: captured.append(new_grads)
    lw = losses.detach().clone()

    def run() -> Tensor:
        captured.clear()
        w.backward(lw, **kw)
        return captured[-1]

    def prepare() -> None:
        for q in w.parameters():
            q.grad = None

    return run, prepare
