"""32 multi-task methods, one module each, and a registry: the 13 the paper compares (Sec. 5,
:data:`AVAILABLE`) and 19 from the peer libraries, TorchJD and LibMTL (:data:`PEERS`: the
aggregators UPGrad, DualProj, ConFIG, Random, Aligned-MTL, Krum, GradVac, CR-MOGM, TrimmedMean,
PCD, the stateful aggregators MoDo, SDMGrad, ExcessMTL, the loss-aware aggregators GradNorm, DB-MTL,
MoCo and the loss weightings GLS, IMTL-L, STCH).

``build_aggregator(name, **hparams)`` builds any of them by name (case-insensitive); the classes
are importable from here too (``from lightning_cost.aggregators import FairGrad, MGDA``).
"""

from __future__ import annotations

import importlib

from lightning_cost.aggregators.base import (
    AggregationError,
    Aggregator,
    GramianAggregator,
    LossWeighting,
    check_jacobian,
    check_jacobian_shape,
    check_losses,
    gramian,
)

#: name -> (module, class). Modules are imported lazily so that solver back-ends
#: (cvxpy for Nash-MTL) are only imported when that method is used.
_REGISTRY: dict[str, tuple[str, str]] = {
    "ls": ("lightning_cost.aggregators.ls", "LinearScalarization"),
    "si": ("lightning_cost.aggregators.si", "ScaleInvariant"),
    "rlw": ("lightning_cost.aggregators.rlw", "RLW"),
    "dwa": ("lightning_cost.aggregators.dwa", "DWA"),
    "uw": ("lightning_cost.aggregators.uw", "UncertaintyWeighting"),
    "mgda": ("lightning_cost.aggregators.mgda", "MGDA"),
    "graddrop": ("lightning_cost.aggregators.graddrop", "GradDrop"),
    "pcgrad": ("lightning_cost.aggregators.pcgrad", "PCGrad"),
    "cagrad": ("lightning_cost.aggregators.cagrad", "CAGrad"),
    "imtl": ("lightning_cost.aggregators.imtl", "IMTLG"),
    "nashmtl": ("lightning_cost.aggregators.nash_mtl", "NashMTL"),
    "famo": ("lightning_cost.aggregators.famo", "FAMO"),
    "fairgrad": ("lightning_cost.aggregators.fairgrad", "FairGrad"),
    "upgrad": ("lightning_cost.aggregators.upgrad", "UPGrad"),
    "dualproj": ("lightning_cost.aggregators.dualproj", "DualProj"),
    "config": ("lightning_cost.aggregators.conflict_free", "ConFIG"),
    "random": ("lightning_cost.aggregators.random_weights", "Random"),
    "alignedmtl": ("lightning_cost.aggregators.aligned_mtl", "AlignedMTL"),
    "krum": ("lightning_cost.aggregators.krum", "Krum"),
    "gradvac": ("lightning_cost.aggregators.gradvac", "GradVac"),
    "crmogm": ("lightning_cost.aggregators.cr_mogm", "CRMOGM"),
    "trimmedmean": ("lightning_cost.aggregators.trimmed_mean", "TrimmedMean"),
    "pcd": ("lightning_cost.aggregators.pcd", "PCD"),
    "gls": ("lightning_cost.aggregators.gls", "GLS"),
    "imtll": ("lightning_cost.aggregators.imtl_l", "IMTLL"),
    "stch": ("lightning_cost.aggregators.stch", "STCH"),
    "modo": ("lightning_cost.aggregators.modo", "MoDo"),
    "sdmgrad": ("lightning_cost.aggregators.sdmgrad", "SDMGrad"),
    "excessmtl": ("lightning_cost.aggregators.excess_mtl", "ExcessMTL"),
    "gradnorm": ("lightning_cost.aggregators.gradnorm", "GradNorm"),
    "dbmtl": ("lightning_cost.aggregators.db_mtl", "DBMTL"),
    "moco": ("lightning_cost.aggregators.moco", "MoCo"),
}
_ALIASES = {"imtl-g": "imtl", "imtlg": "imtl", "nash-mtl": "nashmtl", "nash_mtl": "nashmtl", "ew": "ls", "uncertainty": "uw",
            "dual-proj": "dualproj", "con-fig": "config", "aligned-mtl": "alignedmtl", "cr-mogm": "crmogm",
            "trimmed-mean": "trimmedmean", "trimmed_mean": "trimmedmean", "imtl-l": "imtll", "imtl_l": "imtll",
            "excess-mtl": "excessmtl", "db-mtl": "dbmtl", "db_mtl": "dbmtl"}

#: Methods beyond the paper's 13, from the peer libraries' lists (TorchJD, LibMTL).
PEERS = ("upgrad", "dualproj", "config", "random", "alignedmtl", "krum", "gradvac", "crmogm",
         "trimmedmean", "pcd", "gls", "imtll", "stch", "modo", "sdmgrad", "excessmtl",
         "gradnorm", "dbmtl", "moco")
#: The 13 methods the paper compares, in its order: what the benchmarks run by default.
AVAILABLE = tuple(name for name in _REGISTRY if name not in PEERS)
#: Every registered name (``AVAILABLE + PEERS``).
REGISTERED = tuple(_REGISTRY)

#: class name -> module, for ``from lightning_cost.aggregators import FairGrad`` (resolved lazily).
_CLASSES = {cls: module for module, cls in _REGISTRY.values()}


def __getattr__(name: str) -> type:
    """The method classes, imported on first access (PEP 562) so that importing this package stays
    cheap and Nash-MTL's solver stack is only imported where Nash-MTL is used."""
    if name in _CLASSES:
        return getattr(importlib.import_module(_CLASSES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_CLASSES))


def _key(name: str) -> str:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise KeyError(f"unknown multi-task method {name!r}; available: {', '.join(REGISTERED)}")
    return key


def aggregator_class(name: str) -> type:
    """The class registered under ``name``."""
    module, cls = _REGISTRY[_key(name)]
    return getattr(importlib.import_module(module), cls)


def build_aggregator(name: str, **hparams) -> Aggregator | LossWeighting:
    """Build a method by name with its hyper-parameters (paper defaults when omitted)."""
    return aggregator_class(name)(**hparams)


__all__ = [
    "AVAILABLE",
    "PEERS",
    "REGISTERED",
    "AlignedMTL",
    "CAGrad",
    "CRMOGM",
    "ConFIG",
    "DBMTL",
    "DWA",
    "DualProj",
    "ExcessMTL",
    "FAMO",
    "FairGrad",
    "GLS",
    "GradDrop",
    "GradNorm",
    "GradVac",
    "IMTLG",
    "IMTLL",
    "Krum",
    "LinearScalarization",
    "MGDA",
    "MoCo",
    "MoDo",
    "NashMTL",
    "PCD",
    "PCGrad",
    "RLW",
    "SDMGrad",
    "Random",
    "STCH",
    "ScaleInvariant",
    "TrimmedMean",
    "UPGrad",
    "UncertaintyWeighting",
    "AggregationError",
    "Aggregator",
    "GramianAggregator",
    "LossWeighting",
    "aggregator_class",
    "build_aggregator",
    "check_jacobian",
    "check_jacobian_shape",
    "check_losses",
    "gramian",
]
