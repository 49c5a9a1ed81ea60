"""What one teleport does, measured from outside the callback, with a random move of the same size as control.

    python -m benchmarks.teleport.effect --models mlp3 lenet fpmlp resnet18 --teleports 10 \\
        --out docs/results/teleport_effect

For each model: train to a mid-training checkpoint (cached in ``OUT/checkpoints``), then, on
``--teleports`` different training batches, run one forced teleport of each ``--teleporters`` variant
through :class:`~lightning_cost.SymmetryTeleportCallback` in a ``Trainer``, and measure, with plain
autograd on the same batch before and after (dropout off, BatchNorm on batch statistics): the largest
relative task-loss drift, ``||dtheta|| / ||theta||``, the mean-gradient norm ratio
``||g_0'|| / ||g_0||``, the change of the smallest ``cos(g_i, g_0)`` and the count of tasks with
``cos < 0``. The control moves the same weights by a random direction of the same norm. Writes
``effect.json``, ``effect.md`` (medians per model and variant) and ``effect.png``.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.common import quiet, quiet_trainer
from lightning_cost import MultiTaskMixin, SymmetryTeleportCallback
from lightning_cost.teleport import (
    DROPOUT_LAYERS,
    LoRAConfig,
    LoRATeleporter,
    Teleporter,
    build_teleporter,
    keep_buffers,
)

VARIANTS: dict[str, Callable[[], Any]] = {
    "lora-paper": lambda: LoRATeleporter(LoRAConfig.paper()),
    "lora": lambda: build_teleporter("lora"),
    "rescale-conflict": lambda: build_teleporter("rescale", objective="conflict"),
    "rescale-grad_norm": lambda: build_teleporter("rescale", objective="grad_norm"),
}


# ----------------------------------------------------------------------------- models at mid-training


class ReluMLP3(MultiTaskMixin, L.LightningModule):
    """A 3-task ReLU MLP (two hidden layers of 8) on regression targets that pull its trunk apart."""

    def __init__(self, d: int = 16, hidden: int = 8, k: int = 3) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.heads = nn.ModuleList([nn.Linear(hidden, 1) for _ in range(k)])
        self.configure_multitask([f"t{i}" for i in range(k)], shared=self.trunk, method="ls")

    def compute_task_losses(self, batch: Any) -> dict[str, Tensor]:
        x, y = batch
        z = self.trunk(x)
        return {f"t{i}": F.mse_loss(h(z).squeeze(-1), y[:, i]) for i, h in enumerate(self.heads)}

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return self.compute_task_losses(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def conflicting_regression(n: int = 2048, d: int = 16, k: int = 3, seed: int = 0) -> torch.utils.data.TensorDataset:
    """Targets ``relu(x w_i) - x w_i / 2`` with ``w_i = +-base + noise``: odd tasks pull against even ones."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    base = torch.randn(d, generator=g)
    ys = []
    for i in range(k):
        w = (-1.0 if i % 2 else 1.0) * base + 0.4 * torch.randn(d, generator=g)
        ys.append(torch.relu(x @ w) - 0.5 * (x @ w) + 0.1 * torch.randn(n, generator=g))
    return torch.utils.data.TensorDataset(x, torch.stack(ys, dim=1))


def _loader(ds: Any, batch_size: int, seed: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True,
                                       generator=torch.Generator().manual_seed(seed))


#: multi-label data sets whose benchmark MLP can be measured
MULTILABEL = ("yeast", "birds")
MODELS = ("mlp3", "lenet", "fpmlp", "resnet18", *MULTILABEL)


