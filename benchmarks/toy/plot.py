"""The sweep's figure (:func:`plot_results`): the trajectories in parameter space and in loss space."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmarks.toy.problem import PARETO_X1, PARETO_X2, init_key, toy_losses
from benchmarks.toy.settings import LABELS


def plot_results(runs: Sequence[dict[str, Any]], path: str | Path, extent: float = 10.5) -> None:
    """Row 1: contours of ``(L1 + L2) / 2`` with the trajectories, one panel per method (title: inits that
    reached the Pareto set without | with COST); row 2: the same runs in loss space ``(L1, L2)`` (unscaled).
    Colour = init; solid = without COST, dashed = with COST; small black dots = where accepted teleports
    landed; large black dots = the inits; end markers: square = reached the Pareto set, cross = did not
    (hollow with COST); grey band = the Pareto set (its image in loss space)."""
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: the caller's backend (e.g. Jupyter's) is left alone

    methods = list(dict.fromkeys(r["method"] for r in runs))
    inits = list(dict.fromkeys(tuple(r["init"]) for r in runs))
    colors = matplotlib.colormaps["tab10"]
    n = len(methods)
    fig = Figure(figsize=(3.2 * n, 6.6))
    axes = fig.subplots(2, n, squeeze=False)
    landscape = _landscape(extent)

    for col, method in enumerate(methods):
        ax, bx = axes[0, col], axes[1, col]
        _draw_landscape(ax, bx, landscape)
        for r in runs:
            if r["method"] != method:
                continue
            _draw_run(ax, bx, r, colors(inits.index(tuple(r["init"])) % 10))
        _label_panels(ax, bx, runs, method, extent, first=col == 0)
    _add_legend(fig, inits, colors, n)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)


def _landscape(extent: float) -> tuple[Tensor, Tensor, Any, Any]:
    """The grid ``gx, gy`` over ``[-extent, extent]^2``, ``(L1 + L2) / 2`` on it, and the Pareto set's image
    in loss space (unscaled)."""
    grid = torch.linspace(-extent, extent, 241, dtype=torch.float64)
    gx, gy = torch.meshgrid(grid, grid, indexing="xy")
    lz = toy_losses(torch.stack([gx, gy], dim=-1))
    mean = lz.mean(-1).numpy()
    front_x1 = torch.linspace(PARETO_X1[0], PARETO_X1[1], 200, dtype=torch.float64)
    front = toy_losses(torch.stack([front_x1, torch.full_like(front_x1, PARETO_X2)], dim=-1)).numpy()
    return gx, gy, mean, front


def _draw_landscape(ax: Any, bx: Any, landscape: tuple[Tensor, Tensor, Any, Any]) -> None:
    """The contours and the Pareto set (``ax``, parameter space) and the Pareto set's image (``bx``)."""
    gx, gy, mean, front = landscape
    ax.contour(gx.numpy(), gy.numpy(), mean, levels=20, cmap="viridis", linewidths=0.6, alpha=0.7)
    ax.plot(PARETO_X1, [PARETO_X2, PARETO_X2], color="grey", linewidth=5, alpha=0.5, zorder=1)
    bx.plot(front[:, 0], front[:, 1], color="grey", linewidth=5, alpha=0.5, zorder=1)


def _draw_run(ax: Any, bx: Any, r: dict[str, Any], c: Any) -> None:
    """One run in colour ``c``: its path in parameter (``ax``) and loss space (``bx``), its init, its end
    marker and where its accepted teleports landed."""
    import numpy as np

    ls = "--" if r["cost"] else "-"
    xs = np.asarray(r["trajectory"]["x"])
    lo = np.asarray(r["trajectory"]["losses"])
    ax.plot(xs[:, 0], xs[:, 1], ls, color=c, linewidth=1.3 if r["cost"] else 1.8, zorder=3)
    bx.plot(lo[:, 0], lo[:, 1], ls, color=c, linewidth=1.3 if r["cost"] else 1.8, zorder=3)
    ax.plot(*r["init"], "o", color="k", markersize=4, zorder=5)
    end = "s" if r["reached_pareto"] else "X"
    ax.plot(xs[-1, 0], xs[-1, 1], end, color=c, markersize=5, markerfacecolor="none" if r["cost"] else c,
            zorder=6)
    jumps = [ev["x_after"] for ev in r.get("teleport_events", [])
             if ev.get("accepted") and "x_after" in ev]
    if jumps:  # the jumps themselves are tiny on this problem: mark where they land
        ax.plot(*np.asarray(jumps).T, ".", color="k", markersize=2, alpha=0.5, zorder=4)


def _label_panels(ax: Any, bx: Any, runs: Sequence[dict[str, Any]], method: str, extent: float,
                  first: bool) -> None:
    """Limits, titles (inits that reached the Pareto set without | with COST) and axis labels of a method's
    two panels; the y labels on the ``first`` column only."""
    reached = {f: sum(r["reached_pareto"] for r in runs if r["method"] == method and r["cost"] == f)
               for f in (False, True)}
    n_inits = sum(1 for r in runs if r["method"] == method and not r["cost"])
    ax.set_xlim(-extent, extent)
    ax.set_ylim(-extent, extent)
    ax.set_aspect("equal")
    ax.set_title(f"{LABELS.get(method, method)}: {reached[False]}/{n_inits} | +COST {reached[True]}/{n_inits}",
                 fontsize=10)
    ax.set_xlabel("x1")
    bx.set_xlabel("L1")
    bx.set_title("loss space")
    if first:
        ax.set_ylabel("x2")
        bx.set_ylabel("L2")


def _add_legend(fig: Any, inits: Sequence[tuple[float, ...]], colors: Any, n: int) -> None:
    """The figure's legend (inits, with / without COST, teleports, Pareto set) below the ``n`` columns."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colors(i % 10), label=f"init {init_key(v)}") for i, v in enumerate(inits)]
    handles += [Line2D([], [], color="k", linestyle="-", label="without COST"),
                Line2D([], [], color="k", linestyle="--", label="with COST"),
                Line2D([], [], color="k", linestyle="", marker=".", markersize=3, label="accepted teleport"),
                Line2D([], [], color="grey", linewidth=5, alpha=0.5, label="Pareto set")]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), max(3, int(3.2 * n / 1.6))), fontsize=8,
               frameon=False)
