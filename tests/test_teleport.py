"""COST's teleport: trigger (eq. 4), objective (eqs. 7-10), adapter, HTR (eqs. 12-13), the callback."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
import types
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from mtl_models import TinyMTL, loader, regression_data, trainer
from torch import nn

from lightning_cost import SymmetryTeleportCallback
from lightning_cost.teleport import (
    ConflictTrigger,
    TeleportAdapter,
    TriggerResult,
    apply_htr,
    balance_ratios,
    conflict_cosines,
    conflict_cosines_from_gram,
    htr_sigma,
    loss_invariance,
    sample_sphere,
    sharpness,
)

# ---------------------------------------------------------------- trigger (eqs. 3-4)


def rows(n_conflicting: int, k: int) -> torch.Tensor:
    """K gradients whose mean points along e1; ``n_conflicting`` of them point against it."""
    j = torch.zeros(k, 3)
    j[:n_conflicting, 0] = -0.1
    j[n_conflicting:, 0] = 1.0
    j[:, 1] = torch.linspace(-0.01, 0.01, k)
    return j


@pytest.mark.parametrize("k", [2, 3, 40])
def test_trigger_fires_exactly_from_ceil_half(k):
    trig = ConflictTrigger("majority")
    need = math.ceil(k / 2)
    assert trig(rows(need, k)).fire and trig(rows(need, k)).num_conflicting == need
    if need - 1 >= 0:
        assert not trig(rows(need - 1, k)).fire
    assert not trig(rows(0, k)).fire


def test_trigger_hand_case_and_authors_rule():
    j = torch.tensor([[1.0, 0.0], [-3.0, 0.1]])  # g0 = (-1, 0.05): task 0 conflicts with the mean
    cos = conflict_cosines(j)
    g0 = j.mean(0)
    assert cos[0].item() == pytest.approx(float(j[0] @ g0 / (j[0].norm() * g0.norm())))
    assert cos[0] < 0 < cos[1]
    assert ConflictTrigger("majority")(j).fire
    # K=3 with one conflicting task: the paper's rule waits, the authors' fires
    j3 = rows(1, 3)
    assert not ConflictTrigger("majority")(j3).fire and ConflictTrigger("any")(j3).fire
    # orthogonal to the mean counts for the authors (cos <= 0) but not for the paper (cos < 0)
    jo = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 1.0]])  # g0 = (1/3, 1/3), row 2 orthogonal to it
    assert ConflictTrigger("any")(jo).fire and ConflictTrigger("majority")(jo).num_conflicting == 0
    with pytest.raises(ValueError):
        ConflictTrigger("other")


def test_a_task_with_a_zero_gradient_is_not_a_conflict_under_either_rule():
    """A task with no labels in the batch has an exactly zero gradient: no direction, no conflict."""
    j = torch.tensor([[1.0, 0.2], [0.8, -0.1], [0.0, 0.0]])
    for cos in (conflict_cosines(j), conflict_cosines_from_gram(j @ j.T)):
        assert torch.isnan(cos[2]) and (cos[:2] > 0).all()
    for rule in ("majority", "any"):
        for result in (ConflictTrigger(rule)(j), ConflictTrigger(rule).from_gram(j @ j.T)):
            assert not result.fire and result.num_conflicting == 0
    # a real conflict next to a zero task still counts
    jc = torch.tensor([[1.0, 0.0], [-0.2, 0.1], [0.0, 0.0]])
    assert ConflictTrigger("any")(jc).fire and ConflictTrigger("any")(jc).num_conflicting == 1


# ---------------------------------------------------------------- objective (eqs. 7-10)


def test_loss_invariance_and_sharpness_hand_cases():
    assert loss_invariance(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.0])).item() == pytest.approx(1.0)
    r = torch.tensor([1.5, 0.5])
    assert sharpness(torch.tensor([-2.0, -4.0]), r).item() == pytest.approx(abs((1.5 * -2 + 0.5 * -4) / 2))


def test_balance_ratios_eq10_and_authors():
    norms = torch.tensor([1.0, 3.0])
    expected = 2 * torch.softmax(torch.tensor([4.0 / 1.0, 4.0 / 3.0], dtype=torch.float64), 0)
    torch.testing.assert_close(balance_ratios(norms).double(), expected, rtol=1e-6, atol=1e-7)
    assert balance_ratios(norms).sum().item() == pytest.approx(2.0)
    assert balance_ratios(norms)[0] > balance_ratios(norms)[1]  # the weaker task gets more weight
    torch.testing.assert_close(balance_ratios(norms, "authors"), torch.tensor([1.5, 0.5]))
    with pytest.raises(ValueError):
        balance_ratios(torch.tensor([1.0, float("nan")]))


def test_sample_sphere_has_the_radius_and_is_seeded():
    shapes = [torch.Size([3, 4]), torch.Size([5])]
    a = sample_sphere(shapes, 0.3, torch.Generator().manual_seed(1))
    b = sample_sphere(shapes, 0.3, torch.Generator().manual_seed(1))
    norm = torch.sqrt(sum((t.double() ** 2).sum() for t in a))
    assert norm.item() == pytest.approx(0.3, rel=1e-6)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------- HTR (eqs. 12-13)


def adam_with_state(params, betas=(0.9, 0.999)):
    opt = torch.optim.Adam(params, lr=0.1, betas=betas)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    return opt


@pytest.mark.parametrize("bias_corrected", [False, True])
@pytest.mark.parametrize("sigma", [0.6, 1.0, -0.4, 0.0])
@pytest.mark.parametrize("steps_before", [1, 7])
def test_htr_adam_gives_eq13_moments_for_the_shared_parameters_only(sigma, bias_corrected, steps_before):
    torch.manual_seed(0)
    shared, head = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(3))
    opt = adam_with_state([shared, head])
    for _ in range(steps_before - 1):
        for p in (shared, head):
            p.grad = torch.randn_like(p)
        opt.step()
    t = steps_before
    m0, v0 = opt.state[shared]["exp_avg"].clone(), opt.state[shared]["exp_avg_sq"].clone()
    head_state = {k: v.clone() for k, v in opt.state[head].items()}
    g = torch.randn(4)
    shared.grad, head.grad = g.clone(), torch.randn(3)
    hg = head.grad.clone()
    assert apply_htr(opt, [shared], sigma, bias_corrected=bias_corrected) == "adam"
    opt.step()
    s = min(max(sigma, 0.0), 1.0)
    b1, b2 = 0.9, 0.999
    m13, v13 = s * b1 * m0 + (1 - s * b1) * g, s * b2 * v0 + (1 - s * b2) * g * g  # eq. 13
    m, v = opt.state[shared]["exp_avg"], opt.state[shared]["exp_avg_sq"]
    if bias_corrected:  # Adam's bias-corrected moments are eq. 13's moments over their total weight
        torch.testing.assert_close(m / (1 - b1 ** (t + 1)), m13 / (1 - s * b1 ** (t + 1)))
        torch.testing.assert_close(v / (1 - b2 ** (t + 1)), v13 / (1 - s * b2 ** (t + 1)))
        if s == 0.0:  # history dropped: the step of a fresh Adam on g
            torch.testing.assert_close(m / (1 - b1 ** (t + 1)), g)
            torch.testing.assert_close(v / (1 - b2 ** (t + 1)), g * g)
    else:
        torch.testing.assert_close(m, m13)
        torch.testing.assert_close(v, v13)
    if s == 1.0:  # nothing to forget: an ordinary Adam step either way
        torch.testing.assert_close(m, b1 * m0 + (1 - b1) * g)
    torch.testing.assert_close(opt.state[head]["exp_avg"], b1 * head_state["exp_avg"] + (1 - b1) * hg)
    assert (v >= 0).all()


@pytest.mark.parametrize("bias_corrected", [False, True])
def test_htr_with_beta1_zero_stays_finite(bias_corrected):
    """``betas=(0, 0.99)`` (the 2-D toy's): no first-moment history, and no division by ``b1``."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(3))
    opt = adam_with_state([p], betas=(0.0, 0.99))
    g = torch.randn(3)
    p.grad = g.clone()
    apply_htr(opt, [p], 0.3, bias_corrected=bias_corrected)
    opt.step()
    assert all(torch.isfinite(v).all() for v in opt.state[p].values()) and torch.isfinite(p).all()
    torch.testing.assert_close(opt.state[p]["exp_avg"], g)  # b1 = 0: m is the gradient whatever HTR did


def test_htr_sgd_scales_the_momentum_buffer_and_warns_otherwise():
    p = nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.ones(2)
    opt.step()
    buf = opt.state[p]["momentum_buffer"].clone()
    assert apply_htr(opt, [p], 0.25) == "sgd"
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], 0.25 * buf)
    with pytest.warns(UserWarning, match="HTR supports"):
        assert apply_htr(torch.optim.RMSprop([p]), [p], 0.5) == "none"