def build(name: str, data_root: str | None) -> tuple[L.LightningModule, torch.utils.data.DataLoader, int]:
    """``(module, training loader, steps to the mid-training checkpoint)``."""
    if name == "mlp3":
        torch.manual_seed(0)  # its initialisation (the benchmark models seed theirs)
        return ReluMLP3(), _loader(conflicting_regression(), 64, 0), 200
    from benchmarks import make_datamodule, make_model
    from benchmarks.models import MultiTaskNet, make_heads
    from benchmarks.models.modules import MTLBenchModule

    kw = {} if data_root is None else {"path": str(Path(data_root) / ("mnist.npz" if name != "fpmlp" else
                                                                       "molecules/tox21.csv.gz"))}
    if name in ("lenet", "resnet18"):
        dm = make_datamodule("multimnist", num_train=20000, num_val=1000, batch_size=256 if name == "lenet" else 64,
                             **kw)
        dm.setup()
        if name == "lenet":
            net = make_model(dm)
        else:
            from torchvision.models import resnet18

            trunk = resnet18(num_classes=10)
            trunk.conv1 = nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1, bias=False)
            trunk.fc = nn.Identity()
            net = MultiTaskNet(trunk, make_heads(dm.task_specs, 512))
        return MTLBenchModule(net, dm.task_specs, lr=1e-3), dm.train_dataloader(), 80 if name == "lenet" else 150
    if name == "fpmlp":
        dm = make_datamodule("tox21", batch_size=128, **kw)
        dm.setup()
        return MTLBenchModule(make_model(dm), dm.task_specs, lr=1e-3), dm.train_dataloader(), 150
    if name in MULTILABEL:  # the verdict's multi-label MLPs: no teleporter setting was chosen on them
        dm = make_datamodule(name, **({} if data_root is None else
                                      {"path": str(Path(data_root) / "multilabel" / f"{name}.npz")}))
        dm.setup()
        return MTLBenchModule(make_model(dm), dm.task_specs, lr=1e-3), dm.train_dataloader(), 100
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def checkpoint(name: str, out: Path, data_root: str | None) -> tuple[L.LightningModule, list[Any]]:
    """The model trained to mid-training (cached) and the training batches that follow."""
    module, loader, steps = build(name, data_root)
    path = out / "checkpoints" / f"{name}.pt"
    if path.exists():
        module.load_state_dict(torch.load(path, weights_only=True))
    else:
        L.seed_everything(0, verbose=False)
        with quiet(everything=True):
            quiet_trainer(max_steps=steps).fit(module, loader)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(module.state_dict(), path)
    batches: list[Any] = []
    while len(batches) < 32:  # the batches after the checkpoint (fresh passes; the loader's own seed)
        batches += list(itertools.islice(loader, 32 - len(batches)))
    return module, batches


def plain_stats(module: Any, batch: Any) -> dict[str, Any]:
    """Task losses and per-task gradients of the trained shared parameters by plain autograd."""
    params = [p for p in module.shared_parameters() if p.requires_grad]
    dropouts = [m for m in module.modules() if isinstance(m, DROPOUT_LAYERS) and m.training]
    for m in dropouts:
        m.eval()
    try:
        with torch.enable_grad(), keep_buffers(module):
            losses = module.evaluate_task_losses(batch)
            rows = [torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(
                torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True), params, strict=True)])
                for i in range(losses.shape[0])]
    finally:
        for m in dropouts:
            m.train()
    j = torch.stack(rows).double()
    g0 = j.mean(dim=0)
    norms = j.norm(dim=1)
    cos = torch.where(norms > 0, (j @ g0) / (norms * g0.norm()).clamp_min(1e-300), torch.full_like(norms, math.nan))
    alive = cos[~torch.isnan(cos)]
    return {"losses": losses.detach().double(), "mean_norm": float(g0.norm()),
            "min_cos": float(alive.min()) if alive.numel() else math.nan, "conflicts": int((alive < 0).sum())}


def compare(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    drift = ((after["losses"] - before["losses"]).abs() / before["losses"].abs().clamp_min(1e-12)).max()
    return {"loss_drift": float(drift), "grad_norm_ratio": after["mean_norm"] / max(before["mean_norm"], 1e-300),
            "min_cos_change": after["min_cos"] - before["min_cos"], "conflicts_before": before["conflicts"],
            "conflicts_after": after["conflicts"]}


class _Capture(L.Callback):
    """Placed after the teleport callback: the shared weights the teleport left at step 0."""

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: Any, optimizer: Any) -> None:
        self.weights = [p.detach().clone() for p in pl_module.shared_parameters()]


