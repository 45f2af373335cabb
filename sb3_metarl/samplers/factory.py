"""Building the sub-envs and the episode sampler from what a user passes (``env=``, ``sampler=``)."""

import copy
import functools
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.type_aliases import GymEnv
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv

from sb3_metarl.samplers.processes import GuardedSubprocVecEnv
from sb3_metarl.samplers.protocol import EpisodeSampler, conforming_sampler
from sb3_metarl.samplers.runner import RUNNER_ARGUMENTS
from sb3_metarl.samplers.sharded import ShardedVecEnv
from sb3_metarl.samplers.vec_env import VecEnvSampler


class PrototypeCopies:
    """
    A picklable factory of deep copies of one env instance (the prototype), each with a fresh random
    generator (the model reseeds them from its seed when it has one).

    :param env: the prototype
    :raises ValueError: if the env cannot be copied
    """

    def __init__(self, env: gym.Env):
        try:
            copy.deepcopy(env)
        except Exception as error:
            raise ValueError(
                f"env: the env instance {env!r:.80} cannot be copied into the sub-envs ({type(error).__name__}: {error}); "
                "pass its registered id or a factory (a callable returning a new env) instead."
            ) from None
        self.env = env

    def __call__(self) -> gym.Env:
        env = copy.deepcopy(self.env)
        env.np_random = np.random.default_rng()
        return env


def make_task_env(env_id: str, env_kwargs: dict[str, Any] | None = None) -> gym.Env:
    """
    Module-level (picklable) factory. A worker that unpickles it imports this module, and with it the
    ``sb3_metarl`` package, whose ``__init__`` registers the built-in ids: no import of ``sb3_metarl.tasks`` here
    (it would run up a floor).
    """
    return gym.make(env_id, **(env_kwargs or {}))


def env_factory(env: gym.Env | str | Callable[[], gym.Env], env_kwargs: dict[str, Any] | None = None) -> Callable[[], gym.Env]:
    """
    :param env: an env id, an env instance (deep-copied into each sub-env) or a factory
    :param env_kwargs: keyword arguments of ``gym.make`` for an id
    :return: a picklable factory of one sub-env
    """
    if isinstance(env, gym.Env):
        return PrototypeCopies(env)
    if isinstance(env, str):
        return functools.partial(make_task_env, env, env_kwargs)
    if callable(env):
        return env
    raise ValueError(f"env: expected an env id, an env instance, a factory or a VecEnv, got {type(env).__name__}.")


def make_sub_envs(
    env: GymEnv | str | Callable[[], gym.Env],
    n_envs: int,
    n_groups: int,
    sampler: str | EpisodeSampler = "vec_env",
    sampler_kwargs: dict[str, Any] | None = None,
    vec_env_cls: type[VecEnv] | None = None,
    env_kwargs: dict[str, Any] | None = None,
    max_episode_steps: int | None = None,
) -> VecEnv:
    """
    :param env: an env id, an env instance, a factory, or a VecEnv (returned as is)
    :param n_envs: sub-envs to build
    :param n_groups: task groups (the meta-batch)
    :param sampler: "subproc" and "ray" build the sub-envs in their workers (a ``ShardedVecEnv``); otherwise
        they are built with ``vec_env_cls`` (default ``DummyVecEnv``) in this process
    :param sampler_kwargs: the ``ShardedVecEnv``'s arguments (``num_workers``, ``timeout``, ...), or a
        ``GuardedSubprocVecEnv``'s (``timeout``, ``close_timeout``)
    :param vec_env_cls: the VecEnv class of the in-process sub-envs
    :param env_kwargs: keyword arguments of ``gym.make`` for an id
    :param max_episode_steps: the horizon H (default: the sub-envs' own)
    :return: the sub-envs
    """
    sharded = sampler in ("subproc", "ray")
    if isinstance(env, VecEnv):
        if sharded:
            raise ValueError(
                f"env: sampler={sampler!r} builds the sub-envs in its workers and needs an env id, an env instance "
                "or a factory, not a VecEnv."
            )
        return env
    factory = env_factory(env, env_kwargs)
    if sharded:
        return ShardedVecEnv([factory] * n_envs, n_groups, max_episode_steps, sampler, **(sampler_kwargs or {}))
    if vec_env_cls is GuardedSubprocVecEnv:  # its bounded waits are set like the samplers' (sampler_kwargs)
        waits = {key: value for key, value in (sampler_kwargs or {}).items() if key not in RUNNER_ARGUMENTS}
        return GuardedSubprocVecEnv([factory] * n_envs, **waits)
    return (vec_env_cls or DummyVecEnv)([factory] * n_envs)


def make_episode_sampler(
    env: VecEnv,
    n_groups: int,
    policy: ActorCriticPolicy,
    sampler: str | EpisodeSampler = "vec_env",
    max_episode_steps: int | None = None,
    sampler_kwargs: dict[str, Any] | None = None,
) -> EpisodeSampler:
    """
    :param env: the sub-envs (as ``make_sub_envs`` built them, possibly wrapped by SB3)
    :param n_groups: task groups (the meta-batch)
    :param policy: the policy whose architecture the sampler acts with
    :param sampler: a name (the sub-envs decide: a ``ShardedVecEnv`` samples itself) or an ``EpisodeSampler``
    :param max_episode_steps: the horizon H (default: the sub-envs' own)
    :param sampler_kwargs: the in-process sampler takes ``batched_physics`` and ``num_threads`` from them
    :return: the episode sampler, with the policy attached
    """
    if isinstance(env.unwrapped, ShardedVecEnv):
        if env.unwrapped is not env:
            raise ValueError(
                f"env: {type(env).__name__} wraps the sampler's workers, whose episodes would bypass it (image "
                "observations are transposed by such a wrapper); use sampler='vec_env' for this env."
            )
        episode_sampler: EpisodeSampler = env.unwrapped
    elif isinstance(sampler, EpisodeSampler):
        episode_sampler = conforming_sampler(sampler)
    else:
        runner_kwargs = {key: value for key, value in (sampler_kwargs or {}).items() if key in RUNNER_ARGUMENTS}
        episode_sampler = VecEnvSampler(env, n_groups, max_episode_steps, **runner_kwargs)
    if episode_sampler.n_groups < n_groups:
        raise ValueError(f"sampler: has {episode_sampler.n_groups} task groups, fewer than meta_batch_size={n_groups}.")
    episode_sampler.attach_policy(policy)
    return episode_sampler
