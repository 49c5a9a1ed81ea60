"""Per-layer rules of the Gramian engine: a shared layer's part of ``G = J J^T`` without its Jacobian.

For a layer whose weight gradient is ``g_i = D_i^T A`` (``A``: the layer's inputs as ``N`` rows of
``d_in``; ``D_i``: task ``i``'s cotangents at its output, ``N x d_out``), the weight's part of the
Gramian is ``G_ij = <D_i, S D_j>`` with ``S = A A^T`` (``N x N``), and the weight's part of
``J^T w`` is ``(sum_i w_i D_i)^T A``. A :class:`LayerRule` gives ``A``, ``D`` and that update for
one layer type (``nn.Linear``; ``nn.Conv1d``/``nn.Conv2d`` through ``unfold``, ``N`` = batch x output
positions; ``nn.Embedding``, where ``S`` is the index-equality matrix). The bias's part is read
from ``D`` alone (``sum_n D_i[n]``).

Cost rule (multiply-adds), per step: the Gram path costs ``N^2 d_in + K N^2 d_out + K^2 N d_out``,
the explicit per-task weight gradients ``K N d_in d_out + K^2 d_in d_out``; the engine takes the
cheaper one, and never the Gram path when ``N`` exceeds ``max_rows`` (``S`` would not fit).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Generic, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

__all__ = ["RULES", "LayerRule", "rule_for"]

M = TypeVar("M", bound=nn.Module)


class LayerRule(ABC, Generic[M]):
    """What the Gramian engine needs from one layer type (``M``)."""

    def unsupported(self, module: M) -> str | None:
        """Why this module cannot take the Gram path (``None``: it can)."""
        return None

    @abstractmethod
    def rows(self, module: M, x: Tensor) -> Tensor:
        """The layer's input as ``A`` (``N x d_in``, float32; ``N`` indices for an embedding)."""

    @abstractmethod
    def cotangents(self, module: M, grad: Tensor) -> Tensor:
        """The ``[K, *output shape]`` output cotangents as ``D`` (``K x N x d_out``, float32)."""

    def input_gram(self, a: Tensor) -> Tensor:
        """``S = A A^T``."""
        return a @ a.T

    @abstractmethod
    def weight_update(self, module: M, a: Tensor, dw: Tensor) -> Tensor:
        """``dw^T A`` (``dw = sum_i w_i D_i``) in the weight's shape."""

    def prepare(self, module: M, a: Tensor, d: Tensor) -> Tensor:
        """``D`` with the rows that give the weight no gradient zeroed (only embeddings have any)."""
        return d

    def n_rows(self, module: M, x: Tensor) -> int:
        return int(self.rows_shape(module, x)[0])

    @abstractmethod
    def rows_shape(self, module: M, x: Tensor) -> tuple[int, int, int]:
        """``(N, d_in, d_out)`` for input ``x``, without forming ``A``."""

    def prefers_gram(self, module: M, x: Tensor, k: int, max_rows: int) -> bool:
        """The cost rule of the module docstring."""
        n, d_in, d_out = self.rows_shape(module, x)
        if n > max_rows:
            return False
        gram = n * n * d_in + k * n * n * d_out + k * k * n * d_out
        explicit = k * n * d_in * d_out + k * k * d_in * d_out
        return gram < explicit


class LinearRule(LayerRule[nn.Linear]):
    def rows_shape(self, module: nn.Linear, x: Tensor) -> tuple[int, int, int]:
        return x.numel() // module.in_features, module.in_features, module.out_features

    def rows(self, module: nn.Linear, x: Tensor) -> Tensor:
        return x.detach().reshape(-1, module.in_features).float()

    def cotangents(self, module: nn.Linear, grad: Tensor) -> Tensor:
        return grad.reshape(grad.shape[0], -1, module.out_features).float()

    def weight_update(self, module: nn.Linear, a: Tensor, dw: Tensor) -> Tensor:
        return dw.T @ a


