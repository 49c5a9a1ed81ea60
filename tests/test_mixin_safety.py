"""The multi-task core refuses what it cannot do and stops what makes no progress: manual
optimization, runs of skipped steps, warnings once per DDP job, and a side-effect-free loss hook."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from mtl_models import TinyMTL, loader, regression_data, trainer

import lightning_cost
from lightning_cost import TrainingStalledError
from lightning_cost.aggregators import AggregationError, Aggregator


class ManualStep(TinyMTL):
    """Manual optimization: the step backpropagates and steps by itself, then returns the losses."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        out = super().training_step(batch, batch_idx)
        opt.zero_grad()
        self.manual_backward(sum(out.values()))
        opt.step()
        return out


@pytest.mark.parametrize("method", ["ls", "mgda"])
def test_manual_optimization_is_refused_with_a_clear_error(method):
    """Without the check, a gradient method failed inside autograd and a loss weighting was silently
    bypassed (Lightning ignores the returned objective under manual optimization)."""
    model = ManualStep(k=2, method=method)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="MultiTaskMixin needs automatic optimization"):
        trainer(max_steps=2).fit(model, loader(regression_data(k=2)))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # refused before any step


class Failing(Aggregator):
    def aggregate(self, jacobian):
        raise AggregationError("solver did not converge")


class FailingEveryOther(Aggregator):
    """Fails on every second call: runs of one skipped step, each followed by a taken one."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def aggregate(self, jacobian):
        self.calls += 1
        if self.calls % 2:
            raise AggregationError("every other step")
        return jacobian.mean(0)


def fit(model, steps, **kw):
    trainer(max_steps=steps, **kw).fit(model, loader(regression_data(k=len(model.task_names))))


def test_a_run_of_skipped_steps_stops_training_naming_the_method_count_and_cause():
    model = TinyMTL(k=2, method=Failing(), max_skipped_steps=3)
    with pytest.raises(TrainingStalledError, match=r"Failing: 3 consecutive .*solver did not converge"):
        fit(model, steps=8)
    assert model.mtl_skipped_steps == 3  # stopped at the third skip, not at the end of training
    assert issubclass(TrainingStalledError, RuntimeError) and "TrainingStalledError" in lightning_cost.__all__


def test_a_taken_step_resets_the_run_and_zero_disables_the_check():
    model = TinyMTL(k=2, method=FailingEveryOther(), max_skipped_steps=2)
    fit(model, steps=6)
    assert model.mtl_skipped_steps == 3  # every other step skipped, never two in a row: no error
    never = TinyMTL(k=2, method=Failing(), max_skipped_steps=0)
    fit(never, steps=5)
    assert never.mtl_skipped_steps == 5


def test_default_skip_limit_is_the_larger_of_50_steps_and_a_tenth_of_an_epoch():
    limits = []

    class Keep(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            limits.append((trainer.num_training_batches, pl_module.mtl_skip_limit))

    assert TinyMTL(k=2).mtl_skip_limit == 50  # no trainer: 50
    for n, batch_size in ((1200, 1), (320, 32)):
        model = TinyMTL(k=2, batchnorm=False)
        trainer(max_steps=1, callbacks=[Keep()]).fit(model, loader(regression_data(n=n, k=2), batch_size=batch_size))
    assert limits == [(1200, 120), (10, 50)]
    assert TinyMTL(k=2, max_skipped_steps=7).mtl_skip_limit == 7
    for bad in (-1, 2.5, "10"):
        with pytest.raises(ValueError, match="max_skipped_steps"):
            TinyMTL(k=2, max_skipped_steps=bad)


@pytest.mark.ddp
def test_ddp_skip_warning_is_printed_once_for_the_job(run_ddp):
    """Both ranks skip the same step (they read the same global Jacobian); only rank 0 says so."""
    proc, (r0, r1) = run_ddp("skipwarn")
    assert r0["skipped"] == r1["skipped"] == 1
    assert proc.stderr.count("skipping the optimizer step") == 1, proc.stderr[-3000:]


class Counting(TinyMTL):
    """training_step has a side effect (a counter, as a metric update would); compute_task_losses has none."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.steps_run = 0

    def training_step(self, batch, batch_idx):
        self.steps_run += 1
        return super().training_step(batch, batch_idx)

    def compute_task_losses(self, batch):
        x, y = batch
        z = self.trunk(x)
        return {f"t{i}": F.mse_loss(h(z).squeeze(-1), y[:, i]) for i, h in enumerate(self.heads)}


def test_evaluate_task_losses_uses_the_pure_hook_and_leaves_training_step_alone():
    model = Counting(k=2, batchnorm=False)
    batch = next(iter(loader(regression_data(k=2))))
    assert model.has_pure_losses and not TinyMTL(k=2).has_pure_losses
    losses = model.evaluate_task_losses(batch)
    assert model.steps_run == 0
    x, y = batch
    z = model.trunk(x)
    expected = torch.stack([F.mse_loss(h(z).squeeze(-1), y[:, i]) for i, h in enumerate(model.heads)])
    torch.testing.assert_close(losses, expected)
    assert losses.requires_grad  # differentiable, as the teleport needs
    model.training_step(batch, 0)  # the training path still runs the user's step
    assert model.steps_run == 1


def test_compute_task_losses_output_is_validated_like_training_steps():
    class WrongKeys(Counting):
        def compute_task_losses(self, batch):
            return {"t0": super().compute_task_losses(batch)["t0"]}

    with pytest.raises(ValueError, match="compute_task_losses must return exactly the task losses"):
        WrongKeys(k=2).evaluate_task_losses(next(iter(loader(regression_data(k=2)))))
