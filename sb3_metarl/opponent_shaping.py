"""Deprecated path: moved to :mod:`sb3_metarl.lola` (this module re-exports it for one release)."""

import warnings

from sb3_metarl.lola.lola_dice import *  # noqa: F403
from sb3_metarl.lola.lola_dice import ESTIMATES, StateValueTable  # noqa: F401  (outside its __all__)
from sb3_metarl.tasks.ipd import ipd_exact_value  # noqa: F401

warnings.warn(
    "sb3_metarl.opponent_shaping is deprecated; import from sb3_metarl.lola instead.",
    DeprecationWarning,
    stacklevel=2,
)