class ConvRule(LayerRule[_ConvNd]):
    """``nn.Conv1d`` / ``nn.Conv2d`` with ``groups=1`` and zero padding, as an unfolded matrix product."""

    def __init__(self, dims: int) -> None:
        self.dims = dims

    def unsupported(self, module: _ConvNd) -> str | None:
        if module.groups != 1:
            return f"groups={module.groups}"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}"
        if isinstance(module.padding, str) and module.padding == "same":
            if any(d * (k - 1) % 2 for d, k in zip(module.dilation, module.kernel_size, strict=True)):
                return "asymmetric 'same' padding"
        return None

    def _geometry(self, module: _ConvNd) -> tuple[tuple[int, ...], ...]:
        k, s, d = module.kernel_size, module.stride, module.dilation
        if isinstance(module.padding, str):
            p = tuple(0 if module.padding == "valid" else dd * (kk - 1) // 2 for dd, kk in zip(d, k, strict=True))
        else:
            p = module.padding
        if self.dims == 1:  # a 1-D convolution is a 2-D one over a height-1 image
            return (1, k[0]), (1, s[0]), (0, p[0]), (1, d[0])
        return tuple(k), tuple(s), tuple(p), tuple(d)

    def _as_4d(self, module: _ConvNd, x: Tensor) -> Tensor:
        if x.ndim == self.dims + 1:  # unbatched input
            x = x.unsqueeze(0)
        return x.unsqueeze(2) if self.dims == 1 else x

    def rows_shape(self, module: _ConvNd, x: Tensor) -> tuple[int, int, int]:
        x4 = self._as_4d(module, x)
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self._geometry(module)
        ho = (x4.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (x4.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        return x4.shape[0] * ho * wo, module.in_channels * kh * kw, module.out_channels

    def rows(self, module: _ConvNd, x: Tensor) -> Tensor:
        k, s, p, d = self._geometry(module)
        cols = F.unfold(self._as_4d(module, x.detach()).float(), k, dilation=d, padding=p, stride=s)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (B * L, C_in * kh * kw)

    def cotangents(self, module: _ConvNd, grad: Tensor) -> Tensor:
        k = grad.shape[0]
        g = grad.reshape(k, -1, module.out_channels, grad[0].shape[-2:].numel() if self.dims == 2 else grad.shape[-1])
        return g.transpose(2, 3).reshape(k, -1, module.out_channels).float()

    def weight_update(self, module: _ConvNd, a: Tensor, dw: Tensor) -> Tensor:
        return (dw.T @ a).reshape(module.weight.shape)


class EmbeddingRule(LayerRule[nn.Embedding]):
    """``nn.Embedding``: ``S_nm = [idx_n = idx_m]`` (rows at ``padding_idx`` get no gradient)."""

    def unsupported(self, module: nn.Embedding) -> str | None:
        if module.max_norm is not None:
            return "max_norm (renormalises the weight in place)"
        if module.sparse or module.scale_grad_by_freq:
            return "sparse or scale_grad_by_freq"
        return None

    def rows_shape(self, module: nn.Embedding, x: Tensor) -> tuple[int, int, int]:
        return x.numel(), 1, module.embedding_dim

    def prefers_gram(self, module: nn.Embedding, x: Tensor, k: int, max_rows: int) -> bool:
        n, d = x.numel(), module.embedding_dim
        return n <= max_rows and n * n + k * n * n * d + k * k * n * d < k * n * d + k * k * module.num_embeddings * d

    def rows(self, module: nn.Embedding, x: Tensor) -> Tensor:
        return x.detach().reshape(-1)

    def input_gram(self, a: Tensor) -> Tensor:
        return (a[:, None] == a[None, :]).float()

    def cotangents(self, module: nn.Embedding, grad: Tensor) -> Tensor:
        return grad.reshape(grad.shape[0], -1, module.embedding_dim).float()

    def weight_update(self, module: nn.Embedding, a: Tensor, dw: Tensor) -> Tensor:
        out = torch.zeros(module.weight.shape, dtype=dw.dtype, device=dw.device)
        return out.index_add_(0, a, dw)

    def prepare(self, module: nn.Embedding, a: Tensor, d: Tensor) -> Tensor:
        if module.padding_idx is None:
            return d
        return d.masked_fill((a == module.padding_idx)[None, :, None], 0.0)


#: Exact module types with a Gram rule (a subclass may change ``forward``: it takes the explicit path).
RULES: dict[type[nn.Module], LayerRule[Any]] = {
    nn.Linear: LinearRule(),
    nn.Conv1d: ConvRule(1),
    nn.Conv2d: ConvRule(2),
    nn.Embedding: EmbeddingRule(),
}


def rule_for(module: nn.Module) -> LayerRule[Any] | None:
    return RULES.get(type(module))
