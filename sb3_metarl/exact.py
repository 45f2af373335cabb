"""Deprecated path: moved to :mod:`sb3_metarl.estimators.exact` (this module re-exports it for one release)."""

import warnings

from sb3_metarl.estimators.exact import *  # noqa: F403

warnings.warn(
    "sb3_metarl.exact is deprecated; import from sb3_metarl.estimators.exact instead.",
    DeprecationWarning,
    stacklevel=2,
)
