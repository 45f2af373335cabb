"""2-D point-mass navigation (Finn et al. 2017): the classic MAML task family."""

import math
from typing import Any

import gymnasium as gym
import numpy as np

from sb3_metarl.tasks.task_env import TaskEnv


class Navigation2DEnv(TaskEnv):
    """
    A point starts at the origin and moves by its (clipped) action; the reward is minus the
    Euclidean distance to the task's goal after the move. The episode terminates when the point is
    within ``success_radius`` of the goal along both axes; the horizon (100) comes from the
    registration's ``max_episode_steps``.

    Task: the goal, a numpy array of shape (2,), uniform in ``[goal_low, goal_high]^2``.

    :param goal_low: lower bound of the goal distribution (both coordinates)
    :param goal_high: upper bound of the goal distribution (both coordinates)
    :param action_limit: actions are clipped to ``[-action_limit, action_limit]``
    :param success_radius: termination threshold on each coordinate's distance to the goal
    """

    def __init__(
        self, goal_low: float = -0.5, goal_high: float = 0.5, action_limit: float = 0.1, success_radius: float = 0.01
    ):
        super().__init__()
        self.goal_low, self.goal_high = float(goal_low), float(goal_high)
        self.success_radius = success_radius
        self.action_limit = float(action_limit)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(2,), dtype=np.float32)
        self.action_space = gym.spaces.Box(-action_limit, action_limit, shape=(2,), dtype=np.float32)
        self._goal = np.zeros(2)
        self._position = np.zeros(2)

    def sample_tasks(self, n: int, rng: np.random.Generator | None = None) -> list[np.ndarray]:
        rng = self.np_random if rng is None else rng
        return [rng.uniform(self.goal_low, self.goal_high, size=2) for _ in range(n)]

    def _validate_and_set(self, task: Any) -> None:
        goal = np.asarray(task, dtype=np.float64)
        if goal.shape != (2,) or not np.all((goal >= self.goal_low) & (goal <= self.goal_high)):
            raise ValueError(
                f"Navigation2D: task must be a goal of shape (2,) inside [{self.goal_low}, {self.goal_high}]^2, got {task!r}."
            )
        self._goal = goal

    def get_task(self) -> np.ndarray:
        return self._goal.copy()

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._position = np.zeros(2)
        return self._position.astype(np.float32), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        if not self.task_is_set:
            self.require_task()
        # Scalar arithmetic: numpy calls on 2-element arrays cost more than the maths (this is the hot loop).
        limit = self.action_limit
        x = self._position[0] + min(max(float(action[0]), -limit), limit)
        y = self._position[1] + min(max(float(action[1]), -limit), limit)
        self._position = np.array([x, y])
        dx, dy = x - self._goal[0], y - self._goal[1]
        terminated = bool(abs(dx) < self.success_radius and abs(dy) < self.success_radius)
        return self._position.astype(np.float32), -math.hypot(dx, dy), terminated, False, {}
