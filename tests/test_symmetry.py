"""Exact rescaling symmetries (lightning_cost.teleport.symmetry.groups), measured from outside.

Invariance is checked by running the network before and after ``apply_``; gradients by plain
autograd at both points; factors against ones built by hand from ``exp(log_scales)``.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from mtl_models import regression_data
from torch import Tensor, nn
from torchvision.models import resnet18

from benchmarks.data.tasks import TaskSpec
from benchmarks.models import MultiTaskNet, fingerprint_mlp, lenet_multimnist, make_heads, mlp, mlp_multilabel
from benchmarks.paper.models import segnet_mtan
from benchmarks.paper.tasks import depth_task, segmentation_task
from lightning_cost.teleport.symmetry.groups import NoSymmetryError, RescaleSymmetry, ScaleGroup

LOG4 = math.log(4.0)
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def rel(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def log_scales(sym: RescaleSymmetry, seed: int = 0, dtype=torch.float32) -> Tensor:
    """Uniform in [-log 4, log 4]."""
    g = torch.Generator().manual_seed(seed)
    return ((torch.rand(sym.num_scales, generator=g, dtype=torch.float64) * 2 - 1) * LOG4).to(dtype)


# --------------------------------------------------------------------------- the test networks


def _specs(kind: str, k: int) -> list[TaskSpec]:
    make = {"multiclass": lambda n: TaskSpec.multiclass(n, 10), "binary": TaskSpec.binary,
            "regression": TaskSpec.regression}[kind]
    return [make(f"t{i}") for i in range(k)]


def _plain_mlp(k: int = 3) -> tuple[nn.Module, Tensor]:
    trunk = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    return MultiTaskNet(trunk, make_heads(_specs("regression", k), 8)), torch.randn(16, 6)


def _resnet() -> tuple[nn.Module, Tensor]:
    trunk = resnet18()
    trunk.fc = nn.Identity()
    return MultiTaskNet(trunk, make_heads(_specs("multiclass", 2), 512)), torch.randn(8, 3, 32, 32)


NETWORKS = {
    "mlp": _plain_mlp,
    "mlp_bn": lambda: (MultiTaskNet(mlp(6, [16, 16]), make_heads(_specs("regression", 3), 16)), torch.randn(16, 6)),
    "lenet": lambda: (lenet_multimnist(_specs("multiclass", 2), (1, 28, 28)), torch.randn(8, 1, 28, 28)),
    "mlp_multilabel": lambda: (mlp_multilabel(10, _specs("binary", 3), hidden=(24, 16)), torch.randn(16, 10)),
    "fingerprint_mlp": lambda: (fingerprint_mlp(12, _specs("regression", 2), hidden=(32, 16)), torch.randn(16, 12)),
    "resnet18": _resnet,
    "segnet_mtan": lambda: (segnet_mtan([segmentation_task(3), depth_task()], filters=(4, 6, 8, 8, 8)),
                            torch.randn(2, 3, 32, 32)),
}


def build(name: str, dtype=torch.float32, seed: int = 0) -> tuple[nn.Module, Tensor]:
    """The network with realistic BatchNorm statistics (three train-mode forwards)."""
    torch.manual_seed(seed)
    net, x = NETWORKS[name]()
    net, x = net.to(dtype), x.to(dtype)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(x + 0.1 * torch.randn_like(x))
    return net, x


def trunk_symmetry(name: str, mode: str, dtype=torch.float32, **kw) -> tuple[nn.Module, Tensor, RescaleSymmetry]:
    """The network in ``mode`` and the rescalings of its trunk's parameters."""
    net, x = build(name, dtype)
    net.train(mode == "train")
    return net, x, RescaleSymmetry.find(net.trunk, (x,), list(net.trunk.parameters()), **kw)


