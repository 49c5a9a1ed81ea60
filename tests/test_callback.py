"""The teleport callback end to end: a forced teleport, rejection, schedule, resume, precision, logging."""

from __future__ import annotations

import copy
import types

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from mtl_models import TinyMTL, loader, regression_data, trainer
from teleport_helpers import Force, Spy, cost, fit

from lightning_cost import SymmetryTeleportCallback
from lightning_cost.teleport import (
    ConflictTrigger,
    LoRAConfig,
    LoRATeleporter,
    TriggerResult,
    conflict_cosines,
    conflict_cosines_from_gram,
)


class After(L.Callback):
    """Put after the teleport callback: the state the teleport left at ``step``."""

    def __init__(self, step=3):
        self.step = step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.step:
            self.params = [p.detach().clone() for p in pl_module.parameters()]
            self.buffers = [b.detach().clone() for b in pl_module.buffers()]
            self.opt_ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
            self.opt = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in pl_module.parameters()
                        if p in optimizer.state}


def test_forced_teleport_keeps_losses_moves_weights_keeps_optimizer_params():
    L.seed_everything(0)
    model = TinyMTL(k=3)
    tele = cost(inner_steps=5)
    spy, after = Spy(), After()
    fit(model, [Force(tele), spy, tele, after], steps=4)
    assert tele.num_teleports == 1 and len(tele.history) == 1
    rec = tele.history[0]
    assert rec.accepted and rec.moved and rec.step == 3
    tol = tele.teleporter.config
    for a, b in zip(rec.losses_after, rec.losses_before, strict=True):
        assert abs(a - b) <= tol.loss_tolerance * abs(b) + tol.abs_tolerance
    names = [n for n, _ in model.named_parameters()]
    shared_idx = [names.index(n) for n in model._mtl_shared_names]
    moved = [i for i in shared_idx if not torch.equal(spy.snap["params"][i], after.params[i])]
    assert moved  # the shared weights moved...
    head_idx = [i for i, n in enumerate(names) if n.startswith("heads")]
    assert all(torch.equal(spy.snap["params"][i], after.params[i]) for i in head_idx)  # ...the heads did not
    assert all(torch.equal(a, b) for a, b in zip(spy.snap["buffers"], after.buffers, strict=True))  # BN stats kept
    assert after.opt_ids == {id(p) for p in model.parameters()}
    assert all(p.requires_grad for p in model.parameters())
    assert not any("lora" in n for n in model.state_dict())
    assert rec.after is not None and len(rec.after.task_norms) == 3 and rec.sigma is not None and rec.seconds > 0
    assert rec.loss_drift is not None and rec.displacement_rel > 0


def test_teleporting_batch_takes_no_step_and_htr_touches_only_shared_state():
    runs = {}
    for transfer in ("htr", "keep"):
        L.seed_everything(0)
        model = TinyMTL(k=2)
        tele = cost(transfer=transfer, inner_steps=3)
        fit(model, [Force(tele), tele], steps=5)  # teleport at step 3, HTR applies at step 4 (the last)
        runs[transfer] = model, tele
    (m_on, t_on), (m_off, _) = runs["htr"], runs["keep"]
    for model in (m_on, m_off):
        opt = model.trainer.optimizers[0]
        for p in model.parameters():
            assert int(opt.state[p]["step"]) == 4  # the teleporting batch did not step
    assert t_on.transfer.pending_sigma is None  # HTR was applied at the next step
    names = [n for n, _ in m_on.named_parameters()]
    for n, p_on, p_off in zip(names, m_on.parameters(), m_off.parameters(), strict=True):
        same = torch.equal(p_on, p_off)
        assert same != (n in m_on._mtl_shared_names), n  # only the shared parameters differ


