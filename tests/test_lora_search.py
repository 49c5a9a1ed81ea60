"""The LoRA teleporter's gain search (``LoRAConfig.min_gain``), measured from outside with plain autograd."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from mtl_models import TinyMTL
from teleport_helpers import Force, cost, fit

from lightning_cost.teleport import LoRAConfig


class Capture(L.Callback):
    """Put before the teleport callback: the batch and the weights at ``step``; after it (``after=True``): the
    weights the teleport left."""

    def __init__(self, step: int, after: bool = False):
        self.step, self.after = step, after

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            self.batch = [t.clone() for t in batch]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.step:
            self.state = copy.deepcopy(pl_module.state_dict())


def weighted_norm(model: TinyMTL, state: dict, batch, ratios: torch.Tensor | None = None):
    """``||grad (1/K) sum_i R_i L_i||`` over the trunk at ``state`` (``R`` from eq. 10 at ``state`` unless
    given), the task losses and ``R``: plain autograd, none of the library's teleport code."""
    m = copy.deepcopy(model)
    m.load_state_dict(state)
    x, y = batch
    z = m.trunk(x)
    losses = torch.stack([torch.nn.functional.mse_loss(h(z).squeeze(-1), y[:, i]) for i, h in enumerate(m.heads)])
    trunk = list(m.trunk.parameters())
    if ratios is None:
        norms = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(li, trunk, retain_graph=True)]).norm()
                             for li in losses]).double()
        ratios = len(losses) * torch.softmax(norms.sum() / norms, 0)
    grads = torch.autograd.grad((ratios.float() * losses).mean(), trunk)
    return float(torch.cat([g.flatten() for g in grads]).norm()), losses.detach(), ratios


def test_the_search_reaches_its_gain_on_the_level_set():
    L.seed_everything(0)
    model = TinyMTL(k=3, batchnorm=False)
    tele = cost(inner_steps=10)  # the default min_gain
    before, after = Capture(3), Capture(3, after=True)
    fit(model, [Force(tele, steps=(3,)), before, tele, after], steps=5)
    rec = tele.history[0]
    assert rec.accepted and rec.moved, rec.reason
    start, l0, ratios = weighted_norm(model, before.state, before.batch)
    end, l1, _ = weighted_norm(model, after.state, before.batch, ratios)
    assert end >= (1 + LoRAConfig().min_gain) * start * (1 - 1e-4)
    assert torch.all((l1 - l0).abs() <= 0.01 * l0.abs() + 1e-6)
    # control: a random move of the trunk of the same size gains far less
    gen = torch.Generator().manual_seed(0)
    moved = copy.deepcopy(before.state)
    names = [n for n, _ in model.named_parameters() if n.startswith("trunk.")]
    noise = {n: torch.randn(moved[n].shape, generator=gen) for n in names}
    scale = rec.displacement_norm / float(torch.cat([v.flatten() for v in noise.values()]).norm())
    for n in names:
        moved[n] = moved[n] + scale * noise[n]
    random_gain = weighted_norm(model, moved, before.batch, ratios)[0] / start - 1
    assert abs(random_gain) < end / start - 1


def test_an_unreachable_gain_is_rejected_with_the_best_try_named():
    L.seed_everything(0)
    model = TinyMTL(k=3, batchnorm=False)
    tele = cost(inner_steps=2, min_gain=10.0, max_tries=2)
    with pytest.warns(UserWarning, match=r"rejected.*1000%.*best .* 2 tries"):
        fit(model, [Force(tele, steps=(3,)), tele], steps=5)
    assert not tele.history[0].accepted and tele.num_teleports == 0


@pytest.mark.parametrize("kw,match", [({"min_gain": 0.0}, "min_gain"), ({"min_gain": -1.0}, "min_gain"),
                                      ({"max_tries": 0}, "max_tries"), ({"gamma_growth": 0.5}, "gamma_growth"),
                                      ({"gamma_growth": 1.0, "max_tries": 3}, "gamma_growth")])
def test_search_settings_are_validated(kw, match):
    with pytest.raises(ValueError, match=match):
        LoRAConfig(**kw)


def test_paper_settings_take_one_inner_loop():
    assert LoRAConfig.paper().min_gain is None
    assert LoRAConfig(gamma_growth=1.0, max_tries=1).max_tries == 1
