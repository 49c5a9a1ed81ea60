"""Which COST runs the runner may derive from their base run: the first teleport attempt, by hand."""

from __future__ import annotations

from benchmarks.runner.derive import derived_record, first_attempt

BASE = {"fired_steps": {"majority": [[3, 0], [25, 2], [31, 3]], "any": [[1, 0], [3, 0], [25, 2], [31, 3]]},
        "total_steps": 40.0, "config": {"cost": "none"}, "teleports": 0, "weights_sha256": "abc"}


def test_first_attempt_follows_rule_warmup_and_checked_steps():
    assert first_attempt(BASE, {}) == 3  # eq. 4 (majority) from the first step
    assert first_attempt(BASE, {"trigger": "any"}) == 1
    assert first_attempt(BASE, {"trigger": {"rule": "any"}, "schedule": {"warmup_epochs": 1}}) == 25
    assert first_attempt(BASE, {"schedule": {"warmup_fraction": 0.7}}) == 31  # 0.7 x 40 = 28
    assert first_attempt(BASE, {"schedule": {"warmup_steps": 32}}) is None  # silent after the warm-up
    assert first_attempt(BASE, {"schedule": {"check_every": 5}}) == 25  # 3 and 31 are not checked
    assert first_attempt(BASE, {"schedule": {"on_trigger": False}}) is None


def test_what_the_record_cannot_tell_is_never_derived():
    assert first_attempt(BASE, {"schedule": {"every": 10}}) is False  # forced teleports
    assert first_attempt(BASE, {"trigger": {"on": "representation"}}) is False
    assert first_attempt({"config": {"cost": "none"}}, {}) is False  # a record from before the series
    assert first_attempt({**BASE, "total_steps": float("inf")}, {"schedule": {"warmup_fraction": 0.5}}) is False


def test_derived_record_only_for_a_silent_variant_with_the_same_settings():
    key = {"seed": 0, "lr": 1e-3, "cost": "late", "cost_spec": {"schedule": {"warmup_steps": 32}}}
    base_key = {"seed": 0, "lr": 1e-3, "cost": "none", "cost_spec": None}
    rec = derived_record(BASE, key, base_key, "m__cost-none__seed0.json", needs_gradients=True)
    assert rec is not None and rec["derived_from"] == "m__cost-none__seed0.json" and rec["weights_sha256"] == "abc"
    assert rec["teleports"] == 0 and rec["teleport_history"] == [] and "config" not in rec
    assert derived_record(BASE, {**key, "cost_spec": {}}, base_key, "f", True) is None  # fires at step 3
    assert derived_record(BASE, {**key, "lr": 1e-2}, base_key, "f", True) is None  # another setting
    assert derived_record(BASE, key, base_key, "f", needs_gradients=False) is None  # a loss weighting
    assert derived_record(None, key, base_key, "f", True) is None


def test_relative_warmup_is_a_share_of_the_base_runs_steps_to_its_checkpoint():
    import pytest

    from benchmarks.runner.relative import needs_base, resolve_warmup

    spec = {"trigger": "any", "schedule": {"warmup_of_base_best": 0.5, "max_per_epoch": 1}}
    base = {"total_steps": 40.0, "config": {"epochs": 4}, "best_epoch": 2}  # 10 steps/epoch, best after 30
    assert needs_base(spec) and not needs_base({"schedule": {"warmup_steps": 3}}) and not needs_base(None)
    out = resolve_warmup(spec, base)
    assert out["schedule"] == {"warmup_steps": 15, "max_per_epoch": 1} and out["trigger"] == "any"
    assert spec["schedule"]["warmup_of_base_best"] == 0.5  # the config's preset is left as it is
    assert resolve_warmup({"schedule": {"warmup_of_base_best": 0.0}}, base)["schedule"] == {"warmup_steps": 0}
    with pytest.raises(ValueError, match="finished base run"):
        resolve_warmup(spec, None)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        resolve_warmup({"schedule": {"warmup_of_base_best": 1.5}}, base)
    with pytest.raises(ValueError, match="no step count"):
        resolve_warmup(spec, {"config": {"epochs": 4}, "best_epoch": 2})
    # derivation reads the resolved warm-up: silent after step 15 in a series that fires at 3 only
    assert first_attempt({"fired_steps": {"any": [[3, 0]]}, "total_steps": 40.0}, out) is None
