"""The LoRA teleport's displacement: targets, merge in place, the merged-weight evaluation, the RNG."""

from __future__ import annotations

import pytest
import torch
from mtl_models import TinyMTL, loader, regression_data
from teleport_helpers import WithRaw

from lightning_cost.teleport import (
    TaskLossEvaluator,
    TeleportAdapter,
    balance_ratios,
    sample_sphere,
    sharpness,
)


def test_adapter_targets_shared_layers_only_and_merges_in_place():
    model = WithRaw()
    shared = model.shared_parameters()
    ids = [id(p) for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    ad = TeleportAdapter(model, shared, rank=2)
    assert ad.lora_targets == ["trunk.0", "trunk.3"]  # shared Linears; never the heads
    dense_ids = {id(p) for p in ad.dense_params}
    assert id(model.scale) in dense_ids and id(model.trunk[1].weight) in dense_ids  # raw param, BatchNorm
    ad.inject(torch.Generator().manual_seed(0))
    lora = ad.lora_parameters()
    assert len(lora) == 4 and all("heads" not in n for n, p in model.named_parameters() if "lora_" in n)
    with torch.no_grad():  # a known displacement: B = 1, A as initialised; dense delta = 0.25
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(1.0)
        a = {n.split(".lora_A")[0]: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
        for d in ad.deltas:
            d.fill_(0.25)
    ad.merge()
    assert [id(p) for p in model.parameters()] == ids  # same Parameter objects
    assert not any("lora" in n for n, _ in model.named_parameters()) and not hasattr(model, "peft_config")
    w0 = before[[n for n, _ in model.named_parameters()].index("trunk.0.weight")]
    torch.testing.assert_close(model.trunk[0].weight, w0 + torch.ones(16, 2) @ a["trunk.0"])  # scaling alpha/r = 1
    torch.testing.assert_close(model.scale.detach(), torch.tensor([1.75]))


def test_adapter_discard_is_bit_exact_and_eps_evaluation_matches_perturbed_weights():
    model = WithRaw()
    model.eval()
    batch = next(iter(loader(regression_data(k=2))))
    shared = model.shared_parameters()
    before = [p.detach().clone() for p in model.parameters()]
    ad = TeleportAdapter(model, shared)
    ad.inject(torch.Generator().manual_seed(0))
    eps = sample_sphere([p.shape for p in shared], 0.05, torch.Generator().manual_seed(0))
    ev = TaskLossEvaluator(model)
    got = ev([batch], ad.overrides(eps))
    assert got.requires_grad and torch.autograd.grad(got.sum(), ad.lora_parameters()[1]) is not None  # path to B
    ad.discard()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    ref = WithRaw()
    ref.load_state_dict(model.state_dict())
    ref.eval()
    with torch.no_grad():
        for p, e in zip(ref.shared_parameters(), eps, strict=True):
            p.add_(e)
    torch.testing.assert_close(got.detach(), ref.evaluate_task_losses(batch).detach(), rtol=1e-5, atol=1e-6)


def test_lora_initialisation_comes_from_the_generator_and_leaves_the_global_rng_alone():
    draws = {}
    for seed in (0, 0, 1):
        model = TinyMTL(k=2)
        torch.manual_seed(123)
        ad = TeleportAdapter(model, model.shared_parameters())
        ad.inject(torch.Generator().manual_seed(seed))
        after = torch.rand(3)  # the global stream continues as if no adapter had been built
        torch.manual_seed(123)
        assert torch.equal(after, torch.rand(3))
        a = [p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n]
        assert all(p.abs().sum() > 0 for p in a)
        assert all(p.abs().sum() == 0 for n, p in model.named_parameters() if "lora_B" in n)
        draws.setdefault(seed, []).append(a)
        ad.discard()
    assert all(torch.equal(x, y) for x, y in zip(*draws[0], strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(draws[0][0], draws[1][0], strict=True))


def test_merged_weight_evaluation_equals_the_peft_lora_branch():
    """The adapter evaluates ``W + s B A`` as a weight; PEFT's own LoRA forward gives the same losses."""
    torch.manual_seed(0)
    model = TinyMTL(k=2)
    batch = next(iter(loader(regression_data(k=2))))
    ad = TeleportAdapter(model, model.shared_parameters(), rank=3, alpha=6.0)
    ad.inject(torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in ad.lora_parameters():
            p.normal_(0.0, 0.3)  # a non-trivial dtheta (B starts at 0)
    ev = TaskLossEvaluator(model)
    got = ev([batch], ad.overrides())
    assert got.requires_grad
    grads = torch.autograd.grad(got.sum(), ad.lora_parameters())
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    buffers = [b.clone() for b in model.buffers()]
    with torch.no_grad():
        for _, layer in ad._lora_layers:
            layer.enable_adapters(True)  # PEFT's branch: base(x) + B(A(x)) * s
        peft_losses = model.evaluate_task_losses(batch)
        for _, layer in ad._lora_layers:
            layer.enable_adapters(False)
        for b, saved in zip(model.buffers(), buffers, strict=True):
            b.copy_(saved)
    torch.testing.assert_close(got.detach(), peft_losses, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        ad.merge()
        merged = model.evaluate_task_losses(batch)
    torch.testing.assert_close(merged, got.detach(), rtol=1e-6, atol=1e-6)  # the merged point is the point evaluated


@pytest.mark.parametrize("batchnorm", [True, False])
def test_batched_perturbations_match_the_loop(batchnorm):
    """The n~ perturbed losses of eq. 9 in one vmapped pass equal n~ separate forwards."""
    torch.manual_seed(0)
    model = WithRaw() if batchnorm else TinyMTL(k=3, batchnorm=False)
    model.train()
    batch = next(iter(loader(regression_data(k=len(model.task_names)))))
    shared = model.shared_parameters()
    ad = TeleportAdapter(model, shared, rank=2)
    ad.inject(torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in ad.parameters():
            p.normal_(0.0, 0.1)
    g = torch.Generator().manual_seed(3)
    draws = [sample_sphere([p.shape for p in shared], 0.05, g) for _ in range(5)]
    base = ad.overrides()
    ev = TaskLossEvaluator(model)
    buffers = [b.clone() for b in model.buffers()]
    with torch.no_grad():
        stacked = ad.perturb({k: v.unsqueeze(0) for k, v in base.items()},
                             [torch.stack(parts) for parts in zip(*draws, strict=True)])
        batched = ev.batched([batch], stacked)
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))  # private BN copies
    loop = []
    with torch.no_grad():
        for eps in draws:
            loop.append(ev([batch], ad.perturb(base, eps)))
            for b, saved in zip(model.buffers(), buffers, strict=True):
                b.copy_(saved)
    loop = torch.stack(loop)
    assert batched.shape == loop.shape == (5, len(model.task_names))
    torch.testing.assert_close(batched, loop, rtol=1e-5, atol=1e-6)
    ratios = balance_ratios(torch.rand(len(model.task_names)) + 0.1)
    lg_batched = max(float(sharpness(lp, ratios)) for lp in batched)
    lg_loop = max(float(sharpness(lp, ratios)) for lp in loop)
    assert lg_batched == pytest.approx(lg_loop, rel=1e-5, abs=1e-7)
    ad.discard()
