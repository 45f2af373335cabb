"""Meta-gradient modes, registered by name."""

from sb3_metarl.gradient_modes.base import GradientMode, magic_box, policy_gradient_surrogate
from sb3_metarl.gradient_modes.dice import DiCE
from sb3_metarl.gradient_modes.fomaml import FOMAML
from sb3_metarl.gradient_modes.loaded_dice import LoadedDiCE
from sb3_metarl.gradient_modes.lsf import LSF
from sb3_metarl.gradient_modes.lvc import LVC
from sb3_metarl.gradient_modes.maml import MAML
from sb3_metarl.gradient_modes.sf import SF

GRADIENT_MODES: dict[str, type[GradientMode]] = {mode.name: mode for mode in (SF, LSF, LVC, DiCE, LoadedDiCE, MAML, FOMAML)}


def make_gradient_mode(mode: str | GradientMode, dice_lambda: float = 0.95) -> GradientMode:
    """
    :param mode: a name in ``GRADIENT_MODES`` or a ``GradientMode`` instance (returned as is)
    :param dice_lambda: lambda of ``loaded_dice``
    :return: the gradient mode object
    """
    if isinstance(mode, GradientMode):
        return mode
    if not isinstance(mode, str) or mode not in GRADIENT_MODES:
        raise ValueError(
            f"gradient_mode: unknown mode {mode!r}; use one of {sorted(GRADIENT_MODES)} or a GradientMode instance."
        )
    if mode == LoadedDiCE.name:
        return LoadedDiCE(dice_lambda)
    return GRADIENT_MODES[mode]()


__all__ = [
    "FOMAML",
    "GRADIENT_MODES",
    "LSF",
    "LVC",
    "MAML",
    "SF",
    "DiCE",
    "GradientMode",
    "LoadedDiCE",
    "magic_box",
    "make_gradient_mode",
    "policy_gradient_surrogate",
]
