"""Building a registered component (gradient mode, meta-optimizer, sampler) from a kwargs dict, with clear errors."""

import inspect
from typing import Any, TypeVar

T = TypeVar("T")


def construct_checked(component_class: type[T], kwargs: dict[str, Any] | None, argument: str, owner: str) -> T:
    """
    :param component_class: the class to build
    :param kwargs: its constructor arguments (None: none)
    :param argument: the user-facing name of the kwargs argument (for errors), e.g. ``"meta_optimizer_kwargs"``
    :param owner: what the kwargs configure (for errors), e.g. ``"meta_optimizer='trpo'"``
    :return: ``component_class(**kwargs)``
    :raises ValueError: naming ``argument`` if ``kwargs`` is not a dict or holds unknown keys
    """
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ValueError(f"{argument}: must be a dict or None, got {kwargs!r}.")
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    parameters = inspect.signature(component_class.__init__).parameters.values()
    valid = [p.name for p in parameters if p.name != "self" and p.kind in keyword]
    unknown = sorted(set(kwargs or {}) - set(valid))
    if unknown:
        raise ValueError(f"{argument}: unknown argument(s) {unknown} for {owner}; valid keys: {valid or 'none'}.")
    return component_class(**(kwargs or {}))
