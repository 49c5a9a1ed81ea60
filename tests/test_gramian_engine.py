"""The Gramian engine against plain autograd: G = J J^T and J^T w for each layer type and model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from mtl_models import TinyMTL, loader, regression_data, trainer
from torch import nn

from lightning_cost import GramianConfig, GramianEngine, JacobianEngine
from lightning_cost.aggregators import build_aggregator


def per_task_losses(trunk, heads, x, ys):
    z = trunk(x)
    zs = list(z.values()) if isinstance(z, dict) else [z] * len(heads)  # SegNet-MTAN: one feature map per task
    return torch.stack([F.mse_loss(h(zi.flatten(1)).squeeze(-1), y) for h, zi, y in zip(heads, zs, ys, strict=True)])


def check_engine(trunk, heads, x, k, path, rtol=1e-5, seed=0):
    """G and J^T w from the engine vs the loop Jacobian (float64 products) on the same losses."""
    g = torch.Generator().manual_seed(seed)
    out_dim = heads[0].out_features
    ys = [torch.randn(x.shape[0], generator=g) if out_dim == 1 else torch.randn(x.shape[0], out_dim, generator=g)
          for _ in range(k)]
    shared = [p for p in trunk.parameters() if p.requires_grad]
    engine = GramianEngine(GramianConfig(path=path, verify=False))
    with engine.capture(trunk, shared, k):
        losses = per_task_losses(trunk, heads, x, ys)
    jac = JacobianEngine("loop").jacobian(losses, shared, retain=True).double()
    step = engine.compute(losses, shared, [])
    ref = jac @ jac.T
    size = ref.abs().max()
    assert float((step.gramian.double() - ref).abs().max() / size) <= rtol
    w = torch.rand(k, generator=g) - 0.3
    expected = w.double() @ jac
    assert float((step.combine(w).double() - expected).abs().max() / expected.abs().max()) <= rtol
    return engine.paths()


def heads_for(width, k, out=1):
    return nn.ModuleList([nn.Linear(width, out) for _ in range(k)])


@pytest.mark.parametrize("path", ["gram", "auto", "explicit"])
@pytest.mark.parametrize("k", [2, 12, 40])
def test_mlp_with_batchnorm_dropout_and_inplace_relu(path, k):
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(inplace=True), nn.Dropout(0.0),
                          nn.Linear(32, 16), nn.ReLU(inplace=True))
    paths = check_engine(trunk, heads_for(16, k), torch.randn(24, 64), k, path)
    assert paths["1"].startswith("explicit")  # BatchNorm's affine: plain per-task gradients
    if path == "gram":
        assert paths["0"] == paths["4"] == "gram"
    if path == "explicit":
        assert all(p.startswith("explicit") for p in paths.values())


@pytest.mark.parametrize("k", [2, 12])
def test_fingerprint_mlp_takes_the_gram_path_by_the_cost_rule(k):
    from benchmarks.models import mlp

    torch.manual_seed(0)
    trunk = mlp(2048, (512, 256), batchnorm=True, dropout=0.0)
    x = torch.randint(0, 2, (64, 2048)).float()
    paths = check_engine(trunk, heads_for(256, k), x, k, "auto")
    assert paths["0"] == "gram" and paths["3"] == "gram"  # N = 64 < d_in: the Gram trick is cheaper


@pytest.mark.parametrize("path", ["gram", "auto"])
def test_lenet_convolutions(path):
    from benchmarks.data.tasks import TaskSpec
    from benchmarks.models import lenet_multimnist

    torch.manual_seed(0)
    trunk = lenet_multimnist([TaskSpec.multiclass("a", 10)], in_shape=(1, 28, 28)).trunk
    paths = check_engine(trunk, heads_for(50, 3, out=10), torch.randn(6, 1, 28, 28), 3, path)
    if path == "gram":
        assert paths["0"] == paths["3"] == paths["7"] == "gram"
    else:  # the first conv has N = 6 x 24 x 24 rows of 25 inputs: explicit is cheaper
        assert paths["0"] == "explicit (cost rule)"


def test_resnet18_strided_padded_convolutions_and_batchnorm():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    trunk = torchvision.models.resnet18(num_classes=10)
    trunk.fc = nn.Identity()
    paths = check_engine(trunk, heads_for(512, 3), torch.randn(2, 3, 32, 32), 3, "auto", rtol=2e-5)
    assert paths["layer4.1.conv2"] == "gram"  # 2 x 1 x 1 positions, 4608 inputs
    assert paths["conv1"] == "explicit (cost rule)"


def test_segnet_trunk_with_attention():
    from benchmarks.paper.models import SegNetTrunk

    torch.manual_seed(0)
    trunk = SegNetTrunk(["a", "b"], filters=(4, 8, 8, 8, 8), attention=True, in_channels=3)
    heads = nn.ModuleList([nn.Linear(4 * 32 * 32, 1) for _ in range(2)])
    check_engine(trunk, heads, torch.randn(2, 3, 32, 32), 2, "gram", rtol=2e-5)


def test_conv1d_embedding_with_padding_idx_and_a_layer_called_twice():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8, padding_idx=0)
            self.conv = nn.Conv1d(8, 6, 3, padding="same", dilation=2)
            self.lin = nn.Linear(6, 6)

        def forward(self, idx):
            h = self.conv(self.emb(idx).transpose(1, 2)).relu().mean(-1)
            return self.lin(torch.tanh(self.lin(h)))  # the same Linear twice

    torch.manual_seed(0)
    idx = torch.randint(0, 20, (4, 10))
    idx[0, :3] = 0
    paths = check_engine(Net(), heads_for(6, 3), idx, 3, "gram")
    assert paths == {"emb": "gram", "conv": "gram", "lin": "gram"}


def test_frozen_weight_with_a_trainable_bias():
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))
    trunk[0].weight.requires_grad_(False)
    paths = check_engine(trunk, heads_for(8, 3), torch.randn(10, 32), 3, "gram")
    assert paths["0"] == "gram"


def test_unsupported_layers_take_the_explicit_path_and_say_why():
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2, padding=1), nn.LayerNorm([4, 6, 6]), nn.Flatten(),
                          nn.Linear(144, 8))
    paths = check_engine(trunk, heads_for(8, 2), torch.randn(3, 2, 6, 6), 2, "gram")
    assert paths["0"] == "explicit (groups=2)"
    assert paths["1"] == "explicit (no Gram rule for this module type)"
    assert paths["3"] == "gram"


def test_config_is_validated_where_it_is_defined():
    for bad in ({"path": "fast"}, {"max_rows": 0}, {"verify": "yes"}, {"rtol": 2.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            GramianConfig(**bad)
    with pytest.raises(ValueError, match="engine='gramian' needs a Gramian method"):
        TinyMTL(k=2, method="graddrop", engine="gramian")
    with pytest.raises(ValueError, match="engine must be"):
        TinyMTL(k=2, method="mgda", engine="fast")


# ----------------------------------------------------------------------------- through the mixin
def one_step_direction(method, engine, k=3, batchnorm=True, **kw):
    torch.manual_seed(0)
    model = TinyMTL(k=k, method=build_aggregator(method, **kw), batchnorm=batchnorm, engine=engine,
                    gramian={"path": "gram"}, optimizer="sgd")
    trainer(max_steps=1).fit(model, loader(regression_data(k=k)))
    return model


@pytest.mark.parametrize(("method", "kw"), [("mgda", {}), ("cagrad", {}), ("imtl", {}), ("pcgrad", {"seed": 0}),
                                            ("fairgrad", {}), ("nashmtl", {})])
def test_every_gramian_method_takes_the_same_step_on_both_engines(method, kw):
    if method == "nashmtl":
        pytest.importorskip("cvxpy")
    gram, jac = one_step_direction(method, "gramian", **kw), one_step_direction(method, "jacobian", **kw)
    assert gram.mtl_step.jacobian is None and jac.mtl_step.jacobian is not None
    torch.testing.assert_close(gram.mtl_step.gramian, jac.mtl_step.gramian, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gram.mtl_step.direction, jac.mtl_step.direction, rtol=1e-4, atol=1e-6)
    for a, b in zip(gram.parameters(), jac.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_auto_engine_is_gramian_for_gramian_methods_only():
    assert TinyMTL(k=2, method="mgda").mtl_uses_gramian_engine
    assert not TinyMTL(k=2, method="graddrop").mtl_uses_gramian_engine
    assert not TinyMTL(k=2, method="ls").mtl_uses_gramian_engine
    assert not TinyMTL(k=2, method="mgda", engine="jacobian").mtl_uses_gramian_engine


def test_accumulation_and_several_steps_match_the_jacobian_engine():
    def fit(engine):
        torch.manual_seed(0)
        model = TinyMTL(k=3, method="mgda", batchnorm=False, engine=engine, gramian={"path": "gram"},
                        optimizer="sgd", lr=1e-2)
        trainer(max_steps=4, accumulate_grad_batches=2).fit(model, loader(regression_data(k=3), batch_size=16))
        return model

    for a, b in zip(fit("gramian").parameters(), fit("jacobian").parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class TiedWeights(TinyMTL):
    """Reads the first layer's weight outside its forward: the Gram parts cannot see that use."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        z = self.trunk(x) + F.linear(x, self.trunk[0].weight)
        return {f"t{i}": F.mse_loss(h(z).squeeze(-1), y[:, i]) for i, h in enumerate(self.heads)}