def one_teleport(base: Any, work: Any, batch: Any, variant: str, teleporter: Teleporter, seed: int
                 ) -> dict[str, Any]:
    """Run one forced teleport of ``teleporter`` on ``batch`` from ``base``'s weights (loaded into ``work``,
    the same module every time, so that a teleporter's traced symmetry is reused as in training);
    measure it and its control."""
    module = work
    module.load_state_dict(base.state_dict())
    tele = SymmetryTeleportCallback(teleporter=teleporter, schedule={"max_per_epoch": None, "every": 1}, seed=seed)
    capture = _Capture()
    start = time.perf_counter()
    with quiet(everything=True):
        loader = torch.utils.data.DataLoader([batch], batch_size=None)
        quiet_trainer([tele, capture], max_steps=1).fit(module, loader)
    seconds = time.perf_counter() - start
    rec = tele.history[0]
    out = {"variant": variant, "accepted": rec.accepted, "moved": rec.moved, "reason": rec.reason,
           "seconds": seconds, "teleport_seconds": rec.seconds}
    if not rec.moved:
        return out
    start = time.perf_counter()
    before = plain_stats(base, batch)
    out["jacobian_seconds"] = time.perf_counter() - start  # one per-task Jacobian on the batch, for scale
    moved = copy.deepcopy(base)
    _set_shared(moved, capture.weights)
    out.update(compare(before, plain_stats(moved, batch)))
    delta = [a - b.detach() for a, b in zip(capture.weights, base.shared_parameters(), strict=True)]
    size = math.sqrt(sum(float((d.double() ** 2).sum()) for d in delta))
    theta = math.sqrt(sum(float((p.detach().double() ** 2).sum()) for p in base.shared_parameters()))
    out["displacement_rel"] = size / theta
    g = torch.Generator().manual_seed(seed)
    noise = [torch.randn(d.shape, generator=g, dtype=torch.float64) for d in delta]
    scale = size / math.sqrt(sum(float((n ** 2).sum()) for n in noise))
    control = copy.deepcopy(base)
    _set_shared(control, [p.detach() + (n * scale).to(p.dtype) for p, n in zip(base.shared_parameters(), noise,
                                                                               strict=True)])
    out["control"] = compare(before, plain_stats(control, batch))
    symmetry = getattr(teleporter, "found", None)
    if symmetry is not None:  # a random teleport along the same symmetries, scales uniform in the same box
        bound = math.log(teleporter.config.max_scale)
        module.load_state_dict(base.state_dict())
        s = (torch.rand(symmetry.num_scales, generator=g, dtype=torch.float64) * 2 - 1) * bound
        symmetry.apply_(s.float())
        out["control_symmetry"] = compare(before, plain_stats(module, batch))
    return out


@torch.no_grad()
def _set_shared(module: Any, weights: Sequence[Tensor]) -> None:
    for p, w in zip(module.shared_parameters(), weights, strict=True):
        p.copy_(w)


# ----------------------------------------------------------------------------- summary


def _median(rows: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in rows if key in r and r[key] is not None and not math.isnan(r[key])]
    return statistics.median(values) if values else math.nan


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    table = []
    for model in dict.fromkeys(r["model"] for r in results):
        for variant in dict.fromkeys(r["variant"] for r in results if r["model"] == model):
            rows = [r for r in results if r["model"] == model and r["variant"] == variant]
            moved = [r for r in rows if r.get("moved")]
            controls = [r["control"] for r in moved]
            random_symmetry = [r["control_symmetry"] for r in moved if "control_symmetry" in r]
            table.append({
                "model": model, "variant": variant, "teleports": len(rows),
                "accepted": sum(r["accepted"] for r in rows), "moved": len(moved),
                **{k: _median(moved, k) for k in ("loss_drift", "displacement_rel", "grad_norm_ratio",
                                                  "min_cos_change", "teleport_seconds", "jacobian_seconds")},
                "conflicts_before": _median(moved, "conflicts_before"), "conflicts_after": _median(moved, "conflicts_after"),
                "control_loss_drift": _median(controls, "loss_drift"),
                "control_grad_norm_ratio": _median(controls, "grad_norm_ratio"),
                "control_min_cos_change": _median(controls, "min_cos_change"),
                **({"symmetry_control_grad_norm_ratio": _median(random_symmetry, "grad_norm_ratio"),
                    "symmetry_control_min_cos_change": _median(random_symmetry, "min_cos_change"),
                    "symmetry_control_loss_drift": _median(random_symmetry, "loss_drift")} if random_symmetry else {}),
            })
    return table


