"""2-D point-mass navigation (Finn et al. 2017): the classic MAML task family."""

import math
from typing import Any

import gymnasium as gym
import numpy as np

from sb3_metarl.tasks.task_env import SteppedAtOnce, TaskEnv, numeric_task


class Navigation2DEnv(TaskEnv):
    """
    A point starts at the origin and moves by its (clipped) action; the reward is minus the
    Euclidean distance to the task's goal after the move. The episode terminates when the point is
    within ``success_radius`` of the goal along both axes; the horizon (100) comes from the
    registration's ``max_episode_steps``.

    Task: the goal, a numpy array of shape (2,), uniform in ``[goal_low, goal_high]^2``.

    SG-MRL's point env (kristian-georgiev/SGMRL, ``maml_zoo/envs/point_envs/point_env_2d_v2.py`` under ProMP's
    ``normalize``) is ``position_limit=0.5, action_scale=10``: the same reward, goals and termination, the position
    clipped to [-0.5, 0.5]^2 after each move, and the policy acting in [-10, 10], mapped linearly onto +-0.1.

    :param goal_low: lower bound of the goal distribution (both coordinates)
    :param goal_high: upper bound of the goal distribution (both coordinates)
    :param action_limit: the move per step is clipped to ``[-action_limit, action_limit]`` per coordinate
    :param success_radius: termination threshold on each coordinate's distance to the goal
    :param position_limit: None (default): the plane is unbounded; a number: the position is clipped to
        ``[-position_limit, position_limit]^2`` after each move
    :param action_scale: s (default 1): the action space is ``[-s * action_limit, ...]`` scaled back, i.e. for s != 1
        the policy acts in [-s, s], mapped linearly onto ``[-action_limit, action_limit]`` (as ProMP's normalized envs)
    """

    def __init__(
        self,
        goal_low: float = -0.5,
        goal_high: float = 0.5,
        action_limit: float = 0.1,
        success_radius: float = 0.01,
        position_limit: float | None = None,
        action_scale: float = 1.0,
    ):
        super().__init__()
        if position_limit is not None and not (isinstance(position_limit, (int, float)) and 0 < position_limit < np.inf):
            raise ValueError(f"position_limit: must be None or a finite number > 0, got {position_limit!r}.")
        if isinstance(action_scale, bool) or not isinstance(action_scale, (int, float)) or not 0 < action_scale < np.inf:
            raise ValueError(f"action_scale: must be a finite number > 0, got {action_scale!r}.")
        self.goal_low, self.goal_high = float(goal_low), float(goal_high)
        self.success_radius = success_radius
        self.action_limit = float(action_limit)
        self.position_limit = None if position_limit is None else float(position_limit)
        self.action_scale = float(action_scale)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(2,), dtype=np.float32)
        high = action_limit if action_scale == 1.0 else action_scale
        self.action_space = gym.spaces.Box(-high, high, shape=(2,), dtype=np.float32)
        self._goal = np.zeros(2)
        self._position = np.zeros(2)

    def sample_tasks(self, n: int, rng: np.random.Generator | None = None) -> list[np.ndarray]:
        rng = self.np_random if rng is None else rng
        return [rng.uniform(self.goal_low, self.goal_high, size=2) for _ in range(n)]

    def _validate_and_set(self, task: Any) -> None:
        goal = numeric_task(self, task, f"a goal inside [{self.goal_low}, {self.goal_high}]^2", (2,))
        if not np.all((goal >= self.goal_low) & (goal <= self.goal_high)):
            raise ValueError(
                f"Navigation2D: task must be a goal of shape (2,) inside [{self.goal_low}, {self.goal_high}]^2, got {task!r}."
            )
        self._goal[:] = goal  # (in place: the batched twin may hold this array as a row of its own)

    def get_task(self) -> np.ndarray:
        return self._goal.copy()

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._position[:] = 0.0  # (in place, as every write of the position: see ``BatchedNavigation``)
        return self._position.astype(np.float32), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        if not self.task_is_set:
            self.require_task()
        # Scalar arithmetic: numpy calls on 2-element arrays cost more than the maths (this is the hot loop).
        limit, scale = self.action_limit, self.action_scale
        move_x, move_y = float(action[0]), float(action[1])
        if scale != 1.0:  # ProMP's normalize: low + (a + s) (high - low) / 2s
            move_x = -limit + (move_x + scale) * (2 * limit) / (2 * scale)
            move_y = -limit + (move_y + scale) * (2 * limit) / (2 * scale)
        x = self._position[0] + min(max(move_x, -limit), limit)
        y = self._position[1] + min(max(move_y, -limit), limit)
        if self.position_limit is not None:
            bound = self.position_limit
            x, y = min(max(x, -bound), bound), min(max(y, -bound), bound)
        self._position[0], self._position[1] = x, y
        dx, dy = x - self._goal[0], y - self._goal[1]
        terminated = bool(abs(dx) < self.success_radius and abs(dy) < self.success_radius)
        return self._position.astype(np.float32), -math.hypot(dx, dy), terminated, False, {}