def test_a_weight_used_outside_its_module_is_caught_on_the_first_step(caplog):
    def fit(engine):
        torch.manual_seed(0)
        model = TiedWeights(k=3, method="mgda", batchnorm=False, engine=engine, gramian={"path": "gram"},
                            optimizer="sgd")
        trainer(max_steps=3).fit(model, loader(regression_data(k=3)))
        return model

    gram = fit("gramian")
    assert gram.mtl_gramian_engine.disabled_reason is not None and not gram.mtl_uses_gramian_engine
    assert "differ from J J^T" in caplog.text
    for a, b in zip(gram.parameters(), fit("jacobian").parameters(), strict=True):
        torch.testing.assert_close(a, b)  # the fallback took the exact steps


def test_bf16_mixed_trains_and_fp16_scale_is_removed_from_g():
    from lightning.pytorch.plugins import MixedPrecision

    torch.manual_seed(0)
    model = TinyMTL(k=3, method="mgda", batchnorm=False, engine="gramian", gramian={"path": "gram"})
    trainer(max_steps=3, precision="bf16-mixed").fit(model, loader(regression_data(k=3)))
    assert all(torch.isfinite(p).all() for p in model.parameters()) and model.mtl_step.gramian is not None

    def fp16(engine):
        torch.manual_seed(0)
        m = TinyMTL(k=3, method="mgda", batchnorm=False, engine=engine, gramian={"path": "gram"})
        plugin = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0**10))
        trainer(max_steps=1, plugins=[plugin]).fit(m, loader(regression_data(k=3)))
        return m.mtl_step

    gram, jac = fp16("gramian"), fp16("jacobian")
    torch.testing.assert_close(gram.gramian, jac.gramian, rtol=1e-3, atol=1e-4)  # unscaled in both
    torch.testing.assert_close(gram.direction, jac.direction, rtol=1e-3, atol=1e-4)


