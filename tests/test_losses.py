"""Masked task losses: the loss over the present labels only, and a task with none stays in the graph."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import lightning_cost
from lightning_cost import masked_loss, present_labels

NAN = math.nan


def test_binary_loss_is_the_loss_over_the_present_rows():
    logits = torch.tensor([0.3, -1.2, 2.0, 0.5], requires_grad=True)
    target = torch.tensor([1.0, NAN, 0.0, NAN])
    expected = F.binary_cross_entropy_with_logits(logits[[0, 2]], target[[0, 2]])
    torch.testing.assert_close(masked_loss(logits, target, "binary"), expected)
    # by hand: mean of softplus(-0.3) and softplus(2.0)
    by_hand = (math.log1p(math.exp(-0.3)) + math.log1p(math.exp(2.0))) / 2
    assert masked_loss(logits[:, None], target[:, None], "binary").item() == pytest.approx(by_hand, rel=1e-6)
    (grad,) = torch.autograd.grad(masked_loss(logits, target, "binary"), logits)
    assert grad[1] == 0 and grad[3] == 0 and grad[0] != 0


def test_multiclass_negative_targets_are_missing():
    logits = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([2, -1, 0, -100, 1])
    keep = torch.tensor([0, 2, 4])
    torch.testing.assert_close(masked_loss(logits, target, "multiclass"), F.cross_entropy(logits[keep], target[keep]))
    assert present_labels(target, "multiclass").tolist() == [True, False, True, False, True]
    float_target = torch.tensor([2.0, NAN, 0.0, -1.0, 1.0])
    assert present_labels(float_target, "multiclass").tolist() == [True, False, True, False, True]


def test_regression_mse_and_l1_over_present_values():
    pred = torch.tensor([1.0, 2.0, 3.0])
    target = torch.tensor([1.5, NAN, 1.0])
    assert masked_loss(pred, target, "regression").item() == pytest.approx((0.25 + 4.0) / 2)
    assert masked_loss(pred, target, "regression", regression_loss="l1").item() == pytest.approx((0.5 + 2.0) / 2)


def test_no_present_label_gives_a_connected_zero():
    w = torch.tensor([0.7, -0.4], requires_grad=True)
    logits = torch.stack([w.sum(), w[0] * 3])
    loss = masked_loss(logits, torch.tensor([NAN, NAN]), "binary")
    assert loss.item() == 0.0 and loss.requires_grad
    (grad,) = torch.autograd.grad(loss, w)
    assert torch.equal(grad, torch.zeros(2))


def test_a_task_without_labels_adds_nothing_to_the_update():
    torch.manual_seed(0)
    trunk, heads = torch.nn.Linear(4, 6), torch.nn.Linear(6, 3)
    x = torch.randn(8, 4)
    target = torch.randint(0, 2, (8, 3)).float()
    target[:, 2] = NAN  # task 2 has no label in this batch
    target[::3, 0] = NAN

    def losses():
        out = heads(torch.relu(trunk(x)))
        return [masked_loss(out[:, k], target[:, k], "binary") for k in range(3)]

    record = lightning_cost.backward(losses(), shared=trunk.parameters(), method="ls", jacobian=True)
    assert not record.skipped and torch.equal(record.jacobian[2], torch.zeros_like(record.jacobian[2]))
    got = [p.grad.clone() for p in trunk.parameters()]
    first_two = losses()
    expected = torch.autograd.grad(first_two[0] + first_two[1], list(trunk.parameters()))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: masked_loss(torch.zeros(3), torch.zeros(3), "ordinal"), "kind must be one of"),
        (lambda: masked_loss(torch.zeros(3), torch.zeros(3), "regression", regression_loss="huber"), "huber"),
        (lambda: masked_loss(torch.zeros(3), torch.zeros(3), "multiclass"), r"must be \[B, C\]"),
        (lambda: masked_loss(torch.zeros(3, 2), torch.zeros(3, 2), "binary"), r"\[B\] or \[B, 1\]"),
        (lambda: masked_loss(torch.zeros(3), torch.zeros(4), "binary"), "batch sizes differ"),
    ],
)
def test_bad_input_says_what_is_wrong(call, message):
    with pytest.raises(ValueError, match=message):
        call()
