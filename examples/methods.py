"""The aggregators outside Lightning: each maps the K x P Jacobian of the task gradients to one update."""

import torch

from lightning_cost.aggregators import REGISTERED, build_aggregator

torch.manual_seed(0)
J = torch.tensor([[1.0, 0.2, 0.0], [-0.8, 1.0, 0.1], [0.1, -0.3, 1.0]])  # 3 tasks, 3 shared weights

for name in ("mgda", "pcgrad", "cagrad", "fairgrad", "upgrad", "config"):
    d = build_aggregator(name).aggregate(J)
    # how much each task's loss decreases to first order along d: J d
    print(f"{name:9s} d = {[round(v, 3) for v in d.tolist()]}  J d = {[round(v, 3) for v in (J @ d).tolist()]}")

print(len(REGISTERED), "methods:", ", ".join(REGISTERED))
