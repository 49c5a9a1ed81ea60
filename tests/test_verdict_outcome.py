"""The verdict's outcome rule, its margin and its controls, on hand-made numbers and run files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks.runner.config import RunnerConfig, VerdictMargin, config_from_argv
from benchmarks.runner.report import row_label
from benchmarks.runner.stats import teleports_before_best
from benchmarks.runner.verdict import outcome, propose_margin, write_verdict

CONFIGS = Path(__file__).resolve().parents[1] / "benchmarks" / "configs" / "verdict"


def _row(base=None, control=None, margin=None, *, cost="paper", control_of=None, teleports=5.0,
         before=(2.0, 3, 5), seeds=5) -> dict:
    mean, with_any, runs = before
    return {"method": "fairgrad", "cost": cost, "control_of": control_of, "seeds": seeds,
            "paired_vs_base_ci95": base, "paired_vs_control_ci95": control, "margin": margin,
            "teleports_per_run": teleports,
            "teleports_before_best": None if runs is None else {"mean": mean, "runs_with_any": with_any, "runs": runs}}


def test_each_outcome() -> None:
    assert outcome(_row([-3.0, -1.0], [-2.0, -0.5], 0.5)) == "helps"
    assert outcome(_row([0.5, 2.0], None, 0.5)) == "hurts"
    assert outcome(_row([-0.4, 0.3], None, 0.5)) == "no effect"
    assert outcome(_row([0.0, 0.0], None, 0.5, before=(0.0, 0, 5))) == "never acted"
    assert outcome(_row([-2.0, 1.0], [-1.0, 0.5], 0.5)) == "inconclusive"
    assert outcome(_row([-0.5, 0.5], [-1.0, 0.5], 0.5)) == "no effect"  # the margin's ends count as inside
    assert outcome(_row(None, None, 0.5)) == "inconclusive"  # one seed: no interval


def test_precedence() -> None:
    # never acted first, whatever the margin, when the runs equal their base
    assert outcome(_row([0.0, 0.0], None, None, before=(0.0, 0, 5))) == "never acted"
    assert outcome(_row(None, None, 0.5, teleports=0.0, before=(0.0, 0, None))) == "never acted"
    # no teleport before the checkpoint, yet the runs differ from their base: a teleport after the run's
    # checkpoint (and before the base's) spoiled the later epochs; that is COST acting, judged as such
    assert outcome(_row([0.5, 2.0], None, 0.5, before=(0.0, 0, 5))) == "hurts"
    assert outcome(_row([-0.4, 0.3], None, 0.5, before=(0.0, 0, 5))) == "no effect"
    assert outcome({**_row([0.0, 0.0], None, 0.5, before=(0.0, 0, 5)), "paired_vs_base_mean": 0.1}) == "no effect"
    # no effect before helps and hurts: inside the margin, a significant difference does not count
    assert outcome(_row([-0.4, -0.1], [-0.3, -0.1], 0.5)) == "no effect"
    assert outcome(_row([0.1, 0.4], None, 0.5)) == "no effect"
    # hurts is judged against the base alone; helps needs the control as well
    assert outcome(_row([0.5, 2.0], [-3.0, -1.0], 0.5)) == "hurts"
    assert outcome(_row([-3.0, -1.0], None, 0.5)) == "inconclusive"  # no matched control yet: never helps
    assert outcome(_row([-3.0, -1.0], [-1.0, 0.2], 0.5)) == "inconclusive"  # not below its control


def test_no_margin_never_concludes_no_effect_and_unknown_history_is_not_never_acted() -> None:
    assert outcome(_row([-0.01, 0.01], None, None)) == "inconclusive"
    assert outcome(_row([-0.01, 0.01], None, None, before=(0.0, 0, 4))) == "inconclusive"  # 1 of 5 unknown
    assert outcome(_row([-0.01, 0.01], None, 0.5, before=(0.0, 0, None))) == "no effect"


def test_base_and_control_rows_get_no_outcome_and_controls_are_labelled() -> None:
    assert outcome(_row([-3.0, -1.0], None, 0.5, cost="none")) is None
    assert outcome(_row([-3.0, -1.0], None, 0.5, cost="null", control_of="paper")) is None
    assert row_label("fairgrad", "null", "paper") == "fairgrad + paper (control: null)"
    assert row_label("fairgrad", "paper") == "fairgrad + COST (paper)" and row_label("ls", "none") == "ls"


def test_teleports_before_best_by_hand() -> None:
    history = [{"epoch": 1, "step": 10, "accepted": True}, {"epoch": 3, "step": 30, "accepted": False},
               {"epoch": 3, "step": 31, "accepted": True}, {"epoch": 4, "step": 40, "accepted": True}]
    assert teleports_before_best(history, 3, 3) == 2  # the best epoch's own teleports count, later ones not
    assert teleports_before_best(history, 0, 3) == 0
    assert teleports_before_best([], 3, 0) == 0  # no teleport at all
    assert teleports_before_best([], 3, 4) is None  # acts without records (a control): unknown
    assert teleports_before_best(history, -1, 3) is None
    assert teleports_before_best([{"step": 10, "accepted": True}], 3, 1) is None  # no epoch recorded


def _run(method: str, cost: str, seed: int, delta_m: float, *, teleports: int = 0, epochs: tuple = (),
         control_of: str | None = None) -> dict:
    """A run whose Delta-m% is ``delta_m`` against a single-task accuracy of 1.0, best at epoch 3, with
    accepted teleports in ``epochs``."""
    history = [{"epoch": e, "step": 10 * e, "accepted": True} for e in epochs]
    return {"dataset": "toy", "kind": "run", "method": method, "cost": cost, "seed": seed,
            "test": {"t/accuracy": 1.0 - delta_m / 100}, "higher_is_better": {"t/accuracy": True},
            "best_epoch": 3, "epochs_run": 6, "wall_time_s": 10.0, "teleports": teleports or len(epochs),
            "trigger_ratio_majority": 0.0, "trigger_ratio_any": 0.5, "teleport_history": history,
            "control_of": control_of}


_BASELINE = {"dataset": "toy", "task": "t", "seed": 0, "test": {"t/accuracy": 1.0},
             "higher_is_better": {"t/accuracy": True}, "wall_time_s": 1.0, "epochs_run": 5}


def test_propose_margin_from_the_base_runs_of_cost_methods() -> None:
    runs = [_run("fairgrad", "none", s, d) for s, d in enumerate((0.0, 2.0, 4.0))]  # std 2
    runs += [_run("cagrad", "none", s, d) for s, d in enumerate((1.0, 1.0, 4.0))]  # std sqrt(3)
    runs += [_run("ls", "none", s, d) for s, d in enumerate((0.0, 50.0, -50.0))]  # no COST row: left out
    runs += [_run(m, "paper", s, 99.0 * s, epochs=(1,)) for m in ("fairgrad", "cagrad") for s in range(3)]
    runs += [_run("fairgrad", "null", s, 0.0, control_of="paper") for s in range(3)]
    prop = propose_margin(runs, [_BASELINE], "toy")
    assert prop["pooled_std"] == pytest.approx(math.sqrt(3.5))
    assert prop["delta"] == round(0.5 * math.sqrt(3.5), 2) and prop["multiple"] == 0.5
    assert set(prop["std"]) == {"cagrad", "fairgrad"} and "fairgrad 2.00 over 3 seeds" in prop["why"]
    assert propose_margin(runs, [_BASELINE], "toy", multiple=1.0)["delta"] == round(math.sqrt(3.5), 2)
    VerdictMargin(prop["delta"], prop["why"])  # a valid config entry as it stands
    # before any COST row has run (when a margin is fixed), the config's cost_methods name the methods
    bases = [r for r in runs if r["cost"] == "none"]
    with pytest.raises(ValueError, match="no base method"):
        propose_margin(bases, [_BASELINE], "toy")
    assert propose_margin(bases, [_BASELINE], "toy", methods=["fairgrad", "cagrad"])["pooled_std"] == \
        pytest.approx(math.sqrt(3.5))
    assert set(propose_margin(bases, [_BASELINE], "toy", methods=["ls"])["std"]) == {"ls"}


def test_margin_in_the_config_is_validated() -> None:
    assert RunnerConfig(verdict_margin={"delta": 1.5, "why": "w"}).verdict_margin == VerdictMargin(1.5, "w")
    for bad in ({"delta": 0.0, "why": "w"}, {"delta": float("nan"), "why": "w"}, {"delta": 1.0, "why": ""},
                {"delta": 1.0, "why": "w", "extra": 1}):
        with pytest.raises(ValueError):
            RunnerConfig(verdict_margin=bad)
    for name, margin in (("yeast", True), ("birds", True), ("qm8", True), ("multimnist", True), ("multifashion", False)):
        cfg = RunnerConfig(**config_from_argv(["--config", str(CONFIGS / f"{name}.yaml")])[0])
        assert (cfg.verdict_margin is not None) == margin


def test_control_of_is_checked_and_read_per_variant() -> None:
    cfg = RunnerConfig(cost_variants={"null": {"control_of": "paper"}})
    assert cfg.control_of("null") == "paper" and cfg.control_of("paper") is None and cfg.control_of("none") is None
    for variants in ({"null": {"control_of": "nope"}}, {"null": {"control_of": "null"}},
                     {"a": {"control_of": "paper"}, "b": {"control_of": "paper"}},
                     {"a": {"control_of": "paper"}, "b": {"control_of": "a"}}):
        with pytest.raises(ValueError):
            RunnerConfig(cost_variants=variants)


def _folder(path: Path, runs: list[dict], margin: dict | None) -> Path:
    (path / "runs").mkdir(parents=True)
    (path / "baselines").mkdir()
    (path / "baselines" / "t__seed0.json").write_text(json.dumps(_BASELINE))
    for r in runs:
        (path / "runs" / f"{r['method']}__cost-{r['cost']}__seed{r['seed']}.json").write_text(json.dumps(r))
    (path / "verdict_config.json").write_text(json.dumps({"verdict_margin": margin}))
    return path


def test_write_verdict_end_to_end(tmp_path: Path) -> None:
    base = (10.0, 12.0, 11.0)
    runs = []
    for s, b in enumerate(base):
        runs += [_run("fairgrad", "none", s, b), _run("cagrad", "none", s, b),
                 _run("fairgrad", "paper", s, b - 3.0 - 0.5 * s, epochs=(1, 2)),  # helps: below base and control
                 _run("fairgrad", "null", s, b + 0.1 * s, teleports=4, control_of="paper"),
                 _run("fairgrad", "rescale", s, b + (0.1, -0.1, 0.05)[s], epochs=(2,)),  # inside the margin
                 _run("fairgrad", "authors", s, b, epochs=(4, 5)),  # teleports only after the best epoch: the base's weights
                 _run("cagrad", "paper", s, b + 3.0 + 0.5 * s, epochs=(0,))]  # hurts
    margin = {"delta": 1.0, "why": "hand-made"}
    verdict = write_verdict([_folder(tmp_path / "toy", runs, margin)], tmp_path / "out")
    d = json.loads((tmp_path / "out" / "verdict.json").read_text())["datasets"]["toy"]
    assert d == verdict["datasets"]["toy"] and d["margin"] == margin
    by = {(r["method"], r["cost"]): r for r in d["rows"]}
    assert {k: r["outcome"] for k, r in by.items()} == {
        ("cagrad", "none"): None, ("cagrad", "paper"): "hurts", ("fairgrad", "none"): None,
        ("fairgrad", "authors"): "never acted", ("fairgrad", "null"): None, ("fairgrad", "paper"): "helps",
        ("fairgrad", "rescale"): "no effect"}
    paper, null = by[("fairgrad", "paper")], by[("fairgrad", "null")]
    assert paper["paired_vs_control_mean"] == pytest.approx(-3.0 - 0.5 - 0.1)  # mean of -3 - 0.6 s over s = 0, 1, 2
    assert paper["paired_vs_control_ci95"][1] < 0 and paper["margin"] == 1.0 and paper["seeds"] == 3
    assert paper["teleports_before_best"] == {"mean": 2.0, "runs_with_any": 3, "runs": 3}
    assert by[("fairgrad", "authors")]["teleports_before_best"] == {"mean": 0.0, "runs_with_any": 0, "runs": 3}
    assert null["control_of"] == "paper" and null["margin"] is None and null["teleports_before_best"] is None
    assert by[("cagrad", "paper")]["paired_vs_control_ci95"] is None
    md = (tmp_path / "out" / "VERDICT.md").read_text()
    assert "| fairgrad + paper (control: null) | 3 |" in md and "δ = 1 Δm% points (hand-made)" in md
    assert "toy: COST helps for fairgrad + COST (paper); hurts for cagrad + COST (paper); no effect for " \
           "fairgrad + COST (rescale); never acted for fairgrad + COST (authors) (in none of its 3 runs)." in md
    assert "control: null)" not in md.split("toy: COST")[1].split("\n")[0]  # controls are no COST rows


def test_a_folder_without_a_margin_says_so(tmp_path: Path) -> None:
    runs = [r for s in range(2) for r in (_run("ls", "none", s, 5.0), _run("ls", "paper", s, 5.0 + 0.01 * s,
                                                                          epochs=(1,)))]
    folder = _folder(tmp_path / "toy", runs, None)
    (folder / "verdict_config.json").unlink()  # an older folder: no file at all
    d = write_verdict([folder], tmp_path / "out")["datasets"]["toy"]
    assert d["margin"] is None and [r["outcome"] for r in d["rows"]] == [None, "inconclusive"]
    assert "'no effect' cannot be concluded" in (tmp_path / "out" / "VERDICT.md").read_text()


def test_headline_table_and_readme_block(tmp_path) -> None:
    """One row per data set and method with COST rows, one column per variant; controls and base rows are
    not columns; the README block between the markers is replaced, the rest of the README kept."""
    from benchmarks.runner.headline import BEGIN, END, headline_markdown, update_readme

    def row(method, cost, outcome, base=None, ctrl=None, control_of=None):
        return {"method": method, "cost": cost, "outcome": outcome, "control_of": control_of,
                "paired_vs_base_mean": base, "paired_vs_control_mean": ctrl}

    verdict = {"datasets": {
        "yeast": {"margin": {"delta": 1.04, "why": "x"}, "rows": [
            row("fairgrad", "none", None), row("fairgrad", "paper", "never acted"),
            row("fairgrad", "paper_control", None, control_of="paper"),
            row("fairgrad", "rescale", "no effect", -0.04, 0.21)]},
        "birds": {"margin": None, "rows": [row("cagrad", "rescale", "hurts", 2.89, 1.52)]}}}
    table = headline_markdown(verdict)
    lines = table.splitlines()
    assert lines[0] == "| data set | method | margin δ | paper | authors | rescale | flatness |"
    assert "| yeast | fairgrad | 1.04 | never acted | not run | no effect (-0.04 / +0.21) | not run |" in lines
    assert "| birds | cagrad | none | not run | not run | hurts (+2.89 / +1.52) | not run |" in lines
    assert not any("control" in ln.split("|")[2] for ln in lines[2:4])
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{BEGIN}\nold table\n{END}\noutro\n")
    update_readme(readme, table)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{END}\noutro\n") and "old table" not in text
    assert "no effect (-0.04 / +0.21)" in text
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="verdict headline"):
        update_readme(readme, table)
