"""UPGrad, DualProj, ConFIG, Random, Aligned-MTL, Krum and GradVac (the Gramian aggregators as
TorchJD defines them): against TorchJD 0.18, against their defining properties computed independently
(cvxpy for the projections, the unit-gradient pseudo-inverse for ConFIG, the SVD of J for Aligned-MTL,
brute-force distances for Krum, the vaccine on the gradients themselves for GradVac, the running
average by hand for CR-MOGM), the shared symmetries, and through the mixin on both engines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from aggregator_props import HYPO, Symmetry, assert_permutation_and_scale, gram, jacobians
from hypothesis import assume, given
from hypothesis import strategies as st
from mtl_models import TinyMTL, loader, regression_data, trainer

import lightning_cost.aggregators as aggregators
import lightning_cost.aggregators._common as common
from lightning_cost.aggregators import (
    AVAILABLE,
    CRMOGM,
    DBMTL,
    MGDA,
    PCD,
    PEERS,
    REGISTERED,
    RLW,
    AggregationError,
    AlignedMTL,
    ConFIG,
    DualProj,
    ExcessMTL,
    GradNorm,
    GradVac,
    GramianAggregator,
    Krum,
    MoCo,
    MoDo,
    PCGrad,
    Random,
    SDMGrad,
    TrimmedMean,
    UPGrad,
    aggregator_class,
    build_aggregator,
)

CLASSES = {"upgrad": UPGrad, "dualproj": DualProj, "config": ConFIG, "random": Random,
           "alignedmtl": AlignedMTL, "krum": Krum, "gradvac": GradVac,
           "crmogm": CRMOGM, "trimmedmean": TrimmedMean, "pcd": PCD,
           "modo": MoDo, "sdmgrad": SDMGrad, "excessmtl": ExcessMTL,
           "gradnorm": GradNorm, "dbmtl": DBMTL, "moco": MoCo}
#: the peers that act on the Jacobian (the peer loss weightings are tested in test_aggregators_peers_more.py)
JACOBIAN_PEERS = tuple(name for name in PEERS if aggregator_class(name).requires_jacobian)
KS = [2, 3, 5, 12]
KINDS = ["conflicting", "random", "aligned"]


def make_jacobian(k: int, kind: str, p: int | None = None, seed: int = 0) -> torch.Tensor:
    """A float64 ``K x P`` Jacobian (``P = K + 8`` by default, full row rank). ``conflicting``: a
    common direction with alternating signs plus noise, so that some pairs have negative inner
    products; ``random``: independent rows; ``aligned``: a shared positive component."""
    rng = np.random.default_rng(1000 * k + seed)
    p = k + 8 if p is None else p
    common_dir = 2.0 * rng.standard_normal(p)
    noise = rng.standard_normal((k, p)) * rng.lognormal(0.0, 0.5, (k, 1))
    sign = {"conflicting": np.where(np.arange(k) % 2 == 0, 1.0, -1.0), "random": np.zeros(k),
            "aligned": np.ones(k)}[kind]
    j = torch.tensor(sign[:, None] * common_dir + noise, dtype=torch.float64)
    if kind == "conflicting":
        assert float(gram(j).min()) < 0.0  # at least one conflicting pair
    return j


def mean_scale(j: torch.Tensor) -> float:
    """The scale differences are measured against: the largest gradient norm (the update itself
    can be ~0 when the dual cone is degenerate)."""
    return float(j.norm(dim=1).max())


# ----------------------------------------------------------------------------- against TorchJD


def _torchjd(name: str, exact: bool = False):
    """TorchJD's aggregator; ``exact``: its projector without normalisation or regularisation of G."""
    agg = pytest.importorskip("torchjd.aggregation")
    if name in ("upgrad", "dualproj"):
        pytest.importorskip("qpsolvers")  # TorchJD's projector needs qpsolvers and quadprog
        pytest.importorskip("quadprog")
        cls = agg.UPGrad if name == "upgrad" else agg.DualProj
        if not exact:
            return cls()
        linalg = pytest.importorskip("torchjd.linalg")
        if not hasattr(linalg, "QuadprogProjector"):
            pytest.skip("this TorchJD has no QuadprogProjector")
        return cls(projector=linalg.QuadprogProjector(norm_eps=0.0, reg_eps=0.0))
    return {"config": agg.ConFIG, "random": agg.Random, "alignedmtl": agg.AlignedMTL, "krum": agg.Krum}[name]()


