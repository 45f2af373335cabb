"""Meta-gradient modes, registered by name."""

from typing import Any

from sb3_metarl.common.arguments import construct_checked
from sb3_metarl.gradient_modes.base import GradientMode, magic_box, policy_gradient_surrogate
from sb3_metarl.gradient_modes.dice import DiCE
from sb3_metarl.gradient_modes.fomaml import FOMAML
from sb3_metarl.gradient_modes.loaded_dice import LoadedDiCE
from sb3_metarl.gradient_modes.lsf import LSF
from sb3_metarl.gradient_modes.lvc import LVC
from sb3_metarl.gradient_modes.maml import MAML
from sb3_metarl.gradient_modes.sf import SF

GRADIENT_MODES: dict[str, type[GradientMode]] = {mode.name: mode for mode in (SF, LSF, LVC, DiCE, LoadedDiCE, MAML, FOMAML)}


def make_gradient_mode(mode: str | GradientMode, kwargs: dict[str, Any] | None = None) -> GradientMode:
    """
    :param mode: a name in ``GRADIENT_MODES`` or a ``GradientMode`` instance (returned as is)
    :param kwargs: constructor arguments of a named mode (``dice_lambda`` for ``loaded_dice``)
    :return: the gradient mode object
    """
    if isinstance(mode, GradientMode):
        if kwargs:
            raise ValueError("gradient_mode_kwargs: only for a named gradient_mode; configure the instance instead.")
        return mode
    if not isinstance(mode, str) or mode not in GRADIENT_MODES:
        raise ValueError(
            f"gradient_mode: unknown mode {mode!r}; use one of {sorted(GRADIENT_MODES)} or a GradientMode instance."
        )
    return construct_checked(GRADIENT_MODES[mode], kwargs, "gradient_mode_kwargs", f"gradient_mode={mode!r}")


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
