"""Five UPGrad steps under 2-process CPU DDP (gloo), each rank on its own samples, by one of two routes;
each rank saves its final weights. Used by tests/test_functional_backward.py.

usage: python ddp_functional.py OUT_DIR MODE   (MODE: fabric | trainer)

* ``fabric``: a plain loop under ``Fabric(strategy="ddp", devices=2)`` calling ``lightning_cost.backward``;
  rank ``r`` reads samples ``r, r + 2, r + 4, ...`` in order;
* ``trainer``: :class:`TinyMTL` (``engine="jacobian"``) under ``Trainer(strategy="ddp", devices=2)`` with
  ``use_distributed_sampler=False`` (its sampler would shuffle) and the same samples per rank.
"""

import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.fabric import Fabric  # noqa: E402
from mtl_models import TinyMTL, loader, regression_data, trainer  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

import lightning_cost  # noqa: E402

warnings.filterwarnings("ignore")
torch.set_num_threads(1)
STEPS, BATCH, LR = 5, 16, 1e-2


class Plain(nn.Module):
    """TinyMTL's layers in the same order (the same seed gives the same weights)."""

    def __init__(self, k=2, d=8, hidden=16):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(d, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                   nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(hidden, 1) for _ in range(k)])

    def forward(self, x, y):
        z = self.trunk(x)
        return [F.mse_loss(h(z).squeeze(-1), y[:, i]) for i, h in enumerate(self.heads)]


class Net(TinyMTL):
    first_local_losses = None

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        if self.first_local_losses is None:
            self.first_local_losses = torch.stack([out["t0"], out["t1"]]).detach().clone()
        return out

    def train_dataloader(self):
        return loader(rank_samples(self.global_rank), batch_size=BATCH)


def rank_samples(rank):
    """Samples ``rank, rank + 2, ...`` of the data, in order (each rank its own)."""
    x, y = regression_data().tensors
    return TensorDataset(x[rank::2], y[rank::2])


def fabric_run(out):
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp")
    fabric.launch()
    torch.manual_seed(0)
    model = Plain()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    ddp_model, opt = fabric.setup(model, opt)
    x_r, y_r = rank_samples(fabric.global_rank).tensors
    first = None
    for step in range(STEPS):
        x, y = x_r[step * BATCH : (step + 1) * BATCH], y_r[step * BATCH : (step + 1) * BATCH]
        opt.zero_grad()
        losses = ddp_model(x, y)
        if first is None:
            first = torch.stack(losses).detach().clone()
        lightning_cost.backward(losses, shared=model.trunk.parameters(), method="upgrad")
        opt.step()
    torch.save({"params": [p.detach().clone() for p in model.parameters()], "first_local_losses": first},
               Path(out) / f"rank{fabric.global_rank}.pt")


def trainer_run(out):
    torch.manual_seed(0)
    net = Net(method="upgrad", lr=LR, engine="jacobian")
    fit = trainer(max_steps=STEPS, strategy="ddp", devices=2, use_distributed_sampler=False)
    fit.fit(net)
    torch.save({"params": [p.detach().clone() for p in [*net.trunk.parameters(), *net.heads.parameters()]],
                "first_local_losses": net.first_local_losses}, Path(out) / f"rank{fit.global_rank}.pt")


if __name__ == "__main__":
    {"fabric": fabric_run, "trainer": trainer_run}[sys.argv[2]](sys.argv[1])