def test_htr_sigma_is_the_cosine():
    assert htr_sigma(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])) == pytest.approx(1 / math.sqrt(2))
    assert htr_sigma(torch.zeros(2), torch.ones(2)) == 0.0


# ---------------------------------------------------------------- adapter


class WithRaw(TinyMTL):
    def __init__(self):
        super().__init__(k=2, batchnorm=True)
        self.scale = nn.Parameter(torch.tensor([1.5]))
        self.configure_multitask(["t0", "t1"], shared=[*self.trunk.parameters(), self.scale])

    def training_step(self, batch, batch_idx):
        x, y = batch
        z = self.trunk(x) * self.scale
        return {f"t{i}": ((h(z).squeeze(-1) - y[:, i]) ** 2).mean() for i, h in enumerate(self.heads)}


def test_adapter_targets_shared_layers_only_and_merges_in_place():
    model = WithRaw()
    shared = model.shared_parameters()
    ids = [id(p) for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    ad = TeleportAdapter(model, shared, rank=2)
    assert ad.lora_targets == ["trunk.0", "trunk.3"]  # shared Linears; never the heads
    dense_ids = {id(p) for p in ad.dense_params}
    assert id(model.scale) in dense_ids and id(model.trunk[1].weight) in dense_ids  # raw param, BatchNorm
    ad.inject()
    lora = ad.lora_parameters()
    assert len(lora) == 4 and all("heads" not in n for n, p in model.named_parameters() if "lora_" in n)
    with torch.no_grad():  # a known displacement: B = 1, A as initialised; dense delta = 0.25
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(1.0)
        a = {n.split(".lora_A")[0]: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
        for d in ad.deltas:
            d.fill_(0.25)
    ad.merge()
    assert [id(p) for p in model.parameters()] == ids  # same Parameter objects
    assert not any("lora" in n for n, _ in model.named_parameters()) and not hasattr(model, "peft_config")
    w0 = before[[n for n, _ in model.named_parameters()].index("trunk.0.weight")]
    torch.testing.assert_close(model.trunk[0].weight, w0 + torch.ones(16, 2) @ a["trunk.0"])  # scaling alpha/r = 1
    torch.testing.assert_close(model.scale.detach(), torch.tensor([1.75]))


def test_adapter_discard_is_bit_exact_and_eps_call_matches_perturbed_weights():
    model = WithRaw()
    model.eval()
    batch = next(iter(loader(regression_data(k=2))))
    shared = model.shared_parameters()
    before = [p.detach().clone() for p in model.parameters()]
    ad = TeleportAdapter(model, shared)
    ad.inject()
    eps = sample_sphere([p.shape for p in shared], 0.05, torch.Generator().manual_seed(0))
    got = ad.call(model.evaluate_task_losses, batch, 0, eps=eps)
    assert got.requires_grad and torch.autograd.grad(got.sum(), ad.lora_parameters()[1]) is not None  # path to B
    ad.discard()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p, e in zip(ref.shared_parameters(), eps, strict=True):
            p.add_(e)
    torch.testing.assert_close(got.detach(), ref.evaluate_task_losses(batch).detach(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- the callback


class Force(L.Callback):
    """Forces a teleport at the given optimizer steps and records state around it."""

    def __init__(self, tele, steps=(3,)):
        self.tele, self.steps = tele, set(steps)
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step in self.steps:
            self.tele.force_next = True


class Spy(L.Callback):
    """Put before the teleport callback: snapshots the state the teleport starts from."""

    def __init__(self):
        self.snap = {}

    def on_after_backward(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        self.snap = {
            "params": [p.detach().clone() for p in pl_module.parameters()],
            "buffers": [b.detach().clone() for b in pl_module.buffers()],
            "opt": {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in pl_module.parameters()
                    if p in opt.state},
            "step": trainer.global_step,
        }


def fit(model, callbacks, steps=6, **kw):
    trainer(max_steps=steps, callbacks=callbacks, **kw).fit(model, loader(regression_data(k=len(model.task_names)),
                                                                           shuffle=False))


def test_forced_teleport_keeps_losses_moves_weights_keeps_optimizer_params():
    L.seed_everything(0)
    model = TinyMTL(k=3)
    tele = SymmetryTeleportCallback(inner_steps=5, max_teleports_per_epoch=None)
    spy = Spy()

    class After(L.Callback):
        def on_after_backward(self, trainer, pl_module):
            if trainer.global_step == 3:
                self.params = [p.detach().clone() for p in pl_module.parameters()]
                self.buffers = [b.detach().clone() for b in pl_module.buffers()]
                self.opt_ids = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}

    after = After()
    fit(model, [Force(tele), spy, tele, after], steps=4)
    assert tele.num_teleports == 1 and len(tele.history) == 1
    rec = tele.history[0]
    assert rec["accepted"] and rec["step"] == 3
    for a, b in zip(rec["losses_after"], rec["losses_before"], strict=True):
        assert abs(a - b) <= tele.loss_tolerance * abs(b) + tele.abs_tolerance
    names = [n for n, _ in model.named_parameters()]
    shared_idx = [names.index(n) for n in model._mtl_shared_names]
    moved = [i for i in shared_idx if not torch.equal(spy.snap["params"][i], after.params[i])]
    assert moved  # the shared weights moved...
    head_idx = [i for i, n in enumerate(names) if n.startswith("heads")]
    assert all(torch.equal(spy.snap["params"][i], after.params[i]) for i in head_idx)  # ...the heads did not
    assert all(torch.equal(a, b) for a, b in zip(spy.snap["buffers"], after.buffers, strict=True))  # BN stats as they went in
    assert after.opt_ids == {id(p) for p in model.parameters()}
    assert all(p.requires_grad for p in model.parameters())
    assert not any("lora" in n for n in model.state_dict())
    for key in ("grad_norms_after", "conflicts_after", "cosines_after", "sigma", "seconds", "loss_drift"):
        assert key in rec


def test_teleporting_batch_takes_no_step_and_htr_touches_only_shared_state():
    runs = {}
    for htr in (True, False):
        L.seed_everything(0)
        model = TinyMTL(k=2)
        tele = SymmetryTeleportCallback(inner_steps=3, use_htr=htr, max_teleports_per_epoch=None)
        fit(model, [Force(tele), tele], steps=5)  # teleport at step 3, HTR applies at step 4 (the last)
        runs[htr] = model, tele
    (m_on, t_on), (m_off, _) = runs[True], runs[False]
    opt_steps = 5
    for model in (m_on, m_off):
        opt = model.trainer.optimizers[0]
        for p in model.parameters():
            assert int(opt.state[p]["step"]) == opt_steps - 1  # the teleporting batch did not step
    assert t_on._pending_sigma is None  # HTR was applied at the next step
    names = [n for n, _ in m_on.named_parameters()]
    for n, p_on, p_off in zip(names, m_on.parameters(), m_off.parameters(), strict=True):
        same = torch.equal(p_on, p_off)
        assert same != (n in m_on._mtl_shared_names), n  # only the shared parameters differ


def test_rejected_teleport_restores_everything_bit_for_bit(caplog):
    L.seed_everything(0)
    model = TinyMTL(k=2)
    tele = SymmetryTeleportCallback(inner_steps=3, loss_tolerance=0.0, abs_tolerance=0.0, inner_lr=0.05)
    spy = Spy()

    class Check(L.Callback):
        def on_after_backward(self, trainer, pl_module):
            if trainer.global_step == 3:
                opt = trainer.optimizers[0]
                self.ok = (
                    all(torch.equal(a, b) for a, b in zip(spy.snap["params"], pl_module.parameters(), strict=True))
                    and all(torch.equal(a, b) for a, b in zip(spy.snap["buffers"], pl_module.buffers(), strict=True))
                    and all(torch.equal(v, opt.state[p][k]) for p in pl_module.parameters() if id(p) in spy.snap["opt"]
                            for k, v in spy.snap["opt"][id(p)].items())
                )

    check = Check()
    fit(model, [Force(tele), spy, tele, check], steps=5)
    assert tele.num_rejected == 1 and tele.num_teleports == 0
    assert not tele.history[0]["accepted"] and "drift" in tele.history[0]["reason"]
    assert check.ok
    opt = model.trainer.optimizers[0]
    assert int(opt.state[model.trunk[0].weight]["step"]) == 5  # a rejected teleport does not drop the step


def test_non_finite_inner_loop_is_rejected():
    class Broken(SymmetryTeleportCallback):
        def _inner_objective(self, *args, **kwargs):
            return super()._inner_objective(*args, **kwargs) * float("nan")

    L.seed_everything(0)
    model = TinyMTL(k=2)
    tele = Broken(inner_steps=2)
    before = []

    class Keep(L.Callback):
        def on_after_backward(self, trainer, pl_module):
            if trainer.global_step == 3:
                before.append([p.detach().clone() for p in pl_module.shared_parameters()])

    keep = Keep()
    spy = Spy()
    fit(model, [Force(tele), spy, keep, tele], steps=4)
    assert tele.num_rejected == 1 and "non-finite" in tele.history[0]["reason"]
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("switch", ["use_lt", "use_lg"])
def test_ablation_switches_change_the_teleport(switch):
    moved = {}
    for flag in (True, False):
        L.seed_everything(0)
        model = TinyMTL(k=2)
        kw = {switch: flag, "inner_steps": 3, "gamma": 1.0, "loss_tolerance": 10.0}
        tele = SymmetryTeleportCallback(max_teleports_per_epoch=None, **kw)
        spy = Spy()
        fit(model, [Force(tele), spy, tele], steps=4)
        moved[flag] = [p.detach().clone() for p in model.shared_parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(moved[True], moved[False], strict=True))


def test_trigger_counts_only_stepping_micro_batches():
    model = TinyMTL(k=2)
    tele = SymmetryTeleportCallback(max_teleports_per_epoch=0)
    trainer(max_epochs=1, callbacks=[tele], accumulate_grad_batches=2).fit(model, loader(regression_data(k=2)))
    assert tele.epoch_stats[0]["checked"] == 4  # 8 micro-batches, 4 optimizer steps


def test_warmup_and_spacing_limit_teleports():
    L.seed_everything(0)
    model = TinyMTL(k=2)
    tele = SymmetryTeleportCallback(trigger="any", warmup_steps=2, min_steps_between=3, max_teleports_per_epoch=None,
                                    inner_steps=1, num_perturbations=1, loss_tolerance=10.0)

    class Always(ConflictTrigger):  # every step "conflicts"
        def __call__(self, jacobian, gramian=None):
            return TriggerResult(fire=True, num_conflicting=1, cosines=torch.zeros(jacobian.shape[0]))

    tele.trigger = Always()
    fit(model, [tele], steps=10)
    steps = [r["step"] for r in tele.history]
    assert steps[0] >= 2 and all(b - a >= 3 for a, b in zip(steps, steps[1:], strict=False)) and len(steps) >= 2


def test_resume_restores_counters_and_history(tmp_path):
    L.seed_everything(0)
    model = TinyMTL(k=2)
    tele = SymmetryTeleportCallback(inner_steps=2, max_teleports_per_epoch=None)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(max_epochs=1, callbacks=[Force(tele, steps=(2, 5)), tele, ckpt], enable_checkpointing=True).fit(
        model, loader(regression_data(k=2)))
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert not any("lora" in k for k in state["state_dict"])
    tele2 = SymmetryTeleportCallback(inner_steps=2, max_teleports_per_epoch=None)
    seen = {}

    class Peek(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["n"], seen["hist"] = tele2.num_teleports, copy.deepcopy(tele2.history)

    trainer(max_epochs=2, callbacks=[tele2, Peek()], enable_checkpointing=False).fit(
        TinyMTL(k=2), loader(regression_data(k=2)), ckpt_path=tmp_path / "last.ckpt")
    assert seen["n"] == tele.num_teleports == 2
    assert [r["step"] for r in seen["hist"]] == [r["step"] for r in tele.history]
    assert len(tele2.epoch_stats) == 2


def test_bf16_and_fp16_scaler_runs_teleport_with_finite_weights():
    for kw in ({"precision": "bf16-mixed"},
               {"plugins": [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0**8))]}):
        L.seed_everything(0)
        model = TinyMTL(k=2)
        tele = SymmetryTeleportCallback(inner_steps=3, max_teleports_per_epoch=None, loss_tolerance=0.2)
        scales = []

        class Scale(L.Callback):
            def __init__(self, out):
                self.out = out

            def on_after_backward(self, trainer, pl_module):
                s = getattr(trainer.precision_plugin, "scaler", None)
                self.out.append(s.get_scale() if s is not None else None)

        fit(model, [Force(tele, steps=(2, 4)), tele, Scale(scales)], steps=6, **kw)
        assert len(tele.history) == 2 and all(torch.isfinite(p).all() for p in model.parameters())
        assert any(r["accepted"] for r in tele.history)
        if "plugins" in kw:
            assert scales[2] == scales[1]  # the teleport at step 2 left the outer scaler alone


def test_refuses_unsupported_setups():
    tele = SymmetryTeleportCallback()
    with pytest.raises(TypeError, match="MultiTaskModule"):
        tele.setup(types.SimpleNamespace(strategy=None), L.LightningModule(), "fit")
    with pytest.raises(RuntimeError, match="not supported"):
        tele.setup(types.SimpleNamespace(strategy=object()), TinyMTL(k=2), "fit")
    with pytest.raises(ValueError):
        SymmetryTeleportCallback(use_lt=False, use_lg=False)


@pytest.mark.ddp
def test_ddp_teleport_leaves_identical_weights_on_both_ranks(tmp_path):
    script = Path(__file__).parent / "scripts" / "ddp_run.py"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), "teleport"], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=False) for i in range(2))
    assert len(r0["history"]) == 1 and r0["history"][0]["accepted"]
    assert r0["history"][0]["losses_after"] == r1["history"][0]["losses_after"]
    for a, b in zip(r0["params"], r1["params"], strict=True):
        assert torch.equal(a, b)
    for a, b in zip(r0["opt_state"], r1["opt_state"], strict=True):
        assert torch.equal(a, b)


