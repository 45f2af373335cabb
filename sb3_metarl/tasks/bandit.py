"""One-step Gaussian bandit: the problem on which the meta-gradient has a path-wise reference."""

from typing import Any

import gymnasium as gym
import numpy as np

from sb3_metarl.tasks.task_env import SteppedAtOnce, TaskEnv, numeric_task


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


class BatchedGaussianBandit(SteppedAtOnce):
    """
    Sub-envs of the Gaussian bandit stepped together: each row's reward in the per-env step's own scalar float64
    arithmetic (numpy's vectorized square rounds differently from its scalar power), without the per-env call, the
    observation allocation and the wrappers' bookkeeping.

    :param envs: the unwrapped sub-envs (all ``GaussianBanditEnv``)
    :param num_threads: (the MuJoCo twins' argument; unused)
    :param compiled: (the MuJoCo twins' argument; unused)
    """

    family = GaussianBanditEnv



    def step(self, indices: np.ndarray, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict]]:
        """
        Step the sub-envs ``indices`` with ``actions``, as ``env.step`` would one by one.

        :return: observations (n, 1) of zeros, rewards (n,) float64, terminated (n,) bool (always), infos (empty dicts)
        """
        rows = np.asarray(indices).tolist()
        values = np.asarray(actions, dtype=np.float64).reshape(len(rows), -1)
        if values.shape[1] != 1:
            raise ValueError(f"actions: expected one action per stepped sub-env ({len(rows)}), got shape {np.shape(actions)}.")
        envs = [self.envs[row] for row in rows]
        for env in envs:
            env.require_task()
        rewards = np.array([-float((value - env.get_task()) ** 2) for value, env in zip(values[:, 0], envs)])
        n = len(rows)
        return np.zeros((n, 1), dtype=np.float32), rewards, np.ones(n, dtype=bool), [{} for _ in range(n)]
