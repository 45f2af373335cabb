"""Default hyperparameters per built-in task family, in the spirit of rl-baselines3-zoo."""

from typing import Any

DEFAULT_TIMESTEPS = 1_000_000

#: env id -> (total timesteps, MetaPolicyGradient keyword arguments)
HYPERPARAMS: dict[str, tuple[int, dict[str, Any]]] = {}


def default_hyperparams(env_id: str) -> tuple[int, dict[str, Any]]:
    """:return: (total timesteps, keyword arguments) for ``env_id``; generic defaults for other ids"""
    timesteps, kwargs = HYPERPARAMS.get(env_id, (DEFAULT_TIMESTEPS, {}))
    return timesteps, dict(kwargs)
