"""Task samplers: where the tasks of a meta-iteration come from."""

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
from stable_baselines3.common.vec_env import VecEnv


class TaskSampler(ABC):
    """
    A distribution over tasks. ``sample(n, rng)`` draws ``n`` tasks using the given generator,
    so that the algorithm's seed fixes the task sequence.
    """

    @abstractmethod
    def sample(self, n: int, rng: np.random.Generator) -> list[Any]:
        """
        :param n: number of tasks to draw
        :param rng: random generator owned by the caller
        :return: a list of ``n`` tasks, each accepted by the env's ``set_task``
        """


class FixedTaskSampler(TaskSampler):
    """
    Draws uniformly (with replacement) from a fixed, finite list of tasks.

    :param tasks: the tasks to draw from
    :param cycle: if True, return the tasks in order (cycling) instead of at random,
        which is what an exact-reference comparison on a known task set wants
    """

    def __init__(self, tasks: Sequence[Any], cycle: bool = False):
        if len(tasks) == 0:
            raise ValueError("FixedTaskSampler: `tasks` is empty; give at least one task.")
        self.tasks = list(tasks)
        self.cycle = cycle

    def sample(self, n: int, rng: np.random.Generator) -> list[Any]:
        if self.cycle:
            return [self.tasks[i % len(self.tasks)] for i in range(n)]
        return [self.tasks[i] for i in rng.integers(len(self.tasks), size=n)]


class EnvTaskSampler(TaskSampler):
    """
    The env's own task distribution: calls ``env.unwrapped.sample_tasks(n)`` on the first sub-env.

    The env receives a fresh ``np.random.Generator`` seeded from the caller's generator when its
    ``sample_tasks`` accepts an ``rng`` argument, so sampling stays deterministic even when the env
    lives in another process (``SubprocVecEnv``).

    :param env: a vectorized env whose sub-envs implement ``sample_tasks``
    """

    def __init__(self, env: VecEnv):
        if not env.has_attr("sample_tasks"):
            raise ValueError(
                "EnvTaskSampler: the env has no `sample_tasks(n)` method on `env.unwrapped`; "
                "pass `task_sampler=FixedTaskSampler([...])` or your own TaskSampler."
            )
        self.env = env
        self.accepts_rng = True

    def sample(self, n: int, rng: np.random.Generator) -> list[Any]:
        child = np.random.default_rng(int(rng.integers(2**63)))
        if self.accepts_rng:
            try:
                return list(self.env.env_method("sample_tasks", n, rng=child, indices=[0])[0])
            except TypeError as error:
                if "rng" not in str(error):
                    raise
                # An env whose ``sample_tasks(n)`` takes no generator: it uses its own seeded RNG.
                self.accepts_rng = False
        return list(self.env.env_method("sample_tasks", n, indices=[0])[0])

    def __getstate__(self) -> dict:
        # The env is not saved with the model; it is re-attached by ``set_env``.
        state = self.__dict__.copy()
        state["env"] = None
        return state
