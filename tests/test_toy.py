"""The 2-task toy of the COST paper's Fig. 6 (``benchmarks/toy/``): losses, Pareto set, runner, teleport."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch

from benchmarks.toy import (
    INITS,
    LOWER,
    PARETO_TOL,
    PARETO_X2,
    TOY_COST,
    ToyMTL,
    main,
    on_pareto_set,
    pareto_distance,
    rescaled_betas,
    run_one,
    toy_losses,
)
from lightning_cost import SymmetryTeleportCallback
from lightning_cost.teleport.lora.adapter import TeleportAdapter


def _losses(x1: float, x2: float, l1_scale: float = 1.0) -> list[float]:
    return toy_losses(torch.tensor([x1, x2], dtype=torch.float64), l1_scale).tolist()


# ---------------------------------------------------------------------------------------- the losses
def test_losses_at_the_origin_are_zero():
    # x2 = 0: c1 = max(tanh(0), 0) = 0 and c2 = max(tanh(-0), 0) = 0, so both losses are 0.
    assert _losses(0.0, 0.0) == [0.0, 0.0]


def test_losses_lower_half_by_hand():
    # x = (7, -8): c1 = max(tanh(-4), 0) = 0, c2 = max(tanh(4), 0) = tanh(4) = 0.999329299739067.
    #   f1_sq = ((-7 + 7)^2 + 0.1 * (8 - 8)^2) / 10 - 20 = 0 - 20 = -20
    #   f2_sq = ((-7 - 7)^2 + 0.1 * 0) / 10 - 20 = 196 / 10 - 20 = -0.4
    #   L1 = -20 * 0.999329299739067 = -19.98658599478134
    #   L2 = -0.4 * 0.999329299739067 = -0.39973171989562684
    c2 = math.tanh(4.0)
    assert c2 == pytest.approx(0.999329299739067, abs=1e-15)
    l1, l2 = _losses(7.0, -8.0)
    assert l1 == pytest.approx(-20 * c2, abs=1e-12) and l1 == pytest.approx(-19.98658599478134, abs=1e-12)
    assert l2 == pytest.approx(-0.4 * c2, abs=1e-12) and l2 == pytest.approx(-0.39973171989562684, abs=1e-12)


def test_losses_upper_half_by_hand():
    # x = (-3, 2): c1 = max(tanh(1), 0) = 0.7615941559557649, c2 = max(tanh(-1), 0) = 0,
    # tanh(-x2) = tanh(-2) = -0.9640275800758169.
    #   f1 = log|0.5 * (3 - 7) - (-0.96402758)| + 6 = log|-2 + 0.96402758| + 6 = log(1.03597242) + 6
    #      = 0.03534052 + 6 = 6.03534052
    #   f2 = log|0.5 * (3 + 3) + (-0.96402758) + 2| + 6 = log(4.03597242) + 6 = 1.39524727 + 6 = 7.39524727
    #   L1 = 6.03534052 * 0.76159416 = 4.59648007,   L2 = 7.39524727 * 0.76159416 = 5.63217710
    c1, t = math.tanh(1.0), math.tanh(-2.0)
    f1 = math.log(abs(0.5 * (3 - 7) - t)) + 6
    f2 = math.log(abs(0.5 * (3 + 3) + t + 2)) + 6
    assert f1 == pytest.approx(6.0353405217881235, abs=1e-12)
    assert f2 == pytest.approx(7.395247268950715, abs=1e-12)
    l1, l2 = _losses(-3.0, 2.0)
    assert l1 == pytest.approx(f1 * c1, abs=1e-12) and l1 == pytest.approx(4.596480070596852, abs=1e-12)
    assert l2 == pytest.approx(f2 * c1, abs=1e-12) and l2 == pytest.approx(5.632177101880695, abs=1e-12)
    # The Nash-MTL / FAMO version multiplies L1 (only) by 0.1.
    s1, s2 = _losses(-3.0, 2.0, l1_scale=0.1)
    assert s1 == pytest.approx(0.1 * l1, abs=1e-12) and s2 == l2


def test_log_floor_on_the_valley():
    # x2 = 1, x1 = -7 + 2 tanh(1): 0.5 * (-x1 - 7) - tanh(-1) = -tanh(1) + tanh(1) = 0 (to rounding), so the
    # argument of the log is floored at LOWER = 5e-6:
    #   f1 = log(5e-6) + 6 = -6.206072645530174,   L1 = f1 * tanh(0.5) = -2.867932648701512
    #   f2 = log|0.5 * (5.47681169 + 3) - 0.76159416 + 2| + 6 = log(5.47681169) + 6,  L2 = f2 * tanh(0.5)
    x1 = -7 + 2 * math.tanh(1.0)
    l1, l2 = _losses(x1, 1.0)
    assert l1 == pytest.approx((math.log(LOWER) + 6) * math.tanh(0.5), abs=1e-12)
    assert l1 == pytest.approx(-2.867932648701512, abs=1e-12)
    assert l2 == pytest.approx((math.log(0.5 * (-x1 + 3) + math.tanh(-1.0) + 2) + 6) * math.tanh(0.5), abs=1e-12)


def test_batched_and_float32():
    pts = torch.tensor([[0.0, 0.0], [7.0, -8.0], [-3.0, 2.0]], dtype=torch.float64)
    batch = toy_losses(pts)
    assert batch.shape == (3, 2)
    for p, row in zip(pts, batch, strict=True):
        assert row.tolist() == pytest.approx(toy_losses(p).tolist(), abs=1e-12)
    assert toy_losses(pts.float()).double().tolist()[1] == pytest.approx(batch[1].tolist(), rel=1e-6)


def test_gradient_at_the_origin():
    # At (0, 0) both c's sit on their floor: the derivative of max(., 0) there is taken as 1 (torch.clamp's
    # old subgradient), so dc1/dx2 = 0.5 sech^2(0) = 0.5 and dc2/dx2 = -0.5, while c1 = c2 = 0 kill the f terms:
    #   dL1/dx2 = 0.5 * f1(0, 0) - 0.5 * f1_sq(0, 0) = 0.5 * (log 3.5 + 6) - 0.5 * ((49 + 6.4)/10 - 20)
    #           = 0.5 * 7.25276297 + 0.5 * 14.46 = 10.85638149,   dL/dx1 = 0;  L2 gives the same numbers.
    x = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    l1, l2 = toy_losses(x)
    g1 = torch.autograd.grad(l1, x, retain_graph=True)[0]
    g2 = torch.autograd.grad(l2, x)[0]
    expected = 0.5 * (math.log(3.5) + 6) - 0.5 * ((49 + 6.4) / 10 - 20)
    assert expected == pytest.approx(10.856381486, abs=1e-8)
    assert g1.tolist() == pytest.approx([0.0, expected], abs=1e-12)
    assert g2.tolist() == pytest.approx([0.0, expected], abs=1e-12)


# ---------------------------------------------------------------------------------------- the Pareto set
def _min_norm_residual(x1: float, x2: float) -> tuple[float, float, float]:
    """``min_w ||w g1 + (1 - w) g2||`` over ``w in [0, 1]``, the minimiser, and ``max ||g_i||``."""
    x = torch.tensor([x1, x2], dtype=torch.float64, requires_grad=True)
    l1, l2 = toy_losses(x)
    g1 = torch.autograd.grad(l1, x, retain_graph=True)[0]
    g2 = torch.autograd.grad(l2, x)[0]
    d = g1 - g2
    w = min(max(float(-(g2 @ d) / (d @ d)), 0.0), 1.0)
    return float((w * g1 + (1 - w) * g2).norm()), w, float(max(g1.norm(), g2.norm()))


@pytest.mark.parametrize("x1", [-7.0, -5.0, -3.5, 0.0, 2.0, 6.0, 7.0])
def test_pareto_segment_is_pareto_stationary(x1):
    # On x2 = -8.3552, x1 in [-7, 7], some convex combination of the two gradients vanishes. The exact set
    # bends (x2 = -8.4345 at x1 = +-7), so "vanishes" is up to 1e-3 of the gradients' size (0.82e-3 at
    # the ends, 2e-6 at x1 = 0); the weight w of L1 follows x1 = 14 w - 7.
    residual, w, scale = _min_norm_residual(x1, PARETO_X2)
    assert residual <= 1e-3 * scale
    assert w == pytest.approx((x1 + 7) / 14, abs=1e-3)
    assert on_pareto_set([x1, PARETO_X2]) and float(pareto_distance([x1, PARETO_X2])) == 0.0


@pytest.mark.parametrize("point", [(0.0, -6.0), (9.0, PARETO_X2), (-8.0, -8.0), (0.0, 2.0), (-5.0, 1.5)])
def test_points_off_the_pareto_set(point):
    residual, _, scale = _min_norm_residual(*point)
    assert residual >= 0.05 * scale  # no convex combination of the gradients vanishes
    assert not on_pareto_set(point)


def test_pareto_distance():
    assert float(pareto_distance([0.0, PARETO_X2 + 0.05])) == pytest.approx(0.05)
    assert float(pareto_distance([8.0, PARETO_X2])) == pytest.approx(1.0)
    assert float(pareto_distance([-10.0, PARETO_X2 - 4.0])) == pytest.approx(5.0)
    assert on_pareto_set([7.05, PARETO_X2]) and not on_pareto_set([7.05, PARETO_X2], tol=0.01)
    assert not on_pareto_set([0.0, PARETO_X2 + 1.01 * PARETO_TOL])
    mask = on_pareto_set(torch.tensor([[0.0, PARETO_X2], [0.0, 0.0]]))
    assert mask.tolist() == [True, False]


def test_rescaled_betas():
    assert rescaled_betas(1e-3) == (0.9, 0.999)
    assert rescaled_betas(1e-2) == (0.0, 0.99)
    assert rescaled_betas(5e-3) == (0.5, 0.995)


# ---------------------------------------------------------------------------------------- the module
def test_module_shares_the_raw_parameter_and_gets_a_dense_delta():
    model = ToyMTL((9.0, -1.0), method="mgda")
    assert [p is model.x for p in model.shared_parameters()] == [True]
    assert model.x.shape == (2,)
    out = model.evaluate_task_losses(None)
    assert out.tolist() == pytest.approx(_losses(9.0, -1.0), rel=1e-6)
    adapter = TeleportAdapter(model, model.shared_parameters())
    assert adapter.lora_targets == [] and [p is model.x for p in adapter.dense_params] == [True]


# ---------------------------------------------------------------------------------------- the runner
RUN_KEYS = {"init", "l1_scale", "gradient_clip", "steps", "final_x", "final_losses", "final_pareto_distance",
            "final_on_pareto", "reached_pareto", "first_pareto_step", "teleports", "teleports_rejected",
            "teleport_events", "skipped_steps", "seconds"}


def test_runner_writes_summary_and_plot(tmp_path, capsys):
    init = INITS[4]  # (9, -1): LS reaches the front in ~1000 steps, so 200 steps do not
    main(["--steps", "200", "--out", str(tmp_path), "--methods", "ls", "mgda", "--inits", "4", "--jobs", "1"])
    printed = capsys.readouterr().out
    assert "200 steps" in printed and "time-rescaled" in printed and "LS +COST" in printed

    summary = json.loads((tmp_path / "toy_summary.json").read_text())
    cfg = summary["config"]
    assert cfg["steps"] == 200 and cfg["lr"] == 1e-2 and cfg["betas"] == [0.0, 0.99]
    assert cfg["pareto"]["tol"] == PARETO_TOL and cfg["pareto"]["x2"] == PARETO_X2
    assert cfg["l1_scale"] == {"ls": 1.0, "mgda": 1.0} and cfg["gradient_clip"] == {"ls": None, "mgda": None}
    assert cfg["inits"] == [list(init)]
    assert cfg["cost"]["teleporter"]["radius"] == TOY_COST["teleporter"]["radius"] == 0.1
    assert cfg["cost"]["schedule"]["warmup_steps"] == 20
    assert set(summary["results"]) == {"ls", "mgda"}
    for method, by_flag in summary["results"].items():
        assert set(by_flag) == {"baseline", "cost"}
        for flag, by_init in by_flag.items():
            assert list(by_init) == ["(9, -1)"]
            run = by_init["(9, -1)"]
            assert RUN_KEYS <= set(run)
            assert run["steps"] == 200 and run["init"] == list(init)
            assert len(run["final_x"]) == 2 and len(run["final_losses"]) == 2
            assert run["final_losses"] == pytest.approx(_losses(*run["final_x"]), rel=1e-9)
            assert run["final_pareto_distance"] == pytest.approx(float(pareto_distance(run["final_x"])))
            assert run["reached_pareto"] == (run["first_pareto_step"] is not None)
            assert run["final_on_pareto"] == (run["final_pareto_distance"] <= PARETO_TOL)
            assert run["final_x"] != list(init)  # it trained
            if flag == "baseline":
                assert run["teleports"] == 0 and run["teleport_events"] == []
            assert summary["counts"][method][flag] == int(run["reached_pareto"])

    traj = json.loads((tmp_path / "toy_trajectories.json").read_text())
    assert len(traj["runs"]) == 4
    for run in traj["runs"]:
        t = run["trajectory"]
        assert t["steps"][0] == 0 and t["steps"][-1] == 200 and t["x"][0] == list(init)
        assert len(t["steps"]) == len(t["x"]) == len(t["losses"]) >= 20
        assert t["x"][-1] == pytest.approx(run["final_x"])

    png = (tmp_path / "toy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    # --replot redraws from the trajectories without training
    (tmp_path / "toy.png").unlink()
    main(["--out", str(tmp_path), "--replot"])
    assert (tmp_path / "toy.png").exists()


def test_famo_runs_the_scaled_and_clipped_version():
    r = run_one("famo", INITS[3], cost=False, steps=5)
    assert r["l1_scale"] == 0.1 and r["gradient_clip"] == 1.0 and r["steps"] == 5
    assert r["final_losses"] == pytest.approx(_losses(*r["final_x"]), rel=1e-9)  # reported unscaled
    same = run_one("famo", INITS[3], cost=False, steps=5, l1_scale=1.0)
    assert same["l1_scale"] == 1.0 and same["gradient_clip"] is None


# ---------------------------------------------------------------------------------------- a forced teleport
class _ForceAt(L.Callback):
    """Asks the teleport callback to teleport at batch ``at`` whatever the trigger says."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.at:
            tele = next(c for c in trainer.callbacks if isinstance(c, SymmetryTeleportCallback))
            tele.request_teleport()


