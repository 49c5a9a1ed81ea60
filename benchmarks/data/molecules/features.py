"""Molecules featurised with RDKit: Morgan fingerprints, Bemis-Murcko scaffolds and the scaffold split."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["morgan_fingerprints"]


def morgan_fingerprints(
    smiles: Sequence[str], radius: int = 2, n_bits: int = 2048, use_chirality: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Morgan (ECFP-like) bit fingerprints with RDKit.

    Returns ``(fps, valid)``: ``fps`` uint8 ``[N, n_bits]`` (zeros for invalid rows)
    and ``valid`` bool ``[N]`` (False where RDKit cannot parse the SMILES).
    """
    try:
        from rdkit import Chem, RDLogger
        from rdkit.Chem import rdFingerprintGenerator
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("MoleculeDataModule needs RDKit: pip install rdkit") from e
    gen = rdFingerprintGenerator.GetMorganGenerator(
        radius=int(radius), fpSize=int(n_bits), includeChirality=bool(use_chirality)
    )
    fps = np.zeros((len(smiles), n_bits), dtype=np.uint8)
    valid = np.zeros(len(smiles), dtype=bool)
    RDLogger.DisableLog("rdApp.*")
    try:
        for i, s in enumerate(smiles):
            mol = Chem.MolFromSmiles(s) if s else None
            if mol is None:
                continue
            fps[i] = gen.GetFingerprintAsNumPy(mol)
            valid[i] = True
    finally:
        RDLogger.EnableLog("rdApp.*")
    return fps, valid


def _murcko_scaffolds(smiles: Sequence[str]) -> list[str]:
    from rdkit import Chem, RDLogger
    from rdkit.Chem.Scaffolds import MurckoScaffold

    RDLogger.DisableLog("rdApp.*")
    try:
        out = []
        for s in smiles:
            mol = Chem.MolFromSmiles(s)
            out.append(MurckoScaffold.MurckoScaffoldSmiles(mol=mol, includeChirality=False) if mol else "")
        return out
    finally:
        RDLogger.EnableLog("rdApp.*")


def _scaffold_split(
    scaffolds: Sequence[str], fractions: Sequence[float], seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Balanced scaffold split (as in chemprop): whole scaffold groups go to one split;
    groups larger than half the val/test size go first (to train), the rest in seeded random order."""
    f = np.asarray(fractions, dtype=float) / float(np.sum(fractions))
    n = len(scaffolds)
    n_train, n_val = f[0] * n, f[1] * n
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(scaffolds):
        groups.setdefault(s, []).append(i)
    sets = list(groups.values())
    rng = np.random.default_rng(seed)
    big = [s for s in sets if len(s) > f[1] * n / 2 or len(s) > f[2] * n / 2]
    small = [s for s in sets if not (len(s) > f[1] * n / 2 or len(s) > f[2] * n / 2)]
    order = [big[i] for i in rng.permutation(len(big))] + [small[i] for i in rng.permutation(len(small))]
    tr: list[int] = []
    va: list[int] = []
    te: list[int] = []
    for s in order:
        if len(tr) + len(s) <= n_train:
            tr += s
        elif len(va) + len(s) <= n_val:
            va += s
        else:
            te += s
    return np.asarray(tr, dtype=np.int64), np.asarray(va, dtype=np.int64), np.asarray(te, dtype=np.int64)
