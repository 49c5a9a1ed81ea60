"""What code a run was trained with, kept in its record (``provenance``), so that a cache that mixes
code versions says so.

The cache key leaves the code out on purpose: a grid spans many edits that change no number. So a
folder may hold runs trained by different code, and a paired difference between two of them then
mixes COST's effect with the edit's. :func:`provenance` fingerprints the code a run's training reads
(the library, the benchmark data sets, models and training loop; comments and docstrings do not
count: each module's syntax tree is hashed without them) with the torch and Lightning versions;
:func:`code_versions` counts the versions among a set of records. ``python -m
benchmarks.runner.reproduce`` retrains cached runs and says which ones come out bit for bit the same.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["TRAINING_CODE", "code_fingerprint", "provenance", "code_versions"]

_ROOT = Path(__file__).resolve().parents[2]
#: what a run's numbers depend on, relative to the repository root (folders: every ``*.py`` below)
TRAINING_CODE = ("lightning_cost", "benchmarks/common.py", "benchmarks/registry.py", "benchmarks/data",
                 "benchmarks/models", "benchmarks/paper", "benchmarks/runner/train.py",
                 "benchmarks/runner/variants.py", "benchmarks/runner/conflicts.py",
                 "benchmarks/runner/relative.py", "benchmarks/runner/derive.py")


def _without_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body \
                and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return tree


def _files(root: Path, parts: Iterable[str]) -> list[Path]:
    out: list[Path] = []
    for part in parts:
        p = root / part
        if not p.exists():
            raise FileNotFoundError(f"training code {part!r} not found under {root}")
        out.extend(sorted(p.rglob("*.py")) if p.is_dir() else [p])
    return out


def code_fingerprint(root: Path = _ROOT, parts: Iterable[str] = TRAINING_CODE) -> str:
    """sha256 (12 hex digits) over the files of ``parts``: each one's path and syntax tree without
    docstrings (so an edited comment or docstring keeps the fingerprint, an edited line of code does not)."""
    h = hashlib.sha256()
    for f in _files(root, parts):
        tree = _without_docstrings(ast.parse(f.read_text(), filename=str(f)))
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + ast.dump(tree).encode() + b"\0")
    return h.hexdigest()[:12]


@functools.lru_cache(maxsize=1)
def provenance() -> dict[str, str]:
    """``{"code": fingerprint, "torch": version, "lightning": version, "cpu": ...}`` of this process; ``cpu``
    is the machine and the vector instructions torch's CPU kernels use (other ones round differently,
    so the same code need not give the same bits on another machine)."""
    import platform

    import lightning
    import torch

    return {"code": code_fingerprint(), "torch": str(torch.__version__), "lightning": str(lightning.__version__),
            "cpu": f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()}"}


def code_versions(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """``{"versions": {fingerprint: runs}, "unrecorded": runs}`` over run records (an older record has
    no ``provenance``; a derived or copied record carries its source's)."""
    versions: dict[str, int] = {}
    unrecorded = 0
    for r in records:
        code = (r.get("provenance") or {}).get("code")
        if code is None:
            unrecorded += 1
        else:
            versions[code] = versions.get(code, 0) + 1
    return {"versions": dict(sorted(versions.items())), "unrecorded": unrecorded}
