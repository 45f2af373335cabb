"""The task-aware env protocol shared by the built-in task families."""

from typing import Any

import gymnasium as gym


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

    def set_task(self, task: Any) -> None:
        """
        :param task: the new task; checked against the task distribution
        """
        self._validate_and_set(task)

    def _validate_and_set(self, task: Any) -> None:
        raise NotImplementedError

    def sample_tasks(self, n: int, rng: Any = None) -> list[Any]:
        raise NotImplementedError

    def get_task(self) -> Any:
        raise NotImplementedError