@pytest.mark.ddp
def test_ddp_representation_trigger_decides_on_the_global_gram_on_every_rank(tmp_path):
    """Each rank has its own samples (its rows of dL_i/dz); the K x K Gram is averaged, so both ranks
    fire on the same steps, teleport together and end with identical weights."""
    script = Path(__file__).parent / "scripts" / "ddp_run.py"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), "representation"], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=False) for i in range(2))
    assert not torch.equal(r0["local_rep_jacobian"], r1["local_rep_jacobian"])  # different local samples
    assert len(r0["decisions"]) == len(r1["decisions"]) >= 8
    for (g0, f0), (g1, f1) in zip(r0["decisions"], r1["decisions"], strict=True):
        assert torch.equal(g0, g1) and f0 == f1
    fired = [f for _, f in r0["decisions"]]
    assert any(fired) and not all(fired)  # a data-dependent decision (cos < 0.5, see ddp_run.LowCosine)
    assert [h["step"] for h in r0["history"]] == [h["step"] for h in r1["history"]] != []
    for a, b in zip(r0["params"], r1["params"], strict=True):
        assert torch.equal(a, b)


def test_teleport_on_extra_loader_batches_and_variants_log_to_the_trainer(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    L.seed_everything(0)
    model = TinyMTL(k=3)
    tele = SymmetryTeleportCallback(inner_steps=2, teleport_batches=2, ratio="authors", sharpness="difference",
                                    max_teleports_per_epoch=None, loss_tolerance=0.2)
    logger = CSVLogger(tmp_path, name="run")
    calls = []
    original = model.evaluate_task_losses

    def counting(batch, batch_idx=0):
        calls.append(batch[0].shape[0])
        return original(batch, batch_idx)

    model.evaluate_task_losses = counting
    fit(model, [Force(tele), tele], steps=5, logger=logger)
    assert len(tele.history) == 1
    # 3 batches (current + 2 from the loader) in every evaluation of the teleport
    assert len(calls) % 3 == 0 and len(calls) >= 3 * 2 * (1 + tele.num_perturbations + 1)
    logger.finalize("success")
    text = next((tmp_path / "run").rglob("metrics.csv")).read_text()
    assert "teleport/count" in text and "teleport/accepted" in text


def test_check_every_checks_and_pays_for_the_jacobian_on_every_nth_step_only():
    model = TinyMTL(k=2, method="ls")
    tele = SymmetryTeleportCallback(check_every=3, max_teleports_per_epoch=0)
    jac_steps = []

    class Seen(L.Callback):
        def on_after_backward(self, trainer, pl_module):
            jac_steps.append(pl_module.mtl_step.jacobian is not None)

    trainer(max_epochs=1, callbacks=[tele, Seen()]).fit(model, loader(regression_data(k=2)))
    assert tele.epoch_stats[0]["checked"] == 3  # steps 0, 3, 6 of 8
    assert jac_steps == [i % 3 == 0 for i in range(8)]
    with pytest.raises(ValueError):
        SymmetryTeleportCallback(check_every=0)


# ---------------------------------------------------------------- speed levers (issue 5)


def test_merged_weight_evaluation_equals_the_peft_lora_branch():
    """The adapter evaluates ``W + s B A`` as a weight; PEFT's own LoRA forward gives the same losses."""
    torch.manual_seed(0)
    model = TinyMTL(k=2)
    batch = next(iter(loader(regression_data(k=2))))
    ad = TeleportAdapter(model, model.shared_parameters(), rank=3, alpha=6.0)
    ad.inject()
    with torch.no_grad():
        for p in ad.lora_parameters():
            p.normal_(0.0, 0.3)  # a non-trivial dtheta (B starts at 0)
    got = ad.call(model.evaluate_task_losses, batch, 0)
    assert got.requires_grad
    grads = torch.autograd.grad(got.sum(), ad.lora_parameters())
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    buffers = [b.clone() for b in model.buffers()]
    with torch.no_grad():
        for _, layer in ad._lora_layers:
            layer.enable_adapters(True)  # PEFT's branch: base(x) + B(A(x)) * s
        peft_losses = model.evaluate_task_losses(batch)
        for _, layer in ad._lora_layers:
            layer.enable_adapters(False)
        for b, saved in zip(model.buffers(), buffers, strict=True):
            b.copy_(saved)
    torch.testing.assert_close(got.detach(), peft_losses, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        ad.merge()
        merged = model.evaluate_task_losses(batch)
    torch.testing.assert_close(merged, got.detach(), rtol=1e-6, atol=1e-6)  # the merged point is the point evaluated


@pytest.mark.parametrize("batchnorm", [True, False])
def test_batched_perturbations_match_the_loop(batchnorm):
    """Lever (a): the n~ perturbed losses of eq. 9 in one vmapped pass equal n~ separate forwards."""
    torch.manual_seed(0)
    model = WithRaw() if batchnorm else TinyMTL(k=3, batchnorm=False)
    model.train()
    batch = next(iter(loader(regression_data(k=len(model.task_names)))))
    shared = model.shared_parameters()
    ad = TeleportAdapter(model, shared, rank=2)
    ad.inject()
    with torch.no_grad():
        for p in ad.parameters():
            p.normal_(0.0, 0.1)
    g = torch.Generator().manual_seed(3)
    draws = [sample_sphere([p.shape for p in shared], 0.05, g) for _ in range(5)]
    base = ad.overrides()
    buffers = [b.clone() for b in model.buffers()]
    with torch.no_grad():
        stacked = [torch.stack(parts) for parts in zip(*draws, strict=True)]
        batched = ad.call_batched(model.evaluate_task_losses, batch, 0, eps=stacked, overrides=base)
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))  # private BN copies
    loop = []
    with torch.no_grad():
        for eps in draws:
            loop.append(ad.call(model.evaluate_task_losses, batch, 0, eps=eps, overrides=base))
            for b, saved in zip(model.buffers(), buffers, strict=True):
                b.copy_(saved)
    loop = torch.stack(loop)
    assert batched.shape == loop.shape == (5, len(model.task_names))
    torch.testing.assert_close(batched, loop, rtol=1e-5, atol=1e-6)
    ratios = balance_ratios(torch.rand(len(model.task_names)) + 0.1)
    lg_batched = max(float(sharpness(lp, ratios)) for lp in batched)
    lg_loop = max(float(sharpness(lp, ratios)) for lp in loop)
    assert lg_batched == pytest.approx(lg_loop, rel=1e-5, abs=1e-7)
    ad.discard()