#: tolerance (relative to the largest gradient norm) of each comparison; measured maxima in the comment
TORCHJD_RTOL = {
    ("upgrad", True): 1e-10,  # measured <= 2e-16
    ("dualproj", True): 1e-10,  # measured <= 7e-16
    ("upgrad", False): 1e-2,  # TorchJD solves for G / tr G + 1e-4 I: measured up to 1.8e-3
    ("dualproj", False): 1e-2,
    ("config", False): 1e-10,  # measured <= 2e-14
    ("alignedmtl", False): 1e-10,  # measured <= 7e-16
}


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("name", "exact"), list(TORCHJD_RTOL))
def test_matches_torchjd(name: str, exact: bool, kind: str, k: int) -> None:
    theirs = _torchjd(name, exact)
    for seed in range(3):
        j = make_jacobian(k, kind, seed=seed)
        d = build_aggregator(name).aggregate(j)
        diff = float((d - theirs(j)).abs().max()) / mean_scale(j)
        assert diff <= TORCHJD_RTOL[(name, exact)], (seed, diff)


@pytest.mark.parametrize("k", KS)
def test_random_matches_torchjd_draw_for_draw(k: int) -> None:
    """Seeded with ``s``, our draws are TorchJD's after ``torch.manual_seed(s)`` (float64 CPU J)."""
    theirs = _torchjd("random")
    j = make_jacobian(k, "conflicting")
    ours = Random(seed=123)
    with torch.random.fork_rng():
        torch.manual_seed(123)
        for _ in range(3):  # the sequences continue alike
            torch.testing.assert_close(ours.aggregate(j), theirs(j), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("k", [3, 5, 12])
@pytest.mark.parametrize("kind", KINDS)
def test_aligned_mtl_scales_and_krum_match_torchjd(k: int, kind: str) -> None:
    agg = pytest.importorskip("torchjd.aggregation")
    for seed in range(3):
        j = make_jacobian(k, kind, seed=seed)
        for ours, theirs in (("mean", "rmse"), ("median", "median")):
            if ours == "median" and k % 2 == 0:
                continue  # even count: we average the middle two eigenvalues, TorchJD takes the lower
            diff = AlignedMTL(scale=ours).aggregate(j) - agg.AlignedMTL(scale_mode=theirs)(j)
            assert float(diff.abs().max()) <= 1e-10 * mean_scale(j)
        # f = K - 3 scores each gradient by its nearest neighbour: the closest pair ties, so select 2
        for f, n in [(0, 1), (0, 2), (k - 3, 2), (1, k)]:
            if f + 3 <= k:
                torch.testing.assert_close(Krum(f, n).aggregate(j), agg.Krum(f, n)(j), rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- UPGrad, DualProj


def cone_projection(j: torch.Tensor, x: torch.Tensor) -> np.ndarray:
    """The projection of ``x`` onto ``{y : J y >= 0}``, solved in parameter space with cvxpy."""
    cp = pytest.importorskip("cvxpy")
    y = cp.Variable(j.shape[1])
    prob = cp.Problem(cp.Minimize(cp.sum_squares(y - x.numpy())), [j.numpy() @ y >= 0])
    prob.solve(solver=cp.CLARABEL)
    assert prob.status == "optimal"
    return y.value


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize(("kind", "p"), [("conflicting", None), ("random", None), ("random", 4)])
def test_projections_equal_the_primal_projection(k: int, kind: str, p: int | None) -> None:
    """UPGrad = mean of the projections of the g_i, DualProj = projection of the mean, each
    projection solved as a QP in the P parameters (not on the Gramian); p=4 < K: a singular G."""
    j = make_jacobian(k, kind, p=p)
    upgrad = np.mean([cone_projection(j, j[i]) for i in range(k)], axis=0)
    dualproj = cone_projection(j, j.mean(0))
    scale = mean_scale(j)
    assert np.abs(UPGrad().aggregate(j).numpy() - upgrad).max() <= 1e-6 * scale
    assert np.abs(DualProj().aggregate(j).numpy() - dualproj).max() <= 1e-6 * scale


@pytest.mark.parametrize("cls", [UPGrad, DualProj])
@HYPO
@given(j=jacobians(), p_small=st.booleans())
def test_update_conflicts_with_no_task(cls, j: torch.Tensor, p_small: bool) -> None:
    if p_small:  # K > P rows: the dual cone may be {0}
        j = torch.cat([j, -j[:1] + 0.1 * j[1:2]])[:, : max(1, j.shape[0] // 2)]
    d = cls().aggregate(j)
    g = gram(j)
    assert float((j @ d).min()) >= -1e-9 * float(g.diagonal().max())


@pytest.mark.parametrize("k", KS)
def test_without_conflict_both_return_the_mean(k: int) -> None:
    j = make_jacobian(k, "aligned")
    j = j.abs()  # non-negative rows: every pairwise inner product > 0
    assert float(gram(j).min()) > 0.0
    for cls in (UPGrad, DualProj):
        torch.testing.assert_close(cls().aggregate(j), j.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(DualProj().weights(gram(j)), torch.full((k,), 1.0 / k, dtype=torch.float64))


def test_projection_degenerate_cases() -> None:
    j = make_jacobian(4, "conflicting")
    zero_row = j.clone()
    zero_row[2] = 0.0
    for cls in (UPGrad, DualProj):
        assert torch.equal(cls().aggregate(torch.zeros(3, 5, dtype=torch.float64)), torch.zeros(5, dtype=torch.float64))
        # a zero gradient constrains nothing and its projection is 0: leaving it out changes only the
        # mean's 1/K (UPGrad: 3 projections and a 0 over 4; DualProj: the projection of 3/4 of the mean)
        d = cls().aggregate(zero_row)
        torch.testing.assert_close(d, 0.75 * cls().aggregate(zero_row[[0, 1, 3]]), rtol=1e-10, atol=1e-12)
        assert float((zero_row @ d).min()) >= -1e-12
    # opposite gradients: the dual cone is the plane orthogonal to both; the mean (0) is in it
    opp = torch.tensor([[1.0, 2.0, 0.0], [-1.0, -2.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(UPGrad().aggregate(opp), torch.zeros(3, dtype=torch.float64), atol=1e-15, rtol=0)
    torch.testing.assert_close(DualProj().aggregate(opp), torch.zeros(3, dtype=torch.float64), atol=1e-15, rtol=0)


def test_dual_cone_solver_failure_is_an_aggregation_error(monkeypatch) -> None:
    monkeypatch.setattr(common, "_solve_kkt", lambda a, b: np.full(b.shape, 1e3))  # a broken linear solve
    with pytest.raises(AggregationError, match="dual-cone projection"):
        UPGrad().aggregate(make_jacobian(3, "conflicting"))


# ----------------------------------------------------------------------------- ConFIG


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("kind", KINDS)
def test_config_has_equal_cosines_and_the_summed_projection_as_length(k: int, kind: str) -> None:
    j = make_jacobian(k, kind)
    d = ConFIG().aggregate(j)
    cos = (j @ d) / (j.norm(dim=1) * d.norm())
    torch.testing.assert_close(cos, torch.full_like(cos, float(cos[0])), rtol=1e-10, atol=1e-12)
    assert float(cos.min()) > 0.0
    unit = d / d.norm()
    torch.testing.assert_close(d.norm(), (j @ unit).sum(), rtol=1e-10, atol=0)
    # the paper's form on J itself: pinv of the unit gradients times ones
    v = np.linalg.pinv((j / j.norm(dim=1, keepdim=True)).numpy()) @ np.ones(k)
    np.testing.assert_allclose(unit.numpy(), v / np.linalg.norm(v), rtol=1e-9, atol=1e-12)


def test_config_degenerate_cases() -> None:
    j = make_jacobian(4, "conflicting")
    j[1] = 0.0
    w = ConFIG().weights(gram(j))
    assert float(w[1]) == 0.0  # a zero gradient: a zero unit row, as in the authors' code
    d = ConFIG().aggregate(j)
    torch.testing.assert_close(d, ConFIG().aggregate(j[[0, 2, 3]]), rtol=1e-10, atol=1e-12)
    assert torch.equal(ConFIG().aggregate(torch.zeros(3, 4, dtype=torch.float64)), torch.zeros(4, dtype=torch.float64))
    # float32 Gramian (the Gramian engine's): the cut-off follows the dtype, the result the float64 one
    g = gram(make_jacobian(5, "conflicting"))
    torch.testing.assert_close(ConFIG().weights(g.float()).double(), ConFIG().weights(g), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- Aligned-MTL, Krum


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize(("kind", "p"), [("conflicting", None), ("random", None), ("random", 4)])
def test_aligned_mtl_is_the_equal_norm_orthogonal_basis_of_the_svd(k: int, kind: str, p: int | None) -> None:
    """From the SVD J = U S W^T (not the Gramian): the aligned gradients are s U W^T, so with the
    smallest non-zero singular value s_r, d = s_r W U^T w; they are orthogonal with norm s_r."""
    j = make_jacobian(k, kind, p=p)
    u, sv, wt = np.linalg.svd(j.numpy(), full_matrices=False)
    r = int((sv > sv[0] * 1e-10).sum())
    aligned = sv[r - 1] * u[:, :r] @ wt[:r]
    np.testing.assert_allclose(aligned @ aligned.T, sv[r - 1] ** 2 * u[:, :r] @ u[:, :r].T, atol=1e-9 * sv[0] ** 2)
    expected = aligned.T @ np.full(k, 1.0 / k)
    np.testing.assert_allclose(AlignedMTL().aggregate(j).numpy(), expected, atol=1e-9 * mean_scale(j))
    pref = np.arange(1.0, k + 1.0)
    np.testing.assert_allclose(AlignedMTL(preference=list(pref)).aggregate(j).numpy(), aligned.T @ pref,
                               atol=1e-8 * mean_scale(j))


def test_aligned_mtl_hand_case_and_degenerate_input() -> None:
    # orthogonal gradients of norms 1 and 3: aligned to norm 1 each, d = (e1 + e2) / 2
    j = torch.tensor([[1.0, 0.0, 0.0], [0.0, 3.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(AlignedMTL().aggregate(j), torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))
    # scale="mean": eigenvalues 1 and 9, s = sqrt(5): both aligned gradients have norm sqrt(5)
    torch.testing.assert_close(AlignedMTL(scale="mean").aggregate(j), torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64) * 5**0.5 / 2)
    assert torch.equal(AlignedMTL().aggregate(torch.zeros(3, 4, dtype=torch.float64)), torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="2 weights for 3 tasks"):
        AlignedMTL(preference=[1.0, 2.0]).aggregate(make_jacobian(3, "random"))


def test_krum_picks_the_gradient_closest_to_its_neighbours() -> None:
    j = make_jacobian(6, "aligned")
    j[4] = -10.0 * j[4]  # an outlier
    dist = torch.cdist(j, j)  # brute force in parameter space, not from the Gramian
    for f, n in [(0, 1), (1, 1), (2, 3)]:
        scores = torch.sort(dist, dim=1).values[:, 1 : 6 - f - 2 + 1].sum(dim=1)
        chosen = torch.argsort(scores)[:n]
        torch.testing.assert_close(Krum(f, n).aggregate(j), j[chosen].mean(0), rtol=1e-12, atol=1e-12)
        assert 4 not in chosen.tolist()
    with pytest.raises(ValueError, match="at least 5 tasks"):
        Krum(outliers=2).aggregate(j[:4])
    with pytest.raises(ValueError, match="at least 7 tasks"):
        Krum(selected=7).aggregate(j)


# ----------------------------------------------------------------------------- GradVac


def vaccine_on_gradients(j: torch.Tensor, targets: np.ndarray, orders: list[list[int]], beta: float) -> torch.Tensor:
    """Algorithm 1 of GradVac on the gradient vectors themselves (not the Gramian); updates ``targets``."""
    out = torch.zeros(j.shape[1], dtype=torch.float64)
    for i, order in enumerate(orders):
        gi = j[i].clone()
        for jj in order:
            phi = float(gi @ j[jj] / (gi.norm() * j[jj].norm()))
            t = targets[i, jj]
            if phi < t:
                gi = gi + gi.norm() * (t * (1 - phi**2) ** 0.5 - phi * (1 - t**2) ** 0.5) / (j[jj].norm() * (1 - t**2) ** 0.5) * j[jj]
                assert abs(float(gi @ j[jj] / (gi.norm() * j[jj].norm())) - t) < 1e-9  # the target is reached
            targets[i, jj] = (1 - beta) * t + beta * phi
        out += gi
    return out


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("kind", KINDS)
def test_gradvac_matches_the_vaccine_on_the_gradients_and_torchjd(k: int, kind: str) -> None:
    ours, targets = GradVac(beta=0.3, seed=11), np.zeros((k, k))
    gen = torch.Generator().manual_seed(11)  # the orders GradVac draws: randperm(K-1) over the others, per task
    for t in range(4):  # the targets carry over from call to call
        j = make_jacobian(k, kind, seed=t)
        orders = [[[x for x in range(k) if x != i][n] for n in torch.randperm(k - 1, generator=gen).tolist()] for i in range(k)]
        expected = vaccine_on_gradients(j, targets, orders, 0.3)
        torch.testing.assert_close(ours.aggregate(j), expected, rtol=1e-9, atol=1e-9 * mean_scale(j))
        np.testing.assert_allclose(ours.targets, targets, atol=1e-12)
    agg = pytest.importorskip("torchjd.aggregation")
    ours = GradVac(seed=4)
    with torch.random.fork_rng():
        torch.manual_seed(4)
        theirs = agg.GradVac()
        for t in range(4):  # TorchJD adds eps = 1e-8 to its denominators: measured <= 3e-9
            j = make_jacobian(k, kind, seed=t)
            assert float((ours.aggregate(j) - theirs(j)).abs().max()) <= 1e-7 * mean_scale(j)


def test_gradvac_first_call_is_pcgrad_and_state_resumes() -> None:
    j = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)  # cos = -1/sqrt(2)
    # targets 0: each gradient projected onto the other's normal plane, as PCGrad does
    pc = torch.tensor([0.5, 0.5], dtype=torch.float64) + torch.tensor([0.0, 1.0], dtype=torch.float64)
    gv = GradVac(beta=0.5, seed=0)
    torch.testing.assert_close(gv.aggregate(j), pc)
    torch.testing.assert_close(PCGrad(seed=0).aggregate(j), pc)
    np.testing.assert_allclose(gv.targets, [[0.0, -0.5**1.5], [-0.5**1.5, 0.0]])  # 0.5 * cos
    state = gv.state_dict()
    k3 = make_jacobian(2, "conflicting")
    expected = gv.aggregate(k3)
    again = GradVac(beta=0.5, seed=9)
    again.load_state_dict(state)
    torch.testing.assert_close(again.aggregate(k3), expected, rtol=0, atol=0)
    assert gv.aggregate(make_jacobian(3, "random")).shape == (11,) and gv.targets.shape == (3, 3)  # new K: new targets
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="beta"):
            GradVac(beta=bad)


# ----------------------------------------------------------------------------- CR-MOGM


def test_crmogm_is_the_running_average_of_the_wrapped_weights() -> None:
    jacobians_seq = [make_jacobian(4, "conflicting", seed=t) for t in range(5)]
    ours, mgda = CRMOGM("mgda", alpha=0.7), MGDA()
    running = None
    for j in jacobians_seq:
        fresh = mgda.weights(gram(j))
        running = fresh if running is None else 0.7 * running + 0.3 * fresh
        torch.testing.assert_close(ours.weights(gram(j)), running, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(CRMOGM("mgda", alpha=0.0).aggregate(jacobians_seq[0]), MGDA().aggregate(jacobians_seq[0]))
    # a stateful base keeps its own state under base. and the whole sequence resumes
    a = CRMOGM(build_aggregator("gradvac", seed=2), alpha=0.5)
    a.aggregate(jacobians_seq[0])
    state = a.state_dict()
    assert set(state) == {"_extra_state", "base._extra_state"}
    expected = a.aggregate(jacobians_seq[1])
    b = CRMOGM(build_aggregator("gradvac", seed=8), alpha=0.5)
    b.load_state_dict(state)
    assert torch.equal(b.aggregate(jacobians_seq[1]), expected)
    assert CRMOGM().weights(gram(make_jacobian(3, "random"))).shape == (3,)  # a new K restarts the average
    for make in (lambda: CRMOGM(alpha=1.0), lambda: CRMOGM(alpha=-0.1), lambda: CRMOGM("ls"), lambda: CRMOGM(CRMOGM())):
        with pytest.raises(ValueError):
            make()


def test_crmogm_smoothing_matches_torchjd() -> None:
    """TorchJD's CR-MOGM smoothing around our MGDA's weights (its own MGDA is an inexact iteration)."""
    agg = pytest.importorskip("torchjd.aggregation")

    class OurMGDA(agg.Weighting):
        def forward(self, g: torch.Tensor) -> torch.Tensor:
            return MGDA().weights(g)

    theirs = agg.GramianWeightedAggregator(agg.CRMOGMWeighting(OurMGDA(), alpha=0.6))
    ours = CRMOGM("mgda", alpha=0.6)
    for t in range(4):
        j = make_jacobian(5, "conflicting", seed=t)
        torch.testing.assert_close(ours.aggregate(j), theirs(j), rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- Random


def test_random_weights_are_a_seeded_softmax_redrawn_every_call() -> None:
    g = gram(make_jacobian(5, "conflicting"))
    a, b = Random(seed=7), Random(seed=7)
    draws = [a.weights(g) for _ in range(4)]
    for w in draws:
        assert bool((w > 0).all()) and abs(float(w.sum()) - 1.0) < 1e-12
    for w, w2 in zip(draws, [b.weights(g) for _ in range(4)], strict=True):
        assert torch.equal(w, w2)  # reproducible under the seed
    assert all(not torch.allclose(draws[i], draws[i + 1]) for i in range(3))  # new draw per call
    z = torch.randn(5, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    torch.testing.assert_close(draws[0], torch.softmax(z, 0))
    # the draw ignores G and its dtype: a float32 Gramian gets the same draw
    torch.testing.assert_close(Random(seed=7).weights(g.float()), draws[0].float())
    assert not torch.equal(Random(seed=8).weights(g), draws[0])


def test_random_state_dict_continues_the_sequence() -> None:
    g = gram(make_jacobian(3, "random"))
    a = Random(seed=1)
    a.weights(g)
    state = a.state_dict()
    expected = a.weights(g)
    b = Random(seed=99)
    b.load_state_dict(state)
    assert torch.equal(b.weights(g), expected)


def test_random_differs_from_rlw_only_in_where_it_acts() -> None:
    """Same distribution as RLW's loss weights (softmax of N(0, I)); Random acts on J, RLW on the losses."""
    assert isinstance(Random(), GramianAggregator) and Random.requires_jacobian
    assert not RLW.requires_jacobian
    g = gram(make_jacobian(4, "random"))
    rlw = RLW(num_tasks=4, seed=3)
    torch.testing.assert_close(Random(seed=3).weights(g).float(), rlw.loss_weights(torch.ones(4)))


# ----------------------------------------------------------------------------- shared properties

SYMMETRY = {
    "upgrad": Symmetry(rtol=1e-7, atol=1e-9),
    "dualproj": Symmetry(rtol=1e-7, atol=1e-9),
    "config": Symmetry(rtol=1e-7, atol=1e-9),
    # seeded: the same draws at every scale; the draws are per task index, so no permutation property
    "random": Symmetry(permutes=False, rtol=1e-12, atol=1e-12, hparams={"seed": 5}),
    "alignedmtl": Symmetry(rtol=1e-7, atol=1e-9),
    # selected=2: with K - f - 2 = 1 neighbour (K = 3) the closest pair ties, and a tie breaks by index
    "krum": Symmetry(rtol=1e-9, atol=1e-12, hparams={"selected": 2}),
    "gradvac": Symmetry(permutes=False, rtol=1e-8, atol=1e-10, hparams={"seed": 5}),  # orders drawn per index
    "crmogm": Symmetry(rtol=1e-7, atol=1e-9),
    "trimmedmean": Symmetry(rtol=1e-12, atol=1e-14),  # not a Gramian method: only the direction is checked
    # task 0 is the primary one (no permutation property); eps = 0: exactly scale-free
    "pcd": Symmetry(permutes=False, rtol=1e-7, atol=1e-9, hparams={"eps": 0.0}),
    # stateful, steps in the units of G (SDMGrad: up to its 1e-8): first call, permutation only
    "modo": Symmetry(scale=False, rtol=1e-9, atol=1e-12),
    "sdmgrad": Symmetry(scale=False, rtol=1e-7, atol=1e-9),
    "excessmtl": Symmetry(scale=False, rtol=1e-9, atol=1e-12),
    # loss-aware (the shared tests observe equal losses first): GradNorm's first weights are ones,
    # DB-MTL's first direction scales with J, MoCo's ("loss": unit gradients times the loss) does not
    "gradnorm": Symmetry(rtol=1e-12, atol=1e-14),
    "dbmtl": Symmetry(rtol=1e-9, atol=1e-12),
    "moco": Symmetry(weight_power=-1.0, rtol=1e-9, atol=1e-12),
}


@pytest.mark.parametrize("name", JACOBIAN_PEERS)
@HYPO
@given(j=jacobians(), c=st.sampled_from([1e-3, 0.5, 1e3]), perm_seed=st.integers(0, 100))
def test_permutation_and_scale(name: str, j: torch.Tensor, c: float, perm_seed: int) -> None:
    sym = SYMMETRY[name]
    if name in ("krum", "trimmedmean"):
        assume(j.shape[0] >= 3)  # Krum needs K >= f + 3, TrimmedMean K > 2 trim_number
    perm = torch.randperm(j.shape[0], generator=torch.Generator().manual_seed(perm_seed)).tolist()
    assert_permutation_and_scale(lambda: build_aggregator(name, **sym.hparams), j, c, perm, sym)


@pytest.mark.parametrize("name", JACOBIAN_PEERS)
def test_registry_exports_and_validation(name: str) -> None:
    assert type(build_aggregator(name)) is CLASSES[name] is aggregator_class(name)
    assert getattr(aggregators, CLASSES[name].__name__) is CLASSES[name] and CLASSES[name].__name__ in aggregators.__all__
    assert name in REGISTERED and name not in AVAILABLE  # the benchmarks' default set stays the paper's 13
    for bad in (torch.ones(1, 4, dtype=torch.float64), torch.tensor([[1.0, float("nan")], [0.0, 1.0]])):
        with pytest.raises(ValueError):
            build_aggregator(name).aggregate(bad)


def test_aliases_and_init_validation() -> None:
    assert len(AVAILABLE) == 13 and len(REGISTERED) == 32
    assert isinstance(build_aggregator("Dual-Proj"), DualProj) and isinstance(build_aggregator("ConFIG"), ConFIG)
    for make in (lambda: UPGrad(tol=0.0), lambda: DualProj(tol=1.5), lambda: ConFIG(rcond=-1.0),
                 lambda: ConFIG(rcond=1.0), lambda: Random(seed=1.5), lambda: Random(seed=True),
                 lambda: AlignedMTL(scale="rmse"), lambda: AlignedMTL(preference=[1.0, -1.0]),
                 lambda: Krum(outliers=-1), lambda: Krum(selected=0), lambda: Krum(selected=1.0)):
        with pytest.raises(ValueError):
            make()


# ----------------------------------------------------------------------------- through the mixin


def one_step(method: str, engine: str, k: int = 3, **kw) -> TinyMTL:
    torch.manual_seed(0)
    model = TinyMTL(k=k, method=build_aggregator(method, **kw), batchnorm=True, engine=engine,
                    gramian={"path": "gram"}, optimizer="sgd")
    trainer(max_steps=1).fit(model, loader(regression_data(k=k)))
    return model


@pytest.mark.parametrize(("method", "kw"), [("upgrad", {}), ("dualproj", {}), ("config", {}), ("random", {"seed": 0}),
                                           ("alignedmtl", {}), ("krum", {}), ("gradvac", {"seed": 0}),
                                           ("crmogm", {})])
def test_same_step_on_both_engines(method: str, kw: dict) -> None:
    gram_model, jac_model = one_step(method, "gramian", **kw), one_step(method, "jacobian", **kw)
    assert gram_model.mtl_uses_gramian_engine and gram_model.mtl_step.jacobian is None
    assert jac_model.mtl_step.jacobian is not None
    torch.testing.assert_close(gram_model.mtl_step.gramian, jac_model.mtl_step.gramian, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gram_model.mtl_step.direction, jac_model.mtl_step.direction, rtol=1e-4, atol=1e-6)
    for a, b in zip(gram_model.parameters(), jac_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    if method in ("upgrad", "dualproj"):  # the step taken conflicts with no task
        j = jac_model.mtl_step.jacobian.double()
        assert float((j @ jac_model.mtl_step.direction.double()).min()) >= -1e-5 * float((j @ j.T).diagonal().max())
