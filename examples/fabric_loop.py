"""The same loop under Lightning Fabric (with devices=2, strategy="ddp" each rank gets the global update)."""

import torch
from lightning.fabric import Fabric
from plain_loop import TwoHeads
from quickstart import tasks_that_pull_apart

import lightning_cost
from lightning_cost.aggregators import build_aggregator

if __name__ == "__main__":
    fabric = Fabric(accelerator="cpu", devices=1)  # e.g. Fabric(accelerator="gpu", devices=2, strategy="ddp")
    fabric.launch()
    fabric.seed_everything(0)
    model = TwoHeads()
    method = build_aggregator("mgda")
    model, optimizer = fabric.setup(model, torch.optim.Adam(model.parameters(), lr=1e-3))
    loader = fabric.setup_dataloaders(tasks_that_pull_apart())
    for batch in loader:
        optimizer.zero_grad()
        # model(batch) runs the wrapped forward, so under DDP the reducer averages .grad over ranks
        record = lightning_cost.backward(model(batch), shared=model.trunk.parameters(), method=method)
        optimizer.step()
    fabric.print("last step's task losses:", [round(v, 3) for v in record.losses.tolist()])
