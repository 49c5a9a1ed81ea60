"""The matched control of a teleport: the null teleporter and the reset_step transfer, measured from outside.

A tiny 2-task model trains with Adam and a teleport forced at step 2 (``every=4``). Hooks around the
callback read the weights, gradients and Adam state as plain tensors; the expected state after the next
step is computed by hand from Adam's update rule.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from mtl_models import TinyMTL
from teleport_helpers import fit

import lightning_cost.teleport
from benchmarks.runner.variants import (
    DEFAULT_COST_VARIANTS,
    build_teleport,
    cost_spec,
    deep_merge,
    matched_control,
)
from lightning_cost import SymmetryTeleportCallback
from lightning_cost.teleport import (
    NullTeleporter,
    RandomMove,
    StateTransfer,
    build_teleporter,
    reset_step_count,
)
from lightning_cost.teleport.controls import DropSteps

B1, B2, LR, EPS = 0.9, 0.999, 1e-2, 1e-8  # TinyMTL's Adam
AT = 2  # the forced teleport's step (every=4: step % 4 == 2)


class Look(L.Callback):
    """Copies of every weight, gradient and Adam state entry at each ``on_before_optimizer_step``."""

    def __init__(self):
        self.at = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.at[trainer.global_step] = {
            "w": [p.detach().clone() for p in pl_module.parameters()],
            "g": [None if p.grad is None else p.grad.detach().clone() for p in pl_module.parameters()],
            "state": [{k: v.clone() for k, v in optimizer.state[p].items()} if p in optimizer.state else {}
                      for p in pl_module.parameters()]}


def null_cost(transfer: str, every: int = 4, **kw) -> SymmetryTeleportCallback:
    return SymmetryTeleportCallback(teleporter="null", transfer=transfer,
                                    schedule={"every": every, "max_per_epoch": None, "on_trigger": False}, **kw)


def run(transfer: str, steps: int = 5, **model_kw):
    """Trains with the null teleporter; ``before`` sees each step before it, ``after`` after the callback."""
    L.seed_everything(0)
    model, before, after = TinyMTL(k=2, **model_kw), Look(), Look()
    tele = null_cost(transfer)
    fit(model, [before, tele, after], steps=steps)
    shared = [any(p is q for q in model.shared_parameters()) for p in model.parameters()]
    return model, tele, before.at, after.at, shared


def adam_expected(m, v, g, step):
    """Adam's moments after one update from ``(m, v)`` with gradient ``g``, and its update of the weight."""
    m, v = B1 * m + (1 - B1) * g, B2 * v + (1 - B2) * g * g
    update = LR / (1 - B1**step) * m / (v.sqrt() / (1 - B2**step) ** 0.5 + EPS)
    return m, v, update


@pytest.mark.parametrize("transfer", ["htr", "transport", "keep", "reset", "reset_step", "restart_if_opposed"])
def test_null_teleport_keeps_the_weights_drops_the_step_and_changes_the_state_as_its_transfer_says(transfer):
    model, tele, before, after, shared = run(transfer)
    # the weights: bit for bit the snapshot at the teleport, and the step is dropped (every weight, heads too)
    for w0, w1, w2 in zip(before[AT]["w"], after[AT]["w"], before[AT + 1]["w"], strict=True):
        assert torch.equal(w0, w1) and torch.equal(w0, w2)
    assert not all(torch.equal(a, b) for a, b in zip(before[AT + 1]["w"], before[AT + 2]["w"], strict=True))

    s0, s1 = before[AT]["state"], after[AT]["state"]  # Adam has taken AT steps before the teleport
    t0 = AT
    for i, is_shared in enumerate(shared):
        assert int(s0[i]["step"]) == t0
        g, m0, v0 = before[AT + 1]["g"][i], s0[i]["exp_avg"], s0[i]["exp_avg_sq"]
        new = before[AT + 2]["state"][i]
        policy = transfer if is_shared else "keep"  # the heads' state is never touched ...
        if transfer == "restart_if_opposed":
            policy = "reset"  # ... except by a fresh optimizer: no move, cos = 0, every state forgotten
        # right after the teleport (before the next step)
        if policy == "reset":
            assert s1[i] == {}
        else:
            assert torch.equal(s1[i]["exp_avg"], m0) and torch.equal(s1[i]["exp_avg_sq"], v0)
            assert int(s1[i]["step"]) == (0 if policy == "reset_step" else t0)
        # after the next step, by hand
        if policy in ("keep", "transport"):
            step, (m, v, update) = t0 + 1, adam_expected(m0, v0, g, t0 + 1)
        elif policy == "reset_step":
            step, (m, v, update) = 1, adam_expected(m0, v0, g, 1)  # kept moments, bias correction of step 1
        elif policy == "reset":
            step, (m, v, update) = 1, adam_expected(torch.zeros_like(g), torch.zeros_like(g), g, 1)
        else:  # htr with sigma = 0: m_hat = g, v_hat = g^2 at step t0 + 1
            step = t0 + 1
            m, v = (1 - B1**step) * g, (1 - B2**step) * g * g
            update = LR * g / (g.abs() + EPS)
        assert int(new["step"]) == step
        torch.testing.assert_close(new["exp_avg"], m)
        torch.testing.assert_close(new["exp_avg_sq"], v)
        torch.testing.assert_close(before[AT + 2]["w"][i], before[AT + 1]["w"][i] - update)

    rec = tele.history[0]
    assert (rec.step, rec.teleporter, rec.transfer) == (AT, "null", transfer)
    assert rec.accepted and rec.applied and not rec.moved and tele.num_teleports == 1
    assert rec.displacement_norm == 0.0 and rec.loss_drift == 0.0 and rec.losses_after == rec.losses_before
    assert rec.after == rec.before  # nothing moved: the same gradients
    assert rec.sigma == (0.0 if transfer in ("htr", "restart_if_opposed") else None)
    assert tele.records.state_dict()["history"][0]["applied"] is True


