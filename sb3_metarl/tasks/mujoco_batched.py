"""
The MuJoCo task families stepped together: a batched twin of their per-env ``step``.

``BatchedLocomotion`` steps many sub-envs of a planar family (HalfCheetah, Walker2d, Hopper, Swimmer) in one
call: each sub-env's own ``MjData`` advances by MuJoCo's ``mj_step`` exactly as Gymnasium's ``do_simulation``
does it (the same ``mj_step`` calls on the same data, so the trajectory is the per-env step's, warm start included;
the post-step force pass, ``mj_rnePostConstraint``, only where the family reads its output: Ant),
optionally on a few threads (MuJoCo releases the GIL inside ``mj_step``), and the observations, rewards,
terminations and infos of all of them are computed at once in numpy, with the same operations in the same
floating-point types as the per-env code (Gymnasium's v5 envs, read through their attributes, and this package's
task terms): the results are bit-identical (tested against ``env.step`` over thousands of steps, resets and
falls). It skips the per-env Python work that makes Gymnasium's step slower than MuJoCo's own stepping.
``BatchedAnt`` does the same for the Ant families, contact forces included.
"""

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from typing import Any, overload

import mujoco
import numpy as np
from gymnasium.envs.mujoco.hopper_v5 import HopperEnv
from gymnasium.envs.mujoco.swimmer_v5 import SwimmerEnv
from gymnasium.envs.mujoco.walker2d_v5 import Walker2dEnv

from sb3_metarl.tasks.mujoco import (
    AntDir2DEnv,
    AntDirEnv,
    AntGoalEnv,
    AntVelEnv,
    HalfCheetahDirEnv,
    HalfCheetahVelEnv,
    HopperRandParamsEnv,
    SwimmerVelEnv,
    Walker2dRandParamsEnv,
    Walker2dVelEnv,
    _Direction,
    _TargetVelocity,
)


class RowInfos(Sequence[dict[str, Any]]):
    """
    The infos of one batched step, one dict per stepped sub-env, each built when it is first read (and then kept):
    the sampler reads none of them and a callback few, while building all of them was a tenth of the twin's own time.

    :param n: the number of stepped sub-envs
    :param build: row -> that sub-env's info, as its own ``step`` returns it
    """

    def __init__(self, n: int, build: Callable[[int], dict[str, Any]]):
        self._build = build
        self._rows: list[dict[str, Any] | None] = [None] * n

    def __len__(self) -> int:
        return len(self._rows)

    @overload
    def __getitem__(self, k: int) -> dict[str, Any]: ...

    @overload
    def __getitem__(self, k: slice) -> list[dict[str, Any]]: ...

    def __getitem__(self, k: int | slice) -> dict[str, Any] | list[dict[str, Any]]:
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(len(self)))]
        k = range(len(self))[k]  # a negative row counts from the end; IndexError outside
        row = self._rows[k]
        if row is None:
            row = self._rows[k] = self._build(k)
        return row

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and len(other) == len(self) and all(a == b for a, b in zip(self, other))

    def __repr__(self) -> str:
        return repr(list(self))

    def __reduce__(self) -> tuple[type, tuple[list[dict[str, Any]]]]:
        # pickled (sent to another process, saved by a callback) as the plain list of its dicts
        return list, (list(self),)


