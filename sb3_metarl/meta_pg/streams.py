"""A run's random streams: what a checkpoint holds so that the resumed run continues exactly."""

import contextlib
from collections.abc import Iterator
from typing import Any

import torch as th
from stable_baselines3.common.vec_env import VecEnv

from sb3_metarl.common.rng import (
    EnvRngState,
    generator_state,
    get_env_rng_states,
    restore_generator,
    seed_env_rngs,
    set_env_rng_states,
)
from sb3_metarl.samplers import EpisodeSampler


class EnvStreams:
    """
    The learner's copy of its sub-envs' random states, as of the last completed sampling phase (or
    seeding). A save writes this copy, so saving never asks a sampler's worker (it may be dead, frozen or
    closed); an interrupted block marks it stale, and it is put back on the sub-envs before they sample again.
    """

    def __init__(self) -> None:
        #: one state per sub-env (None: no env attached yet)
        self.states: list[EnvRngState] | None = None
        #: True when the sub-envs may not hold ``states`` (an interrupted block could not put them back)
        self.stale = False

    def seed(self, env: VecEnv, seed: int) -> None:
        """Seed every sub-env's generator from ``(seed, index)`` and keep the copy."""
        self.states, self.stale = seed_env_rngs(env, seed), False

    def put(self, env: VecEnv, states: list[EnvRngState]) -> None:
        """Give the sub-envs these random states and keep the copy."""
        set_env_rng_states(env, states)
        self.states, self.stale = states, False

    def read(self, env: VecEnv) -> None:
        """Ask the sub-envs for their states (once, when their workers were just started)."""
        self.states, self.stale = get_env_rng_states(env), False

    def record(self, env: VecEnv, sampler: EpisodeSampler) -> None:
        """After a completed sampling phase on ``env``: the states the sampler sent with its batch (else ask ``env``)."""
        states = sampler.env_rng_states()
        self.states = states if states is not None else get_env_rng_states(env)

    def refresh(self, env: VecEnv) -> None:
        """Before sampling: put the copy back if an interrupted block left the sub-envs elsewhere."""
        if self.stale and self.states is not None:
            self.put(env, self.states)

    @contextlib.contextmanager
    def kept(self, env: VecEnv | None) -> Iterator[None]:
        """The sub-envs' streams are as they were before the block (e.g. across SB3's reset in ``_setup_learn``)."""
        states = self.states if env is not None else None
        if states is None:
            yield
            return
        try:
            yield
        except BaseException:
            # interrupted (Ctrl-C, a dead worker): the copy is the streams before the block, which is what a save
            # holds; the sub-envs get them back before they sample again
            self.states, self.stale = states, True
            with contextlib.suppress(Exception):
                self.put(env, states)
            raise
        self.put(env, states)

    @contextlib.contextmanager
    def isolated(self, env: VecEnv | None, seed: int | None) -> Iterator[th.Generator]:
        """
        Sample outside training's random streams: yields an action-noise generator seeded by ``seed``
        (fresh entropy when None); the sub-envs are seeded by ``seed`` inside the block and get their
        streams back afterwards, so that a later ``learn`` is exactly what it would have been without it.
        """
        generator = th.Generator()
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        with self.kept(env):
            if seed is not None and env is not None:
                self.seed(env, seed)
            yield generator


def run_streams(model: Any, include_env: bool = True) -> dict[str, Any]:
    """
    :param model: a ``MetaPolicyGradient``
    :param include_env: include the sub-envs' streams (the learner's copy: never a question to the workers)
    :return: copies of the model's random streams and its timestep counter
    """
    return {
        "num_timesteps": model.num_timesteps,
        "task_rng": generator_state(model.task_rng),
        "torch_generator": model.torch_generator.get_state(),
        "env": model.env_streams.states if include_env and model.env is not None else None,
    }


def set_run_streams(model: Any, state: dict[str, Any], include_env: bool = True) -> None:
    """:param state: as returned by ``run_streams``"""
    model.num_timesteps = state["num_timesteps"]
    restore_generator(model.task_rng, state["task_rng"])
    model.torch_generator.set_state(state["torch_generator"])
    if include_env and state["env"] is not None and model.env is not None:
        model.env_streams.put(model.env, state["env"])
