"""The task-aware env protocol shared by the built-in task families."""

from typing import Any

import gymnasium as gym
import numpy as np


def numeric_task(env: Any, task: Any, expected: str, shape: tuple[int, ...] = ()) -> np.ndarray:
    """
    :param env: the env (its class names the error)
    :param task: the task given to ``set_task``
    :param expected: what a task of the family is, for the error (e.g. "a target velocity in [0.0, 2.0]")
    :param shape: the task's shape (``()``: one number)
    :return: ``task`` as a float64 array of ``shape`` with finite entries
    :raises ValueError: naming the env and what a task is, for anything else (None, a string, a list of the wrong
        length, NaN)
    """
    try:
        value = None if isinstance(task, (str, bytes)) else np.asarray(task, dtype=np.float64)
    except (TypeError, ValueError):
        value = None
    if value is None or value.shape != shape or not np.all(np.isfinite(value)):
        what = "one finite number" if shape == () else f"finite numbers of shape {shape}"
        raise ValueError(f"{type(env).__name__}: task must be {expected} ({what}), got {task!r}.")
    return value


class TaskEnv(gym.Env):
    """
    Base class of the built-in task families. A task-aware env exposes, on ``env.unwrapped``:

    - ``set_task(task)``: switch to ``task`` (takes effect from the next ``reset``; the built-in
      envs apply it immediately), raising ``ValueError`` for a task outside the distribution;
    - ``sample_tasks(n, rng=None)``: ``n`` tasks from the family's distribution, drawn with ``rng``
      (a ``np.random.Generator``) when given;
    - ``get_task()``: the current task.

    Tasks are plain picklable values (floats, numpy arrays), so ``SubprocVecEnv`` works.
    Any env with a ``set_task`` method works with ``MetaPolicyGradient``; subclassing is optional.
    """

    #: True once ``set_task`` was called: the built-in families refuse to step before (their default task is a
    #: placeholder: Navigation2D's goal is the start point, so any policy would look perfect)
    task_is_set: bool = False

    def set_task(self, task: Any) -> None:
        """
        :param task: the new task; checked against the task distribution
        """
        self._validate_and_set(task)
        self.task_is_set = True

    def require_task(self) -> None:
        """:raises RuntimeError: if no task was set (called by the built-in families' ``step``)"""
        if not self.task_is_set:
            raise RuntimeError(
                f"{type(self).__name__}: no task is set, so step() has nothing to reward; call "
                "env.unwrapped.set_task(task) first (tasks from env.unwrapped.sample_tasks(n)). To score a meta-trained "
                "model, adapt it first: model.evaluate_adaptation(...) or sb3_metarl.MetaEvalCallback (SB3's "
                "evaluate_policy and EvalCallback would score one placeholder task without adaptation)."
            )

    def _validate_and_set(self, task: Any) -> None:
        raise NotImplementedError

    def sample_tasks(self, n: int, rng: Any = None) -> list[Any]:
        raise NotImplementedError

    def get_task(self) -> Any:
        raise NotImplementedError


class SteppedAtOnce:
    """
    The start / finish interface of the batched twins (``sb3_metarl.tasks.twins``) for a twin whose step runs at once
    in the caller's thread (nothing beside it: the sampler's two lanes are for the MuJoCo twins' physics threads).
    A subclass names the env class it twins (``family``) and steps rows of its sub-envs in :meth:`step`.

    :param envs: the unwrapped sub-envs (all of ``family``; each keeps its own arguments and task)
    :param num_threads: (the MuJoCo twins' argument; unused)
    :param compiled: (the MuJoCo twins' argument; unused)
    """

    #: the env class this twin steps exactly (a subclass may step otherwise: it keeps its own step)
    family: type
    #: no physics runs beside the caller
    overlaps = False
    #: no compiled loop
    kernel = None

    def __init__(self, envs: list[Any], num_threads: int = 1, compiled: bool | None = None):
        self.envs = list(envs)

    @classmethod
    def supports(cls, env: Any) -> bool:
        """:return: whether ``env`` (unwrapped) is of the family this twin steps exactly"""
        return type(env) is cls.family

    def step(self, indices: np.ndarray, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, Any]:
        """:return: the stepped rows' observations, rewards (float64), terminations and infos"""
        raise NotImplementedError

    def start(self, indices: np.ndarray, actions: np.ndarray) -> Any:
        """Step at once; :meth:`finish` returns the outcome."""
        return (np.asarray(indices), self.step(indices, actions))

    def wait(self, pending: Any) -> None:
        """Nothing runs after :meth:`start`."""

    def finish(self, pending: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, Any]:
        """:return: the outcome of the step ``pending``"""
        return pending[1]

    def close(self) -> None:
        """No threads to stop."""