def write_table(table: list[dict[str, Any]], path: Path, commands: Sequence[str]) -> str:
    head = ["model", "teleporter", "accepted/moved/n", "loss drift", "‖dθ‖/‖θ‖", "‖g0‖ ratio", "Δ min cos",
            "conflicts before→after", "s/teleport (× Jacobian)", "control: drift", "control: ‖g0‖ ratio", "control: Δ min cos",
            "random rescaling: ‖g0‖ ratio", "random rescaling: Δ min cos"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        lines.append("| " + " | ".join([
            r["model"], r["variant"], f"{r['accepted']}/{r['moved']}/{r['teleports']}", f"{r['loss_drift']:.2e}",
            f"{r['displacement_rel']:.2e}", f"{r['grad_norm_ratio']:.3f}", f"{r['min_cos_change']:+.3f}",
            f"{r['conflicts_before']:.1f}→{r['conflicts_after']:.1f}",
            f"{r['teleport_seconds']:.2f} (×{r['teleport_seconds'] / r['jacobian_seconds']:.1f})",
            f"{r['control_loss_drift']:.2e}", f"{r['control_grad_norm_ratio']:.3f}",
            f"{r['control_min_cos_change']:+.3f}",
            f"{r['symmetry_control_grad_norm_ratio']:.3f}" if "symmetry_control_grad_norm_ratio" in r else "",
            f"{r['symmetry_control_min_cos_change']:+.3f}" if "symmetry_control_min_cos_change" in r else ""]) + " |")
    text = ("Medians over the teleports that moved, measured by plain autograd on the teleport's batch before and "
            "after; the control is a random move of the same norm; for the rescaling teleports also a random "
            "rescaling in the same box.\n\n" + "".join(f"`{c}`\n" for c in commands)
            + "\n" + "\n".join(lines) + "\n")
    path.write_text(text)
    return text


FLOOR = 1e-8  #: where a drift of exactly 0 is drawn on the log axis


def plot(results: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.figure import Figure

    models = list(dict.fromkeys(r["model"] for r in results))
    fig = Figure(figsize=(4.2 * len(models), 3.6))
    for ax, model in zip(fig.subplots(1, len(models), squeeze=False)[0], models, strict=True):
        for variant in dict.fromkeys(r["variant"] for r in results if r["model"] == model):
            rows = [r for r in results if r["model"] == model and r["variant"] == variant and r.get("moved")]
            ax.scatter([max(r["loss_drift"], FLOOR) for r in rows], [r["grad_norm_ratio"] for r in rows], s=14,
                       label=variant)
        ctrl = [r["control"] for r in results if r["model"] == model and r.get("moved")]
        ax.scatter([c["loss_drift"] for c in ctrl], [c["grad_norm_ratio"] for c in ctrl], s=10, marker="x",
                   color="grey", label="random move (control)")
        sym = [r["control_symmetry"] for r in results if r["model"] == model and r.get("moved")
               and "control_symmetry" in r]
        if sym:
            ax.scatter([max(c["loss_drift"], FLOOR) for c in sym], [c["grad_norm_ratio"] for c in sym], s=14,
                       marker="+", color="black", label="random rescaling (control)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.axhline(1.0, color="k", lw=0.5)
        ax.set_title(model)
        ax.set_xlabel(f"largest relative loss drift (0 drawn at {FLOOR:g})")
        ax.set_ylabel("‖g0‖ after / before")
    fig.axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def merge_previous(path: Path, results: list[dict[str, Any]], command: str
                   ) -> tuple[list[dict[str, Any]], list[str]]:
    """Keep the rows of ``path`` for (model, teleporter) pairs this run did not measure, and the
    commands that made them, so a table can be completed one model or teleporter at a time."""
    old = json.loads(path.read_text()) if path.exists() else {}
    measured = {(r["model"], r["variant"]) for r in results}
    kept = [r for r in old.get("results", []) if (r["model"], r["variant"]) not in measured]
    pairs = {(r["model"], r["variant"]) for r in kept}
    commands = [c for c in old.get("commands", []) if c != command] if pairs else []
    return kept + results, [*commands, command]


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.teleport.effect", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["mlp3"], choices=list(MODELS))
    p.add_argument("--teleporters", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--teleports", type=int, default=10, help="teleports (batches) per model and variant")
    p.add_argument("--data-root", default=None, help="default: ../shared/data or $LIGHTNING_COST_DATA")
    p.add_argument("--out", type=Path, default=Path("results/teleport_effect"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for model in args.models:
        base, batches = checkpoint(model, args.out, args.data_root)
        work = copy.deepcopy(base)
        for variant in args.teleporters:
            teleporter = VARIANTS[variant]()
            for i in range(args.teleports):
                row = {"model": model, **one_teleport(base, work, batches[i], variant, teleporter, seed=i)}
                results.append(row)
                print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                                  if k != "control"}), flush=True)
    results, commands = merge_previous(args.out / "effect.json", results,
                                       "python -m benchmarks.teleport.effect " + " ".join(argv or []))
    table = summarize(results)
    (args.out / "effect.json").write_text(json.dumps({"commands": commands, "results": results, "summary": table},
                                                     indent=1))
    print(write_table(table, args.out / "effect.md", commands))
    plot(results, args.out / "effect.png")
    return table


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
