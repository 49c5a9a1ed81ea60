"""The teleport-effect benchmark, small and real: the 3-task MLP, two teleports per teleporter."""

from __future__ import annotations

import json

import pytest

from benchmarks.teleport import effect as teleport_effect


@pytest.fixture(scope="module")
def effect_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("effect")
    teleport_effect.main(["--models", "mlp3", "--teleporters", "lora", "rescale-conflict", "--teleports", "2",
                          "--out", str(out)])
    return out


def _summary(out) -> dict[str, dict]:
    return {r["variant"]: r for r in json.loads((out / "effect.json").read_text())["summary"]}


def test_effect_is_measured_against_controls(effect_dir):
    rows = _summary(effect_dir)
    rescale = rows["rescale-conflict"]
    assert rescale["moved"] == 2 and rescale["loss_drift"] < 1e-5 and rescale["conflicts_after"] <= rescale["conflicts_before"]
    assert rescale["min_cos_change"] > 0.05  # the exact teleport raises the smallest cosine ...
    assert rescale["symmetry_control_min_cos_change"] < rescale["min_cos_change"]  # ... more than a random rescaling
    lora = rows["lora"]
    assert lora["accepted"] == 2 and lora["loss_drift"] < 0.01
    # the acceptance bar at defaults: >= 10 % more gradient or >= 0.05 more smallest cosine
    assert lora["grad_norm_ratio"] >= 1.1 or lora["min_cos_change"] >= 0.05
    assert lora["control_loss_drift"] > lora["loss_drift"]  # a random move of the same norm drifts more


def test_table_columns_match_header(effect_dir):
    lines = [ln for ln in (effect_dir / "effect.md").read_text().splitlines() if ln.startswith("|")]
    assert len({ln.count("|") for ln in lines}) == 1
    assert (effect_dir / "effect.png").stat().st_size > 0


def test_a_later_run_completes_the_table(effect_dir):
    teleport_effect.main(["--models", "mlp3", "--teleporters", "rescale-grad_norm", "--teleports", "1",
                          "--out", str(effect_dir)])
    saved = json.loads((effect_dir / "effect.json").read_text())
    assert set(_summary(effect_dir)) == {"lora", "rescale-conflict", "rescale-grad_norm"}
    assert len(saved["commands"]) == 2 and "rescale-grad_norm" in saved["commands"][-1]
    assert _summary(effect_dir)["rescale-grad_norm"]["teleports"] == 1