def outputs_and_loss(net: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """Trunk output, heads' outputs and a task loss; dropout masks drawn from one fixed seed."""
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(1)
        z = net.trunk(x)
        heads = net.heads_forward(z)
    flat = torch.cat([v.reshape(-1) for v in (z.values() if isinstance(z, dict) else [z])])
    target = torch.linspace(-1, 1, 7, dtype=x.dtype)
    loss = sum(F.mse_loss(y, target.repeat(y.numel() // 7 + 1)[: y.numel()].view_as(y)) for y in heads.values())
    return torch.cat([flat, *[y.reshape(-1) for y in heads.values()]]), loss


def invariance_error(net: nn.Module, x: Tensor, sym: RescaleSymmetry, s: Tensor) -> tuple[float, float, float]:
    """Relative change of (outputs, loss) under ``apply_(s)``, and the outputs' own rounding error.

    The rounding error is the distance of the unrescaled outputs to those of a float64 copy (same
    buffers): float32 train-mode BatchNorm on small batches amplifies rounding by itself.
    """
    buffers = [(b, b.clone()) for b in net.buffers()]
    exact = copy.deepcopy(net).double()
    truth, _ = outputs_and_loss(exact, x.double())
    out0, loss0 = outputs_and_loss(net, x)
    for b, saved in buffers:
        b.copy_(saved)
    sym.apply_(s)
    out1, loss1 = outputs_and_loss(net, x)
    return rel(out1, out0), abs(loss1 - loss0).item() / abs(loss0).item(), rel(out0.double(), truth)


# --------------------------------------------------------------------------- invariance


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(NETWORKS))
def test_rescaling_leaves_outputs_and_task_loss_unchanged(name, mode, dtype):
    """To 1e-5 relative in float32 (or 4x the network's own float32 rounding error where that is
    larger), to 1e-12 in float64."""
    net, x, sym = trunk_symmetry(name, mode, dtype)
    assert sym.num_scales > 0 and all(g.kind == "homogeneous" for g in sym.groups)
    out_err, loss_err, rounding = invariance_error(net, x, sym, log_scales(sym, dtype=dtype))
    tol = TOL[dtype] if dtype == torch.float64 else max(TOL[dtype], 4 * rounding)
    assert out_err < tol and loss_err < tol, (out_err, loss_err, rounding)


@pytest.mark.parametrize("name", ["mlp", "lenet", "resnet18"])
def test_control_rescaling_one_layer_alone_changes_outputs(name):
    """The check above can fail: one parameter's factor without the rest of its group's."""
    net, x, sym = trunk_symmetry(name, "eval")
    out0, _ = outputs_and_loss(net, x)
    k, t = next((k, t) for k, t in enumerate(sym.factors(log_scales(sym))) if not bool((t == 1).all()))
    with torch.no_grad():
        sym.params[k].mul_(t)
    out1, _ = outputs_and_loss(net, x)
    assert rel(out1, out0) > 1e-2


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", ["mlp_bn", "resnet18"])
def test_normalized_groups_are_exact_up_to_eps(name, mode):
    """Channels feeding only a BatchNorm: invariant once eps ~ 0 (running stats follow in eval);
    with the norm's own eps the invariance is only approximate, which is why it is off by default."""
    net, x, sym = trunk_symmetry(name, mode, torch.float64, normalized=True)
    default = RescaleSymmetry.find(net.trunk, (x,), sym.params)
    kinds = {g.kind for g in sym.groups}
    assert kinds == {"homogeneous", "normalized"} and sym.num_scales > default.num_scales
    s = log_scales(sym, dtype=torch.float64)
    state = copy.deepcopy(net.state_dict())
    drift, _, _ = invariance_error(net, x, sym, s)
    net.load_state_dict(state)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eps = 1e-30
    exact, _, _ = invariance_error(net, x, sym, s)
    assert exact < 1e-10 and drift > 1e3 * exact, (exact, drift)


# --------------------------------------------------------------------------- gradients


def per_task_jacobian(net: nn.Module, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``[K, P]`` per-task gradients of the trunk parameters (plain autograd) and the ``[K]`` losses.

    Task ``k``'s loss is the MSE of its output to ``y[:, k]`` (to 0.3 without ``y``).
    """
    params = list(net.trunk.parameters())
    losses = torch.stack([F.mse_loss(out, torch.full_like(out, 0.3) if y is None else y[:, k])
                          for k, out in enumerate(net(x).values())])
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)])
            for loss in losses]
    return torch.stack(rows), losses.detach()


@pytest.mark.parametrize("name", ["mlp", "mlp_bn", "lenet"])
def test_per_task_gradients_at_the_new_point_are_the_old_ones_over_t(name):
    net, x, sym = trunk_symmetry(name, "train")
    state = copy.deepcopy(net.state_dict())
    j0, l0 = per_task_jacobian(net, x)
    net.load_state_dict(state)
    s = log_scales(sym, seed=3)
    sym.apply_(s)
    j1, l1 = per_task_jacobian(net, x)
    t = sym.flat_factors(s)
    assert rel(l1, l0) < 1e-5
    for k in range(j0.shape[0]):
        assert rel(j1[k], j0[k] / t) < 1e-4, k
    assert rel(j1[0], j0[0]) > 1e-2  # the gradients did change


# --------------------------------------------------------------------------- the group analysis


def group_names(sym: RescaleSymmetry) -> list[str]:
    return [g.name for g in sym.groups]


def find_all(module: nn.Module, x: Tensor, **kw) -> RescaleSymmetry:
    return RescaleSymmetry.find(module, (x,), list(module.parameters()), **kw)


def assert_invariant(module: nn.Module, x: Tensor, sym: RescaleSymmetry) -> None:
    with torch.no_grad():
        y0 = module(x)
        sym.apply_(log_scales(sym))
        assert rel(module(x), y0) < 1e-5


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = F.relu(self.a(x))
        return self.d(F.relu(h + self.c(F.relu(self.b(h)))))


def named_factors(module: nn.Module, sym: RescaleSymmetry, s: Tensor) -> dict[str, Tensor]:
    return dict(zip([n for n, _ in module.named_parameters()], sym.factors(s), strict=True))


def test_a_residual_sum_ties_both_paths_into_one_group():
    torch.manual_seed(0)
    module, x = Residual(), torch.randn(5, 4)
    sym = find_all(module, x)
    assert sym.groups == (ScaleGroup("a, c -> b, d", 6, "homogeneous"), ScaleGroup("b -> c", 6, "homogeneous"))
    t = named_factors(module, sym, log_scales(sym))
    a = t["a.weight"][:, 0]
    assert torch.equal(t["a.bias"], a) and torch.equal(t["c.bias"], a)
    assert torch.allclose(t["b.weight"], t["b.bias"][:, None] / a) and torch.allclose(t["d.weight"][0], 1 / a)
    assert_invariant(module, x, sym)


@pytest.mark.parametrize("squash", [nn.Tanh, nn.Sigmoid])
def test_a_saturating_activation_fixes_the_group_it_reads(squash):
    module = nn.Sequential(nn.Linear(4, 6), squash(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    sym = find_all(module, torch.randn(5, 4))
    assert group_names(sym) == ["2 -> 4"]
    assert all(bool((t == 1).all()) for t in sym.factors(log_scales(sym))[:2])


def test_a_layer_outside_params_fixes_the_groups_it_touches():
    module = nn.Sequential(*[m for i in range(3) for m in (nn.Linear(6 if i else 4, 6), nn.ReLU())], nn.Linear(6, 2))
    x = torch.randn(5, 4)
    assert group_names(find_all(module, x)) == ["0 -> 2", "2 -> 4", "4 -> 6"]
    params = [p for name, p in module.named_parameters() if not name.startswith("2.")]
    sym = RescaleSymmetry.find(module, (x,), params)
    assert group_names(sym) == ["4 -> 6"]
    assert all(bool((t == 1).all()) for t in sym.factors(log_scales(sym))[:2])
    assert_invariant(module, x, sym)


def test_the_traced_modules_output_is_fixed():
    module = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU())
    sym = find_all(module, torch.randn(5, 4))
    assert group_names(sym) == ["0 -> 2"]
    t = named_factors(module, sym, log_scales(sym))
    assert torch.equal(t["2.weight"], t["2.weight"][:1].expand(5, 6)) and bool((t["2.bias"] == 1).all())
    assert torch.allclose(t["2.weight"][0], 1 / t["0.bias"])


def test_a_grouped_convolution_is_not_a_consumer():
    module = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1, groups=2), nn.ReLU(),
                           nn.Conv2d(4, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    x = torch.randn(2, 3, 5, 5)
    sym = find_all(module, x)
    assert group_names(sym) == ["4 -> 6"]
    assert_invariant(module, x, sym)


def test_flatten_gives_each_channel_its_block_of_columns():
    module = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    x = torch.randn(2, 2, 6, 6)
    sym = find_all(module, x)
    assert sym.groups == (ScaleGroup("0 -> 3", 3, "homogeneous"),)
    s = log_scales(sym)
    t_conv, t_bias, t_lin, t_lin_bias = sym.factors(s)
    a = s.exp()
    assert torch.allclose(t_conv, a.view(3, 1, 1, 1).expand(3, 2, 3, 3)) and torch.allclose(t_bias, a)
    assert torch.allclose(t_lin, (1 / a).repeat_interleave(16).expand(5, 48)) and bool((t_lin_bias == 1).all())
    assert_invariant(module, x, sym)


class TwoBranches(nn.Module):
    """``a`` and ``b`` feed ``c``: shared (``c`` called on both) or concatenated; optional mask."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a, self.b = nn.Linear(3, 4), nn.Linear(3, 4)
        self.c = nn.Linear(8 if how == "cat" else 4, 2)

    def forward(self, x):
        ha, hb = F.relu(self.a(x)), F.relu(self.b(x))
        if self.how == "shared":
            return self.c(ha) + self.c(hb)
        if self.how == "cat":
            return self.c(torch.cat([ha, hb], dim=1))
        if self.how == "mask":
            return self.c(ha * torch.sigmoid(self.b(x)))
        return self.c(ha * hb)


@pytest.mark.parametrize(
    "how, names",
    [("shared", ["a, b -> c"]), ("cat", ["a -> c", "b -> c"]), ("mask", ["a -> c"]), ("product", [])],
)
def test_shared_layers_concatenation_and_products(how, names):
    module, x = TwoBranches(how), torch.randn(5, 3)
    if not names:
        with pytest.raises(NoSymmetryError, match="mul"):
            find_all(module, x)
        return
    sym = find_all(module, x)
    assert group_names(sym) == names
    assert_invariant(module, x, sym)


def test_no_symmetry_raises_with_the_reason():
    module = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    with pytest.raises(NoSymmetryError, match=r"'1' \(Tanh\)"):
        find_all(module, torch.randn(5, 4))
    with pytest.raises(NoSymmetryError, match="could not be traced.*mat1 and mat2"):
        find_all(module, torch.randn(5, 3))
    with pytest.raises(NoSymmetryError, match="no Linear/Conv"):
        RescaleSymmetry.find(module, (torch.randn(5, 4),), [nn.Parameter(torch.zeros(1))])


class ShapeChecked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        if x.dim() != 2 or x.shape[-1] % 2:
            raise ValueError("bad input")
        h = F.relu(self.a(x))
        return self.b(h) if x.sum() > -100 else self.b(2 * h)


def test_shape_branches_are_followed_and_value_branches_are_reported():
    """Plain torch.fx cannot trace a forward that branches on x.dim(); the value tracer follows it."""
    module, x = ShapeChecked(), torch.randn(5, 4)
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(module)
    with pytest.warns(UserWarning, match="branches on tensor values"):
        sym = find_all(module, x)
    assert group_names(sym) == ["a -> b"]


def test_find_has_no_side_effects():
    net, x = build("fingerprint_mlp")
    net.train()
    net.trunk[1].eval()
    modes = [m.training for m in net.modules()]
    state = copy.deepcopy(net.state_dict())
    rng = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RescaleSymmetry.find(net.trunk, (x,), list(net.trunk.parameters()), normalized=True)
    assert [m.training for m in net.modules()] == modes and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())


# --------------------------------------------------------------------------- the action itself


def test_apply_is_in_place_and_undone_by_the_opposite_scales():
    net, x = build("mlp_bn")
    params = list(net.trunk.parameters())
    sym = RescaleSymmetry.find(net.trunk, (x,), params, normalized=True)
    ids, ptrs, before = [id(p) for p in params], [p.data_ptr() for p in params], [p.detach().clone() for p in params]
    snapshot = sym.buffer_snapshot()
    assert {id(b) for b, _ in snapshot} == {id(m.running_mean) for m in net.trunk if isinstance(m, nn.BatchNorm1d)} | \
        {id(m.running_var) for m in net.trunk if isinstance(m, nn.BatchNorm1d)}
    s = log_scales(sym)
    sym.apply_(s)
    assert [id(p) for p in net.trunk.parameters()] == ids and [p.data_ptr() for p in params] == ptrs
    assert max(rel(p, b) for p, b in zip(params, before, strict=True)) > 0.1
    assert not all(torch.equal(b, c) for b, c in snapshot)
    sym.apply_(-s)
    assert max(rel(p, b) for p, b in zip(params, before, strict=True)) < 1e-6
    for b, c in snapshot:
        b.copy_(c)
    assert all(torch.equal(b, c) for b, c in snapshot)


def test_factors_are_differentiable_and_cheap_to_form():
    net, x = build("mlp", torch.float64)
    sym = RescaleSymmetry.find(net.trunk, (x,), list(net.trunk.parameters()))
    s = log_scales(sym, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(sym.flat_factors, (s,))
    flat = sym.flat_factors(s)
    assert flat.shape == (sum(p.numel() for p in net.trunk.parameters()),)
    assert [tuple(t.shape) for t in sym.factors(s)] == [tuple(p.shape) for p in net.trunk.parameters()]


def test_bad_arguments_are_refused():
    module = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    sym = find_all(module, torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"shape \[6\]"):
        sym.factors(torch.zeros(5))
    with pytest.raises(ValueError, match="floating-point"):
        sym.apply_(torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="more than once"):
        RescaleSymmetry.find(module, (torch.randn(3, 4),), [*module.parameters(), module[0].weight])
    with pytest.raises(ValueError, match="kind"):
        ScaleGroup("x", 1, "approximate")


# --------------------------------------------------------------------------- a teleport on the level set


def trained_conflicting_mlp(steps: int = 200) -> tuple[MultiTaskNet, Tensor, Tensor]:
    """3-task ReLU MLP (two hidden layers) after ``steps`` Adam steps on conflicting targets."""
    torch.manual_seed(0)
    x, y = regression_data(n=256, d=8, k=3, seed=0, conflict=1.0).tensors
    trunk = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
    net = MultiTaskNet(trunk, nn.ModuleDict({f"t{k}": nn.Linear(16, 1) for k in range(3)}))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        sum(F.mse_loss(out, y[:, k]) for k, out in enumerate(net(x).values())).backward()
        opt.step()
    return net, x, y


def min_cosine(j: Tensor, temperature: float | None = None) -> Tensor:
    """min_i cos(g_i, g0), g0 the mean gradient; a soft minimum when ``temperature`` is given."""
    cos = F.cosine_similarity(j, j.mean(0, keepdim=True), dim=1)
    return cos.min() if temperature is None else -temperature * torch.logsumexp(-cos / temperature, 0)


def teleport_search(objective: str, steps: int = 300) -> dict[str, float]:
    """Search log-scales (|log a| <= log 4) with Adam on J' = J / t only; verify at the new point."""
    net, x, y = trained_conflicting_mlp()
    sym = RescaleSymmetry.find(net.trunk, (x,), list(net.trunk.parameters()))
    j, losses = per_task_jacobian(net, x, y)
    u = torch.zeros(sym.num_scales, requires_grad=True)
    opt = torch.optim.Adam([u], lr=0.05)
    for _ in range(steps):
        jt = j / sym.flat_factors(LOG4 * torch.tanh(u))
        loss = -min_cosine(jt, 0.05) if objective == "cos" else -jt.mean(0).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    s = (LOG4 * torch.tanh(u)).detach()
    predicted = j / sym.flat_factors(s)
    sym.apply_(s)
    j_new, losses_new = per_task_jacobian(net, x, y)
    return {
        "min_cos_before": min_cosine(j).item(), "min_cos_after": min_cosine(j_new).item(),
        "g0_before": j.mean(0).norm().item(), "g0_after": j_new.mean(0).norm().item(),
        "grad_error": rel(j_new, predicted), "loss_change": rel(losses_new, losses),
        "max_abs_log_scale": s.abs().max().item(),
    }


@pytest.mark.parametrize("objective", ["cos", "norm"])
def test_a_rescaling_teleport_moves_gradients_exactly_as_predicted(objective):
    r = teleport_search(objective)
    assert r["grad_error"] < 1e-4 and r["loss_change"] < 1e-5 and r["max_abs_log_scale"] <= LOG4
    if objective == "cos":
        assert r["min_cos_after"] > r["min_cos_before"] + 0.05
    else:
        assert r["g0_after"] > 1.2 * r["g0_before"]


def _norm_net(norm: str) -> tuple[nn.Module, Tensor]:
    if norm == "layer":
        return nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, 2)), torch.randn(5, 4)
    layer = nn.GroupNorm(2, 6) if norm == "group" else nn.InstanceNorm2d(6, affine=True)
    return nn.Sequential(nn.Conv2d(3, 6, 1), layer, nn.ReLU(), nn.Conv2d(6, 2, 1)), torch.randn(2, 3, 4, 4)


@pytest.mark.parametrize("norm, absorbed", [("layer", 1), ("group", 2), ("instance", 6)])
def test_layer_group_and_instance_norms(norm, absorbed):
    """The affine of each norm produces a homogeneous group; with normalized=True the norm also
    absorbs one scale per normalised slice (LayerNorm: 1, GroupNorm: 1 per group, InstanceNorm: 1
    per channel), exact once eps ~ 0."""
    torch.manual_seed(0)
    module, x = _norm_net(norm)
    module, x = module.double(), x.double()
    assert find_all(module, x).groups == (ScaleGroup("1 -> 3", 6, "homogeneous"),)
    sym = find_all(module, x, normalized=True)
    assert sym.groups == (ScaleGroup("0 -> 1", absorbed, "normalized"), ScaleGroup("1 -> 3", 6, "homogeneous"))
    module[1].eps = 1e-30
    with torch.no_grad():
        y0 = module(x)
        sym.apply_(log_scales(sym, dtype=torch.float64))
        assert rel(module(x), y0) < 1e-12


def test_a_layer_whose_weight_is_not_a_listed_parameter_is_not_rescaled():
    """A weight replaced by a plain tensor (e.g. a frozen copy) must not be treated as rescalable."""
    module = nn.Sequential(*[m for i in range(3) for m in (nn.Linear(6 if i else 4, 6), nn.ReLU())], nn.Linear(6, 2))
    frozen = module[2].weight.detach().clone()
    del module[2].weight
    module[2].weight = frozen
    x = torch.randn(5, 4)
    sym = find_all(module, x)
    assert group_names(sym) == ["4 -> 6"]
    assert_invariant(module, x, sym)


class IntegerCast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.b(F.relu(self.a(x)).mul(10).to(torch.int64).float())


def test_a_cast_to_integers_fixes_the_group():
    """Rounding to integers is not homogeneous: (a x).to(int) != a * x.to(int)."""
    with pytest.raises(NoSymmetryError, match=r"'to' \(to\)"):
        find_all(IntegerCast(), torch.randn(5, 4))