@pytest.mark.ddp
def test_ddp_gramian_is_the_global_one_on_both_ranks(run_ddp):
    """Ranks see different samples: a per-rank Gram would differ between them and from the global J J^T."""
    _, (r0, r1) = run_ddp("gramian")
    assert len(r0["gramians"]) == len(r0["jacobians"]) == 6  # the exact path: J averaged over ranks
    for g0, g1, j in zip(r0["gramians"], r1["gramians"], r0["jacobians"], strict=True):
        assert torch.equal(g0, g1)
        torch.testing.assert_close(g0, j @ j.T, rtol=1e-5, atol=1e-6)
    for a, b in zip(r0["params"], r1["params"], strict=True):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- two stages (heads, then trunk)
def check_two_stage(trunk, heads, x, k, head=None, path="auto", reps=False, rtol=1e-5):
    """G, J^T w, the heads' and the representation's per-task gradients from the engine with separate
    task losses vs the loop Jacobian of the same losses; returns the engine's ``split``."""
    g = torch.Generator().manual_seed(1)
    ys = [torch.randn(x.shape[0], generator=g) for _ in range(k)]
    shared = [p for p in trunk.parameters() if p.requires_grad]
    others = [p for h in heads for p in h.parameters()]
    engine = GramianEngine(GramianConfig(path=path, verify=False))
    head = head or (lambda i, z: heads[i](z).squeeze(-1))
    with engine.capture(trunk, shared, k, boundary=trunk):
        z = trunk(x)
        parts = [F.mse_loss(head(i, z), y) for i, y in enumerate(ys)]
    losses = torch.stack(parts)
    marked = [z] if reps else []
    ref = JacobianEngine("loop").vjps(losses, [*shared, *others, *marked], retain=True)
    jac = JacobianEngine.assemble(ref[: len(shared)], shared, k).double()
    step = engine.compute(losses, shared, others, marked, task_losses=parts)
    size = (jac @ jac.T).abs().max()
    assert float((step.gramian.double() - jac @ jac.T).abs().max() / size) <= rtol
    w = torch.rand(k, generator=g) - 0.3
    expected = w.double() @ jac
    assert float((step.combine(w).double() - expected).abs().max() / expected.abs().max()) <= rtol
    for got, want in zip([*step.other_grads, *step.rep_grads], ref[len(shared):], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    return engine.split


@pytest.mark.parametrize("path", ["gram", "explicit"])
@pytest.mark.parametrize("k", [2, 12, 40])
def test_two_stages_give_g_the_update_and_the_head_gradients(path, k):
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(inplace=True), nn.Linear(32, 16),
                          nn.ReLU(inplace=True))
    split = check_two_stage(trunk, heads_for(16, k), torch.randn(24, 64), k, path=path, reps=True)
    assert split.startswith("two stages")


