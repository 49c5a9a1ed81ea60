"""Molecules (MoleculeNet): a SMILES + targets CSV, Morgan fingerprints, masked missing labels; one
module per job:

* :mod:`.table` -- the SMILES + targets CSV read into arrays, the most-labelled target columns;
* :mod:`.features` -- RDKit: Morgan fingerprints, Bemis-Murcko scaffolds and the scaffold split;
* :mod:`.datamodule` -- :class:`~.datamodule.MoleculeDataModule`, with its fingerprint cache.
"""

from benchmarks.data.molecules.datamodule import MoleculeDataModule
from benchmarks.data.molecules.features import morgan_fingerprints
from benchmarks.data.molecules.table import most_labelled_columns, read_molecule_csv

__all__ = ["read_molecule_csv", "morgan_fingerprints", "most_labelled_columns", "MoleculeDataModule"]
