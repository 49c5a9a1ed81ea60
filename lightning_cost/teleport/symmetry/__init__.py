"""The exact symmetry teleport: positive rescalings that leave every task loss unchanged.

* :mod:`.trace` -- a torch.fx trace whose nodes carry their example values;
* :mod:`.labels`, :mod:`.ops`, :mod:`.graph` -- scale labels, how they cross parameter-free operations,
  and which channels of the traced graph can be rescaled;
* :mod:`.groups` -- :class:`RescaleSymmetry`, the group action ``theta' = t(log a) * theta`` found on a module;
* :mod:`.flatness` -- the Hessian-trace objective (a move toward flatter points);
* :mod:`.rescale` -- :class:`RescaleTeleporter`, the log-scales chosen on the Jacobian (eq. 6, eq. 4).
"""

from lightning_cost.teleport.symmetry.groups import NoSymmetryError, RescaleSymmetry, ScaleGroup
from lightning_cost.teleport.symmetry.rescale import RescaleConfig, RescaleTeleporter

__all__ = ["NoSymmetryError", "RescaleConfig", "RescaleSymmetry", "RescaleTeleporter", "ScaleGroup"]
