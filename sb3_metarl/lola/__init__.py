"""The opponent-shaping wing: LOLA-DiCE on the iterated prisoner's dilemma (Liu et al. 2022, Sec. 5.2)."""

from sb3_metarl.lola.lola_dice import LOLADiCE, StateValueTable
from sb3_metarl.tasks.ipd import ipd_exact_value

__all__ = ["LOLADiCE", "StateValueTable", "ipd_exact_value"]
