"""
MuJoCo locomotion task families on Gymnasium's v5 environments.

Each family subclasses the Gymnasium env, so ``set_task`` lives on ``env.unwrapped``. The reward
is recomputed from the base env's ``info`` terms: the task term replaces the forward reward, and the
base env's own control cost (and, where it has them, contact cost and alive bonus) is kept.
``info["reward_task"]`` holds the task term. ``action_scale=s`` (every family) lets the policy act in
[-s, s] per dimension, mapped linearly onto the actuators' range, as rllab's, ProMP's and pytorch-maml-rl's
normalized envs do (scale 10 in all three).
"""

import dataclasses
import re
from typing import Any

import gymnasium as gym
import mujoco
import numpy as np
from gymnasium import spaces
from gymnasium.envs.mujoco.ant_v5 import AntEnv
from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv
from gymnasium.envs.mujoco.hopper_v5 import HopperEnv
from gymnasium.envs.mujoco.swimmer_v5 import SwimmerEnv
from gymnasium.envs.mujoco.walker2d_v5 import Walker2dEnv

from sb3_metarl.tasks.task_env import TaskEnv, numeric_task

#: base-env reward terms kept next to the task term
CONTROL_TERMS = ("reward_ctrl",)
ANT_TERMS = ("reward_ctrl", "reward_contact", "reward_survive")
WALKER_TERMS = ("reward_ctrl", "reward_survive")


_TOTAL_MASS = re.compile(r'\s+settotalmass="([^"]+)"')


@dataclasses.dataclass(frozen=True)
class BaseEnvSettings:
    """
    A Gymnasium MuJoCo env's reward, termination and observation settings: its constructor's arguments, which
    Gymnasium keeps under private names (read here, in one place: the batched twin computes with them). None where
    the env has no such setting.
    """

    forward_reward_weight: float
    ctrl_cost_weight: float
    exclude_current_positions: bool
    healthy_reward: float | None
    terminate_when_unhealthy: bool | None
    healthy_z_range: tuple[float, float] | None
    healthy_angle_range: tuple[float, float] | None
    healthy_state_range: tuple[float, float] | None
    main_body: Any
    contact_cost_weight: float | None
    contact_force_range: tuple[float, float] | None
    include_cfrc_ext: bool | None

    @classmethod
    def of(cls, env: gym.Env) -> "BaseEnvSettings":
        """:return: the settings of ``env`` (a Gymnasium v5 MuJoCo env, unwrapped)"""
        names = [field.name for field in dataclasses.fields(cls)]
        private = {"exclude_current_positions": "exclude_current_positions_from_observation",
                   "include_cfrc_ext": "include_cfrc_ext_in_observation"}  # fmt: skip
        return cls(**{name: getattr(env, "_" + private.get(name, name), None) for name in names})


class ModelLoading:
    """
    Loads the base env's XML as Gymnasium does, except that a ``settotalmass`` compiler attribute
    (HalfCheetah's; deprecated in MuJoCo 4, which prints a warning per model load, i.e. per sub-env) is
    applied after compilation with ``mj_setTotalmass`` and ``mj_setConst``: the same masses,
    inertias and constants bit for bit (tested), without the warning.
    """

    fullpath: str
    width: int
    height: int

    def _initialize_simulation(self) -> tuple[mujoco.MjModel, mujoco.MjData]:
        with open(self.fullpath) as handle:
            xml = handle.read()
        match = _TOTAL_MASS.search(xml)
        if match is None:
            return super()._initialize_simulation()  # type: ignore[misc]
        model = mujoco.MjModel.from_xml_string(xml.replace(match.group(0), ""))
        data = mujoco.MjData(model)
        mujoco.mj_setTotalmass(model, float(match.group(1)))
        mujoco.mj_setConst(model, data)
        model.vis.global_.offwidth = max(model.vis.global_.offwidth, self.width)
        model.vis.global_.offheight = max(model.vis.global_.offheight, self.height)
        return model, mujoco.MjData(model)