class BatchedNavigation(SteppedAtOnce):
    """
    Sub-envs of Navigation2D stepped as arrays: the moves, clips, distances and terminations of all stepped rows in a
    few numpy operations, each in the per-env ``step``'s float64 arithmetic, in its order, so that the results are its
    own bit for bit (tested over resets, clips and terminations). Each sub-env's position and goal are rows of the
    twin's arrays (the env writes them in place), so its own ``step``, ``reset``, ``set_task`` and pickling go on as
    before and see the twin's steps. The
    distance is ``math.hypot`` per row, as the per-env step computes it (numpy's ``hypot`` may round differently).
    Nothing runs on other threads: ``start`` steps at once (the interface of the MuJoCo twins,
    ``sb3_metarl.tasks.mujoco.batched``; ``sb3_metarl.tasks.twins.batched_stepper`` returns this twin for Navigation2D).

    :param envs: the unwrapped sub-envs (all ``Navigation2DEnv``; each keeps its own arguments)
    :param num_threads: (the MuJoCo twins' argument; unused)
    :param compiled: (the MuJoCo twins' argument; unused)
    """

    family = Navigation2DEnv

    def __init__(self, envs: list[Any], num_threads: int = 1, compiled: bool | None = None):
        super().__init__(envs)
        first = self.envs[0]
        #: per sub-env: action limit, action scale, position limit (inf: none), success radius
        self.settings = np.array(
            [[env.action_limit, env.action_scale, env.position_limit or np.inf, env.success_radius] for env in self.envs]
        )
        #: those four as Python floats where every sub-env has the same, else None
        self.uniform = tuple(self.settings[0].tolist()) if (self.settings == self.settings[0]).all() else None
        self.dtype = first.observation_space.dtype
        # every sub-env's position and goal become rows of the twin's arrays (the env writes them in place), so a step
        # reads and writes all rows at once, and the env's own step, reset and set_task see and make the same state
        self.positions = np.array([env._position for env in self.envs], dtype=np.float64)
        self.goals = np.array([env._goal for env in self.envs], dtype=np.float64)
        for row, env in enumerate(self.envs):
            env._position, env._goal = self.positions[row], self.goals[row]

    def step(self, indices: np.ndarray, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict]]:
        """
        Step the sub-envs ``indices`` with ``actions``, as ``env.step`` would one by one.

        :return: observations (n, 2), rewards (n,) float64, terminated (n,) bool, infos (one empty dict per row)
        """
        rows = [int(index) for index in np.asarray(indices)]
        envs = [self.envs[index] for index in rows]
        moves = np.array(actions, dtype=np.float64)  # float32 -> float64 is exact, as float(action[i]) in the step
        if moves.shape != (len(rows), 2):
            raise ValueError(f"actions: expected shape ({len(rows)}, 2), one row per stepped sub-env, got {moves.shape}.")
        if not all(env.task_is_set for env in envs):
            for env in envs:
                env.require_task()
        if self.uniform is not None:
            limit, scale, bound, radius = self.uniform
        else:  # per row, as columns that broadcast over the two coordinates (the radius over the rows)
            limit, scale, bound = (self.settings[rows, column][:, None] for column in range(3))
            radius = self.settings[rows, 3]
        if np.any(scale != 1.0):  # ProMP's normalize, as the step computes it: low + (a + s) (high - low) / 2s
            scaled = -limit + (moves + scale) * (2 * limit) / (2 * scale)
            moves = np.where(scale != 1.0, scaled, moves)
        positions = self.positions[rows] + np.minimum(np.maximum(moves, -limit), limit)
        positions = np.minimum(np.maximum(positions, -bound), bound)  # (no clip where the bound is inf: the same value)
        offsets = positions - self.goals[rows]
        rewards = np.array([-math.hypot(dx, dy) for dx, dy in offsets.tolist()])
        terminated = (np.abs(offsets[:, 0]) < radius) & (np.abs(offsets[:, 1]) < radius)
        self.positions[rows] = positions
        return positions.astype(self.dtype), rewards, terminated, [{} for _ in rows]
