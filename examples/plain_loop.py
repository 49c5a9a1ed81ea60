"""A plain PyTorch loop: lightning_cost.backward in place of loss.backward(), and COST's teleport."""

import torch
import torch.nn.functional as F
from quickstart import tasks_that_pull_apart
from torch import nn

import lightning_cost
from lightning_cost.aggregators import build_aggregator


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        self.heads = nn.ModuleList([nn.Linear(64, 1), nn.Linear(64, 1)])

    def forward(self, batch):  # the K task losses (under Fabric or DDP, call the wrapped model: model(batch))
        x, y = batch
        z = self.trunk(x)
        return [F.mse_loss(head(z).squeeze(-1), y[:, i]) for i, head in enumerate(self.heads)]


if __name__ == "__main__":
    torch.manual_seed(0)
    model = TwoHeads()
    method = build_aggregator("upgrad")  # build once: stateful methods keep their state across steps
    optimizer = torch.optim.Adam([*model.parameters(), *method.parameters()], lr=1e-3)
    teleport = lightning_cost.Teleport("rescale")  # the exact rescaling; its optimizer state is transported
    batches = (batch for epoch in range(2) for batch in tasks_that_pull_apart(seed=epoch))
    for step, batch in enumerate(batches):
        optimizer.zero_grad()
        record = lightning_cost.backward(model(batch), shared=model.trunk.parameters(), method=method)
        if step % 32 == 16:  # a fixed schedule; a loop may decide from record.jacobian instead
            if teleport(model, model, [batch], optimizer, shared=model.trunk, step=step).applied:
                continue  # this step's gradient belongs to the old point: no optimizer.step()
        teleport.before_step(optimizer)  # applies a pending HTR share (transfer="htr"); a no-op here
        optimizer.step()  # a skipped step (non-finite values) left every .grad at None: nothing moves
    print(f"last step's task losses {[round(v, 3) for v in record.losses.tolist()]}")
    for r in teleport.history:
        print(f"teleport at step {r.step}: loss drift {r.loss_drift:.1e}, "
              f"min cos(g_i, g0) {r.before.min_cos:+.3f} -> {r.after.min_cos:+.3f}")