def test_callback_batched_perturbations_give_the_same_teleport():
    moved = {}
    for batched in (False, True):
        L.seed_everything(0)
        model = TinyMTL(k=3)
        tele = SymmetryTeleportCallback(inner_steps=3, max_teleports_per_epoch=None, batched_perturbations=batched,
                                        gamma=1.0, radius=0.05)
        fit(model, [Force(tele), tele], steps=4)
        assert tele.num_teleports == 1
        moved[batched] = ([p.detach().clone() for p in model.shared_parameters()], tele.history[0])
    (w0, h0), (w1, h1) = moved[False], moved[True]
    for a, b in zip(w0, w1, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.tensor(h0["inner_terms"]), torch.tensor(h1["inner_terms"]), rtol=1e-4, atol=1e-6)
    assert h0["displacement_norm"] > 0 and h0["displacement_rel"] > 0


def test_the_trigger_reuses_the_aggregators_jacobian():
    """Lever (c): with a gradient aggregator, COST's trigger costs no extra per-task backward pass.

    The trigger reads the very Gramian the aggregator got (``mtl_step.gramian``), and a step does one
    batched vector-Jacobian product with or without the callback.
    """
    from lightning_cost.aggregators import build_aggregator

    seen: dict[str, list] = {"agg": [], "trig": [], "grad_calls": []}

    class SpyAgg(type(build_aggregator("mgda"))):
        def aggregate(self, jacobian, gramian=None):
            seen["agg"].append(gramian)
            return super().aggregate(jacobian, gramian)

    class SpyTrigger(ConflictTrigger):
        def __call__(self, jacobian, gramian=None):
            seen["trig"].append(gramian)
            return super().__call__(jacobian, gramian)

    real_grad = torch.autograd.grad

    def counting_grad(*args, **kwargs):
        seen["grad_calls"].append(1)
        return real_grad(*args, **kwargs)

    calls = {}
    for with_cost in (False, True):
        L.seed_everything(0)
        model = TinyMTL(k=3, method=SpyAgg())
        cbs = []
        if with_cost:
            tele = SymmetryTeleportCallback(max_teleports_per_epoch=0)
            tele.trigger = SpyTrigger()
            cbs = [tele]
        seen["grad_calls"].clear()
        torch.autograd.grad = counting_grad
        try:
            fit(model, cbs, steps=4)
        finally:
            torch.autograd.grad = real_grad
        calls[with_cost] = len(seen["grad_calls"])
    assert calls[True] == calls[False] == 4  # one batched VJP (K cotangents) per step, none added by the trigger
    assert len(seen["trig"]) == 4
    assert all(t is a for t, a in zip(seen["trig"], seen["agg"][-4:], strict=True))
    rec = model.mtl_step  # the shared Gramian is J J^T, and the decision from it is the one from J (eq. 3)
    torch.testing.assert_close(rec.gramian, rec.jacobian @ rec.jacobian.T)
    torch.testing.assert_close(conflict_cosines_from_gram(rec.gramian), conflict_cosines(rec.jacobian),
                               rtol=1e-5, atol=1e-6)