class ScaledActions:
    """
    ``action_scale=s``: the action space is [-s, s] per dimension, mapped linearly onto the actuators' control
    range (``low + (a + s) (high - low) / 2s``, then clipped to it) before the base env steps, so the control cost
    is charged on the actuators' controls. The meta-RL papers' envs act this way with s = 10 (rllab's, ProMP's and
    pytorch-maml-rl's ``normalization_scale``): an initial policy with standard deviation 1 then moves the
    actuators by 0.1 of their half-range, where with s = 1 it saturates them at random and the inner gradient of
    HalfCheetahDir at N = 20 episodes is almost pure noise (see ``docs/results/reproduce_published.md``).

    :param action_scale: s > 0 (1: the actuators' own range, Gymnasium's)
    """

    action_scale = 1.0

    def __init__(self, *args: Any, action_scale: float = 1.0, **kwargs: Any):
        if isinstance(action_scale, bool) or not isinstance(action_scale, (int, float)) or not 0 < action_scale < np.inf:
            raise ValueError(f"action_scale: must be a finite number > 0, got {action_scale!r}.")
        super().__init__(*args, **kwargs)
        if action_scale != 1.0:
            # Gymnasium's EzPickle rebuilds the env from its constructor arguments (copies, pickles)
            self._ezpickle_kwargs = {**self._ezpickle_kwargs, "action_scale": action_scale}
            self.action_scale = float(action_scale)
            #: the actuators' control range, which [-s, s] is mapped onto
            self.control_low, self.control_high = self.action_space.low.copy(), self.action_space.high.copy()
            shape, dtype = self.action_space.shape, self.action_space.dtype
            self.action_space = spaces.Box(-self.action_scale, self.action_scale, shape, dtype)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        if self.action_scale != 1.0:
            low, high, scale = self.control_low, self.control_high, self.action_scale
            action = np.clip(low + (np.asarray(action) + scale) * (high - low) / (2 * scale), low, high)
        return super().step(action)  # type: ignore[misc]


class TaskReward(ScaledActions, ModelLoading, TaskEnv):
    """Replaces the base env's forward reward by a task term computed from ``info``."""

    kept_terms: tuple[str, ...] = CONTROL_TERMS

    def _task_reward(self, info: dict[str, Any]) -> float:
        raise NotImplementedError

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        self.require_task()
        obs, _, terminated, truncated, info = super().step(action)
        info["reward_task"] = self._task_reward(info)
        reward = info["reward_task"] + sum(float(info[term]) for term in self.kept_terms)
        return obs, reward, terminated, truncated, info


class TargetVelocity(TaskReward):
    """
    Task: a target forward velocity ``v*``, uniform in ``velocity_range``; task term ``-|v_x - v*|``.

    :param velocity_range: (low, high) of the target velocity (default: the family's; e.g. SG-MRL's
        HalfCheetah Rand Vel draws from U[0, 3], MAML's from U[0, 2])
    :param deviation_sign: -1 (default): the task term is ``-|v_x - v*|``, the target tracked; +1: ``+|v_x - v*|``,
        the deviation rewarded, as maml_zoo's ``SwimmerRandVelEnv`` computes it (ProMP's and SG-MRL's code,
        ``maml_zoo/envs/mujoco_envs/swimmer_rand_vel.py:36``), the env behind SG-MRL's positive Swimmer returns
    :param kwargs: passed to the Gymnasium env (e.g. ``ctrl_cost_weight=0.05``, rllab's control cost)
    """

    velocity_range: tuple[float, float] = (0.0, 2.0)
    deviation_sign = -1
    _target = 1.0

    def __init__(
        self, *args: Any, velocity_range: tuple[float, float] | None = None, deviation_sign: int = -1, **kwargs: Any
    ):
        if isinstance(deviation_sign, bool) or deviation_sign not in (-1, 1):
            raise ValueError(f"deviation_sign: must be -1 (track the target velocity) or +1, got {deviation_sign!r}.")
        super().__init__(*args, **kwargs)
        if deviation_sign != -1:
            self._ezpickle_kwargs = {**self._ezpickle_kwargs, "deviation_sign": deviation_sign}
            self.deviation_sign = int(deviation_sign)
        if velocity_range is not None:
            # Gymnasium's EzPickle rebuilds the env from its constructor arguments (copies, pickles)
            self._ezpickle_kwargs = {**self._ezpickle_kwargs, "velocity_range": velocity_range}
            try:
                bounds = np.asarray(velocity_range, dtype=np.float64)
            except (TypeError, ValueError):
                bounds = np.full(1, np.nan)
            if bounds.shape != (2,) or not np.all(np.isfinite(bounds)) or not bounds[0] <= bounds[1]:
                raise ValueError(f"velocity_range: must be finite (low, high) with low <= high, got {velocity_range!r}.")
            low, high = float(bounds[0]), float(bounds[1])
            self.velocity_range = (low, high)
            self._target = (low + high) / 2

    def sample_tasks(self, n: int, rng: np.random.Generator | None = None) -> list[float]:
        rng = self.np_random if rng is None else rng
        return [float(v) for v in rng.uniform(*self.velocity_range, size=n)]

    def _validate_and_set(self, task: Any) -> None:
        low, high = self.velocity_range
        target = float(numeric_task(self, task, f"a target velocity in [{low}, {high}]"))
        if not low <= target <= high:
            raise ValueError(f"{type(self).__name__}: task must be a target velocity in [{low}, {high}], got {task!r}.")
        self._target = target

    def get_task(self) -> float:
        return self._target

    def _task_reward(self, info: dict[str, Any]) -> float:
        deviation = abs(float(info["x_velocity"]) - self._target)
        return -deviation if self.deviation_sign < 0 else deviation


