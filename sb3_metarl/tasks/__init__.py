"""Task samplers and the built-in task families, registered in Gymnasium under ``sb3_metarl/``."""

import sys

import gymnasium as gym

from sb3_metarl.tasks import distributions
from sb3_metarl.tasks.bandit import GaussianBanditEnv
from sb3_metarl.tasks.distributions import EnvTaskSampler, FixedTaskSampler, TaskSampler
from sb3_metarl.tasks.navigation import Navigation2DEnv
from sb3_metarl.tasks.tabular import TabularMDPEnv
from sb3_metarl.tasks.task_env import TaskEnv

#: id -> (entry point, horizon). The horizon is the literature's, set as ``max_episode_steps``.
BUILTIN_TASK_ENVS = {
    "sb3_metarl/Navigation2D-v0": ("sb3_metarl.tasks.navigation:Navigation2DEnv", 100),
    "sb3_metarl/GaussianBandit-v0": ("sb3_metarl.tasks.bandit:GaussianBanditEnv", 1),
    "sb3_metarl/TabularMDP-v0": ("sb3_metarl.tasks.tabular:TabularMDPEnv", 20),
    # MuJoCo locomotion families (Gymnasium v5 envs; imported only when made)
    "sb3_metarl/HalfCheetahVel-v0": ("sb3_metarl.tasks.mujoco.envs:HalfCheetahVelEnv", 200),
    "sb3_metarl/HalfCheetahDir-v0": ("sb3_metarl.tasks.mujoco.envs:HalfCheetahDirEnv", 200),
    "sb3_metarl/AntVel-v0": ("sb3_metarl.tasks.mujoco.envs:AntVelEnv", 200),
    "sb3_metarl/AntDir-v0": ("sb3_metarl.tasks.mujoco.envs:AntDirEnv", 200),
    "sb3_metarl/AntDir2D-v0": ("sb3_metarl.tasks.mujoco.envs:AntDir2DEnv", 200),
    "sb3_metarl/AntGoal-v0": ("sb3_metarl.tasks.mujoco.envs:AntGoalEnv", 200),
    "sb3_metarl/Walker2dVel-v0": ("sb3_metarl.tasks.mujoco.envs:Walker2dVelEnv", 200),
    "sb3_metarl/SwimmerVel-v0": ("sb3_metarl.tasks.mujoco.envs:SwimmerVelEnv", 200),
    "sb3_metarl/HopperRandParams-v0": ("sb3_metarl.tasks.mujoco.envs:HopperRandParamsEnv", 200),
    "sb3_metarl/Walker2dRandParams-v0": ("sb3_metarl.tasks.mujoco.envs:Walker2dRandParamsEnv", 200),
}
MUJOCO_TASK_ENVS = [env_id for env_id, (entry_point, _) in BUILTIN_TASK_ENVS.items() if ".mujoco.envs:" in entry_point]
#: Meta-World benchmarks (the optional extra ``sb3_metarl[metaworld]``): id -> benchmark name;
#: make with ``env_name=`` (ML1) and ``seed=`` (task generation); episodes of Meta-World's 500 steps
METAWORLD_TASK_ENVS = {
    "sb3_metarl/MetaWorldML1-v0": "ML1",
    "sb3_metarl/MetaWorldML10-v0": "ML10",
    "sb3_metarl/MetaWorldML45-v0": "ML45",
}


#: built-in envs that are not task families: id -> (entry point, horizon)
GAME_ENVS = {"sb3_metarl/IPD-v0": ("sb3_metarl.tasks.ipd:IteratedPrisonersDilemmaEnv", 100)}


def register_envs() -> None:
    """Register the built-in task families and games (idempotent)."""
    for env_id, (entry_point, horizon) in {**BUILTIN_TASK_ENVS, **GAME_ENVS}.items():
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=entry_point, max_episode_steps=horizon)
    for env_id, benchmark in METAWORLD_TASK_ENVS.items():
        if env_id not in gym.registry:
            gym.register(
                id=env_id,
                entry_point="sb3_metarl.tasks.meta_world:MetaWorldTaskEnv",
                max_episode_steps=500,
                kwargs={"benchmark": benchmark},
            )


register_envs()

# the pickle path of the task distributions in zips saved by 0.1.0 (tests/data/v0_1_0): no module of that name remains
sys.modules.setdefault("sb3_metarl.tasks.samplers", distributions)

__all__ = [
    "BUILTIN_TASK_ENVS",
    "GAME_ENVS",
    "METAWORLD_TASK_ENVS",
    "MUJOCO_TASK_ENVS",
    "EnvTaskSampler",
    "FixedTaskSampler",
    "GaussianBanditEnv",
    "Navigation2DEnv",
    "TabularMDPEnv",
    "TaskEnv",
    "TaskSampler",
    "register_envs",
]
