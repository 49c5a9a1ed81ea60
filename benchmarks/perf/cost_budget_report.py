"""The COST-cost benchmark's report: the budget plot (``cost_budget.png``) and the tables of every
section (``cost_budget.txt``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.common import text_table
from benchmarks.perf.cost_budget_curve import TARGET_RATIO, inner_name


def plot_budget(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = res["points"]
    fg = next(p for p in pts if p["label"] == "fairgrad")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.5, 3.6))
    zero = [p for p in pts if p["label"] == "cost-b0"]
    for t in res["inner_steps"]:
        line = zero + sorted((p for p in pts if p["inner_steps"] == str(t)), key=lambda p: p["budget"])
        xs = [p["budget"] for p in line]
        name = inner_name(t)
        (ln,) = ax1.plot(xs, [p["time_ratio"] for p in line], "o-", label=name)
        ax1.plot(xs, [p["time_ratio_teleport"] for p in line], "x--", color=ln.get_color(), lw=0.8)
        ax1.fill_between(xs, [p["time_ratio_min"] for p in line], [p["time_ratio_max"] for p in line], alpha=0.15)
        ax2.plot(xs, [p["delta_m"] for p in line], "o-", label=name)
    ax1.axhline(TARGET_RATIO, color="r", ls="--", lw=1, label=f"target {TARGET_RATIO}x")
    ax1.axhline(1.0, color="k", lw=0.8)
    ax1.set_xlabel("forced teleports per epoch")
    ax1.set_ylabel("training time / FairGrad's")
    ax1.set_title("FairGrad + COST: time (dashed: FG + teleport s)")
    ax1.legend(fontsize=8)
    ax2.axhline(fg["delta_m"], color="k", ls="--", lw=1, label="FairGrad")
    ax2.set_xlabel("forced teleports per epoch")
    ax2.set_ylabel("Δm% (lower is better)")
    ax2.set_title("FairGrad + COST: Δm%")
    ax2.legend(fontsize=8)
    fig.suptitle(f"MultiMNIST, {res['config']['epochs']} epochs x {res['steps_per_epoch']} steps, "
                 f"seeds {res['seeds']}, {res['repeats']} repeat(s)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- report


def _table(title: str, header: list[str], rows: list[list[Any]]) -> str:
    return text_table(title, header, rows, digits=3)


def render(res: dict[str, Any]) -> str:
    parts = []
    if "budget" in res:
        b = res["budget"]
        rows = [[p["label"], p["inner_steps"] if p["inner_steps"] is not None else "-",
                 p["budget"] if p["budget"] is not None else "trigger", p["teleports"], p["rejected"],
                 p["time_ratio"], p["time_ratio_teleport"], p["teleport_share"], p["teleport_s_mean"], p["delta_m"],
                 p["delta_m_gain_vs_fairgrad"], p["loss_drift_mean"]] for p in b["points"]]
        t = b["target"]
        parts.append(_table(
            f"1. FairGrad + COST vs FairGrad, MultiMNIST ({b['config']['epochs']} epochs x {b['steps_per_epoch']} "
            f"steps, seeds {b['seeds']}, {b['repeats']} repeat(s)); time = trainer.fit (train + val); "
            "'time x FG': median over repeats of the run's time over the same repeat's FairGrad run; "
            "'(FG+tele s)/FG': FairGrad's median time plus the run's measured teleport seconds (less noisy)",
            ["point", "inner", "tele/epoch", "teleports", "rejected", "time x FG", "(FG+tele s)/FG", "tele share",
             "s/teleport",
             "Δm%", "Δm% gain", "loss drift"], rows)
            + f"\n   target: COST default <= {TARGET_RATIO}x FairGrad: {t['default_time_ratio']:.3f}x "
              f"({'pass' if t['default_pass'] else 'FAIL'}; {t['default_teleports']:.0f} teleports: the trigger is "
              f"silent); forced points within the target: {t['forced_points_within_target']}")
    if "levers" in res:
        lv = res["levers"]
        rows = [[r["inner_steps"], r["inner_lr"], r["accepted"], r["teleport_s_mean"], r["loss_drift_mean"],
                 r["displacement_rel_mean"], r["grad_norm_ratio_mean"], r["lt_final_mean"], r["lg_gain_rel_mean"],
                 r["sigma_mean"]] for r in lv["inner_steps"]]
        parts.append(_table("2a. inner steps x inner lr (MultiMNIST FairGrad, forced teleports in one epoch)",
                            ["steps", "lr", "accepted", "s/teleport", "loss drift", "|dθ|/|θ|", "|g| after/before",
                             "L_t final", "L_g gain", "sigma"], rows))
        rows = []
        for ds, r in lv["step_costs"].items():
            for k, v in r.items():
                if isinstance(v, dict):
                    rows.append([ds, r["K"], k, v["unchecked_step_ms"], v["checked_step_ms"], v["ratio"]])
        parts.append(_table("2b. step time with the trigger checked vs not (check_every=2, same run)",
                            ["data", "K", "variant", "plain step ms", "checked step ms", "ratio"], rows))
    if "agreement" in res:
        rows = []
        for ds, r in res["agreement"].items():
            for rule in ("majority", "any"):
                if rule not in r:
                    continue
                for reduce in ("flatten", "mean"):
                    a = r[rule][reduce]
                    rows.append([ds, r.get("K"), r["steps"], rule, reduce, r[rule]["exact_fire_rate"],
                                 a["rep_fire_rate"], a["both_fire"], a["both_silent"], a["exact_only"], a["rep_only"],
                                 a["agreement"], r[f"task_sign_agreement_{reduce}"]])
        parts.append(_table("3. representation trigger vs exact trigger, per step",
                            ["data", "K", "steps", "rule", "reduce", "exact fires", "rep fires", "both fire",
                             "both silent", "exact only", "rep only", "agreement", "task signs agree"], rows))
    return "\n\n".join(parts)