def test_forced_teleport_keeps_both_losses_and_moves_x():
    # (0, -5) with LS: both gradients push x2 down, no dominated conflict, so only the forced teleport fires.
    r = run_one("ls", (0.0, -5.0), cost=True, steps=12, cost_overrides={"schedule": {"warmup_steps": 0}},
                callbacks=[_ForceAt(5)])
    assert r["teleports"] + r["teleports_rejected"] == 1
    (event,) = r["teleport_events"]
    assert event["step"] == 5 and event["accepted"], event
    before, after = torch.tensor(event["x_before"]), torch.tensor(event["x_after"])
    assert float((after - before).norm()) > 1e-4  # x moved
    # Both losses, recomputed independently at the two points, stay within the callback's tolerance.
    l_before, l_after = toy_losses(before.double()), toy_losses(after.double())
    tolerance = TOY_COST["teleporter"]
    bound = tolerance["loss_tolerance"] * l_before.abs() + tolerance["abs_tolerance"]
    assert ((l_after - l_before).abs() <= bound).all(), (l_before, l_after)
    assert event["losses_before"] == pytest.approx(l_before.tolist(), abs=1e-4)
    assert event["losses_after"] == pytest.approx(l_after.tolist(), abs=1e-4)
    # The teleporting batch (the 6th) takes no optimizer step: x after it is the teleported point itself.
    # The recorded trajectory (x after k steps) contains the jump from step 5 to step 6.
    steps, xs = r["trajectory"]["steps"], r["trajectory"]["x"]
    assert xs[steps.index(5)] == pytest.approx(event["x_before"])
    assert xs[steps.index(6)] == pytest.approx(event["x_after"])


# ---------------------------------------------------------------------------------------- longer runs
@pytest.mark.slow
def test_ls_gets_stuck_only_from_the_upper_inits():
    # The papers' picture (35k steps at lr 1e-3), in the runner's time-rescaled default (2000 steps at lr 1e-2,
    # betas (0, 0.99)): LS stays in a valley of the log terms from (-8.5, 7.5) and reaches the front from (9, -1).
    stuck = run_one("ls", INITS[0], cost=False, steps=2000)
    assert not stuck["reached_pareto"] and stuck["final_x"][1] > 0
    ok = run_one("ls", INITS[4], cost=False, steps=2000)
    assert ok["reached_pareto"] and 1000 < ok["first_pareto_step"] < 2000
    assert ok["final_x"] == pytest.approx([0.0, PARETO_X2], abs=0.05)  # LS ends in the middle of the front