class _BatchedMujoco:
    """
    What every twin shares: each sub-env's own model and data, its control mapping (``_ScaledActions``) and the
    physics advanced by ``mj_step`` as Gymnasium's ``do_simulation`` calls it, on ``num_threads`` threads.

    :param envs: the unwrapped sub-envs (all of one class)
    :param num_threads: threads that advance the physics, this one included (1: this thread only); the results do not
        depend on it
    """

    families: tuple[type, ...] = ()
    #: whether the family's observation or reward reads what ``mj_rnePostConstraint`` computes after each step
    #: (``cacc``, ``cfrc_int``, ``cfrc_ext``): Gymnasium's ``do_simulation`` always calls it, but nothing in the next
    #: step reads them (MuJoCo recomputes them where a sensor needs them), so a family that does not read them skips it:
    #: the same trajectories, a thirteenth less physics (HalfCheetah); those three arrays of its data are then stale
    reads_contact_forces = True

    def __init__(self, envs: Sequence[Any], num_threads: int = 1):
        self.envs = list(envs)
        self.models = [env.model for env in self.envs]
        self.datas = [env.data for env in self.envs]
        # views of each MjData's arrays, taken once: reading ``data.qpos`` builds a new view at every access (a third
        # of the twin's own time for 200 sub-envs); the arrays live as long as the data, which the envs keep
        self.qpos = [data.qpos for data in self.datas]
        self.qvel = [data.qvel for data in self.datas]
        self.ctrl = [data.ctrl for data in self.datas]
        self.frame_skips = [env.frame_skip for env in self.envs]
        self.dts = np.array([env.dt for env in self.envs])
        self.forward_weights = np.array([env._forward_reward_weight for env in self.envs])
        self.ctrl_weights = [env._ctrl_cost_weight for env in self.envs]
        self.excluded = [env._exclude_current_positions_from_observation for env in self.envs]
        self.all_excluded = all(self.excluded)
        self.scales = [env.action_scale for env in self.envs]
        self.kept_terms = getattr(type(self.envs[0]), "kept_terms", ())
        scaled = [env for env in self.envs if env.action_scale != 1.0]
        #: (low, high, scale) when every sub-env maps its actions the same way (then one elementwise op does all rows)
        self.uniform_scale = None
        if len(scaled) == len(self.envs) and all(
            env.action_scale == scaled[0].action_scale
            and np.array_equal(env._control_low, scaled[0]._control_low)
            and np.array_equal(env._control_high, scaled[0]._control_high)
            for env in scaled
        ):
            self.uniform_scale = (scaled[0]._control_low, scaled[0]._control_high, scaled[0].action_scale)
        self.num_threads = int(num_threads)
        self.pool = ThreadPoolExecutor(self.num_threads - 1) if self.num_threads > 1 else None

    @classmethod
    def supports(cls, env: Any) -> bool:
        """:return: whether ``env`` (unwrapped) is a family this twin steps exactly, with nothing that it would skip"""
        return type(env) in cls.families and env.render_mode is None

    def _advance(self, rows: list[int], controls: np.ndarray) -> None:
        # (bound once: this loop runs once per sub-env and control step, and its Python is what the physics threads
        # wait for the GIL over)
        models, datas, ctrls, frame_skips = self.models, self.datas, self.ctrl, self.frame_skips
        step = mujoco.mj_step
        post_constraint = mujoco.mj_rnePostConstraint if self.reads_contact_forces else None
        for index, control in zip(rows, controls):
            ctrls[index][:] = control
            model, data = models[index], datas[index]
            step(model, data, nstep=frame_skips[index])
            if post_constraint is not None:
                post_constraint(model, data)

    def _advance_all(self, rows: list[int], controls: np.ndarray) -> None:
        """:param rows: positions in ``envs``, as Python ints (a list indexed by numpy ints is slower)"""
        if self.pool is None or len(rows) < 2 * self.num_threads:
            self._advance(rows, controls)
        else:
            bounds = [len(rows) * thread // self.num_threads for thread in range(self.num_threads + 1)]
            chunks = [(rows[start:stop], controls[start:stop]) for start, stop in pairwise(bounds)]
            futures = [self.pool.submit(self._advance, *chunk) for chunk in chunks[1:]]
            try:  # this thread advances the first chunk rather than waiting idle for the pool's
                self._advance(*chunks[0])
            finally:
                for future in futures:
                    future.result()

    def _require_tasks(self, envs: list[Any]) -> None:
        """Raise the family's own error if a sub-env has no task (checked in one pass: all of them have one)."""
        if not all(env.task_is_set for env in envs):
            for env in envs:
                env.require_task()

    def _controls(self, envs: list[Any], indices: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """:return: the actuators' controls: ``_ScaledActions.step``'s mapping, in its float32 arithmetic"""
        controls = np.array(actions)
        if self.uniform_scale is not None:  # one elementwise op for all rows: each row's values are the same
            low, high, scale = self.uniform_scale
            return np.clip(low + (controls + scale) * (high - low) / (2 * scale), low, high)
        for k, env in enumerate(envs):
            if self.scales[indices[k]] != 1.0:
                low, high, scale = env._control_low, env._control_high, env.action_scale
                controls[k] = np.clip(low + (np.asarray(actions[k]) + scale) * (high - low) / (2 * scale), low, high)
        return controls

    def _with_kept_terms(self, task_terms: np.ndarray, terms: dict[str, Any]) -> np.ndarray:
        """:return: the mixin's ``reward_task + sum(float(info[term]) for term in kept_terms)``, in its order"""
        kept = np.zeros(len(task_terms))
        for term in self.kept_terms:
            kept = kept + np.array([float(value) for value in terms[term]])
        return task_terms + kept

    def step(self, indices: np.ndarray, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, RowInfos]:
        """
        Step the sub-envs ``indices`` with ``actions``, as ``env.step`` would one by one.

        :param indices: positions in ``envs`` (distinct)
        :param actions: their actions (len(indices), action_dim), in each env's action space
        :return: observations (n, obs_dim) float64, rewards (n,) float64, terminated (n,) bool, infos (one dict per
            row, built when read)
        """
        raise NotImplementedError

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False)


class BatchedLocomotion(_BatchedMujoco):
    """
    Sub-envs of one planar locomotion family stepped together: HalfCheetahVel / HalfCheetahDir, Walker2dVel,
    SwimmerVel, HopperRandParams and Walker2dRandParams (``env.unwrapped`` of each, all of one class; each keeps its
    own arguments, task and, for the RandParams families, its own model).

    :param envs: the unwrapped sub-envs
    :param num_threads: threads that advance the physics, this one included (1: this thread only); the results do not
        depend on it
    """

    reads_contact_forces = False
    families = (
        HalfCheetahVelEnv,
        HalfCheetahDirEnv,
        Walker2dVelEnv,
        SwimmerVelEnv,
        HopperRandParamsEnv,
        Walker2dRandParamsEnv,
    )

    def __init__(self, envs: Sequence[Any], num_threads: int = 1):
        super().__init__(envs, num_threads)
        kind = type(self.envs[0])
        #: Swimmer measures its velocity in the plane and leaves both coordinates out of the observation
        self.planar = issubclass(kind, SwimmerEnv)
        #: Walker2d and Hopper: a healthy range, an alive bonus, termination, velocities clipped in the observation
        self.upright = issubclass(kind, (Walker2dEnv, HopperEnv))
        self.hopper = issubclass(kind, HopperEnv)
        #: the task term the family adds to the base env's control (and alive) terms; None: the base env's reward
        self.task_term = None
        if issubclass(kind, _Direction):
            self.task_term = "direction"
        elif issubclass(kind, _TargetVelocity):
            self.task_term = "velocity"
        if self.upright:  # the healthy ranges, alive bonus and termination switch: constants of each sub-env
            self.healthy_ranges = np.array([(*env._healthy_z_range, *env._healthy_angle_range) for env in self.envs])
            self.healthy_rewards = np.array([env._healthy_reward for env in self.envs])
            self.terminate_when_unhealthy = np.array([env._terminate_when_unhealthy for env in self.envs])
            if self.hopper:
                self.healthy_state_ranges = np.array([env._healthy_state_range for env in self.envs])

    def _healthy(self, indices: np.ndarray, qpos: np.ndarray, qvel: np.ndarray) -> np.ndarray:
        """:return: Walker2d's / Hopper's ``is_healthy`` per row"""
        z, angle = qpos[:, 1], qpos[:, 2]
        ranges = self.healthy_ranges[indices]
        healthy = (ranges[:, 0] < z) & (z < ranges[:, 1]) & (ranges[:, 2] < angle) & (angle < ranges[:, 3])
        if self.hopper:
            state = np.concatenate((qpos, qvel), axis=1)[:, 2:]
            states = self.healthy_state_ranges[indices]
            healthy &= np.all((states[:, :1] < state) & (state < states[:, 1:]), axis=1)
        return healthy

    def step(self, indices: np.ndarray, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, RowInfos]:
        rows = np.asarray(indices).tolist()
        envs = [self.envs[index] for index in rows]
        if self.task_term is not None:
            self._require_tasks(envs)
        controls = self._controls(envs, indices, actions)
        coordinates = slice(0, 2) if self.planar else slice(0, 1)
        qpos_views, qvel_views = self.qpos, self.qvel
        before = np.array([qpos_views[index] for index in rows])[:, coordinates]
        self._advance_all(rows, controls)
        qpos = np.array([qpos_views[index] for index in rows])
        qvel = np.array([qvel_views[index] for index in rows])
        velocity = (qpos[:, coordinates] - before) / self.dts[indices][:, None]
        x_velocity = velocity[:, 0]
        forward_reward = self.forward_weights[indices] * x_velocity
        squares = np.sum(np.square(controls), axis=1)  # each row as the env's control_cost sums it
        # per row, the env's own (weight * sum): the product's type follows NumPy's rules for a Python float and the sum
        ctrl_cost = [self.ctrl_weights[index] * squares[k] for k, index in enumerate(rows)]
        n = len(rows)
        terms: dict[str, Any] = {"reward_ctrl": [-cost for cost in ctrl_cost]}
        terminated = np.zeros(n, dtype=bool)
        if self.upright:
            healthy = self._healthy(indices, qpos, qvel)
            terms["reward_survive"] = healthy * self.healthy_rewards[indices]
            terminated = ~healthy & self.terminate_when_unhealthy[indices]
        task_terms = None
        if self.task_term == "direction":
            task_terms = np.array([env._direction for env in envs]) * x_velocity
        elif self.task_term == "velocity":
            task_terms = -np.abs(x_velocity - np.array([env._target for env in envs]))
        if task_terms is not None:
            rewards = self._with_kept_terms(task_terms, terms)
        else:  # the base env's reward: forward + alive - control cost
            rewards = (forward_reward + terms["reward_survive"] if self.upright else forward_reward) - np.array(ctrl_cost)
        observations = self._observations(rows, qpos, qvel)

        def info(k: int) -> dict[str, Any]:  # the per-env step's info, in its order
            row = {"x_position": qpos[k, 0]}
            if self.planar:
                row.update(y_position=qpos[k, 1], distance_from_origin=np.linalg.norm(qpos[k, :2], ord=2))
            if self.upright:
                row["z_distance_from_origin"] = qpos[k, 1] - self.envs[rows[k]].init_qpos[1]
            row["x_velocity"] = x_velocity[k]
            if self.planar:
                row["y_velocity"] = velocity[k, 1]
            row.update(reward_forward=forward_reward[k], reward_ctrl=terms["reward_ctrl"][k])
            if self.upright:
                row["reward_survive"] = terms["reward_survive"][k]
            if task_terms is not None:
                row["reward_task"] = task_terms[k]
            return row

        return observations, rewards, terminated, RowInfos(n, info)

    def _observations(self, rows: list[int], qpos: np.ndarray, qvel: np.ndarray) -> np.ndarray:
        velocities = np.clip(qvel, -10, 10) if self.upright else qvel
        left_out = 2 if self.planar else 1
        if self.all_excluded or all(self.excluded[index] for index in rows):
            return np.concatenate((qpos[:, left_out:], velocities), axis=1)
        return np.stack(
            [
                np.concatenate((qpos[k, left_out:] if self.excluded[index] else qpos[k], velocities[k]))
                for k, index in enumerate(rows)
            ]
        )

class BatchedAnt(_BatchedMujoco):
    """
    Sub-envs of one Ant family stepped together: AntVel, AntDir, AntDir2D and AntGoal (Ant-v5 with a task term),
    with Ant-v5's contact forces (``cfrc_ext``, clipped) in the contact cost and the observation, its closed
    healthy-height interval, the alive bonus and termination, computed from the state arrays as Ant-v5 computes
    them per env.

    :param envs: the unwrapped sub-envs
    :param num_threads: threads that advance the physics, this one included (1: this thread only); the results do not
        depend on it
    """

    families = (AntVelEnv, AntDirEnv, AntDir2DEnv, AntGoalEnv)

    def __init__(self, envs: Sequence[Any], num_threads: int = 1):
        super().__init__(envs, num_threads)
        self.kind = type(self.envs[0])
        self.main_bodies = [env._main_body for env in self.envs]
        self.contact_weights = [env._contact_cost_weight for env in self.envs]
        self.contact_ranges = [env._contact_force_range for env in self.envs]
        self.healthy_ranges = np.array([env._healthy_z_range for env in self.envs], dtype=float)
        self.healthy_rewards = np.array([env._healthy_reward for env in self.envs])
        self.terminate_when_unhealthy = np.array([env._terminate_when_unhealthy for env in self.envs])
        self.with_contact_forces = [env._include_cfrc_ext_in_observation for env in self.envs]
        self.xpos = [data.xpos for data in self.datas]
        self.cfrc_ext = [data.cfrc_ext for data in self.datas]

    def step(self, indices: np.ndarray, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, RowInfos]:
        rows = np.asarray(indices).tolist()
        envs = [self.envs[index] for index in rows]
        self._require_tasks(envs)
        controls = self._controls(envs, indices, actions)
        xpos, main_bodies = self.xpos, self.main_bodies
        before = np.array([xpos[index][main_bodies[index], :2] for index in rows])
        self._advance_all(rows, controls)
        after = np.array([xpos[index][main_bodies[index], :2] for index in rows])
        qpos = np.array([self.qpos[index] for index in rows])
        qvel = np.array([self.qvel[index] for index in rows])
        velocity = (after - before) / self.dts[indices][:, None]
        x_velocity, y_velocity = velocity[:, 0], velocity[:, 1]
        # per sub-env, as Ant-v5 sums them: its (n_bodies, 6) contact forces and its action, each array on its own
        contact_forces = [np.clip(self.cfrc_ext[index], *self.contact_ranges[index]) for index in rows]
        contact_cost = [self.contact_weights[index] * np.sum(np.square(contact_forces[k])) for k, index in enumerate(rows)]
        ctrl_cost = [self.ctrl_weights[index] * np.sum(np.square(controls[k])) for k, index in enumerate(rows)]
        state = np.concatenate((qpos, qvel), axis=1)
        ranges = self.healthy_ranges[indices]
        healthy = np.isfinite(state).all(axis=1) & (ranges[:, 0] <= state[:, 2]) & (state[:, 2] <= ranges[:, 1])
        forward_reward = x_velocity * self.forward_weights[indices]
        terms = {
            "reward_forward": forward_reward,
            "reward_ctrl": [-cost for cost in ctrl_cost],
            "reward_contact": [-cost for cost in contact_cost],
            "reward_survive": healthy * self.healthy_rewards[indices],
        }
        terminated = ~healthy & self.terminate_when_unhealthy[indices]
        task_terms = self._task_terms(envs, qpos, x_velocity, y_velocity)
        rewards = self._with_kept_terms(task_terms, terms)
        observations = []
        for k, index in enumerate(rows):
            parts = [qpos[k, 2:] if self.excluded[index] else qpos[k], qvel[k]]
            if self.with_contact_forces[index]:
                parts.append(contact_forces[k][1:].flatten())
            observations.append(np.concatenate(parts))

        def info(k: int) -> dict[str, Any]:  # Ant-v5's info with the task term, in its order
            return {
                "x_position": qpos[k, 0],
                "y_position": qpos[k, 1],
                "distance_from_origin": np.linalg.norm(qpos[k, 0:2], ord=2),
                "x_velocity": x_velocity[k],
                "y_velocity": y_velocity[k],
                **{term: values[k] for term, values in terms.items()},
                "reward_task": task_terms[k],
            }

        return np.stack(observations), rewards, terminated, RowInfos(len(rows), info)

    def _task_terms(self, envs: list[Any], qpos: np.ndarray, x_velocity: np.ndarray, y_velocity: np.ndarray) -> np.ndarray:
        """:return: each family's ``_task_reward``, in its float64 arithmetic"""
        if self.kind is AntDirEnv:
            return np.array([env._direction for env in envs]) * x_velocity
        if self.kind is AntVelEnv:
            return -np.abs(x_velocity - np.array([env._target for env in envs]))
        # (the transcendental functions per row, as scalars: numpy's vectorised loops may round differently)
        if self.kind is AntDir2DEnv:
            terms = [np.cos(env._angle) * x_velocity[k] + np.sin(env._angle) * y_velocity[k] for k, env in enumerate(envs)]
            return np.array(terms)
        return np.array([-np.hypot(qpos[k, 0] - env._goal[0], qpos[k, 1] - env._goal[1]) for k, env in enumerate(envs)])


#: the batched twins, tried in order
BATCHED_FAMILIES = (BatchedLocomotion, BatchedAnt)


def batched_stepper(envs: Sequence[Any], num_threads: int = 1) -> _BatchedMujoco | None:
    """
    :param envs: unwrapped sub-envs
    :param num_threads: threads that advance the physics
    :return: a twin that steps all of ``envs`` exactly as their own ``step``, or None if none does
    """
    for twin in BATCHED_FAMILIES:
        if envs and all(twin.supports(env) for env in envs) and len({type(env) for env in envs}) == 1:
            return twin(envs, num_threads)
    return None
