"""Train every registered method for a few steps in one 2-process CPU DDP run (gloo), each rank on its
own samples, with forced exact rescalings; save each rank's final weights per method. Used by
``tests/test_methods_plug_and_play.py``.

usage: python ddp_methods.py OUT_DIR
"""

import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from mtl_models import TinyMTL, loader, regression_data, trainer  # noqa: E402

from lightning_cost import SymmetryTeleportCallback  # noqa: E402
from lightning_cost.aggregators import REGISTERED, build_aggregator  # noqa: E402

warnings.filterwarnings("ignore")
K = 3


class FirstBatch(L.Callback):
    def __init__(self):
        self.batch = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.batch is None:
            self.batch = batch[0].clone()


def main():
    out, results, rank = Path(sys.argv[1]), {}, 0
    for name in REGISTERED:
        L.seed_everything(0)
        net = TinyMTL(k=K, method=build_aggregator(name, **({"num_tasks": K} if name in ("uw", "imtll") else {})))
        tele = SymmetryTeleportCallback(teleporter="rescale", transfer="transport",
                                        schedule={"every": 2, "on_trigger": False, "max_per_epoch": None})
        first = FirstBatch()
        fit = trainer(max_steps=4, callbacks=[tele, first], strategy="ddp", devices=2, accumulate_grad_batches=2)
        fit.fit(net, loader(regression_data(k=K), batch_size=16, shuffle=True))
        rank = fit.global_rank
        results[name] = {"params": [p.detach().clone() for p in net.parameters()], "steps": fit.global_step,
                         "first_batch": first.batch}
    torch.save(results, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
