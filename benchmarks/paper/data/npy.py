"""MTAN's pre-processed ``.npy`` files (CityScapes, NYUv2) read lazily, and the dense training
augmentation (random scale-crop and flip)."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = ["random_scale_crop_flip"]

_INDEX_RE = re.compile(r"^(\d+)\.npy$")


def _npy_indices(folder: Path) -> list[int]:
    return sorted(int(m.group(1)) for f in os.listdir(folder) if (m := _INDEX_RE.match(f)))


def random_scale_crop_flip(
    image: torch.Tensor, targets: dict[str, torch.Tensor], scales: Sequence[float] = (1.0, 1.2, 1.5),
    flip: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The MTAN/Nash-MTL/FairGrad training augmentation (one sample, channels first).

    Crops a random window of ``1/s`` of the image (``s`` drawn from ``scales``) and resizes it back
    (bilinear for the image and normals, nearest for labels and depth; depth is divided by ``s``:
    zooming in brings the scene closer), then flips horizontally with probability 1/2 (negating
    the normals' x-component). Uses torch's global RNG (seeded per worker by Lightning).
    """
    h, w = image.shape[-2:]
    s = float(scales[int(torch.randint(len(scales), ()).item())])
    ch, cw = int(h / s), int(w / s)
    i = int(torch.randint(h - ch + 1, ()).item())
    j = int(torch.randint(w - cw + 1, ()).item())

    def crop(t: torch.Tensor, mode: str) -> torch.Tensor:
        t = t[..., i : i + ch, j : j + cw]
        if (ch, cw) == (h, w):
            return t
        kw = {"align_corners": True} if mode == "bilinear" else {}
        return F.interpolate(t[None].float(), size=(h, w), mode=mode, **kw)[0].to(t.dtype)

    image = crop(image, "bilinear")
    out: dict[str, torch.Tensor] = {}
    for name, t in targets.items():
        if name == "segmentation":
            out[name] = crop(t[None], "nearest")[0]
        elif name == "depth":
            out[name] = crop(t, "nearest") / s
        elif name == "normal":
            out[name] = crop(t, "bilinear")
        else:
            raise ValueError(f"unknown dense target {name!r}")
    if flip and bool(torch.rand(()) < 0.5):
        image = image.flip(-1)
        for name in out:
            out[name] = out[name].flip(-1)
        if "normal" in out:
            out["normal"] = out["normal"].clone()
            out["normal"][0].neg_()
    return image, out


class _DenseNpyDataset(Dataset):
    """Reads ``<split dir>/<modality>/<i>.npy`` lazily; returns ``(image [3,H,W], {task: target})``."""

    def __init__(self, folder: Path, dirs: dict[str, str], indices: Sequence[int], augment: bool = False) -> None:
        self.folder = Path(folder)
        self.dirs = dict(dirs)  # target name -> sub-folder
        self.indices = [int(i) for i in indices]
        self.augment = augment

    def __len__(self) -> int:
        return len(self.indices)

    def _load(self, sub: str, i: int) -> np.ndarray:
        return np.load(self.folder / sub / f"{i}.npy")

    def __getitem__(self, k: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        i = self.indices[k]
        image = torch.from_numpy(np.ascontiguousarray(np.moveaxis(self._load("image", i), -1, 0), dtype=np.float32))
        targets: dict[str, torch.Tensor] = {}
        for name, sub in self.dirs.items():
            a = self._load(sub, i)
            if name == "segmentation":
                a = np.where(np.isfinite(a), a, -1)
                targets[name] = torch.from_numpy(np.rint(a).astype(np.int64))
            elif name == "depth":
                a = a[..., 0] if a.ndim == 3 else a
                targets[name] = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None]
            else:
                targets[name] = torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, 0), dtype=np.float32))
        if self.augment:
            image, targets = random_scale_crop_flip(image, targets)
        return image, targets
