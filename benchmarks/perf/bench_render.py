"""The perf benchmark's text report (``perf.txt``): one table per section of ``perf.json``."""

from __future__ import annotations

import json
from typing import Any

from benchmarks.common import text_table
from benchmarks.perf.bench_gradients import TARGET_PERTASK
from benchmarks.perf.bench_solve import TARGET_SOLVE_PCT


def _passed(v: Any) -> Any:
    return ("PASS" if v else "MISS") if isinstance(v, bool) else v


def table(title: str, header: list[str], rows: list[list[Any]]) -> str:
    return "\n" + text_table(f"== {title}", header, [[_passed(c) for c in r] for r in rows])


def _header(res: dict[str, Any]) -> list[str]:
    return [f"lightning_cost perf benchmark ({'quick' if res['meta']['quick'] else 'full'}); "
            f"torch {res['meta']['torch']}, {res['meta']['threads']} thread(s) on a shared 2-core CPU under load; "
            "ratios are the headline, absolute times are indicative only.",
            f"memory = {res['meta']['memory_metric']}"]


def _methods_tables(res: dict[str, Any]) -> list[str]:
    parts = []
    for key, blk in res["methods"].items():
        rows = [[m, r["step_ms"], r["time_ratio_vs_ls"], r["peak_rss_delta_mb"], r["mem_ratio_vs_ls"], r["skipped_steps"]]
                for m, r in blk["methods"].items()]
        parts.append(table(f"1. Step time through a Lightning Trainer, {key} (median of {blk['steps']} steps after "
                           f"{blk['warmup']} warm-up; LS runs start/mid/end "
                           f"{'/'.join(f'{t:.0f}' for t in blk['methods']['ls']['ls_runs_ms'])} ms)",
                           ["method", "step ms", "x LS", "peak RSS MB", "mem x LS", "skipped"], rows))
    return parts


def _pertask_tables(res: dict[str, Any]) -> list[str]:
    rows = [[r["setup"], r["P"], r["forward_ms"], r["sum_backward_ms"], r["k_plain_ms"], r["k_retain_ms"], r["mixin_ms"],
             r["ratio_mixin_vs_k_plain"], r["ratio_mixin_vs_k_retain"], r["ratio_mixin_vs_sum_backward"], r["pass"],
             "" if r["pass"] else f"+{100 * (r['ratio_mixin_vs_k_plain'] / TARGET_PERTASK - 1):.0f}% over"]
            for r in res["pertask"]]
    pertask = table(f"2. Exact per-task gradients (ms, median); target mixin <= {TARGET_PERTASK} x K plain backwards "
                    "(each re-running the forward)",
                    ["setup", "P", "fwd", "sum bwd", "K plain", "K retain", "mixin", "/K plain", "/K retain",
                     "/sum bwd", "target", "miss by"], rows)
    rows = [[r["setup"], r.get("mixin_loop_ms"), r.get("mixin_batched_ms"), r.get("ratio_batched_vs_loop"),
             r.get("mixin_loop_peak_mb"), r.get("mixin_batched_peak_mb"), r.get("torchjd_ms", r.get("torchjd_error")),
             r.get("ratio_mixin_vs_torchjd"),
             f"{r['torchjd_max_abs_diff']:.1e}" if "torchjd_max_abs_diff" in r else ""] for r in res["pertask"]]
    modes = table("2b. jacobian_mode: K VJPs ('loop') vs one VJP with K cotangents ('batched', the default "
                  "'auto'); mixin step ms and peak RSS MB of one step; TorchJD's engine on the same step "
                  "(mtl_backward + jac_to_grad(Sum); max |diff| of the shared update vs ours)",
                  ["setup", "loop ms", "batched ms", "batched/loop", "loop MB", "batched MB", "torchjd ms",
                   "mixin/tjd", "max diff"], rows)
    return [pertask, modes]


def _solve_table(res: dict[str, Any]) -> str:
    rows = []
    for r in res["solve"]:
        if "error" in r:
            rows.append([r["setup"], r["K"], r["method"], "ERROR", "", "", "", r["error"][:60]])
            continue
        miss = "" if r["pass"] in (True, None) else f"{r['pct_of_step'] / TARGET_SOLVE_PCT:.1f}x over"
        rows.append([r["setup"], r["K"], r["method"], r["solve_ms"], r["step_ms"], r["pct_of_step"], r["pass"], miss])
    return table(f"3. Solve time alone on the model's J (loss weightings: loss_weights only); % of the step "
                 f"(forward + K VJPs; K=40 step extrapolated linearly in K); target <= {TARGET_SOLVE_PCT}% for K<=10",
                 ["setup", "K", "method", "solve ms", "step ms", "% step", "target", "miss by"], rows)


def _teleport_table(res: dict[str, Any]) -> str:
    t = res["teleport"]
    return table("4. Teleport cost (MultiMNIST LeNet, forced, default callback settings)",
                 ["teleports", "accepted", "mean ms", "step ms (w/ J)", "x step", "x LS step"],
                 [[t["teleports"], t["accepted"], t["teleport_ms_mean"], t["step_ms_with_jacobian"],
                   t["ratio_teleport_vs_step"], t["ratio_teleport_vs_ls_step"]]])


def _e(v: Any) -> str:
    return f"{v:.1e}" if isinstance(v, float) else ""


def _trigger_table(res: dict[str, Any]) -> str:
    rows = [[r["K"], r["P"], r["conflict_cosines_ms"], r["float32_variant_ms"], r["ratio_vs_float32_variant"],
             _e(r.get("cos_abs_err")), _e(r.get("cos_plain_abs_err")), r.get("pct_of_step"), r.get("gramian_ms"),
             r.get("gramian_plain_ms"), r.get("ratio_gramian_blocked_vs_plain"), _e(r.get("gramian_rel_err")),
             _e(r.get("gramian_plain_rel_err"))] for r in res["trigger"]]
    return table("5. Trigger cosines and Gramian J J^T on a synthetic J at the model's P: ours (sums blocked by "
                 "65536 columns) vs one BLAS call over P; ms and max error vs float64 (abs for cos, relative "
                 "for G)",
                 ["K", "P", "cos ms", "plain ms", "x plain", "cos err", "plain err", "% step", "G ms",
                  "G plain ms", "x plain", "G rel err", "plain rel err"], rows)


def _peers_table(res: dict[str, Any]) -> str:
    rows = [[r["setup"], r["method"], r.get("ours_ms"), r.get("torchjd_ms"), r.get("ratio_ours_vs_torchjd"),
             r.get("cos_ours_torchjd"), r.get("libmtl_ms") if "libmtl_ms" in r else r.get("libmtl_error", "")[:40],
             r.get("ratio_ours_vs_libmtl"), r.get("cos_ours_libmtl")] for r in res["peers"]]
    return table("6. Peers on the same J (ms; ratio < 1: ours faster; cos = agreement of the directions)",
                 ["setup", "method", "ours", "torchjd", "ours/tjd", "cos tjd", "libmtl", "ours/lib", "cos lib"],
                 rows)


def render(res: dict[str, Any]) -> str:
    parts = [*_header(res), *_methods_tables(res), *_pertask_tables(res), _solve_table(res), _teleport_table(res),
             _trigger_table(res), _peers_table(res), f"\npeers: {json.dumps(res['meta']['peers'])}"]
    return "\n".join(parts)
