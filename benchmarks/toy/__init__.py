"""The 2-task, 2-parameter toy problem (CAGrad / Nash-MTL / FAMO; the COST paper's Fig. 6) in Lightning.

Entry point: ``python -m benchmarks.toy`` (:func:`.cli.main`; see *Run* below). One module per job:

* :mod:`.problem` -- the two losses, the Pareto set and the distance to it, the five inits;
* :mod:`.settings` -- the methods and their hyper-parameters, the optimiser (steps, lr, betas), COST's settings;
* :mod:`.model` -- :class:`ToyMTL`, the toy as a multi-task LightningModule, and its dummy dataloader;
* :mod:`.train` -- one training run (:func:`run_one`) and :class:`TrajectoryRecorder`, the callback recording it;
* :mod:`.sweep` -- every method x flag x init (:func:`run_sweep`), in this process or a process pool, summarised;
* :mod:`.table` -- the plain-text results table (:func:`results_table`);
* :mod:`.plot` -- the figure (:func:`plot_results`): the trajectories in parameter and loss space;
* :mod:`.cli` -- ``python -m benchmarks.toy`` (:func:`main`; ``__main__`` runs it).

Every public name of these modules is re-exported here (``from benchmarks.toy import run_sweep``).

The problem (the same as ``toy.py`` of the CAGrad code)::

    x = (x1, x2);  LOWER = 5e-6
    f1 = log(max(|0.5*(-x1-7) - tanh(-x2)|, LOWER)) + 6
    f2 = log(max(|0.5*(-x1+3) + tanh(-x2) + 2|, LOWER)) + 6
    c1 = max(tanh(0.5*x2), 0);   c2 = max(tanh(-0.5*x2), 0)
    f1_sq = ((-x1+7)^2 + 0.1*(-x2-8)^2)/10 - 20
    f2_sq = ((-x1-7)^2 + 0.1*(-x2-8)^2)/10 - 20
    L1 = l1_scale * (f1*c1 + f1_sq*c2);    L2 = f2*c1 + f2_sq*c2

The ``max(., floor)`` have derivative 1 at ``t == floor`` (``torch.where(t >= floor, ...)``), the
subgradient ``torch.clamp`` had in the papers' PyTorch (``where(self >= min, grad, 0)``). torch 2.14's
``clamp`` gives 0 there, which would make the init ``(0, 0)`` (``c1 = c2 = 0``) an exact stationary
point of both losses: every method would stay there. The values are unchanged.

``x`` is a raw ``nn.Parameter`` of shape ``[2]``: the *shared* parameters, no heads. :class:`ToyMTL`
trains it through the same Lightning path as any model (a ``Trainer``, a dataloader yielding one dummy
batch per step, Adam), :class:`~lightning_cost.MultiTaskMixin` doing the aggregation and, in the "COST"
runs, :class:`~lightning_cost.SymmetryTeleportCallback` teleporting ``x`` (a raw parameter gets the
callback's dense-delta adapter automatically).

**Which methods use ``l1_scale = 0.1``.** The CAGrad paper ran LS, MGDA, PCGrad and CAGrad on the
unscaled problem; the Nash-MTL and FAMO papers multiplied ``L1`` by 0.1 (``--scale 1e-1`` in their toy
code). The runner follows that by default (``--l1-scale paper``): ``nashmtl`` and ``famo`` train with
``l1_scale = 0.1`` (:data:`PAPER_L1_SCALE`) and, as their toy code (``max_norm=1.0``), with the gradient
clipped to norm 1 (:data:`PAPER_CLIP`, the trainer's ``gradient_clip_val``); LS, MGDA, PCGrad, CAGrad and
FairGrad train with ``1`` and no clipping. ``--l1-scale 1`` or ``--l1-scale 0.1`` puts every method on
the same problem, without clipping. A positive factor does not change the Pareto set, so "reached the
Pareto set" compares across methods; the losses written to the summary and drawn in loss space are
always the *unscaled* ``(L1, L2)``.

**Pareto set.** ``x1 in [-7, 7], x2 = -8.3552`` (the segment the CAGrad / Nash-MTL plots draw);
:func:`pareto_distance` is the Euclidean distance to it. The exact Pareto set (the minimisers of
``w L1 + (1 - w) L2``, ``w in [0, 1]``) bends slightly: ``x2 = -8.3551`` at ``x1 = 0``, ``-8.4345`` at
``x1 = +-7``, i.e. within 0.08 of the segment. A run has *reached* the Pareto set at the first optimizer
step after which its distance is at most :data:`PARETO_TOL` = 0.1 (checked after every step): this
counts every exactly Pareto-optimal point, plus Adam's jitter, and nothing visibly off the front.

**Optimiser and step budget.** The papers ran Adam at lr ``1e-3`` with the default betas for 35k-100k
steps. Through Lightning that is far too slow for a 70-run sweep on 2 CPU cores (a step costs a few ms,
10-20 ms with Nash-MTL's solver, more with teleports), so the default is :data:`DEFAULT_STEPS` = 2000
steps at lr :data:`DEFAULT_LR` = ``1e-2`` with *time-rescaled* betas (:func:`rescaled_betas`): one step
stands for ``s = lr / 1e-3 = 10`` of the papers' steps, so the moment averages must forget 10 times
faster, ``1 - beta = s (1 - beta_paper)``: betas ``(0.0, 0.99)``. 2000 steps are thus ~20k of the papers'
steps (``--steps 3500`` gives their 35k). This keeps the papers' dynamics: LS (checked without Lightning
at 3500 vs 35k steps) ends where the papers' setting ends, stuck in the valleys of the log terms from
``(-8.5, 7.5)`` and ``(9, 9)`` and on the front from the other three inits, which it first reaches
after 1364 / 1486 / 1617 steps vs 13641 / 14866 / 16154. A larger lr alone does *not* (lr ``1e-2`` or
``2e-2`` with betas ``(0.9, 0.999)``: Adam's second moment remembers the huge gradients near the log
valleys for ~1000 steps and nothing converges in 2-3.5k steps), nor does ``s = 20`` (lr ``2e-2``, betas
``(0, 0.98)``: the stuck runs jump out of the valleys). ``--lr 1e-3 --steps 35000`` is the papers'
exact setting; ``--betas`` overrides the betas. Measured (2 cores, ``--jobs 2``): the default 70-run
sweep takes 805 s on an otherwise idle machine (1266 s while other jobs used about half of it);
Nash-MTL's runs are 46% of that and FairGrad's 24%, mostly solver retries on steps that fail (below).
Fewer steps do not pay: below ~1650 steps not even LS reaches the front from its three good inits.

**Failed aggregations.** The library's Nash-MTL and FairGrad raise :class:`AggregationError` instead of
falling back (the official code keeps the previous or an inexact solution), and the training core then
skips the step. On this toy that happens on most steps near the front (``g_1`` nearly ``-g_2``: the
systems become singular) and in the valleys (gradient norms 1e3-1e4 apart): the runs report thousands
of ``skipped_steps``. As the problem is deterministic, a skipped step leaves ``x`` and hence the next
Jacobian unchanged, so a run that fails once stays frozen (Nash-MTL from ``(9, 9)``: 1650 of 2000 steps
skipped); the teleport trigger does not check skipped steps, so COST cannot help there either.

**Method settings on the toy** (from the papers' toy code, not tuned here): CAGrad ``c = 0.5`` and the
update divided by ``1 + c`` (CAGrad ``toy.py``, ``rescale=2``); PCGrad seeded; FAMO ``gamma = 0`` (FAMO
``experiments/toy/run.sh``: "the objective is not changing"), Adam on the logits as in the authors'
code, ``min_losses = (-21 * l1_scale, -21)`` (FAMO ``toy/trainer.py``; both losses are >= -20);
MGDA, Nash-MTL and FairGrad (``alpha = 2``) with the library's defaults.

**COST settings on the toy** (:data:`TOY_COST`, chosen on this toy only). The library's defaults are
kept where they make sense for 2 parameters: ``gamma = 0.05``, ``inner_steps = 10``, inner lr = the
outer lr (the authors' rule), 5 perturbations, the paper's trigger (eq. 4; for ``K = 2``: one task
with ``cos(g_i, g_0) < 0``), HTR, and the acceptance test (every task loss within 5% of its value
before the teleport, + 1e-4). Changed for the toy: the perturbation radius ``delta = 0.1`` (not
``1e-2``: a coordinate here is O(1), the ``tanh`` features vary over ~1 unit); a warm-up (no teleport
in the first 10% of the steps); and the spacing: one long epoch (schedule ``max_per_epoch=None``) and
at least 20 optimizer steps between two teleports (``min_steps_between=20``, ~200 of the papers'
steps); the trigger still decides. What was tried (LS, on this toy): inner lr 0.05 with 20 inner steps
is mostly rejected (a step of the inner Adam leaves the narrow valleys); spacings of 10, 25 and 50 steps
all speed up the escape from the valleys, and which stuck init gets out within the budget changes with
the spacing (20 halves the cost of 10). Why so: with 2 parameters and 2 losses held fixed, the
loss-preserving set is (generically) a point, so a teleport can only move ``x`` inside the tolerance
band (in the valleys by ~1e-3 to 1e-2). COST acts here mostly through HTR: when the displacement has a
non-positive cosine with the pre-teleport gradient (``sigma <= 0``) Adam's moments restart from the next
gradient, which un-sticks the slow drift along a valley; with ``transfer="keep"`` the same teleports
changed nothing (LS from the two stuck inits).

Run::

    python -m benchmarks.toy --out runs/toy [--steps 2000] [--methods ls cagrad] [--inits 0 2] [--jobs 2]

It writes ``DIR/toy_summary.json`` (schema in :func:`run_sweep`), ``DIR/toy_trajectories.json`` (every
recorded point; ``--replot`` redraws from it) and ``DIR/toy.png``, and prints a results table.
"""

