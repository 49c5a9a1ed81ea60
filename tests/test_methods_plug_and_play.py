"""Every registered method in the setting users train in: the teleport callback forcing exact rescalings,
bf16 mixed precision, gradient accumulation, and a resume from a checkpoint that ends bit-identical to the
uninterrupted run; and 2-process DDP with different samples per rank, ranks identical
(``tests/scripts/ddp_methods.py``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from mtl_models import TinyMTL, loader, regression_data, trainer

from lightning_cost import SymmetryTeleportCallback
from lightning_cost.aggregators import REGISTERED, build_aggregator

K = 3
STEPS_PER_EPOCH = 4  # 256 samples, batches of 32, two micro-batches per optimizer step


def method_kw(name: str) -> dict:
    """The arguments a method needs to be built (``num_tasks`` for learned loss weights)."""
    return {"num_tasks": K} if name in ("uw", "imtll") else {}


def run(name: str, epochs: int, tmp_path: Path, ckpt: Path | None = None, save: Path | None = None
        ) -> tuple[TinyMTL, SymmetryTeleportCallback]:
    torch.manual_seed(0)
    model = TinyMTL(k=K, method=build_aggregator(name, **method_kw(name)))
    # bf16 rounds each loss to ~1e-3 relative, and a rescaled network rounds differently: the exact
    # rescaling's default acceptance bound (1e-4, float32 rounding) would reject every move here
    tele = SymmetryTeleportCallback(teleporter={"name": "rescale", "loss_tolerance": 1e-2}, transfer="transport",
                                    schedule={"every": 2, "on_trigger": False, "max_per_epoch": None})
    fit = trainer(max_epochs=epochs, callbacks=[tele], precision="bf16-mixed", accumulate_grad_batches=2,
                  default_root_dir=tmp_path)
    L.seed_everything(0)
    fit.fit(model, loader(regression_data(k=K)), ckpt_path=ckpt)  # a fixed order: the resumed epoch sees the same batches
    if save is not None:
        fit.save_checkpoint(save)
    return model, tele


@pytest.mark.parametrize("name", REGISTERED)
def test_teleport_bf16_accumulation_and_resume(name: str, tmp_path: Path) -> None:
    whole, tele = run(name, 2, tmp_path / "whole")
    assert whole.global_step == 2 * STEPS_PER_EPOCH
    assert len(tele.history) == STEPS_PER_EPOCH  # every second step forced: 1, 3, 5, 7
    assert any(r.accepted for r in tele.history), [r.reason for r in tele.history]
    assert all(torch.isfinite(p).all() for p in whole.parameters())
    ckpt = tmp_path / "epoch1.ckpt"
    run(name, 1, tmp_path / "first", save=ckpt)
    resumed, tele2 = run(name, 2, tmp_path / "second", ckpt=ckpt)
    assert [r.step for r in tele2.history] == [r.step for r in tele.history]
    for (pname, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert same(a, b), f"{name}: {pname} differs after resume"


def same(a: object, b: object) -> bool:
    """Bit-identical state: tensors by ``torch.equal``, containers entry by entry, the rest by ``==``."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.mark.ddp
def test_every_method_keeps_ddp_ranks_identical(tmp_path: Path) -> None:
    script = Path(__file__).parent / "scripts" / "ddp_methods.py"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                          timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=False) for i in range(2))
    assert sorted(r0) == sorted(REGISTERED)
    for name in REGISTERED:
        assert not torch.equal(r0[name]["first_batch"], r1[name]["first_batch"])  # each rank its own samples
        assert r0[name]["steps"] == r1[name]["steps"] > 0
        for a, b in zip(r0[name]["params"], r1[name]["params"], strict=True):
            assert torch.equal(a, b), name
