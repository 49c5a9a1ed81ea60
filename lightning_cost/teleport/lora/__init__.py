"""COST's teleport as in the paper (Sec. 4.1, eqs. 5-6): a LoRA displacement of the shared weights.

* :mod:`.config` -- :class:`LoRAConfig`, the settings, validated where they are defined;
* :mod:`.adapter` -- :class:`TeleportAdapter`, the low-rank adapters attached to the trunk and merged;
* :mod:`.objective` -- the terms of the objective ``L_t - gamma L_g`` (loss invariance, sharpness,
  balance ratios, sphere samples);
* :mod:`.teleporter` -- :class:`LoRATeleporter`, the inner optimisation and its acceptance test.
"""

from lightning_cost.teleport.lora.adapter import TeleportAdapter
from lightning_cost.teleport.lora.config import LoRAConfig
from lightning_cost.teleport.lora.objective import balance_ratios, loss_invariance, sample_sphere, sharpness
from lightning_cost.teleport.lora.teleporter import LoRATeleporter

__all__ = ["LoRAConfig", "LoRATeleporter", "TeleportAdapter", "balance_ratios", "loss_invariance", "sample_sphere",
           "sharpness"]
