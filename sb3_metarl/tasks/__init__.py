"""Task samplers and the built-in task families, registered in Gymnasium under ``sb3_metarl/``."""

import gymnasium as gym

from sb3_metarl.tasks.bandit import GaussianBanditEnv
from sb3_metarl.tasks.navigation import Navigation2DEnv
from sb3_metarl.tasks.samplers import EnvTaskSampler, FixedTaskSampler, TaskSampler
from sb3_metarl.tasks.tabular import TabularMDPEnv
from sb3_metarl.tasks.task_env import TaskEnv

#: id -> (entry point, horizon). The horizon is the literature's, set as ``max_episode_steps``.
BUILTIN_TASK_ENVS = {
    "sb3_metarl/Navigation2D-v0": ("sb3_metarl.tasks.navigation:Navigation2DEnv", 100),
    "sb3_metarl/GaussianBandit-v0": ("sb3_metarl.tasks.bandit:GaussianBanditEnv", 1),
    "sb3_metarl/TabularMDP-v0": ("sb3_metarl.tasks.tabular:TabularMDPEnv", 20),
}


def register_envs() -> None:
    """Register the built-in task families (idempotent)."""
    for env_id, (entry_point, horizon) in BUILTIN_TASK_ENVS.items():
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=entry_point, max_episode_steps=horizon)


register_envs()

__all__ = [
    "BUILTIN_TASK_ENVS",
    "EnvTaskSampler",
    "FixedTaskSampler",
    "GaussianBanditEnv",
    "Navigation2DEnv",
    "TabularMDPEnv",
    "TaskEnv",
    "TaskSampler",
    "register_envs",
]
