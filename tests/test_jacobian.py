"""JacobianEngine: per-task gradients against one plain backward per task, in every mode."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from lightning_cost import JacobianEngine
from lightning_cost.jacobian import JACOBIAN_MODES

MODES = list(JACOBIAN_MODES)


def problem(seed: int = 0):
    """K = 3 losses of a small network; ``unused`` reaches no loss, ``head1`` only tasks 1 and 2."""
    g = torch.Generator().manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
    heads = nn.ModuleList([nn.Linear(6, 1) for _ in range(3)])
    unused = nn.Parameter(torch.randn(2, generator=g))
    for p in [*trunk.parameters(), *heads.parameters()]:
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(8, 4, generator=g)

    def losses() -> torch.Tensor:
        z = trunk(x)
        out = [heads[i](z).pow(2).mean() for i in range(3)]
        out[2] = out[2] + heads[1](z).mean()
        return torch.stack(out)

    params = [*trunk.parameters(), *heads[1].parameters(), unused]
    return losses, params


def per_task_reference(losses_fn, params) -> list[list[torch.Tensor | None]]:
    """Independent computation: one backward per task on a fresh graph."""
    out = []
    for i in range(3):
        grads = torch.autograd.grad(losses_fn()[i], params, allow_unused=True)
        out.append(list(grads))
    return out


@pytest.mark.parametrize("mode", MODES)
def test_vjps_are_the_per_task_gradients_with_none_and_zero_rows(mode: str) -> None:
    losses_fn, params = problem()
    ref = per_task_reference(losses_fn, params)
    grads = JacobianEngine(mode).vjps(losses_fn(), params)
    assert grads[-1] is None  # no task reaches `unused`
    for j, g in enumerate(grads[:-1]):
        assert g.shape == (3, *params[j].shape)
        for i in range(3):
            expected = ref[i][j] if ref[i][j] is not None else torch.zeros_like(params[j])
            torch.testing.assert_close(g[i], expected, rtol=1e-6, atol=1e-7)
    head1 = grads[len(list(params)) - 3]  # heads[1].weight: task 0 does not reach it
    assert torch.equal(head1[0], torch.zeros_like(head1[0])) and head1[1].abs().sum() > 0


@pytest.mark.parametrize("mode", MODES)
def test_jacobian_is_k_by_p_in_params_order_unscaled(mode: str) -> None:
    losses_fn, params = problem(1)
    ref = per_task_reference(losses_fn, params)
    expected = torch.stack([torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                       for g, p in zip(row, params, strict=True)]) for row in ref])
    engine = JacobianEngine(mode)
    losses = losses_fn()
    jac = engine.jacobian(losses, params, scale=1024.0, retain=True)
    assert jac.shape == (3, sum(p.numel() for p in params))
    torch.testing.assert_close(jac, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(jac[:, -2:], torch.zeros(3, 2))  # the unreached parameter's columns
    torch.testing.assert_close(engine.jacobian(losses, params), expected, rtol=1e-5, atol=1e-6)  # graph was kept
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        engine.jacobian(losses, params)  # ... and released by the call without retain


def test_mode_is_validated_and_read_only() -> None:
    with pytest.raises(ValueError, match="jacobian_mode must be one of"):
        JacobianEngine("vmap")  # type: ignore[arg-type]
    engine = JacobianEngine("loop")
    assert engine.mode == "loop" and not engine.fell_back
    with pytest.raises(AttributeError):
        engine.mode = "batched"  # type: ignore[misc]


def long_runtime_error(lines: int = 60) -> RuntimeError:
    """What a failing batching rule under torch.compile raises: one line of cause, then a C++ stack."""
    stack = "\n".join(f"frame #{i}: 0x{i:08x} in c10::something<{i}>(at::Tensor const&) + {i}" for i in range(lines))
    return RuntimeError(f"Batching rule not implemented for aten::fake_op; the fallback path doesn't work on "
                        f"out= or view ops.\nException raised from operator() at functorch/BatchRules.cpp:42\n{stack}")


def test_auto_falls_back_with_one_warning_line_and_the_trace_at_debug(monkeypatch, caplog) -> None:
    losses_fn, params = problem(2)
    expected = JacobianEngine("loop").jacobian(losses_fn(), params)
    real_grad = torch.autograd.grad

    def no_batching_rule(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise long_runtime_error()
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_batching_rule)
    engine = JacobianEngine("auto")
    with caplog.at_level(logging.DEBUG, logger="lightning_cost.jacobian"):
        jac = engine.jacobian(losses_fn(), params)
        engine.jacobian(losses_fn(), params)  # the loop from now on: nothing more is logged
    torch.testing.assert_close(jac, expected)
    assert engine.fell_back and engine.mode == "auto"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "\n" not in message and len(message) < 300, message
    assert "RuntimeError: Batching rule not implemented for aten::fake_op" in message and "K VJPs" in message
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG and r.exc_info]
    assert len(debug) == 1
    assert "frame #59" in caplog.text and "BatchRules.cpp:42" in caplog.text  # the full trace, at DEBUG


def test_batched_mode_never_falls_back(monkeypatch) -> None:
    losses_fn, params = problem()
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: (_ for _ in ()).throw(long_runtime_error(3)))
    engine = JacobianEngine("batched")
    with pytest.raises(RuntimeError, match="Batching rule"):
        engine.vjps(losses_fn(), params)
    assert not engine.fell_back
