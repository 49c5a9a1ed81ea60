"""ConflictMonitor: its values against plain autograd, its trigger flags, both engines, the plot, resume."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightning_cost import ConflictMonitor, StepRecord
from lightning_cost.monitor import conflict_stats, record_gramian
from tests.mtl_models import TinyMTL, loader, regression_data, trainer


class Probe(L.Callback):
    """The weights and batch at the start of every batch, and whether each step's record had J or G."""

    def __init__(self) -> None:
        self.weights: dict[int, dict] = {}
        self.batches: dict[int, tuple] = {}
        self.had: dict[int, tuple[bool, bool]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.weights[trainer.global_step] = copy.deepcopy(pl_module.state_dict())
        self.batches[trainer.global_step] = tuple(t.clone() for t in batch)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        rec = pl_module.mtl_step
        self.had[trainer.global_step] = (rec.jacobian is not None, rec.gramian is not None)


def autograd_stats(state: dict, batch: tuple, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-task gradient norms and cos(g_i, g0) of the trunk at ``state`` by plain autograd, in float64."""
    model = TinyMTL(k=k)
    missing, _ = model.load_state_dict({n: v for n, v in state.items() if not n.startswith("mtl_method.")}, strict=False)
    assert all(n.startswith("mtl_method.") for n in missing)
    model.train()
    x, y = batch
    z = model.trunk(x)
    params = list(model.trunk.parameters())
    rows = []
    for i, head in enumerate(model.heads):
        loss = F.mse_loss(head(z).squeeze(-1), y[:, i])
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]).double())
    j = torch.stack(rows)
    g0 = j.mean(0)
    return j.norm(dim=1), (j @ g0) / (j.norm(dim=1) * g0.norm())


def fit(model, callbacks, **kw):
    t = trainer(callbacks=callbacks, **{"max_steps": 5, **kw})
    t.fit(model, loader(regression_data(n=128, k=len(model.task_names))))
    return t


# ---------------------------------------------------------------- (a) against plain autograd
@pytest.mark.parametrize("method", ["ls", "mgda"])
def test_values_match_plain_autograd(method, tmp_path):
    torch.manual_seed(0)
    k = 3
    model = TinyMTL(k=k, method=method)
    monitor, probe = ConflictMonitor(every_n_steps=2, plot=False, log="module"), Probe()
    t = fit(model, [monitor, probe], max_steps=5)
    assert monitor.steps == [0, 2, 4]
    for step, cos, norms in zip(monitor.steps, monitor.cosines, monitor.norms, strict=True):
        ref_norms, ref_cos = autograd_stats(probe.weights[step], probe.batches[step], k)
        torch.testing.assert_close(torch.tensor(norms, dtype=torch.float64), ref_norms, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(torch.tensor(cos, dtype=torch.float64), ref_cos, rtol=1e-5, atol=1e-6)
    # the logged values are the last monitored step's
    metrics = t.callback_metrics
    for i, task in enumerate(model.task_names):
        assert float(metrics[f"conflict/cos/{task}"]) == pytest.approx(monitor.cosines[-1][i], rel=1e-6)
        assert float(metrics[f"conflict/grad_norm/{task}"]) == pytest.approx(monitor.norms[-1][i], rel=1e-6)
    s = monitor.summary()
    assert float(metrics["conflict/share_majority"]) == pytest.approx(s["share_majority"])
    assert float(metrics["conflict/share_any"]) == pytest.approx(s["share_any"])
    if method == "ls":  # a loss weighting: the per-task gradients are computed on monitored steps only
        assert {step: had[0] for step, had in probe.had.items()} == {0: True, 1: False, 2: True, 3: False, 4: True}
        assert not model._mtl_jacobian_requested  # the request is handed back


def test_gradient_accumulation_and_a_teleport_callback_before_it():
    torch.manual_seed(0)
    model = TinyMTL(k=2)
    monitor, probe = ConflictMonitor(every_n_steps=2, plot=False), Probe()
    fit(model, [monitor, probe], max_steps=4, accumulate_grad_batches=2)
    assert monitor.steps == [0, 2] and monitor.steps_unavailable == 0
    assert not model._mtl_jacobian_requested

    from lightning_cost import SymmetryTeleportCallback

    torch.manual_seed(0)
    model = TinyMTL(k=2)
    cost = SymmetryTeleportCallback(teleporter="null", schedule={"check_every": 2, "max_per_epoch": 0})
    monitor = ConflictMonitor(plot=False)  # after the teleport callback, which sets the request every batch
    fit(model, [cost, monitor], max_steps=4)
    assert monitor.steps == [0, 1, 2, 3] and monitor.steps_unavailable == 0


# ---------------------------------------------------------------- (b) hand-made Gramians
def _gram(rows):
    j = torch.tensor(rows, dtype=torch.float64)
    return j @ j.T


@pytest.mark.parametrize(("rows", "majority", "any_"), [
    ([[1.0, 0.0], [1.0, 0.0], [-3.0, 0.1]], True, True),     # two of three against the mean: ceil(3/2) = 2
    ([[1.0, 0.0], [1.0, 0.5], [-1.0, 0.0]], False, True),    # one of three
    ([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8]], False, False),    # no conflict
    ([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.01], [0.0, -1.02]], True, True),  # K=4: two < 0 reach ceil(4/2)
])
def test_flags_on_constructed_conflicts(rows, majority, any_):
    j = torch.tensor(rows, dtype=torch.float64)
    stats = conflict_stats(j @ j.T)
    g0 = j.mean(0)
    torch.testing.assert_close(stats.cosines, (j @ g0) / (j.norm(dim=1) * g0.norm()))
    torch.testing.assert_close(stats.norms, j.norm(dim=1))
    assert stats.fires("majority") is majority and stats.fires("any") is any_
    # the same from a record with only J, or only G
    from_j = conflict_stats(record_gramian(StepRecord(losses=torch.zeros(len(rows)), jacobian=j.float())))
    assert from_j.fires("majority") is majority and from_j.fires("any") is any_


def test_zero_gradient_task_is_not_counted_and_summary():
    monitor = ConflictMonitor(plot=False)
    monitor.task_names, monitor._min_cos = ["a", "b", "c"], [math.inf] * 3
    stats = conflict_stats(_gram([[1.0, 0.0], [0.0, 0.0], [-2.0, 0.1]]))  # b has no gradient: NaN, not counted
    assert math.isnan(stats.cosines[1]) and stats.rules["majority"].num_conflicting == 1
    monitor._add(0, stats)
    monitor._add(1, conflict_stats(_gram([[1.0, 0.0], [1.0, 0.1], [0.9, 0.0]])))
    s = monitor.summary()
    assert s["steps_monitored"] == 2 and s["share_any"] == 0.5 and s["share_majority"] == 0.0
    assert s["min_cos"]["b"] == pytest.approx(float(conflict_stats(_gram([[1.0, 0.0], [1.0, 0.1], [0.9, 0.0]]))
                                                    .cosines[1]))
    assert s["min_cos"]["a"] < 0 and s["min_cos"]["c"] > 0
    json.dumps(s)
    assert ConflictMonitor().summary()["share_majority"] is None


def test_record_gramian_unusable_records():
    j = torch.randn(2, 5)
    assert record_gramian(None) is None
    assert record_gramian(StepRecord(losses=torch.zeros(2))) is None
    assert record_gramian(StepRecord(losses=torch.zeros(2), jacobian=j, skipped=True)) is None
    assert record_gramian(StepRecord(losses=torch.zeros(2), jacobian=j, finite=False)) is None
    g = torch.eye(2)
    assert record_gramian(StepRecord(losses=torch.zeros(2), jacobian=j, gramian=g)) is g


# ---------------------------------------------------------------- (c) both engines
def test_jacobian_and_gramian_engines_agree():
    out = {}
    for engine in ("jacobian", "gramian"):
        torch.manual_seed(0)
        model = TinyMTL(k=3, method="mgda", engine=engine)
        monitor, probe = ConflictMonitor(plot=False), Probe()
        fit(model, [monitor, probe], max_steps=4)
        # the Gramian engine records G only (after its first, checked step)
        assert all(had == ((True, True) if engine == "jacobian" else (False, True)) for s, had in probe.had.items() if s)
        out[engine] = monitor
    a, b = out["jacobian"], out["gramian"]
    assert a.steps == b.steps == [0, 1, 2, 3]
    torch.testing.assert_close(torch.tensor(a.cosines), torch.tensor(b.cosines), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(a.norms), torch.tensor(b.norms), rtol=1e-4, atol=1e-6)
    assert a.fired == b.fired


# ---------------------------------------------------------------- (d) the plot
def test_plot_written(tmp_path):
    torch.manual_seed(0)
    monitor = ConflictMonitor(plot_path=tmp_path / "sub" / "conflict.png")
    fit(TinyMTL(k=2), [monitor], max_steps=3)
    assert monitor.written_plot == tmp_path / "sub" / "conflict.png" and monitor.written_plot.stat().st_size > 0
    default = ConflictMonitor(every_n_steps=2)
    fit(TinyMTL(k=2), [default], max_steps=3, default_root_dir=str(tmp_path / "root"))
    assert default.written_plot == tmp_path / "root" / "conflict_monitor.png" and default.written_plot.is_file()
    from lightning.pytorch.loggers import CSVLogger

    logged = ConflictMonitor()
    csv = CSVLogger(str(tmp_path / "csv"))
    fit(TinyMTL(k=2), [logged], max_steps=3, logger=csv, log_every_n_steps=1)
    assert logged.written_plot == Path(csv.log_dir) / "conflict_monitor.png" and logged.written_plot.is_file()
    header = (Path(csv.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"conflict/cos/t0", "conflict/grad_norm/t1", "conflict/fires_majority", "conflict/share_any"} <= set(header)
    rows = (Path(csv.log_dir) / "metrics.csv").read_text().splitlines()[1:]
    col = header.index("conflict/cos/t0")
    logged_cos = [float(r.split(",")[col]) for r in rows if r.split(",")[col]]
    assert logged_cos == pytest.approx([c[0] for c in logged.cosines])
    off = ConflictMonitor(plot=False)
    fit(TinyMTL(k=2), [off], max_steps=1, default_root_dir=str(tmp_path / "off"))
    assert off.written_plot is None and not (tmp_path / "off" / "conflict_monitor.png").exists()


# ---------------------------------------------------------------- (e) resume
def test_resume_from_checkpoint_continues_the_history(tmp_path):
    data = loader(regression_data(n=64, k=2), batch_size=16)  # 4 steps per epoch

    def run(epochs, monitor, ckpt=None):
        torch.manual_seed(0)
        model = TinyMTL(k=2)
        t = trainer(callbacks=[monitor], max_epochs=epochs)
        t.fit(model, data, ckpt_path=ckpt)
        return t

    full = ConflictMonitor(plot=False)
    run(2, full)
    first = ConflictMonitor(plot=False)
    t = run(1, first)
    t.save_checkpoint(tmp_path / "a.ckpt")
    resumed = ConflictMonitor(plot=False)
    run(2, resumed, ckpt=str(tmp_path / "a.ckpt"))
    assert resumed.steps == full.steps == list(range(8))
    torch.testing.assert_close(torch.tensor(resumed.cosines), torch.tensor(full.cosines), rtol=1e-5, atol=1e-6)
    got, want = resumed.summary(), full.summary()
    assert got.pop("min_cos") == pytest.approx(want.pop("min_cos"), rel=1e-5) and got == want
    assert got["steps_monitored"] == 8 and len(first.steps) == 4


def test_state_dict_round_trip():
    a = ConflictMonitor(plot=False)
    a.task_names, a._min_cos = ["x", "y"], [math.inf] * 2
    a._add(0, conflict_stats(_gram([[1.0, 0.0], [-1.0, 0.1]])))
    a._add(3, conflict_stats(_gram([[1.0, 0.0], [1.0, 0.1]])))
    a.steps_unavailable = 2
    b = ConflictMonitor(plot=False)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert b.summary() == a.summary() and b.steps == [0, 3] and b.fired == a.fired
    with pytest.warns(UserWarning, match="every_n_steps"):
        ConflictMonitor(every_n_steps=5).load_state_dict(a.state_dict())


# ---------------------------------------------------------------- (f) bad arguments
@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"every_n_steps": 0}, ValueError, "every_n_steps must be >= 1"),
    ({"every_n_steps": 2.0}, TypeError, "every_n_steps must be an integer"),
    ({"every_n_steps": True}, TypeError, "every_n_steps must be an integer"),
    ({"plot": "yes"}, TypeError, "plot must be True or False"),
    ({"log": True}, ValueError, "log must be one of"),
    ({"plot_path": 3}, TypeError, "plot_path must be a path"),
    ({"plot_path": ""}, ValueError, "plot_path must not be empty"),
    ({"prefix": ""}, ValueError, "prefix must be a non-empty string"),
    ({"name": 1}, TypeError, "name must be a string"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        ConflictMonitor(**kwargs)


def test_bad_inputs():
    with pytest.raises(ValueError, match="gram must have shape"):
        conflict_stats(torch.ones(2, 3))

    class Plain(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 1)

    with pytest.raises(TypeError, match="MultiTaskModule"):
        ConflictMonitor().setup(trainer(), Plain(), "fit")


# ---------------------------------------------------------------- the benchmark script
def test_overhead_script_smoke(tmp_path):
    from benchmarks.perf import monitor_overhead

    try:
        monitor_overhead.build("yeast", 64, 0)
    except FileNotFoundError:
        pytest.skip("the yeast data set is not available")
    results = monitor_overhead.main(["--steps", "3", "--reps", "1", "--summary-steps", "4",
                                     "--out", str(tmp_path)])
    written = json.loads(Path(tmp_path / "monitor_overhead.json").read_text())
    assert set(written["variants"]) == {"plain", "every_1", "every_10", "jacobian_only"}
    assert written["summary_every_1"]["steps_monitored"] == 4 and written["command"].startswith("python -m")
    assert (tmp_path / "monitor_overhead.md").read_text().startswith("# ConflictMonitor overhead")
    assert (tmp_path / "monitor_overhead.png").is_file() and results["num_tasks"] == 14
