"""sb3_metarl: gradient-based meta-reinforcement learning for Stable-Baselines3."""

import os

import sb3_metarl.tasks  # noqa: F401  (registers the built-in task envs)
from sb3_metarl.common.callbacks import MetaCheckpointCallback, MetaEvalCallback
from sb3_metarl.gradient_modes import GRADIENT_MODES, GradientMode
from sb3_metarl.lola import LOLADiCE
from sb3_metarl.meta_pg import MetaPolicyGradient
from sb3_metarl.mgrl import MetaGradientA2C
from sb3_metarl.tasks import EnvTaskSampler, FixedTaskSampler, TaskSampler

with open(os.path.join(os.path.dirname(__file__), "version.txt")) as file_handler:
    __version__ = file_handler.read().strip()

__all__ = [
    "GRADIENT_MODES",
    "EnvTaskSampler",
    "FixedTaskSampler",
    "GradientMode",
    "LOLADiCE",
    "MetaCheckpointCallback",
    "MetaEvalCallback",
    "MetaGradientA2C",
    "MetaPolicyGradient",
    "TaskSampler",
    "__version__",
]
