"""Would COST act on my model? The read-only ConflictMonitor in an ordinary training run."""

import lightning as L
from quickstart import Net, tasks_that_pull_apart

from lightning_cost import ConflictMonitor

if __name__ == "__main__":
    L.seed_everything(0)
    monitor = ConflictMonitor(every_n_steps=10, plot_path="conflict_monitor.png")
    trainer = L.Trainer(max_epochs=2, callbacks=[monitor], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False)
    trainer.fit(Net(), tasks_that_pull_apart())
    summary = monitor.summary()  # the share of monitored steps on which each trigger rule would teleport
    print({k: v for k, v in summary.items() if k != "min_cos"})
    print("smallest cos(g_i, g0) per task:", {k: round(v, 3) for k, v in summary["min_cos"].items()})
