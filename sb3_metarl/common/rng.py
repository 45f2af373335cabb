"""The random streams a meta-training run draws from, owned by the model so that they can be saved and restored."""

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.vec_env import VecEnv

#: a sub-env's ``np_random`` as ``bit_generator.state`` (a plain dict: pickles and compares)
EnvRngState = dict[str, Any]


def get_env_rng_states(venv: VecEnv) -> list[EnvRngState]:
    """:return: the state of every sub-env's ``np_random`` (copies: later draws do not change them)"""
    return [generator.bit_generator.state for generator in venv.get_attr("np_random")]


def _generator(state: EnvRngState) -> np.random.Generator:
    bit_generator = getattr(np.random, state["bit_generator"])()
    bit_generator.state = state
    return np.random.Generator(bit_generator)


def set_env_rng_states(venv: VecEnv, states: list[EnvRngState]) -> None:
    """
    Give every sub-env a generator in the given state.

    :param venv: the vectorized env
    :param states: one state per sub-env, as returned by ``get_env_rng_states``
    """
    if len(states) != venv.num_envs:
        raise ValueError(f"env: {len(states)} saved sub-env random states for {venv.num_envs} sub-envs.")
    _set_generators(venv, [_generator(state) for state in states])


def _set_generators(venv: VecEnv, generators: list[np.random.Generator]) -> None:
    # a sampler whose sub-envs live in workers sets them all in one message per worker
    if hasattr(venv, "set_attr_each"):
        venv.set_attr_each("np_random", generators)
        return
    for index, generator in enumerate(generators):
        venv.set_attr("np_random", generator, indices=[index])


def seed_env_rngs(venv: VecEnv, seed: int | None) -> list[EnvRngState]:
    """
    Give every sub-env its own generator, seeded from ``seed`` and the sub-env's index (fresh entropy
    when ``seed`` is None), directly rather than at the next reset, so no later reset reseeds them.

    :return: the generators' states (known here, without asking the sub-envs)
    """
    generators = []
    for index in range(venv.num_envs):
        seed_sequence = np.random.SeedSequence(None if seed is None else [seed, index])
        generators.append(np.random.Generator(np.random.PCG64(seed_sequence)))
    states = [generator.bit_generator.state for generator in generators]
    _set_generators(venv, generators)
    return states


@contextlib.contextmanager
def preserved_global_rng() -> Iterator[None]:
    """Leave Python's, numpy's and torch's global generators as they were before the block."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with th.random.fork_rng(devices=list(range(th.cuda.device_count())) if th.cuda.is_available() else []):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def generator_state(generator: np.random.Generator) -> EnvRngState:
    """:return: a copy of a numpy generator's state"""
    return generator.bit_generator.state


def restore_generator(generator: np.random.Generator, state: EnvRngState) -> None:
    """Put ``generator`` back into ``state`` in place."""
    generator.bit_generator.state = state
