"""The teleport under 2-process DDP (gloo): ranks with different samples stay identical."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "ddp_run.py"


@pytest.mark.ddp
def test_ddp_teleport_leaves_identical_weights_on_both_ranks(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "teleport"], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=False) for i in range(2))
    assert len(r0["history"]) == 1 and r0["history"][0]["accepted"]
    assert r0["history"][0]["losses_after"] == r1["history"][0]["losses_after"]
    for a, b in zip(r0["params"], r1["params"], strict=True):
        assert torch.equal(a, b)
    for a, b in zip(r0["opt_state"], r1["opt_state"], strict=True):
        assert torch.equal(a, b)


@pytest.mark.ddp
def test_ddp_representation_trigger_decides_on_the_global_gram_on_every_rank(tmp_path):
    """Each rank has its own samples (its rows of dL_i/dz); the K x K Gram is averaged, so both ranks
    fire on the same steps, teleport together and end with identical weights."""
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "representation"], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=False) for i in range(2))
    assert not torch.equal(r0["local_rep_jacobian"], r1["local_rep_jacobian"])  # different local samples
    assert len(r0["decisions"]) == len(r1["decisions"]) >= 8
    for (g0, f0), (g1, f1) in zip(r0["decisions"], r1["decisions"], strict=True):
        assert torch.equal(g0, g1) and f0 == f1
    fired = [f for _, f in r0["decisions"]]
    assert any(fired) and not all(fired)  # a data-dependent decision (cos < 0.5, see ddp_run.LowCosine)
    assert [h["step"] for h in r0["history"]] == [h["step"] for h in r1["history"]] != []
    for a, b in zip(r0["params"], r1["params"], strict=True):
        assert torch.equal(a, b)


def _run(tmp_path, devices, mode, stderr=None):
    proc = subprocess.run([sys.executable, str(Path(__file__).parent / "scripts" / "ddp_teleport.py"), str(tmp_path),
                           str(devices), mode], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if stderr is not None:
        stderr.append(proc.stderr)
    return torch.load(tmp_path / f"devices{devices}.pt", weights_only=False)


@pytest.mark.ddp
def test_ddp_teleport_is_the_one_device_teleport_on_the_global_batch(tmp_path):
    """Ranks see very different samples; the inner objective uses the global losses, so the teleport equals
    the one on one device with both ranks' samples in one batch (no BatchNorm: its statistics are per rank)."""
    ddp, one = _run(tmp_path, 2, "compare"), _run(tmp_path, 1, "compare")
    assert ddp["history"][0]["moved"] and one["history"][0]["moved"]
    torch.testing.assert_close(torch.tensor(ddp["history"][0]["losses_before"]),
                               torch.tensor(one["history"][0]["losses_before"]), rtol=1e-5, atol=1e-7)
    # 50 inner Adam steps amplify the ranks' different summation order to ~1e-5 on weights of ~0.3 that the
    # teleport moved by ~1e-2 each (a rank-local objective left them 14 % apart, relative)
    assert ddp["history"][0]["displacement_norm"] == pytest.approx(one["history"][0]["displacement_norm"], rel=1e-3)
    for a, b in zip(ddp["shared"], one["shared"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.ddp
def test_ddp_loss_invariance_alone_does_not_move_the_weights(tmp_path):
    """With L_t alone the global losses already equal L*, so the displacement is exactly zero (a local L_t
    moved the weights by percents on each rank)."""
    rec = _run(tmp_path, 2, "lt_only")["history"][0]
    assert rec["accepted"] and not rec["moved"] and rec["displacement_norm"] is None


@pytest.mark.ddp
def test_ddp_teleports_at_defaults_are_accepted_on_heterogeneous_ranks_at_batch_8(tmp_path):
    stderr = []
    history = _run(tmp_path, 2, "accept", stderr)["history"]
    assert [r["step"] for r in history] == [1, 3, 5, 7]
    assert all(r["accepted"] for r in history[:3]), [r["reason"] for r in history]
    assert not history[3]["accepted"]
    assert stderr[0].count("teleport rejected") == 1  # rank zero warns; rank one does not repeat it


@pytest.mark.ddp
def test_ddp_rescale_teleport_leaves_identical_ranks_equal_to_the_one_device_teleport(tmp_path):
    ddp, one = _run(tmp_path, 2, "rescale"), _run(tmp_path, 1, "rescale")
    rank1 = torch.load(tmp_path / "devices2_rank1.pt", weights_only=False)
    assert ddp["history"][0]["moved"] and ddp["history"][0]["loss_drift"] <= 1e-5
    for a, b, c in zip(ddp["shared"], rank1["shared"], one["shared"], strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6)
