"""Names of ``MetaPolicyGradient`` kept for one release: each warns and gives the new one."""

import warnings

from sb3_metarl.meta_optimizers import MetaOptimizer


class DeprecatedNames:
    """The deprecated attribute and method names of ``MetaPolicyGradient`` (delete with the 0.3 release)."""

    meta_optimizer: MetaOptimizer

    @property
    def meta_updater(self) -> MetaOptimizer:
        """Deprecated name of ``meta_optimizer`` (the object)."""
        warnings.warn("model.meta_updater is deprecated; use model.meta_optimizer.", DeprecationWarning, stacklevel=2)
        return self.meta_optimizer

    def resolved_inner_lr(self) -> float:
        """Deprecated name of ``calibrate_inner_lr``."""
        warnings.warn("resolved_inner_lr() is deprecated; use calibrate_inner_lr().", DeprecationWarning, stacklevel=2)
        return self.calibrate_inner_lr()  # type: ignore[attr-defined]
