"""The paper's models (COST paper Sec. 5.1), as :class:`~benchmarks.models.MultiTaskNet`\\ s.

* :func:`segnet_mtan` -- CityScapes / NYUv2: "we construct our model using SegNet [2] and employ MTAN
  [19] as the backbone within it" (the FairGrad / Nash-MTL setup). A SegNet encoder-decoder (13 + 13
  3x3 conv-BN-ReLU layers in 5 levels, max-pooling with indices and max-unpooling) shared by the
  tasks, plus MTAN's per-task soft-attention branches, which read the shared features at every
  level through 1x1-conv sigmoid masks and share one 3x3 conv per level between tasks. The trunk
  returns ``{task: attended full-resolution features}``; each head is MTAN's prediction layer
  (3x3 conv then 1x1 conv to the task's channels). As in the FairGrad/Nash-MTL code, everything but
  the prediction layers is *shared* (the attention branches included): the aggregators and the
  teleport act on the trunk. ``attention=False`` gives the plain SegNet "split" model (one shared
  feature map for all heads). ``filters`` sets the widths of the 5 levels (paper: 64, 128, 256,
  512, 512); tests use tiny ones. Inputs must have H and W divisible by 32.
* :func:`celeba_cnn` -- CelebA: "a 9-layer convolutional neural network (CNN) as the backbone and
  linear layers as the task-specific heads" (FairGrad/FAMO's network): 7 conv-BN-ReLU layers (64,
  128, 128, 256, 256, 512, 512 channels, max-pooling after the 1st, 3rd and 5th), global average
  pooling, 2 linear-BN-ReLU layers of 512, then one ``Linear(512, 1)`` per attribute. ``width``
  scales every layer (64 = the paper's).
* :func:`qm9_mpnn` -- QM9: the message-passing network of the Nash-MTL/FAMO/FairGrad QM9 code (after
  Gilmer et al. 2017 and the PyTorch Geometric example): ``Linear(11 -> dim)``, 3 rounds of an
  edge-conditioned ``NNConv`` (edge network ``Linear(5 -> 128) -> ReLU -> Linear(128 -> dim*dim)``,
  mean aggregation) followed by a ``GRU``, ``Set2Set`` pooling (3 steps), ``Linear(2 dim -> dim)``
  + ReLU; the heads are one ``Linear(dim, 1)`` per target (together, the reference code's final
  ``Linear(dim, 11)``). ``torch_geometric`` is imported when the model is built.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.data.tasks import TaskSpec
from benchmarks.models.networks import MultiTaskNet, make_heads
from benchmarks.paper.tasks import DENSE_METRICS

__all__ = ["SegNetTrunk", "DenseHead", "segnet_mtan", "celeba_cnn", "qm9_mpnn", "QM9Trunk"]

PAPER_FILTERS = (64, 128, 256, 512, 512)


# --------------------------------------------------------------------------- SegNet / MTAN


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _attention(cin: int, cout: int) -> nn.Sequential:
    """MTAN's attention mask: 1x1 conv-BN-ReLU, 1x1 conv-BN, sigmoid."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 1), nn.BatchNorm2d(cout), nn.Sigmoid(),
    )