def test_rejected_teleport_restores_everything_bit_for_bit():
    L.seed_everything(0)
    model = TinyMTL(k=2)
    tele = cost(inner_steps=3, loss_tolerance=0.0, abs_tolerance=0.0, inner_lr=0.05, min_gain=None)
    spy, after = Spy(), After()
    with pytest.warns(UserWarning, match="rejected"):
        fit(model, [Force(tele), spy, tele, after], steps=5)
    assert tele.num_rejected == 1 and tele.num_teleports == 0
    assert not tele.history[0].accepted and "drift" in tele.history[0].reason
    snap = spy.snaps[3]
    assert all(torch.equal(a, b) for a, b in zip(snap["params"], after.params, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(snap["buffers"], after.buffers, strict=True))
    assert all(torch.equal(v, after.opt[i][k]) for i, state in snap["opt"].items() for k, v in state.items())
    opt = model.trainer.optimizers[0]
    assert int(opt.state[model.trunk[0].weight]["step"]) == 5  # a rejected teleport does not drop the step


def test_non_finite_inner_loop_is_rejected():
    class Broken(LoRATeleporter):
        def _objective(self, *args, **kwargs):
            objective, terms = super()._objective(*args, **kwargs)
            return objective * float("nan"), terms

    L.seed_everything(0)
    model = TinyMTL(k=2)
    tele = SymmetryTeleportCallback(teleporter=Broken(LoRAConfig(inner_steps=2)))
    with pytest.warns(UserWarning, match="rejected"):
        fit(model, [Force(tele), tele], steps=4)
    assert tele.num_rejected == 1 and "non-finite" in tele.history[0].reason
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("switch", ["use_lt", "use_lg"])
def test_ablation_switches_change_the_teleport(switch):
    moved = {}
    for flag in (True, False):
        L.seed_everything(0)
        model = TinyMTL(k=2)
        tele = cost(**{switch: flag, "inner_steps": 3, "gamma": 1.0, "loss_tolerance": 10.0})
        fit(model, [Force(tele), tele], steps=4)
        moved[flag] = [p.detach().clone() for p in model.shared_parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(moved[True], moved[False], strict=True))


def test_trigger_counts_only_stepping_micro_batches():
    model = TinyMTL(k=2)
    tele = SymmetryTeleportCallback(schedule={"max_per_epoch": 0})
    trainer(max_epochs=1, callbacks=[tele], accumulate_grad_batches=2).fit(model, loader(regression_data(k=2)))
    assert tele.epoch_stats[0]["checked"] == 4  # 8 micro-batches, 4 optimizer steps


class Always(ConflictTrigger):
    """Every step "conflicts"."""

    def __call__(self, jacobian, gramian=None):
        return TriggerResult(fire=True, num_conflicting=1, cosines=torch.zeros(jacobian.shape[0]))


def test_warmup_and_spacing_limit_teleports():
    L.seed_everything(0)
    model = TinyMTL(k=2)
    tele = SymmetryTeleportCallback(trigger=Always(), schedule={"warmup_steps": 2, "min_steps_between": 3,
                                                                "max_per_epoch": None},
                                    teleporter={"inner_steps": 1, "num_perturbations": 1, "loss_tolerance": 10.0})
    fit(model, [tele], steps=10)
    steps = [r.step for r in tele.history]
    assert steps[0] >= 2 and all(b - a >= 3 for a, b in zip(steps, steps[1:], strict=False)) and len(steps) >= 2


def test_warmup_fraction_waits_for_that_share_of_the_run():
    L.seed_everything(0)
    model = TinyMTL(k=2)
    tele = SymmetryTeleportCallback(trigger=Always(), schedule={"warmup_fraction": 0.5, "max_per_epoch": None},
                                    teleporter={"inner_steps": 1, "num_perturbations": 1, "loss_tolerance": 10.0})
    fit(model, [tele], steps=8)
    assert [r.step for r in tele.history][0] == 4


def test_resume_restores_counters_and_history(tmp_path):
    L.seed_everything(0)
    model = TinyMTL(k=2)
    tele = cost(inner_steps=2)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(max_epochs=1, callbacks=[Force(tele, steps=(2, 5)), tele, ckpt], enable_checkpointing=True).fit(
        model, loader(regression_data(k=2)))
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert not any("lora" in k for k in state["state_dict"])
    tele2 = cost(inner_steps=2)
    seen = {}

    class Peek(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["n"], seen["hist"] = tele2.num_teleports, copy.deepcopy(tele2.history)

    trainer(max_epochs=2, callbacks=[tele2, Peek()], enable_checkpointing=False).fit(
        TinyMTL(k=2), loader(regression_data(k=2)), ckpt_path=tmp_path / "last.ckpt")
    assert seen["n"] == tele.num_teleports == 2
    assert [r.step for r in seen["hist"]] == [r.step for r in tele.history]
    assert len(tele2.epoch_stats) == 2


@pytest.mark.parametrize("kw", [{"precision": "bf16-mixed"},
                                {"plugins": [MixedPrecision("16-mixed", "cpu",
                                                            torch.amp.GradScaler("cpu", init_scale=2.0**8))]}])
def test_bf16_and_fp16_scaler_runs_teleport_with_finite_weights(kw):
    L.seed_everything(0)
    model = TinyMTL(k=2)
    tele = cost(inner_steps=3, loss_tolerance=0.2)
    scales = []

    class Scale(L.Callback):
        def on_after_backward(self, trainer, pl_module):
            s = getattr(trainer.precision_plugin, "scaler", None)
            scales.append(s.get_scale() if s is not None else None)

    fit(model, [Force(tele, steps=(2, 4)), tele, Scale()], steps=6, **kw)
    assert len(tele.history) == 2 and all(torch.isfinite(p).all() for p in model.parameters())
    assert any(r.accepted for r in tele.history)
    if "plugins" in kw:
        assert scales[3] == scales[2]  # the teleport at step 2 left the outer scaler alone


def test_refuses_unsupported_setups():
    tele = SymmetryTeleportCallback()
    with pytest.raises(TypeError, match="MultiTaskModule"):
        tele.setup(types.SimpleNamespace(strategy=None), L.LightningModule(), "fit")
    with pytest.raises(RuntimeError, match="not supported"):
        tele.setup(types.SimpleNamespace(strategy=object()), TinyMTL(k=2), "fit")
    with pytest.raises(ValueError, match="use_lt"):
        SymmetryTeleportCallback(teleporter={"use_lt": False, "use_lg": False})
    with pytest.raises(ValueError, match="transport"):
        SymmetryTeleportCallback(teleporter="lora", transfer="transport")
    with pytest.raises(ValueError, match="unknown teleporter"):
        SymmetryTeleportCallback(teleporter="warp")


def test_teleport_on_extra_loader_batches_and_variants_log_to_the_trainer(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    L.seed_everything(0)
    model = TinyMTL(k=3)
    tele = SymmetryTeleportCallback(teleporter={"inner_steps": 2, "ratio": "linear", "sharpness": "difference",
                                                "perturbation": "random",
                                                "loss_tolerance": 0.2},
                                    schedule={"max_per_epoch": None}, teleport_batches=2)
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
    n = tele.teleporter.config.num_perturbations
    assert len(calls) % 3 == 0 and len(calls) >= 3 * 2 * (1 + n + 1)
    logger.finalize("success")
    text = next((tmp_path / "run").rglob("metrics.csv")).read_text()
    assert "teleport/count" in text and "teleport/accepted" in text


def test_check_every_checks_and_pays_for_the_jacobian_on_every_nth_step_only():
    model = TinyMTL(k=2, method="ls")
    tele = SymmetryTeleportCallback(schedule={"check_every": 3, "max_per_epoch": 0})
    jac_steps = []

    class Seen(L.Callback):
        def on_after_backward(self, trainer, pl_module):
            jac_steps.append(pl_module.mtl_step.jacobian is not None)

    trainer(max_epochs=1, callbacks=[tele, Seen()]).fit(model, loader(regression_data(k=2)))
    assert tele.epoch_stats[0]["checked"] == 3  # steps 0, 3, 6 of 8
    assert jac_steps == [i % 3 == 0 for i in range(8)]
    with pytest.raises(ValueError):
        SymmetryTeleportCallback(schedule={"check_every": 0})


def test_schedule_every_forces_evenly_spaced_teleports():
    L.seed_everything(0)
    model = TinyMTL(k=2)
    tele = SymmetryTeleportCallback(schedule={"every": 4, "max_per_epoch": None},
                                    teleporter={"inner_steps": 1, "num_perturbations": 1, "loss_tolerance": 10.0})
    fit(model, [tele], steps=12)
    assert [r.step for r in tele.history] == [2, 6, 10]
    with pytest.raises(ValueError):
        SymmetryTeleportCallback(schedule={"every": -1})


def test_schedule_off_trigger_teleports_at_the_forced_steps_only_and_still_counts_the_trigger():
    runs = {}
    for on_trigger in (True, False):
        L.seed_everything(0)
        tele = SymmetryTeleportCallback(trigger=Always(), schedule={"every": 4, "max_per_epoch": None,
                                                                    "on_trigger": on_trigger},
                                        teleporter={"inner_steps": 1, "num_perturbations": 1, "loss_tolerance": 10.0})
        fit(TinyMTL(k=2), [tele], steps=12)
        runs[on_trigger] = tele
    assert [r.step for r in runs[False].history] == [2, 6, 10]
    assert len(runs[True].history) > 3  # the trigger fires on every step
    assert runs[False].epoch_stats and runs[False].epoch_stats[-1]["trigger_ratio"] == 1.0
    with pytest.raises(TypeError, match="on_trigger"):
        SymmetryTeleportCallback(schedule={"on_trigger": "no"})


def test_teleport_switches_dropout_off_so_the_losses_are_one_function_of_the_weights():
    """With dropout on, every loss evaluation draws new masks: L_t and the acceptance test would compare
    noise. The teleport runs with dropout off (and the layers are back in training mode afterwards)."""
    L.seed_everything(0)
    model = TinyMTL(k=3)
    model.trunk.append(torch.nn.Dropout(0.5))  # no parameters: the shared set is unchanged
    tele = cost(inner_steps=2, gamma=0.0)
    modes = []

    class Mode(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            modes.append(pl_module.trunk[-1].training)

    fit(model, [Force(tele, steps=(2, 4)), tele, Mode()], steps=6)
    assert len(tele.history) == 2
    for rec in tele.history:
        # only L_t (gamma = 0) from an adapter that starts at zero: the losses stay put; with p = 0.5 masks
        # redrawn per evaluation the "drift" was tens of percent
        assert rec.accepted, rec.reason
        assert rec.loss_drift is None or rec.loss_drift < 1e-3
    assert modes and all(modes)
    assert model.training


def test_the_measurement_after_a_move_runs_with_dropout_off_too(monkeypatch):
    from lightning_cost.teleport import TaskLossEvaluator

    L.seed_everything(0)
    model = TinyMTL(k=3)
    model.trunk.append(torch.nn.Dropout(0.5))
    tele = cost(inner_steps=2, loss_tolerance=10.0)
    seen = []  # the dropout layer's mode at every Jacobian a teleport evaluates
    original = TaskLossEvaluator.jacobian

    def spy(self, *args, **kwargs):
        seen.append(model.trunk[-1].training)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TaskLossEvaluator, "jacobian", spy)
    fit(model, [Force(tele, steps=(2, 4)), tele], steps=6)
    assert [r.moved for r in tele.history] == [True, True] and all(r.after is not None for r in tele.history)
    assert len(seen) == 4 and not any(seen)  # before and after each move
    assert model.trunk[-1].training


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
        model = TinyMTL(k=3, method=SpyAgg(), engine="jacobian")
        cbs = []
        if with_cost:
            tele = SymmetryTeleportCallback(trigger=SpyTrigger(), schedule={"max_per_epoch": 0})
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


def test_on_the_gramian_engine_the_trigger_reads_the_gramian_the_weights_got():
    from lightning_cost.aggregators import build_aggregator

    seen: dict[str, list] = {"weights": [], "trig": []}

    class SpyAgg(type(build_aggregator("mgda"))):
        def weights(self, gramian):
            seen["weights"].append(gramian)
            return super().weights(gramian)

    class SpyTrigger(ConflictTrigger):
        def __call__(self, jacobian, gramian=None):
            seen["trig"].append((jacobian, gramian))
            return super().__call__(jacobian, gramian)

    L.seed_everything(0)
    model = TinyMTL(k=3, method=SpyAgg(), engine="gramian", gramian={"path": "gram"})
    fit(model, [SymmetryTeleportCallback(trigger=SpyTrigger(), schedule={"max_per_epoch": 0})], steps=4)
    assert len(seen["trig"]) == 4
    assert all(j is None and g is w for (j, g), w in zip(seen["trig"], seen["weights"], strict=True))
