"""When to teleport (eqs. 3-4): the cosines, the two rules, zero gradients, the Gram-matrix path."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_cost.teleport import ConflictTrigger, conflict_cosines, conflict_cosines_from_gram
from lightning_cost.teleport.trigger import representation_gram


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


def test_gram_cosines_equal_the_jacobian_cosines():
    torch.manual_seed(0)
    for k in (2, 3, 14):
        j = torch.randn(k, 50)
        torch.testing.assert_close(conflict_cosines_from_gram(j @ j.T), conflict_cosines(j), rtol=1e-5, atol=1e-6)
        rj = torch.randn(k, 8, 5)
        torch.testing.assert_close(representation_gram(rj, "flatten"), (rj.reshape(k, -1) @ rj.reshape(k, -1).T).double())
        torch.testing.assert_close(representation_gram(rj, "mean"), (rj.sum(1) @ rj.sum(1).T).double())
        assert ConflictTrigger().from_gram(j @ j.T).fire == ConflictTrigger()(j).fire
