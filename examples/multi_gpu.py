"""The same model and callback on 2 processes in bf16: only the Trainer's arguments change."""

import lightning as L
from quickstart import Net, tasks_that_pull_apart

from lightning_cost import SymmetryTeleportCallback

if __name__ == "__main__":
    L.seed_everything(0)
    # one attempt every 8 steps after the first epoch, whatever the trigger says; the level-set check
    # follows bf16's rounding by itself (loss_tolerance="auto")
    cost = SymmetryTeleportCallback(teleporter="rescale",
                                    schedule={"warmup_epochs": 1, "every": 8, "on_trigger": False})
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp",  # on GPUs: accelerator="gpu", devices=N
                        precision="bf16-mixed", max_epochs=2, callbacks=[cost], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(Net(), tasks_that_pull_apart())
    if trainer.is_global_zero:
        print("teleports:", cost.num_teleports, "rejected:", cost.num_rejected)
        for r in cost.history[:3]:
            print(f"step {r.step}: accepted {r.accepted}, loss drift {r.loss_drift:.1e} "
                  f"(tolerance {r.loss_tolerance:.1e})")