class Direction(TaskReward):
    """Task: a direction, +1 (forward) or -1 (backward), equally likely; task term ``direction * v_x``."""

    _direction = 1.0

    def sample_tasks(self, n: int, rng: np.random.Generator | None = None) -> list[float]:
        rng = self.np_random if rng is None else rng
        return [float(d) for d in rng.choice([-1.0, 1.0], size=n)]

    def _validate_and_set(self, task: Any) -> None:
        direction = float(numeric_task(self, task, "a direction, 1.0 or -1.0"))
        if direction not in (-1.0, 1.0):
            raise ValueError(f"{type(self).__name__}: task must be a direction, 1.0 or -1.0, got {task!r}.")
        self._direction = direction

    def get_task(self) -> float:
        return self._direction

    def _task_reward(self, info: dict[str, Any]) -> float:
        return self._direction * float(info["x_velocity"])


class HalfCheetahVelEnv(TargetVelocity, HalfCheetahEnv):
    """HalfCheetah-v5; task: target velocity ~ U[0, 2] (Finn et al. 2017); reward ``-|v_x - v*| - ctrl cost``."""


class HalfCheetahDirEnv(Direction, HalfCheetahEnv):
    """HalfCheetah-v5; task: direction +-1 (Finn et al. 2017); reward ``direction * v_x - ctrl cost``."""


class AntVelEnv(TargetVelocity, AntEnv):
    """Ant-v5; task: target velocity ~ U[0, 3]; reward ``-|v_x - v*|`` plus Ant's ctrl, contact and alive terms."""

    velocity_range = (0.0, 3.0)
    _target = 1.5
    kept_terms = ANT_TERMS


class AntDirEnv(Direction, AntEnv):
    """Ant-v5; task: direction +-1 along x; reward ``direction * v_x`` plus Ant's ctrl, contact and alive terms."""

    kept_terms = ANT_TERMS


class AntDir2DEnv(TaskReward, AntEnv):
    """
    Ant-v5; task: a direction in the plane, the angle phi ~ U[0, 2 pi); task term
    ``cos(phi) v_x + sin(phi) v_y``, plus Ant's ctrl, contact and alive terms.
    """

    kept_terms = ANT_TERMS
    _angle = 0.0

    def sample_tasks(self, n: int, rng: np.random.Generator | None = None) -> list[float]:
        rng = self.np_random if rng is None else rng
        return [float(a) for a in rng.uniform(0.0, 2 * np.pi, size=n)]

    def _validate_and_set(self, task: Any) -> None:
        angle = float(numeric_task(self, task, "an angle in [0, 2 pi)"))
        if not 0.0 <= angle < 2 * np.pi:
            raise ValueError(f"AntDir2DEnv: task must be an angle in [0, 2 pi), got {task!r}.")
        self._angle = angle

    def get_task(self) -> float:
        return self._angle

    def _task_reward(self, info: dict[str, Any]) -> float:
        return float(np.cos(self._angle) * info["x_velocity"] + np.sin(self._angle) * info["y_velocity"])


