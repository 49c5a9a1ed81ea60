"""The LoRA teleport's objective pieces (eqs. 7-10) on hand-worked cases."""

from __future__ import annotations

import pytest
import torch

from lightning_cost.teleport import balance_ratios, loss_invariance, sample_sphere, sharpness


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
    torch.testing.assert_close(balance_ratios(norms, "linear"), torch.tensor([1.5, 0.5]))
    with pytest.raises(ValueError):
        balance_ratios(torch.tensor([1.0, float("nan")]))


def test_sample_sphere_has_the_radius_and_is_seeded():
    shapes = [torch.Size([3, 4]), torch.Size([5])]
    a = sample_sphere(shapes, 0.3, torch.Generator().manual_seed(1))
    b = sample_sphere(shapes, 0.3, torch.Generator().manual_seed(1))
    norm = torch.sqrt(sum((t.double() ** 2).sum() for t in a))
    assert norm.item() == pytest.approx(0.3, rel=1e-6)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_relative_drift_penalty_and_ascent_direction_hand_cases():
    from lightning_cost.teleport.lora.objective import ascent_direction, relative_drift_penalty

    losses, target = torch.tensor([1.01, 2.0, 0.5]), torch.tensor([1.0, 2.0, 0.5])
    assert relative_drift_penalty(losses, target, 0.01).item() == pytest.approx(1 / 3, rel=1e-4)  # 1 % drift -> 1
    assert relative_drift_penalty(target, target, 0.01).item() == 0.0
    eps = ascent_direction([torch.tensor([3.0, 0.0]), torch.tensor([4.0])], radius=0.5)
    torch.testing.assert_close(eps[0], torch.tensor([0.3, 0.0]))
    torch.testing.assert_close(eps[1], torch.tensor([0.4]))
    assert all(e.abs().sum() == 0 for e in ascent_direction([torch.zeros(2)], 1.0))