class SegNetTrunk(nn.Module):
    """Shared SegNet encoder-decoder with optional MTAN task-attention branches.

    Level ``i`` (0..4) of the encoder: ``conv(c_in -> f_i)``, then 1 (levels 0, 1) or 2 (levels
    2-4) ``conv(f_i -> f_i)``, then 2x2 max-pooling (indices kept). The decoder mirrors it: unpool
    with the indices, ``conv(f_i -> f_{i-1})`` (``f_0`` at level 0), then 1 or 2 convs at that width.

    Attention (MTAN), per task: at encoder level ``i`` a mask computed from the level's first conv
    output (concatenated with the branch's previous output) multiplies the level's last conv output;
    a shared conv ``f_i -> f_{i+1}`` and 2x2 pooling carry it on. In the decoder the branch is
    upsampled (bilinear), passed through a shared conv to the decoder level's width, concatenated with
    the unpooled shared features to compute the mask, and the mask multiplies the level's output.

    ``forward(x)`` returns ``{task: [B, f_0, H, W]}`` (the same tensor for every task without attention).
    """

    def __init__(
        self,
        tasks: Sequence[str],
        filters: Sequence[int] = PAPER_FILTERS,
        attention: bool = True,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        f = [int(c) for c in filters]
        if len(f) != 5 or min(f) < 1:
            raise ValueError(f"filters must be 5 positive widths (paper: {PAPER_FILTERS}), got {tuple(filters)}")
        if not tasks:
            raise ValueError("at least one task is needed")
        self.tasks = list(tasks)
        self.filters = tuple(f)
        self.attention = bool(attention)
        n_extra = [1, 1, 2, 2, 2]
        dec_out = [f[0]] + f[:4]  # width of decoder level i's output: f_{i-1}, f_0 at level 0

        self.enc_first = nn.ModuleList()
        self.enc_rest = nn.ModuleList()
        self.dec_first = nn.ModuleList()
        self.dec_rest = nn.ModuleList()
        for i in range(5):
            self.enc_first.append(_conv_bn_relu(in_channels if i == 0 else f[i - 1], f[i]))
            self.enc_rest.append(nn.Sequential(*[_conv_bn_relu(f[i], f[i]) for _ in range(n_extra[i])]))
            self.dec_first.append(_conv_bn_relu(f[i], dec_out[i]))
            self.dec_rest.append(nn.Sequential(*[_conv_bn_relu(dec_out[i], dec_out[i]) for _ in range(n_extra[i])]))
        self.pool = nn.MaxPool2d(2, 2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2, 2)

        if self.attention:
            enc_att_out = [f[min(i + 1, 4)] for i in range(5)]
            # shared between tasks (as in MTAN): one conv per level on each branch
            self.enc_att_conv = nn.ModuleList([_conv_bn_relu(f[i], enc_att_out[i]) for i in range(5)])
            dec_att_in = [dec_out[i + 1] if i < 4 else enc_att_out[4] for i in range(5)]
            self.dec_att_conv = nn.ModuleList([_conv_bn_relu(dec_att_in[i], dec_out[i]) for i in range(5)])
            # task-specific masks
            self.enc_att = nn.ModuleDict()
            self.dec_att = nn.ModuleDict()
            for t in self.tasks:
                self.enc_att[t] = nn.ModuleList(
                    [_attention(f[i] if i == 0 else f[i] + enc_att_out[i - 1], f[i]) for i in range(5)]
                )
                self.dec_att[t] = nn.ModuleList([_attention(f[i] + dec_out[i], dec_out[i]) for i in range(5)])
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-normal conv weights, zero biases, unit BN scale (the MTAN initialisation)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if x.dim() != 4:
            raise ValueError(f"expected images [B, C, H, W], got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % 32 or w % 32:
            raise ValueError(f"SegNet needs H and W divisible by 32 (5 poolings), got {h}x{w}")
        enc_first, enc_last, indices = [], [], []
        z = x
        for i in range(5):
            a = self.enc_first[i](z)
            b = self.enc_rest[i](a)
            z, idx = self.pool(b)
            enc_first.append(a)
            enc_last.append(b)
            indices.append(idx)
        unpooled, dec_last = [None] * 5, [None] * 5
        for i in reversed(range(5)):
            u = self.unpool(z, indices[i])
            z = self.dec_rest[i](self.dec_first[i](u))
            unpooled[i], dec_last[i] = u, z
        if not self.attention:
            return {t: z for t in self.tasks}
        out = {}
        for t in self.tasks:
            enc_att, dec_att = self.enc_att[t], self.dec_att[t]
            branch = None
            for i in range(5):
                inp = enc_first[i] if branch is None else torch.cat([enc_first[i], branch], 1)
                branch = F.max_pool2d(self.enc_att_conv[i](enc_att[i](inp) * enc_last[i]), 2, 2)
            for i in reversed(range(5)):
                up = F.interpolate(branch, scale_factor=2, mode="bilinear", align_corners=True)
                up = self.dec_att_conv[i](up)
                branch = dec_att[i](torch.cat([unpooled[i], up], 1)) * dec_last[i]
            out[t] = branch
        return out


class DenseHead(nn.Module):
    """MTAN's prediction layer on the task's feature map: 3x3 conv, 1x1 conv to ``out_channels``.

    Picks ``z[task]`` when the trunk returns a dict. ``normalize=True`` (surface normals) returns
    unit vectors along the channel dimension.
    """

    def __init__(self, task: str, in_channels: int, out_channels: int, normalize: bool = False) -> None:
        super().__init__()
        self.task = task
        self.normalize = normalize
        self.conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.out = nn.Conv2d(in_channels, out_channels, 1)
        for m in (self.conv, self.out):
            nn.init.xavier_normal_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, z: Tensor | dict[str, Tensor]) -> Tensor:
        if isinstance(z, dict):
            z = z[self.task]
        y = self.out(self.conv(z))
        return F.normalize(y, dim=1, eps=1e-12) if self.normalize else y


def _dense_out_channels(spec: TaskSpec) -> tuple[int, bool]:
    kind = DENSE_METRICS.get(spec.metric)
    if kind == "segmentation":
        return int(spec.num_classes), False
    if kind == "depth":
        return 1, False
    if kind == "normal":
        return 3, True
    raise ValueError(
        f"task {spec.name!r} (metric {spec.metric!r}) is not a dense task; "
        f"expected one of the metrics {sorted(DENSE_METRICS)}"
    )


def segnet_mtan(
    task_specs: Sequence[TaskSpec],
    filters: Sequence[int] = PAPER_FILTERS,
    attention: bool = True,
    in_channels: int = 3,
) -> MultiTaskNet:
    """SegNet-MTAN for dense prediction (module docstring): trunk shared, one prediction head per task."""
    trunk = SegNetTrunk([s.name for s in task_specs], filters, attention, in_channels)
    heads = nn.ModuleDict()
    for s in task_specs:
        out, norm = _dense_out_channels(s)
        heads[s.name] = DenseHead(s.name, trunk.filters[0], out, normalize=norm)
    return MultiTaskNet(trunk, heads)


# --------------------------------------------------------------------------- CelebA


def celeba_cnn(task_specs: Sequence[TaskSpec], width: int = 64, in_channels: int = 3) -> MultiTaskNet:
    """The 9-layer CelebA CNN (module docstring) with one linear head per attribute."""
    w = int(width)
    if w < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    chans = [w, 2 * w, 2 * w, 4 * w, 4 * w, 8 * w, 8 * w]
    pool_after = {0, 2, 4}
    layers: list[nn.Module] = []
    cin = in_channels
    for i, c in enumerate(chans):
        layers += [nn.Conv2d(cin, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        if i in pool_after:
            layers.append(nn.MaxPool2d(2, 2))
        cin = c
    d = 8 * w
    layers += [
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(d, d, bias=False), nn.BatchNorm1d(d), nn.ReLU(inplace=True),
        nn.Linear(d, d, bias=False), nn.BatchNorm1d(d), nn.ReLU(inplace=True),
    ]
    return MultiTaskNet(nn.Sequential(*layers), make_heads(task_specs, d))


# --------------------------------------------------------------------------- QM9


class QM9Trunk(nn.Module):
    """MPNN trunk (module docstring): a PyG ``Batch`` (``x``, ``edge_index``, ``edge_attr``, ``batch``)
    -> ``[num_graphs, dim]``."""

    def __init__(self, num_features: int = 11, edge_dim: int = 5, dim: int = 64, steps: int = 3,
                 edge_hidden: int = 128, set2set_steps: int = 3) -> None:
        super().__init__()
        try:
            from torch_geometric.nn import NNConv, Set2Set
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("the QM9 model needs PyTorch Geometric: pip install 'lightning-cost[paper]'") from e
        self.dim, self.steps = int(dim), int(steps)
        self.lin0 = nn.Linear(num_features, dim)
        edge_net = nn.Sequential(nn.Linear(edge_dim, edge_hidden), nn.ReLU(), nn.Linear(edge_hidden, dim * dim))
        self.conv = NNConv(dim, dim, edge_net, aggr="mean")
        self.gru = nn.GRU(dim, dim)
        self.set2set = Set2Set(dim, processing_steps=set2set_steps)
        self.lin1 = nn.Linear(2 * dim, dim)

    def forward(self, data) -> Tensor:
        out = F.relu(self.lin0(data.x))
        h = out.unsqueeze(0)
        for _ in range(self.steps):
            m = F.relu(self.conv(out, data.edge_index, data.edge_attr))
            out, h = self.gru(m.unsqueeze(0), h)
            out = out.squeeze(0)
        return F.relu(self.lin1(self.set2set(out, data.batch)))


def qm9_mpnn(task_specs: Sequence[TaskSpec], num_features: int = 11, edge_dim: int = 5, dim: int = 64,
             **kwargs) -> MultiTaskNet:
    """The QM9 MPNN (module docstring): :class:`QM9Trunk` and one ``Linear(dim, 1)`` per target."""
    trunk = QM9Trunk(num_features, edge_dim, dim, **kwargs)
    return MultiTaskNet(trunk, make_heads(task_specs, dim))