class AntGoalEnv(TaskReward, AntEnv):
    """
    Ant-v5 with its (x, y) position in the observation; task: a goal uniform in the disc of radius
    ``goal_radius`` (3); task term ``-|(x, y) - goal|`` (Euclidean), plus Ant's ctrl, contact and alive terms.

    :param goal_radius: radius of the goal disc
    :param kwargs: passed to Gymnasium's ``AntEnv``
    """

    kept_terms = ANT_TERMS

    def __init__(self, *args: Any, goal_radius: float = 3.0, **kwargs: Any):
        if not args:  # (a copy or unpickling rebuilds the env from AntEnv's positional arguments, this one included)
            kwargs.setdefault("exclude_current_positions_from_observation", False)
        super().__init__(*args, **kwargs)
        if goal_radius != 3.0:
            self._ezpickle_kwargs = {**self._ezpickle_kwargs, "goal_radius": goal_radius}
        self.goal_radius = goal_radius
        self._goal = np.zeros(2)

    def sample_tasks(self, n: int, rng: np.random.Generator | None = None) -> list[np.ndarray]:
        rng = self.np_random if rng is None else rng
        radius = self.goal_radius * np.sqrt(rng.uniform(size=n))  # uniform over the disc's area
        angle = rng.uniform(0.0, 2 * np.pi, size=n)
        return [np.array([r * np.cos(a), r * np.sin(a)]) for r, a in zip(radius, angle)]

    def _validate_and_set(self, task: Any) -> None:
        goal = numeric_task(self, task, f"a goal within radius {self.goal_radius}", (2,))
        if np.linalg.norm(goal) > self.goal_radius + 1e-9:
            raise ValueError(f"AntGoalEnv: task must be a goal of shape (2,) within radius {self.goal_radius}, got {task!r}.")
        self._goal = goal

    def get_task(self) -> np.ndarray:
        return self._goal.copy()

    def _task_reward(self, info: dict[str, Any]) -> float:
        return -float(np.hypot(info["x_position"] - self._goal[0], info["y_position"] - self._goal[1]))


class Walker2dVelEnv(TargetVelocity, Walker2dEnv):
    """Walker2d-v5; task: target velocity ~ U[0, 2]; reward ``-|v_x - v*|`` plus Walker's ctrl and alive terms."""

    kept_terms = WALKER_TERMS


class SwimmerVelEnv(TargetVelocity, SwimmerEnv):
    """Swimmer-v5; task: target velocity ~ U[0, 0.5]; reward ``-|v_x - v*| - ctrl cost``."""

    velocity_range = (0.0, 0.5)
    _target = 0.25


class RandomParameters(ScaledActions, TaskEnv):
    """
    Task: multiplicative factors on the compiled model's body masses, body inertias, joint damping
    and geom friction, each ``1.5 ** u`` with ``u ~ U[-log_scale_limit, log_scale_limit]`` per element
    (the rand_param_envs distribution of ProMP, limit 3). The reward is the base env's. The originals
    are stored once, and every ``set_task`` writes original x factor, so setting all-one factors
    restores the model exactly.
    """

    parameter_names = ("body_mass", "body_inertia", "dof_damping", "geom_friction")
    log_scale_limit = 3.0

    def _originals(self) -> dict[str, np.ndarray]:
        if not hasattr(self, "_original_parameters"):
            self._original_parameters = {name: getattr(self.model, name).copy() for name in self.parameter_names}
        return self._original_parameters

    def sample_tasks(self, n: int, rng: np.random.Generator | None = None) -> list[dict[str, np.ndarray]]:
        rng = self.np_random if rng is None else rng
        limit = self.log_scale_limit
        return [
            {name: 1.5 ** rng.uniform(-limit, limit, size=value.shape) for name, value in self._originals().items()}
            for _ in range(n)
        ]

    def _validate_and_set(self, task: Any) -> None:
        originals = self._originals()
        if not isinstance(task, dict) or not set(task) <= set(originals):
            raise ValueError(f"{type(self).__name__}: task must be a dict with keys among {sorted(originals)}, got {task!r}.")
        bound = 1.5**self.log_scale_limit
        for name, factor in task.items():
            factor = numeric_task(self, factor, f"factors for {name!r}", originals[name].shape)
            if np.any(factor < 1 / bound - 1e-9) or np.any(factor > bound + 1e-9):
                raise ValueError(
                    f"{type(self).__name__}: task[{name!r}] must have shape {originals[name].shape} "
                    f"and factors in [1.5^-{self.log_scale_limit}, 1.5^{self.log_scale_limit}]."
                )
        for name, original in originals.items():
            getattr(self.model, name)[:] = original * np.asarray(task.get(name, 1.0))
        self._task = {name: np.asarray(task.get(name, np.ones_like(o)), dtype=np.float64) for name, o in originals.items()}

    def get_task(self) -> dict[str, np.ndarray]:
        return {name: factor.copy() for name, factor in getattr(self, "_task", {}).items()}


class HopperRandParamsEnv(RandomParameters, HopperEnv):
    """Hopper-v5 with randomized physical parameters (see ``RandomParameters``)."""


class Walker2dRandParamsEnv(RandomParameters, Walker2dEnv):
    """Walker2d-v5 with randomized physical parameters (see ``RandomParameters``)."""
