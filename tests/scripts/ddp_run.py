"""Run a 2-process CPU DDP fit (gloo) and save each rank's final state; used by the tests.

usage: python ddp_run.py OUT_DIR MODE   (MODE: core | gramian | teleport | representation | skipwarn)
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
from lightning_cost.aggregators import GramianAggregator  # noqa: E402
from lightning_cost.teleport import ConflictTrigger, TriggerResult  # noqa: E402

warnings.filterwarnings("ignore")


class NormalizedMean(GramianAggregator):
    """Mean of unit task gradients: non-linear in J, so local vs global aggregation differ."""

    def weights(self, gramian):
        return 1.0 / gramian.diagonal().clamp_min(1e-30).sqrt() / gramian.shape[0]


class LowCosine(ConflictTrigger):
    """Fires when some cos(g_i, g_0) < 0.5: this data never conflicts, but the cosines (0.37-0.79 here)
    cross 0.5 on some steps only, so ranks deciding on their local Gram would disagree."""

    def __init__(self, decisions):
        super().__init__(on="representation")
        self.decisions = decisions

    def from_gram(self, gram):
        result = super().from_gram(gram)
        self.decisions.append((gram.clone(), bool(result.fire)))
        return result

    def decide(self, cos):
        n = int((cos < 0.5).sum())
        return TriggerResult(fire=n >= 1, num_conflicting=n, cosines=cos)


class Net(TinyMTL):
    nan_at_step = -1

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        if self.global_step == self.nan_at_step and self.global_rank == 1:
            out["t0"] = out["t0"] * float("nan")
        return out


class Save(L.Callback):
    def __init__(self, out, tele=None):
        self.out, self.tele, self.jacobians, self.gramians = out, tele, [], []

    def on_after_backward(self, trainer, pl_module):
        if pl_module.mtl_step is not None and pl_module.mtl_step.jacobian is not None:
            self.jacobians.append(pl_module.mtl_step.jacobian.clone())
        if pl_module.mtl_step is not None and pl_module.mtl_step.gramian is not None:
            self.gramians.append(pl_module.mtl_step.gramian.clone())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.tele is not None and self.tele.trigger.on == "parameters" and trainer.global_step == 3:
            self.tele.request_teleport()

    def on_train_end(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        state = [v.clone() for p in pl_module.parameters() for v in opt.state.get(p, {}).values() if torch.is_tensor(v)]
        torch.save({
            "params": [p.detach().clone() for p in pl_module.parameters()],
            "buffers": [b.clone() for b in pl_module.buffers()],
            "opt_state": state,
            "jacobians": self.jacobians,
            "gramians": self.gramians,
            "skipped": pl_module.mtl_skipped_steps,
            "history": [r.to_dict() for r in self.tele.history] if self.tele is not None else None,
            "decisions": getattr(self.tele, "decisions", None),
            "local_rep_jacobian": pl_module.mtl_step.representation_jacobian,
        }, Path(self.out) / f"rank{trainer.global_rank}.pt")


def main():
    out, mode = sys.argv[1], sys.argv[2]
    L.seed_everything(0)
    engine = {"engine": "gramian", "gramian": {"path": "gram"}} if mode == "gramian" else {}
    net = Net(k=3, method="ls" if mode == "representation" else NormalizedMean(), **engine)
    tele = None
    callbacks = []
    if mode == "teleport":
        tele = SymmetryTeleportCallback(teleporter={"inner_steps": 3, "num_perturbations": 2},
                                        schedule={"max_per_epoch": None})
        callbacks.append(tele)
    elif mode == "representation":  # the trigger on each rank's own samples; it must decide the same everywhere
        tele = SymmetryTeleportCallback(trigger={"on": "representation"},
                                        teleporter={"inner_steps": 2, "num_perturbations": 2, "loss_tolerance": 1.0},
                                        schedule={"max_per_epoch": None, "min_steps_between": 2})
        tele.decisions = []
        tele.trigger = LowCosine(tele.decisions)
        callbacks.append(tele)
    elif mode != "gramian":  # core; skipwarn: the same NaN on rank 1 makes both ranks skip step 2, and only rank 0 may warn
        net.nan_at_step = 2
    callbacks.append(Save(out, tele))
    fit = trainer(max_steps=10 if mode == "representation" else 4 if mode == "skipwarn" else 6, callbacks=callbacks,
                  strategy="ddp", devices=2, accumulate_grad_batches=2 if mode == "core" else 1)
    fit.fit(net, loader(regression_data(k=3), batch_size=16, shuffle=True))


if __name__ == "__main__":
    main()
