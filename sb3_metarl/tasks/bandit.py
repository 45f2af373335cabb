"""One-step Gaussian bandit: the problem on which the meta-gradient has a path-wise reference."""

from typing import Any

import gymnasium as gym
import numpy as np

from sb3_metarl.tasks.task_env import TaskEnv, numeric_task


class GaussianBanditEnv(TaskEnv):
    """
    One-step episodes with a constant (zero) observation; the reward of action ``a`` is
    ``-(a - g)^2`` for the task's target ``g``. With a Gaussian policy N(mu, sigma^2) the value is
    ``-(mu - g)^2 - sigma^2`` in closed form (see :mod:`sb3_metarl.estimators.exact`).

    Task: the target ``g``, a float uniform in ``[task_low, task_high]``.
    The observation is zero so that a linear policy's mean is its bias alone.

    :param task_low: lower bound of the target distribution
    :param task_high: upper bound of the target distribution
    :param action_limit: the action space is ``[-action_limit, action_limit]`` (wide, so that
        clipping never matters for policies near the targets)
    """

    def __init__(self, task_low: float = -1.0, task_high: float = 1.0, action_limit: float = 10.0):
        super().__init__()
        self.task_low, self.task_high = float(task_low), float(task_high)
        self.observation_space = gym.spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)
        self.action_space = gym.spaces.Box(-action_limit, action_limit, shape=(1,), dtype=np.float32)
        self._target = 0.0

    def sample_tasks(self, n: int, rng: np.random.Generator | None = None) -> list[float]:
        rng = self.np_random if rng is None else rng
        return [float(g) for g in rng.uniform(self.task_low, self.task_high, size=n)]

    def _validate_and_set(self, task: Any) -> None:
        target = float(numeric_task(self, task, f"a target in [{self.task_low}, {self.task_high}]"))
        if not self.task_low <= target <= self.task_high:
            raise ValueError(f"GaussianBandit: task must be a target in [{self.task_low}, {self.task_high}], got {task!r}.")
        self._target = target

    def get_task(self) -> float:
        return self._target

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        return np.zeros(1, dtype=np.float32), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        self.require_task()
        reward = -float((np.asarray(action, dtype=np.float64).reshape(()) - self._target) ** 2)
        return np.zeros(1, dtype=np.float32), reward, True, False, {}
