"""Meta-optimizers: how a meta-iteration's samples become a parameter update, registered by name."""

import inspect
from typing import Any

from sb3_metarl.meta_optimizers.base import MetaOptimizer
from sb3_metarl.meta_optimizers.gradient_ascent import SGD, Adam, GradientAscent
from sb3_metarl.meta_optimizers.ppo import PPO
from sb3_metarl.meta_optimizers.trpo import TRPO

META_OPTIMIZERS: dict[str, type[MetaOptimizer]] = {opt.name: opt for opt in (Adam, SGD, TRPO, PPO)}


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
    optimizer_class = META_OPTIMIZERS[meta_optimizer]
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ValueError(f"meta_optimizer_kwargs: must be a dict or None, got {kwargs!r}.")
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    parameters = inspect.signature(optimizer_class.__init__).parameters.values()
    valid = [p.name for p in parameters if p.name != "self" and p.kind in keyword]
    unknown = sorted(set(kwargs or {}) - set(valid))
    if unknown:
        raise ValueError(
            f"meta_optimizer_kwargs: unknown argument(s) {unknown} for meta_optimizer={meta_optimizer!r}; "
            f"valid keys: {valid or 'none'}."
        )
    return optimizer_class(**(kwargs or {}))


__all__ = ["META_OPTIMIZERS", "PPO", "SGD", "TRPO", "Adam", "GradientAscent", "MetaOptimizer", "make_meta_optimizer"]
