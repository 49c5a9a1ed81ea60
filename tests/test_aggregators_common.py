"""What every Jacobian-based method shares: the registry, input validation, dtypes, the Gramian,
the symmetries (task permutation, scale), and the package's exports.

The methods themselves are checked against their defining properties in
test_aggregators_minnorm.py (MGDA, CAGrad), test_aggregators_projection.py (GradDrop, PCGrad)
and test_aggregators_fair.py (IMTL-G, Nash-MTL, FairGrad); the four TorchJD peers (UPGrad, DualProj,
ConFIG, Random) in test_aggregators_peers.py.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from aggregator_props import HYPO, Symmetry, assert_permutation_and_scale, gram, jacobians, rand_jacobian
from hypothesis import given
from hypothesis import strategies as st

import lightning_cost.aggregators as aggregators
from lightning_cost.aggregators import (
    AVAILABLE,
    IMTLG,
    MGDA,
    Aggregator,
    CAGrad,
    FairGrad,
    GradDrop,
    GramianAggregator,
    NashMTL,
    PCGrad,
    aggregator_class,
    build_aggregator,
)

METHODS = ["mgda", "graddrop", "pcgrad", "cagrad", "imtl", "nashmtl", "fairgrad"]
GRAMIAN_METHODS = ["mgda", "pcgrad", "cagrad", "imtl", "nashmtl", "fairgrad"]
EXPECTED_CLASS = {
    "mgda": MGDA,
    "graddrop": GradDrop,
    "pcgrad": PCGrad,
    "cagrad": CAGrad,
    "imtl": IMTLG,
    "nashmtl": NashMTL,
    "fairgrad": FairGrad,
}

#: How each method transforms under a task permutation and J -> cJ (tolerances as each method's solver allows).
SYMMETRY = {
    "mgda": Symmetry(rtol=1e-7, atol=1e-9),
    "cagrad": Symmetry(),
    "imtl": Symmetry(),
    "nashmtl": Symmetry(rtol=1e-5, atol=1e-7, max_k=4),
    # G -> c^2 G scales w by c^(-2 alpha / (alpha + 1)) (alpha = 2: c^(-4/3)).
    "fairgrad": Symmetry(weight_power=-4 / 3, atol=1e-10, scales=(1e-2, 1e2)),
    # Seeded random methods: the same draws give the same result at any scale; PCGrad's task
    # orders are drawn per task index, so a permutation changes them (no permutation property).
    "pcgrad": Symmetry(permutes=False, rtol=1e-7, atol=1e-9, hparams={"seed": 5}),
    "graddrop": Symmetry(rtol=1e-7, atol=1e-9, hparams={"seed": 5}),
}


# ----------------------------------------------------------------------------- registry and exports


@pytest.mark.parametrize("name", METHODS)
def test_build_aggregator_builds_each(name: str) -> None:
    agg = build_aggregator(name)
    assert type(agg) is EXPECTED_CLASS[name]
    assert aggregator_class(name) is EXPECTED_CLASS[name]
    assert isinstance(agg, Aggregator) and agg.requires_jacobian
    assert isinstance(agg, GramianAggregator) == (name != "graddrop")


def test_every_registered_class_is_exported_by_name() -> None:
    for name in AVAILABLE:
        cls = aggregator_class(name)
        assert getattr(aggregators, cls.__name__) is cls and cls.__name__ in aggregators.__all__
        assert cls.__name__ in dir(aggregators)
    with pytest.raises(AttributeError, match="NoSuchMethod"):
        aggregators.NoSuchMethod  # noqa: B018


@pytest.mark.parametrize("missing", ["cvxpy", "ecos"])
def test_without_the_nashmtl_extra_only_building_nash_mtl_fails(monkeypatch, missing: str) -> None:
    """cvxpy/ECOS are an optional extra: the package, its class exports and the other methods work
    without them, and building Nash-MTL is an ImportError that names the extra."""
    monkeypatch.setitem(sys.modules, missing, None)  # `import missing` now raises ImportError
    # a fresh import of the Nash-MTL module itself (restored afterwards) must not need cvxpy
    monkeypatch.delitem(sys.modules, "lightning_cost.aggregators.nash_mtl")
    monkeypatch.setattr(aggregators, "nash_mtl", aggregators.nash_mtl)
    fresh = aggregators.__getattr__("NashMTL")
    assert fresh is not NashMTL  # re-imported without the solver stack
    build_aggregator("cagrad").aggregate(rand_jacobian(0, 2, 3))
    FairGrad().aggregate(rand_jacobian(0, 2, 3))
    with pytest.raises(ImportError, match=r"lightning-cost\[nashmtl\]"):
        fresh()
    with pytest.raises(ImportError, match=r"lightning-cost\[nashmtl\]"):
        NashMTL()
    if missing == "ecos":  # another cvxpy solver needs no ECOS
        assert NashMTL(solver="CLARABEL").solver == "CLARABEL"
    g = gram(rand_jacobian(0, 3, 5, shift=0.5))
    alpha = fresh(solver="newton").weights(g).numpy()  # the Newton solve needs no cvxpy at all
    gn = g.numpy() / np.linalg.norm(g.numpy())
    np.testing.assert_allclose(alpha * (gn @ alpha), 1.0, atol=1e-9)


def test_aliases_and_hparams() -> None:
    assert isinstance(build_aggregator("IMTL-G"), IMTLG)
    assert isinstance(build_aggregator("nash-mtl"), NashMTL)
    assert build_aggregator("cagrad", c=0.2, rescale=0).c == 0.2
    assert build_aggregator("fairgrad", alpha=1.0).alpha == 1.0


def test_paper_defaults() -> None:
    assert CAGrad().c == 0.4 and CAGrad().rescale == 1
    assert FairGrad().alpha == 2.0 and not FairGrad().scale_and_clip
    assert NashMTL().max_iter == 20 and NashMTL().update_weights_every == 1 and NashMTL().solver == "ECOS"
    assert MGDA().normalization == "none"
    assert GradDrop()._leaks == [0.0]


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize(
    "bad",
    [
        torch.ones(5, dtype=torch.float64),  # 1-D
        torch.ones(1, 4, dtype=torch.float64),  # K = 1
        torch.ones(2, 3, 4, dtype=torch.float64),  # 3-D
        torch.tensor([[1.0, float("nan")], [0.0, 1.0]], dtype=torch.float64),
        torch.tensor([[1.0, 2.0], [float("inf"), 1.0]], dtype=torch.float64),
    ],
)
def test_bad_jacobian_raises_value_error(name: str, bad: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        build_aggregator(name).aggregate(bad)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_any_non_finite_entry_raises_naming_its_row(name: str, dtype: torch.dtype, value: float) -> None:
    # aggregate() no longer scans J: a non-finite entry is caught through G (or GradDrop's column sums)
    rng = np.random.default_rng(0)
    for _ in range(4):
        j = rand_jacobian(int(rng.integers(1000)), 4, 9, shift=0.3).to(dtype)
        row, col = int(rng.integers(4)), int(rng.integers(9))
        j[row, col] = value
        with pytest.raises(ValueError, match=rf"non-finite entries in the rows of tasks \[{row}\]"):
            build_aggregator(name).aggregate(j)


@pytest.mark.parametrize("name", GRAMIAN_METHODS)
def test_finite_jacobian_with_overflowing_gramian_raises(name: str) -> None:
    j = rand_jacobian(0, 3, 5).float() * 1e20  # finite in float32, but G = J J^T overflows
    with pytest.raises(ValueError, match="gramian has non-finite entries"):
        build_aggregator(name).aggregate(j)


def test_custom_gramian_aggregator_still_rejects_non_finite_jacobian() -> None:
    class NormalizedMean(GramianAggregator):  # does not validate its Gramian itself
        def weights(self, gramian: torch.Tensor) -> torch.Tensor:
            return 1.0 / gramian.diagonal().sqrt() / gramian.shape[0]

    j = rand_jacobian(1, 3, 6)
    torch.testing.assert_close(NormalizedMean().aggregate(j), (j / j.norm(dim=1, keepdim=True)).mean(0))
    j[2, 4] = float("nan")
    with pytest.raises(ValueError, match=r"rows of tasks \[2\]"):
        NormalizedMean().aggregate(j)


@pytest.mark.parametrize("name", METHODS)
def test_non_tensor_raises_type_error(name: str) -> None:
    with pytest.raises(TypeError):
        build_aggregator(name).aggregate(np.ones((2, 3)))


@pytest.mark.parametrize("name", GRAMIAN_METHODS)
@pytest.mark.parametrize(
    "bad",
    [torch.ones(2, 3), torch.ones(1, 1), torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]])],
)
def test_bad_gramian_raises_value_error(name: str, bad: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        build_aggregator(name).weights(bad)


@pytest.mark.parametrize(
    ("name", "hparams"),
    [("imtl", {}), ("nashmtl", {}), ("fairgrad", {}), ("mgda", {"normalization": "l2"})],
)
def test_zero_norm_task_raises_value_error_naming_it(name: str, hparams: dict) -> None:
    j = rand_jacobian(0, 3, 5)
    j[1] = 0.0
    with pytest.raises(ValueError, match=r"task\(s\) \[1\]"):
        build_aggregator(name, **hparams).aggregate(j)


@pytest.mark.parametrize("name", ["cagrad", "pcgrad", "graddrop", "mgda"])
def test_zero_task_gradient_allowed_where_nothing_divides_by_it(name: str) -> None:
    j = rand_jacobian(0, 3, 5)
    j[2] = 0.0
    d = build_aggregator(name).aggregate(j)
    assert torch.isfinite(d).all()


# ----------------------------------------------------------------------------- outputs and symmetries


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_output_shape_dtype_and_finiteness(name: str, dtype: torch.dtype) -> None:
    j = rand_jacobian(3, 3, 7, shift=0.5).to(dtype)
    d = build_aggregator(name, **({"seed": 0} if name in ("graddrop", "pcgrad") else {})).aggregate(j)
    assert d.shape == (7,) and d.dtype == dtype and torch.isfinite(d).all()
    assert d.abs().sum() > 0


@pytest.mark.parametrize("name", METHODS)
@HYPO
@given(data=st.data())
def test_permutation_and_scale(name: str, data: st.DataObject) -> None:
    sym = SYMMETRY[name]
    j = data.draw(jacobians(max_k=sym.max_k))
    c = data.draw(st.floats(*sym.scales))
    perm = data.draw(st.permutations(range(j.shape[0])))
    assert_permutation_and_scale(lambda: build_aggregator(name, **sym.hparams), j, c, perm, sym)


def test_gramian_methods_use_jacobian_only_through_gramian() -> None:
    # Two Jacobians with the same Gramian (J2 = J1 Q, Q orthogonal) give the same weights.
    j1 = rand_jacobian(1, 3, 6, shift=0.3)
    q, _ = torch.linalg.qr(torch.tensor(np.random.default_rng(2).standard_normal((6, 6))))
    j2 = j1 @ q
    for name in GRAMIAN_METHODS:
        kw = {"seed": 5} if name == "pcgrad" else {}
        d1 = build_aggregator(name, **kw).aggregate(j1)
        d2 = build_aggregator(name, **kw).aggregate(j2)
        torch.testing.assert_close(d2, d1 @ q, rtol=1e-6, atol=1e-8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", METHODS)
def test_cuda_jacobian_matches_cpu(name: str) -> None:
    j = rand_jacobian(6, 3, 1000, shift=0.3).float()
    kw = {"seed": 1} if name in ("graddrop", "pcgrad") else {}
    d_cpu = build_aggregator(name, **kw).aggregate(j)
    d_gpu = build_aggregator(name, **kw).aggregate(j.cuda())
    assert d_gpu.device.type == "cuda" and d_gpu.dtype == torch.float32
    torch.testing.assert_close(d_gpu.cpu(), d_cpu, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------- Gramian


def test_gramian_is_j_jt_summed_by_blocks():
    """Definition: G = J J^T, for any block size (a block boundary inside P, at P, past P)."""
    from lightning_cost.aggregators import gramian

    j = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    for block in (7, 50, 64):
        torch.testing.assert_close(gramian(j, block=block), j @ j.T, rtol=1e-5, atol=1e-5)
    assert gramian(j.half()).dtype == torch.float32  # at least float32, as the aggregators need
    torch.testing.assert_close(gramian(j), gram(j))


def test_gramian_and_trigger_cosines_keep_float32_accuracy_at_large_p():
    """Long float32 sums over P drift; blocked sums stay near float32 resolution (float64 reference)."""
    from lightning_cost.aggregators import gramian
    from lightning_cost.teleport import conflict_cosines

    g = torch.Generator().manual_seed(0)
    j = torch.randn(3, 3_000_000, generator=g) + 0.5  # a common mean component: the sums grow with P
    exact = j.double() @ j.double().T
    err = ((gramian(j).double() - exact).abs() / exact.abs()).max().item()
    assert err < 1e-5, err
    g0 = j.double().mean(0)
    cos = (j.double() @ g0) / (j.double().norm(dim=1) * g0.norm())
    assert (conflict_cosines(j) - cos).abs().max().item() < 1e-6