@pytest.mark.parametrize("transfer", ["keep", "transport"])
def test_null_teleport_with_keep_is_the_run_with_the_same_steps_dropped(transfer):
    """With the state unchanged, the control is the dropped step alone: the same run as DropSteps at the same
    steps, next to a teleport callback that never acts. Without that callback the update is not computed
    through the per-task Jacobian; its rounding differs, and Adam turns rounding noise into full steps on a
    weight whose gradient is 0 (the bias before BatchNorm), so only this baseline is equal bit for bit."""
    finals = []
    for callbacks in (lambda: [null_cost(transfer)],
                      lambda: [DropSteps(every=4), SymmetryTeleportCallback(teleporter="null", transfer=transfer,
                                                                            schedule={"max_per_epoch": 0})]):
        L.seed_everything(0)
        model = TinyMTL(k=2)
        fit(model, callbacks(), steps=9)  # teleports (or drops) at steps 2 and 6
        finals.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*finals, strict=True):
        assert torch.equal(a, b)


def test_reset_step_keeps_the_moments_and_refuses_sgd():
    p = torch.nn.Parameter(torch.randn(5))
    opt = torch.optim.Adam([p], lr=0.1)
    for _ in range(3):
        p.grad = torch.randn(5)
        opt.step()
    m, v = opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone()
    assert reset_step_count(opt, [p]) and int(opt.state[p]["step"]) == 0
    assert torch.equal(opt.state[p]["exp_avg"], m) and torch.equal(opt.state[p]["exp_avg_sq"], v)
    with pytest.raises(ValueError, match="SGD keeps none"):
        run("reset_step", optimizer="sgd")
    StateTransfer("reset_step").check_optimizer(opt)  # Adam is fine


def test_null_htr_with_sgd_restarts_the_momentum():
    model, tele, before, after, shared = run("htr", optimizer="sgd")
    for i, is_shared in enumerate(shared):
        buf = before[AT + 2]["state"][i]["momentum_buffer"]
        g, b0 = before[AT + 1]["g"][i], before[AT]["state"][i]["momentum_buffer"]
        torch.testing.assert_close(buf, g if is_shared else 0.9 * b0 + g)


def test_names_and_bad_names():
    assert isinstance(build_teleporter("null"), NullTeleporter)
    tele = SymmetryTeleportCallback(teleporter={"name": "random_move", "relative_size": 0.02})
    assert isinstance(tele.teleporter, RandomMove) and lightning_cost.teleport.RandomMove is RandomMove
    assert SymmetryTeleportCallback(teleporter="null", transfer="transport").transfer.policy == "transport"
    with pytest.raises(ValueError, match="unknown teleporter 'nul'; available: .*null"):
        SymmetryTeleportCallback(teleporter="nul")
    with pytest.raises(ValueError, match="transfer must be one of .*reset_step"):
        SymmetryTeleportCallback(teleporter="null", transfer="reset_steps")
    with pytest.raises(TypeError):
        build_teleporter("null", sigma=0.5)  # the null teleporter has no settings
    with pytest.raises(ValueError, match="relative_size must be > 0"):
        build_teleporter("random_move", relative_size=0.0)


def test_matched_control_and_control_of_presets():
    variants = deep_merge(DEFAULT_COST_VARIANTS, {
        "lora": {"schedule": {"every": 4, "on_trigger": False}, "teleporter": {"name": "lora", "inner_steps": 3}},
        "lora_control": {"control_of": "lora"},
        "rescale_control": {"control_of": "rescale", "measure": False},
        "loop": {"control_of": "lora_control"}, "nowhere": {"control_of": "paper2"}})
    shared = {"schedule": {"max_per_epoch": None}}
    lora = cost_spec("lora", shared, variants)
    control = cost_spec("lora_control", shared, variants)
    assert control == {**lora, "teleporter": {"name": "null"}, "transfer": "htr", "control_of": "lora"}
    assert matched_control(control) == matched_control(lora) == {k: v for k, v in control.items() if k != "control_of"}
    rescale = cost_spec("rescale_control", shared, variants)
    assert rescale["transfer"] == "transport" and rescale["measure"] is False and rescale["control_of"] == "rescale"
    cb = build_teleport(control, seed=3)
    assert (cb.teleporter.name, cb.transfer.policy, cb.schedule.every, cb.seed) == ("null", "htr", 4, 3)
    assert build_teleport(rescale, 0).transfer.policy == "transport"
    with pytest.raises(ValueError, match="itself a control"):
        cost_spec("loop", shared, variants)
    with pytest.raises(ValueError, match="control_of must name another preset"):
        cost_spec("nowhere", shared, variants)
    with pytest.raises(ValueError, match="no matched control"):
        matched_control({"control": "drop_step"})
