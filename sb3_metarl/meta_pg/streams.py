"""A run's random streams: what a checkpoint holds so that the resumed run continues exactly."""

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
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


@dataclasses.dataclass(frozen=True)
class StreamsSnapshot:
    """Copies of a run's random streams and its timestep counter at one moment (what a resumed run starts from)."""

    #: the model's ``num_timesteps``
    num_timesteps: int
    #: the task stream's state
    task_rng: dict[str, Any]
    #: the action noise's stream
    torch_generator: th.Tensor
    #: the sub-envs' states (the learner's copy); None when not taken or no env
    env: list[EnvRngState] | None


class RunStreams:
    """
    Training's random streams, which a checkpoint holds so that the resumed run continues exactly: the task stream,
    the torch stream of the action noise (and of whatever a meta-optimizer draws: TRPO's conjugate-gradient start),
    the learner's copy of the sub-envs' streams, and the snapshot taken at the start of the meta-iteration in progress.

    Pickled (SB3's save), it holds the task and torch streams as of the iteration's start when one is in progress
    (the resumed run samples that iteration again), else as they are; the sub-envs' copy and the snapshot are not
    pickled (the model saves the sub-envs' states itself, and a loaded model is between iterations).

    :param seed: the run's seed (None: fresh entropy)
    """

    def __init__(self, seed: int | None) -> None:
        #: the stream training draws its meta-batches' tasks from
        self.task_rng = np.random.default_rng(seed)
        #: training's torch stream: the action noise of its sampling (on the CPU, so the same on every device)
        self.torch_generator = th.Generator()
        self.torch_generator.manual_seed(int(np.random.SeedSequence(seed).generate_state(1, np.uint64)[0] >> 1))
        #: the learner's copy of the sub-envs' streams
        self.env = EnvStreams()
        #: the streams at the start of the meta-iteration in progress (None between iterations)
        self.iteration_start: StreamsSnapshot | None = None

    @classmethod
    def of(cls, task_rng: np.random.Generator, torch_generator: th.Generator) -> "RunStreams":
        """:return: the streams holding these generators (a model saved before the streams were one object)"""
        streams = cls(0)
        streams.task_rng, streams.torch_generator = task_rng, torch_generator
        return streams

    def snapshot(self, num_timesteps: int, include_env: bool = True) -> StreamsSnapshot:
        """
        :param num_timesteps: the model's timestep counter, kept with the streams
        :param include_env: include the sub-envs' streams (the learner's copy: never a question to the workers)
        :return: copies of the streams
        """
        return StreamsSnapshot(
            num_timesteps,
            generator_state(self.task_rng),
            self.torch_generator.get_state(),
            self.env.states if include_env else None,
        )

    def restore(self, snapshot: StreamsSnapshot, env: VecEnv | None = None) -> int:
        """
        Put the streams back as in ``snapshot`` (the sub-envs' too when it holds them and ``env`` is given).

        :return: the snapshot's timestep counter
        """
        restore_generator(self.task_rng, snapshot.task_rng)
        self.torch_generator.set_state(snapshot.torch_generator)
        if snapshot.env is not None and env is not None:
            self.env.put(env, snapshot.env)
        return snapshot.num_timesteps

    def begin_iteration(self, num_timesteps: int) -> None:
        """A meta-iteration starts: a save until ``end_iteration`` holds the streams as they are now."""
        self.iteration_start = self.snapshot(num_timesteps)

    def end_iteration(self) -> None:
        """The meta-iteration's update was applied: a save holds the streams as they are from now on."""
        self.iteration_start = None

    def saved(self, num_timesteps: int) -> StreamsSnapshot:
        """:return: what a save holds: the iteration's start when one is in progress, else the streams as they are"""
        return self.iteration_start if self.iteration_start is not None else self.snapshot(num_timesteps)

    def isolated(self, env: VecEnv | None, seed: int | None) -> contextlib.AbstractContextManager[th.Generator]:
        """Sampling outside training's streams (``EnvStreams.isolated``): yields the action noise's generator."""
        return self.env.isolated(env, seed)

    def __getstate__(self) -> dict[str, Any]:
        saved = self.saved(0)
        task_rng, torch_generator = np.random.default_rng(), th.Generator()
        restore_generator(task_rng, saved.task_rng)
        torch_generator.set_state(saved.torch_generator)
        return {"task_rng": task_rng, "torch_generator": torch_generator}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.task_rng, self.torch_generator = state["task_rng"], state["torch_generator"]
        self.env, self.iteration_start = EnvStreams(), None
