"""Meta-optimizers: how a meta-iteration's samples become a parameter update, registered by name."""

import sys
from typing import Any

from sb3_metarl.common.arguments import construct_checked
from sb3_metarl.meta_optimizers import promp
from sb3_metarl.meta_optimizers.base import MetaOptimizer
from sb3_metarl.meta_optimizers.gradient_ascent import AdamAscent, GradientAscent, SGDAscent
from sb3_metarl.meta_optimizers.promp import ProMP
from sb3_metarl.meta_optimizers.trpo import TrustRegion

META_OPTIMIZERS: dict[str, type[MetaOptimizer]] = {opt.name: opt for opt in (AdamAscent, SGDAscent, TrustRegion, ProMP)}


def make_meta_optimizer(meta_optimizer: str | MetaOptimizer, kwargs: dict[str, Any] | None = None) -> MetaOptimizer:
    """
    :param meta_optimizer: a name in ``META_OPTIMIZERS`` or a ``MetaOptimizer`` instance (returned as is)
    :param kwargs: constructor arguments for a named meta-optimizer (``max_kl``, ``n_epochs``, ...)
    :return: the meta-optimizer object
    """
    if isinstance(meta_optimizer, MetaOptimizer):
        if kwargs:
            raise ValueError("meta_optimizer_kwargs: only for a named meta_optimizer; configure the instance instead.")
        return meta_optimizer
    if not isinstance(meta_optimizer, str) or meta_optimizer not in META_OPTIMIZERS:
        raise ValueError(
            f"meta_optimizer: unknown optimizer {meta_optimizer!r}; use one of {sorted(META_OPTIMIZERS)} "
            "or a MetaOptimizer instance."
        )
    return construct_checked(
        META_OPTIMIZERS[meta_optimizer], kwargs, "meta_optimizer_kwargs", f"meta_optimizer={meta_optimizer!r}"
    )



# the pickle path of ProMP in zips saved by 0.1.0 (tests/data/v0_1_0): ``sb3_metarl.meta_optimizers.ppo.PPO``
sys.modules.setdefault("sb3_metarl.meta_optimizers.ppo", promp)

__all__ = [
    "META_OPTIMIZERS",
    "AdamAscent",
    "GradientAscent",
    "MetaOptimizer",
    "ProMP",
    "SGDAscent",
    "TrustRegion",
    "make_meta_optimizer",
]
