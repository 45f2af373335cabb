"""Deprecated path: moved to :mod:`sb3_metarl.estimators` (this module re-exports it for one release)."""

import warnings

from sb3_metarl.estimators.callbacks import *  # noqa: F403
from sb3_metarl.estimators.decomposition import *  # noqa: F403
from sb3_metarl.estimators.setups import *  # noqa: F403
from sb3_metarl.estimators.study import *  # noqa: F403

warnings.warn(
    "sb3_metarl.diagnostics is deprecated; import from sb3_metarl.estimators instead.",
    DeprecationWarning,
    stacklevel=2,
)
