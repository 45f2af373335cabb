"""Deprecated path: moved to :mod:`sb3_metarl.mgrl` (this module re-exports it for one release)."""

import warnings

from sb3_metarl.mgrl.meta_gradient_a2c import *  # noqa: F403

warnings.warn(
    "sb3_metarl.meta_gradient_rl is deprecated; import from sb3_metarl.mgrl instead.",
    DeprecationWarning,
    stacklevel=2,
)
