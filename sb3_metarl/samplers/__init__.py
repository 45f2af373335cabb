"""
Episode samplers: how a meta-iteration's episodes are collected (``MetaPolicyGradient(sampler=...)``).

- ``"vec_env"`` (default): the model's VecEnv, in this process (``VecEnvSampler``);
- ``"subproc"``: ``k`` worker processes on this machine, each owning many sub-envs (``ShardedVecEnv``);
- ``"ray"``: ``k`` Ray actors, on this machine or a cluster (``ShardedVecEnv(backend="ray")``);
- or any ``EpisodeSampler`` instance.
"""

from sb3_metarl.samplers.acting import GroupPolicies, draw_noise_seeds, group_generators
from sb3_metarl.samplers.processes import SamplerClosedError, WorkerDiedError
from sb3_metarl.samplers.protocol import EpisodeSampler, StepCallback, conforming_sampler
from sb3_metarl.samplers.runner import GroupRunner
from sb3_metarl.samplers.sharded import ShardedVecEnv
from sb3_metarl.samplers.vec_env import VecEnvSampler

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
    "conforming_sampler",
    "draw_noise_seeds",
    "group_generators",
]