def test_teleport_every_forces_evenly_spaced_teleports():
    L.seed_everything(0)
    model = TinyMTL(k=2)
    tele = SymmetryTeleportCallback(teleport_every=4, max_teleports_per_epoch=None, inner_steps=1,
                                    num_perturbations=1, loss_tolerance=10.0)
    fit(model, [tele], steps=12)
    assert [r["step"] for r in tele.history] == [2, 6, 10]
    with pytest.raises(ValueError):
        SymmetryTeleportCallback(teleport_every=-1)


# ---------------------------------------------------------------- representation trigger (lever d)


def test_gram_cosines_equal_the_jacobian_cosines():
    from lightning_cost.teleport.trigger import representation_gram

    torch.manual_seed(0)
    for k in (2, 3, 14):
        j = torch.randn(k, 50)
        torch.testing.assert_close(conflict_cosines_from_gram(j @ j.T), conflict_cosines(j), rtol=1e-5, atol=1e-6)
        rj = torch.randn(k, 8, 5)
        torch.testing.assert_close(representation_gram(rj, "flatten"), (rj.reshape(k, -1) @ rj.reshape(k, -1).T).double())
        torch.testing.assert_close(representation_gram(rj, "mean"), (rj.sum(1) @ rj.sum(1).T).double())
        assert ConflictTrigger().from_gram(j @ j.T).fire == ConflictTrigger()(j).fire


