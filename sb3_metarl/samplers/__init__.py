"""
Episode samplers: how a meta-iteration's episodes are collected (``MetaPolicyGradient(sampler=...)``).

- ``"vec_env"`` (default): the model's VecEnv, in this process (``VecEnvSampler``);
- ``"subproc"``: ``k`` worker processes on this machine, each owning many sub-envs (``ShardedVecEnv``);
- ``"ray"``: ``k`` Ray actors, on this machine or a cluster (``ShardedVecEnv(backend="ray")``);
- or any ``EpisodeSampler`` instance.
"""

from sb3_metarl.samplers.base import (
    EpisodeSampler,
    GroupPolicies,
    StepCallback,
    draw_noise_seeds,
    group_generators,
    sampler_options,
)
from sb3_metarl.samplers.runner import GroupRunner
from sb3_metarl.samplers.sharded import ShardedVecEnv
from sb3_metarl.samplers.vec_env import VecEnvSampler
from sb3_metarl.samplers.workers import SamplerClosedError, WorkerDiedError

#: the names ``sampler=`` accepts
SAMPLER_NAMES = ("vec_env", "subproc", "ray")

__all__ = [
    "SAMPLER_NAMES",
    "EpisodeSampler",
    "GroupPolicies",
    "GroupRunner",
    "SamplerClosedError",
    "ShardedVecEnv",
    "StepCallback",
    "VecEnvSampler",
    "WorkerDiedError",
    "draw_noise_seeds",
    "group_generators",
    "sampler_options",
]
