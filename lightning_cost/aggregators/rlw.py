"""Random loss weighting (RLW), Lin et al. 2021.

B. Lin, F. Ye, Y. Zhang, I. W. Tsang, "Reasonable Effectiveness of Random
Weighting: A Litmus Test for Multi-Task Learning", TMLR 2022 (arXiv:2111.10603;
ref. [15] of the COST paper). The RLW objective (Sec. 3 there): at every
training step the weights are ``lambda = softmax(lambda_tilde)`` with
``lambda_tilde ~ p(lambda_tilde)``, and the objective is ``sum_k lambda_k L_k``.
The paper studies several distributions ``p``; the standard normal ``N(0, I)``
is its default and the one used here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_cost.aggregators.base import LossWeighting, check_losses

__all__ = ["RLW"]


class RLW(LossWeighting):
    r"""Random loss weighting: ``objective = sum_k lambda_k L_k``, ``lambda = softmax(z)``, ``z ~ N(0, I_K)``.

    **Scale.** As in the paper, the weights are a softmax and sum to 1
    (``E[lambda_k] = 1/K``); the paper does not multiply by ``K``. Compared to
    :class:`~lightning_cost.aggregators.ls.LinearScalarization` (weights 1, sum
    ``K``) the update is therefore ``K`` times smaller on average, which with
    Adam (scale-invariant up to ``eps``) hardly matters but with SGD acts like a
    ``K``-times smaller learning rate. ``rescale=True`` multiplies the weights by
    ``K`` (sum ``K``, ``E[lambda_k] = 1``) to match LS's scale.

    **When the weights change.** One draw per optimizer step: the current draw
    is kept in the ``weights`` buffer (so :meth:`forward` and
    :meth:`loss_weights` are deterministic between steps, and all micro-batches of
    an accumulated step share it) and :meth:`observe`, which the training core
    calls once per optimizer step, draws the next one. Outside Lightning, call
    :meth:`observe` (or :meth:`resample`) after each step yourself.

    **Reproducibility / DDP.** Draws come from a private CPU
    :class:`torch.Generator` seeded with ``seed``, so every DDP rank draws the same
    weights without any communication, and the global RNG is not consumed. With
    ``seed=None`` the seed is :func:`torch.initial_seed` at construction, which is
    equal on all ranks when the run was seeded (``lightning.seed_everything``)
    before the module was built. The generator state is saved in the module's
    ``state_dict`` (``get_extra_state``) so a resumed run continues the sequence.

    Args:
        num_tasks: ``K``; when ``None`` it is taken from the first losses seen.
        seed: seed of the private generator (see above).
        rescale: multiply the softmax weights by ``K`` (not in the paper).
    """

    weights: Tensor
    num_draws: Tensor

    def __init__(self, num_tasks: int | None = None, seed: int | None = None, rescale: bool = False) -> None:
        super().__init__()
        if num_tasks is not None and (not isinstance(num_tasks, int) or num_tasks < 2):
            raise ValueError(f"num_tasks must be an int >= 2, got {num_tasks!r}")
        self.seed = int(torch.initial_seed() if seed is None else seed)
        self.rescale = bool(rescale)
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(self.seed)
        self.register_buffer("weights", torch.empty(0))
        self.register_buffer("num_draws", torch.zeros((), dtype=torch.long))
        if num_tasks is not None:
            self.resample(num_tasks)

    def _draw(self, k: int) -> Tensor:
        z = torch.randn(k, generator=self._generator, dtype=torch.float64)
        w = torch.softmax(z, dim=0)
        if self.rescale:
            w = w * k
        return w.to(torch.float32)

    def resample(self, num_tasks: int | None = None) -> Tensor:
        """Draw new weights (for ``num_tasks`` tasks, default: the current ``K``) and return them."""
        current = self.weights
        k = current.numel() if num_tasks is None else int(num_tasks)
        if k < 2:
            raise ValueError(
                "RLW does not know the number of tasks yet: pass num_tasks or call forward first"
            )
        # A new tensor, not an in-place copy: the previous draw may be saved in an autograd
        # graph that is still to be back-propagated (forward, then observe, then backward).
        new = self._draw(k)  # drawn on the CPU generator
        self.weights = new if current.device.type == "cpu" else new.to(current.device)
        self.num_draws.add_(1)  # in place: no re-registration of the buffer
        return self.weights

    def _ensure(self, k: int) -> None:
        n = self.weights.numel()
        if n == 0:
            self.resample(k)
        elif n != k:
            raise ValueError(f"RLW was set up for {n} tasks but got {k} losses")

    def task_weights(self, losses: Tensor) -> Tensor:
        """The current random weights (drawing the first ones if needed)."""
        check_losses(losses)
        self._ensure(losses.shape[0])
        return self.weights.to(device=losses.device, dtype=losses.dtype)

    def forward(self, losses: Tensor) -> Tensor:
        return (self.task_weights(losses) * losses).sum()

    def loss_weights(self, losses: Tensor) -> Tensor:
        """``d/dL_k sum_j lambda_j L_j = lambda_k``: the current draw, as a new tensor."""
        check_losses(losses)
        self._ensure(losses.shape[0])
        return self.weights.to(device=losses.device, dtype=losses.dtype, copy=True)

    def observe(self, losses: Tensor) -> None:
        """Draw the weights for the next optimizer step."""
        check_losses(losses)
        self._ensure(losses.shape[0])
        self.resample()

    # -- checkpointing of the generator ------------------------------------------------
    def get_extra_state(self) -> dict:
        return {"seed": self.seed, "generator_state": self._generator.get_state()}

    def set_extra_state(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self._generator.set_state(state["generator_state"].cpu())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        key = prefix + "weights"
        if key in state_dict:  # K may be unknown (lazy) in the receiving instance
            self.weights = torch.empty_like(state_dict[key], device=self.weights.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"seed={self.seed}, rescale={self.rescale}"
