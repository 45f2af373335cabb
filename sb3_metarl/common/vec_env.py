"""Deprecated path (kept for one release): the worker processes moved to ``sb3_metarl.samplers.workers``, the env
factories to ``sb3_metarl.samplers.factory``. Zips saved before 0.2 pickle ``GuardedSubprocVecEnv`` by this path."""

import importlib
import warnings
from typing import Any

_MOVED = {
    "PrototypeCopies": "sb3_metarl.samplers.factory",
    "make_task_env": "sb3_metarl.samplers.factory",
}


def __getattr__(name: str) -> Any:
    module = _MOVED.get(name, "sb3_metarl.samplers.workers")
    value = getattr(importlib.import_module(module), name)  # (an unknown name raises AttributeError there)
    warnings.warn(f"sb3_metarl.common.vec_env is deprecated; import {name} from {module}.", DeprecationWarning, stacklevel=2)
    return value