@pytest.mark.parametrize("method", ["ls", "mgda"])
def test_representation_jacobian_is_the_gradient_wrt_the_trunk_output(method):
    """Loss weighting (K passes through the heads) and Jacobian path (same VJPs) record dL_i/dz."""
    torch.manual_seed(0)
    model = TinyMTL(k=3, method=method)
    x, y = next(iter(loader(regression_data(k=3))))
    model.training_step((x, y), 0)
    assert model.mtl_step.representation_jacobian is None  # not requested: nothing recorded
    model.request_representation_jacobian(True)
    model.training_step((x, y), 0)
    rj = model.mtl_step.representation_jacobian
    assert rj.shape == (3, 32, 16)
    assert (model.mtl_step.jacobian is None) == (method == "ls")
    z = model.trunk(x)
    losses = model.evaluate_task_losses((x, y))
    for i in range(3):
        loss = torch.nn.functional.mse_loss(model.heads[i](z).squeeze(-1), y[:, i])
        torch.testing.assert_close(loss, losses[i])
        (g,) = torch.autograd.grad(loss, z)
        torch.testing.assert_close(rj[i], g, rtol=1e-5, atol=1e-7)
    if method == "ls":  # the K-pass fallback of the batched VJP gives the same rows
        model.mtl_jacobian_mode = "loop"
        model.training_step((x, y), 0)
        torch.testing.assert_close(model.mtl_step.representation_jacobian, rj, rtol=1e-6, atol=1e-8)
    model.request_representation_jacobian(False)
    assert model._mtl_rep_hook is None


