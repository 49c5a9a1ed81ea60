"""A forced teleport on rank-heterogeneous data, on 2 DDP processes or on one device; used by the tests.

usage: python ddp_teleport.py OUT_DIR DEVICES MODE
  DEVICES: 2 (DDP over gloo, batch B per rank) or 1 (one device, batch 2B: the union of the ranks' batches)
  MODE: compare  one teleport at step 0 (B = 16), then stop: the weights it left
        lt_only  the same with L_t alone (eq. 7): no displacement when the objective is the global one
        rescale  one exact rescaling teleport at step 0 (B = 16): every rank saves its weights
        accept   defaults, B = 8, teleports at steps 1, 3, 5 (all must be accepted) and one at step 7 with a
                 zero tolerance (rejected: its warning must be printed once, not once per rank)
"""

import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from mtl_models import TinyMTL, regression_data, trainer  # noqa: E402
from torch.utils.data import DataLoader, Sampler, TensorDataset  # noqa: E402

from lightning_cost import SymmetryTeleportCallback  # noqa: E402

warnings.filterwarnings("ignore")
warnings.filterwarnings("always", message=".*teleport rejected.*")


def heterogeneous(n: int = 256) -> TensorDataset:
    """Odd samples (rank 1 under DDP's sampler) come from a shifted input and a 5x larger target scale."""
    x, y = regression_data(n=n, k=3).tensors
    odd = torch.arange(n) % 2 == 1
    x, y = x.clone(), y.clone()
    x[odd] += 1.5
    y[odd] *= 5.0
    return TensorDataset(x, y)


class RankSamples(Sampler):
    """Rank r of W takes samples r, r + W, ... in order (one device: all of them in order)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        return iter(range(rank, self.n, world))

    def __len__(self) -> int:
        world = dist.get_world_size() if dist.is_initialized() else 1
        return self.n // world


class Force(L.Callback):
    def __init__(self, tele, steps):
        self.tele, self.steps = tele, set(steps)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step in self.steps:
            self.tele.request_teleport()


class Strict(L.Callback):
    """From ``step`` on, the acceptance test tolerates no drift at all."""

    def __init__(self, tele, step):
        self.tele, self.step = tele, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            self.tele.teleporter.loss_tolerance = self.tele.teleporter.abs_tolerance = 0.0


class Save(L.Callback):
    def __init__(self, out, tele):
        self.out, self.tele = Path(out), tele

    def on_train_end(self, trainer, pl_module):
        state = {"shared": [p.detach().clone() for p in pl_module.shared_parameters()],
                 "history": [r.to_dict() for r in self.tele.history]}
        if trainer.global_rank == 0:
            torch.save(state, self.out / f"devices{trainer.world_size}.pt")
        torch.save(state, self.out / f"devices{trainer.world_size}_rank{trainer.global_rank}.pt")


def main():
    out, devices, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    L.seed_everything(0)
    net = TinyMTL(k=3, batchnorm=False)
    per_rank = 8 if mode == "accept" else 16
    teleporter = {"use_lg": False} if mode == "lt_only" else ("rescale" if mode == "rescale" else {})
    tele = SymmetryTeleportCallback(teleporter=teleporter, schedule={"max_per_epoch": None})
    steps, max_steps = ((1, 3, 5, 7), 8) if mode == "accept" else ((0,), 1)
    kw = {"strategy": "ddp"} if devices == 2 else {}
    callbacks = [Force(tele, steps), Strict(tele, 7), tele, Save(out, tele)]
    fit = trainer(max_steps=max_steps, devices=devices, callbacks=callbacks,
                  use_distributed_sampler=False, **kw)
    data = heterogeneous()
    fit.fit(net, DataLoader(data, batch_size=per_rank * (2 // devices), sampler=RankSamples(len(data))))


if __name__ == "__main__":
    main()