def test_two_stages_on_convolutions():
    from benchmarks.perf.bench import lenet_parts

    torch.manual_seed(0)
    trunk, _ = lenet_parts(3)
    width = trunk(torch.zeros(2, 1, 28, 28)).shape[1]
    assert check_two_stage(trunk, heads_for(width, 3), torch.randn(8, 1, 28, 28), 3, path="gram").startswith("two")


def test_a_head_reading_a_trunk_feature_keeps_one_stage_and_stays_exact():
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(12, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 6))
    heads = heads_for(6, 3)
    feature = {}
    trunk[2].register_forward_hook(lambda m, a, out: feature.update(h=out))  # a skip connection around layer 3
    skip = nn.Linear(10, 6)
    split = check_two_stage(trunk, heads, torch.randn(16, 12), 3, head=lambda i, z: heads[i](z + skip(feature["h"])).squeeze(-1))
    assert split.startswith("one stage (a task loss reaches")


def test_a_shared_parameter_used_in_a_head_keeps_one_stage_and_stays_exact():
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(12, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 10))
    heads = heads_for(10, 3)
    bn = trunk[1].weight  # the explicit path's autograd sees this use; the cut at the trunk's output does not
    split = check_two_stage(trunk, heads, torch.randn(16, 12), 3, head=lambda i, z: heads[i](z * bn).squeeze(-1))
    assert split.startswith("one stage (a task loss reaches")


def test_stacked_losses_and_repeated_calls_take_one_stage_and_say_why():
    torch.manual_seed(0)
    trunk, heads, x = nn.Sequential(nn.Linear(12, 8), nn.ReLU()), heads_for(8, 2), torch.randn(16, 12)
    shared = list(trunk.parameters())
    engine = GramianEngine(GramianConfig(verify=False))
    with engine.capture(trunk, shared, 2, boundary=trunk):
        losses = torch.stack([h(trunk(x)).pow(2).mean() for h in heads])  # the trunk is called twice
    engine.compute(losses, shared, [], task_losses=list(losses.unbind()))
    assert engine.split == "one stage (the shared module was called 2 times, not once)"
    with engine.capture(trunk, shared, 2, boundary=trunk):
        z = trunk(x)
        losses = torch.stack([h(z).pow(2).mean() for h in heads])
    engine.compute(losses, shared, [])
    assert engine.split.startswith("one stage (the task losses came as one stacked tensor")
    off = GramianEngine(GramianConfig(verify=False, two_stage=False))
    with off.capture(trunk, shared, 2, boundary=trunk):
        z = trunk(x)
        parts = [h(z).pow(2).mean() for h in heads]
    off.compute(torch.stack(parts), shared, [], task_losses=parts)
    assert off.split == "one stage (two_stage=False)"


def test_the_mixin_takes_two_stages_for_a_mapping_of_losses():
    model = one_step_direction("mgda", "gramian")
    assert model.mtl_gramian_engine.split.startswith("two stages")