class MarkedRaw(WithRaw):
    """Shared parameters given as a list: the representation is marked in training_step."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        z = self.mark_representation(self.trunk(x) * self.scale)
        return {f"t{i}": ((h(z).squeeze(-1) - y[:, i]) ** 2).mean() for i, h in enumerate(self.heads)}


def test_mark_representation_and_a_clear_error_without_one():
    model = MarkedRaw()
    model.request_representation_jacobian(True)
    model.training_step(next(iter(loader(regression_data(k=2)))), 0)
    assert model.mtl_step.representation_jacobian.shape == (2, 32, 16)
    tele = SymmetryTeleportCallback(trigger_on="representation")
    with pytest.raises(RuntimeError, match="mark_representation"):
        fit(WithRaw(), [tele], steps=1)  # a parameter list and nothing marked


def test_representation_trigger_decides_from_the_representation_and_teleports_without_a_step_jacobian():
    L.seed_everything(0)
    model = TinyMTL(k=3, method="ls")
    tele = SymmetryTeleportCallback(trigger_on="representation", representation_reduce="mean",
                                    max_teleports_per_epoch=None, inner_steps=2)
    seen = []

    class Check(L.Callback):
        def on_after_backward(self, trainer, pl_module):
            rec = pl_module.mtl_step
            seen.append((rec.jacobian is None, rec.representation_jacobian is not None))

    fit(model, [Force(tele, steps=(3,)), tele, Check()], steps=5)
    assert seen == [(True, True)] * 5  # the loss weighting never paid for a parameter Jacobian
    assert tele._epoch["checked"] == 5
    rec = tele.history[0]
    assert rec["accepted"] and rec["trigger_on"] == "representation" and rec["sigma"] is not None
    assert len(rec["trigger_cosines"]) == 3 and len(rec["cosines_before"]) == 3 and len(rec["grad_norms_before"]) == 3
    assert model._mtl_rep_hook is None  # removed at the end of fit


def test_teleport_switches_dropout_off_so_the_losses_are_one_function_of_the_weights():
    """With dropout on, every loss evaluation draws new masks: L_t and the acceptance test would compare
    noise. The teleport runs with dropout off (and the layers are back in training mode afterwards)."""
    L.seed_everything(0)
    model = TinyMTL(k=3)
    model.trunk.append(torch.nn.Dropout(0.5))  # no parameters: the shared set is unchanged
    tele = SymmetryTeleportCallback(inner_steps=2, gamma=0.0, max_teleports_per_epoch=None)
    modes = []

    class Mode(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            modes.append(pl_module.trunk[-1].training)

    fit(model, [Force(tele, steps=(2, 4)), tele, Mode()], steps=6)
    assert len(tele.history) == 2
    for rec in tele.history:
        # only L_t (gamma = 0) from an adapter that starts at zero: the losses stay put, up to the few
        # inner Adam steps; with p = 0.5 masks redrawn per evaluation the "drift" was tens of percent
        assert rec["accepted"], rec["reason"]
        assert rec["loss_drift"] < 1e-3
    assert modes and all(modes)
    assert model.training