from benchmarks.toy.cli import main
from benchmarks.toy.model import ToyMTL, dummy_loader
from benchmarks.toy.plot import plot_results
from benchmarks.toy.problem import (
    INITS,
    LOWER,
    PARETO_TOL,
    PARETO_X1,
    PARETO_X2,
    init_key,
    on_pareto_set,
    pareto_distance,
    toy_losses,
)
from benchmarks.toy.settings import (
    DEFAULT_LR,
    DEFAULT_STEPS,
    LABELS,
    METHODS,
    PAPER_BETAS,
    PAPER_CLIP,
    PAPER_L1_SCALE,
    PAPER_LR,
    TOY_COST,
    TOY_WARMUP_FRACTION,
    cost_settings,
    method_hparams,
    rescaled_betas,
)
from benchmarks.toy.sweep import run_sweep
from benchmarks.toy.table import results_table
from benchmarks.toy.train import TrajectoryRecorder, run_one

__all__ = [
    "DEFAULT_LR",
    "DEFAULT_STEPS",
    "INITS",
    "LABELS",
    "LOWER",
    "METHODS",
    "PAPER_BETAS",
    "PAPER_CLIP",
    "PAPER_L1_SCALE",
    "PAPER_LR",
    "PARETO_TOL",
    "PARETO_X1",
    "PARETO_X2",
    "TOY_COST",
    "TOY_WARMUP_FRACTION",
    "ToyMTL",
    "TrajectoryRecorder",
    "cost_settings",
    "dummy_loader",
    "init_key",
    "main",
    "method_hparams",
    "on_pareto_set",
    "pareto_distance",
    "plot_results",
    "rescaled_betas",
    "results_table",
    "run_one",
    "run_sweep",
    "toy_losses",
]
