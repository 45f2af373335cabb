"""
The MuJoCo task families stepped together: a batched twin of their per-env ``step``.

``BatchedLocomotion`` steps many sub-envs of a planar family (HalfCheetah, Walker2d, Hopper, Swimmer) in one
call: each sub-env's own ``MjData`` advances by MuJoCo's ``mj_step`` exactly as Gymnasium's ``do_simulation``
does it (the same ``mj_step`` calls on the same data, so the trajectory is the per-env step's, warm start included;
the post-step force pass, ``mj_rnePostConstraint``, only where the family reads its output: Ant),
optionally on a few threads (by the compiled loop of ``mujoco_kernel``, which holds no GIL, where numba is installed;
else by a Python loop, MuJoCo releasing the GIL inside each ``mj_step``), and the observations, rewards,
terminations and infos of all of them are computed at once in numpy, with the same operations in the same
floating-point types as the per-env code (Gymnasium's v5 envs, read through their attributes, and this package's
task terms): the results are bit-identical (tested against ``env.step`` over thousands of steps, resets and
falls). It skips the per-env Python work that makes Gymnasium's step slower than MuJoCo's own stepping.
``BatchedAnt`` does the same for the Ant families, contact forces included. ``start`` and ``finish`` split a step
so that its physics runs on the threads while the caller does other work (the sampler's two lanes).
"""

from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import mujoco
import numpy as np
from gymnasium.envs.mujoco.hopper_v5 import HopperEnv
from gymnasium.envs.mujoco.swimmer_v5 import SwimmerEnv
from gymnasium.envs.mujoco.walker2d_v5 import Walker2dEnv

from sb3_metarl.common.infos import RowInfos
from sb3_metarl.common.threads import DaemonThreads, settle
from sb3_metarl.tasks.mujoco.envs import (
    AntDir2DEnv,
    AntDirEnv,
    AntGoalEnv,
    AntVelEnv,
    BaseEnvSettings,
    Direction,
    HalfCheetahDirEnv,
    HalfCheetahVelEnv,
    HopperRandParamsEnv,
    SwimmerVelEnv,
    TargetVelocity,
    Walker2dRandParamsEnv,
    Walker2dVelEnv,
)
from sb3_metarl.tasks.mujoco.kernel import Gather, addresses, nogil_kernel


@dataclass
class PendingStep:
    """A batched step between its start and its outcome (``_BatchedMujoco.start``)."""

    #: the stepped sub-envs' positions, as an array and as Python ints
    indices: np.ndarray
    rows: list[int]
    envs: list[Any]
    #: the actuators' controls, one row per stepped sub-env
    controls: np.ndarray
    #: what the family reads before the physics (the positions its velocities are measured from); None where the
    #: compiled loop copies it (``gathered``)
    before: np.ndarray | None
    #: the physics still running on the pool's threads
    physics: list[Future] = field(default_factory=list)
    #: where the compiled loop copies the rows' state before and after their physics (``_BatchedMujoco.gathers``)
    gathered: tuple[np.ndarray, np.ndarray] | None = None


class _BatchedMujoco:
    """
    What every twin shares: each sub-env's own model and data, its control mapping (``ScaledActions``) and the
    physics advanced by ``mj_step`` as Gymnasium's ``do_simulation`` calls it, on ``num_threads`` threads.

    :param envs: the unwrapped sub-envs (all of one class)
    :param num_threads: threads that advance the physics, this one included (1: this thread only); the results do not
        depend on it
    :param compiled: advance the physics with the compiled loop that holds no GIL (``sb3_metarl.tasks.mujoco.kernel``);
        None: where numba can load it, False: the Python loop (the same trajectories either way)
    """

    families: tuple[type, ...] = ()
    #: whether the family's observation or reward reads what ``mj_rnePostConstraint`` computes after each step
    #: (``cacc``, ``cfrc_int``, ``cfrc_ext``): Gymnasium's ``do_simulation`` always calls it, but nothing in the next
    #: step reads them (MuJoCo recomputes them where a sensor needs them), so a family that does not read them skips it:
    #: the same trajectories, a thirteenth less physics (HalfCheetah); those three arrays of its data are then stale
    reads_contact_forces = True

    def __init__(self, envs: Sequence[Any], num_threads: int = 1, compiled: bool | None = None):
        self.envs = list(envs)
        self.models = [env.model for env in self.envs]
        self.datas = [env.data for env in self.envs]
        # views of each MjData's arrays, taken once: reading ``data.qpos`` builds a new view at every access (at
        # every step of every sub-env); the arrays live as long as the data, which the envs keep
        self.qpos = [data.qpos for data in self.datas]
        self.qvel = [data.qvel for data in self.datas]
        self.ctrl = [data.ctrl for data in self.datas]
        self.frame_skips = [env.frame_skip for env in self.envs]
        self.dts = np.array([env.dt for env in self.envs])
        #: each sub-env's base settings (Gymnasium's constructor arguments)
        self.settings = [BaseEnvSettings.of(env) for env in self.envs]
        self.forward_weights = np.array([settings.forward_reward_weight for settings in self.settings])
        self.ctrl_weights = [settings.ctrl_cost_weight for settings in self.settings]
        first_weight = self.ctrl_weights[0]
        #: the control cost weight where every sub-env has the same, of the same type (then it multiplies all rows at once)
        self.uniform_ctrl_weight = (
            first_weight if all(type(w) is type(first_weight) and w == first_weight for w in self.ctrl_weights) else None
        )
        #: each sub-env's sign of its target-velocity term (``TargetVelocity``'s ``deviation_sign``), for the families
        #: that have one
        if isinstance(self.envs[0], TargetVelocity):
            self.deviation_signs = np.array([env.deviation_sign for env in self.envs])
        self.excluded = [settings.exclude_current_positions for settings in self.settings]
        self.all_excluded = all(self.excluded)
        self.scales = [env.action_scale for env in self.envs]
        self.kept_terms = getattr(type(self.envs[0]), "kept_terms", ())
        scaled = [env for env in self.envs if env.action_scale != 1.0]
        #: (low, high, scale) when every sub-env maps its actions the same way (then one elementwise op does all rows)
        self.uniform_scale = None
        if len(scaled) == len(self.envs) and all(
            env.action_scale == scaled[0].action_scale
            and np.array_equal(env.control_low, scaled[0].control_low)
            and np.array_equal(env.control_high, scaled[0].control_high)
            for env in scaled
        ):
            self.uniform_scale = (scaled[0].control_low, scaled[0].control_high, scaled[0].action_scale)
        self.num_threads = int(num_threads)
        self.kernel = nogil_kernel() if compiled is not False else None
        if compiled and self.kernel is None:
            raise ValueError("compiled: the compiled physics loop needs numba and MuJoCo's shared library; pass None.")
        if self.kernel is not None:
            #: the controls per sub-env (the compiled loop copies this many, so it is checked before each copy)
            self.control_size = self.models[0].nu
            if any(model.nu != self.control_size for model in self.models):
                raise ValueError("envs: the sub-envs' models have different numbers of actuators.")
            self.model_addresses, self.data_addresses = addresses(self.models), addresses(self.datas)
            self.ctrl_addresses = np.array([ctrl.ctypes.data for ctrl in self.ctrl], dtype=np.uint64)
            self.frame_skip_array = np.array(self.frame_skips, dtype=np.int64)
        #: whether physics started by :meth:`start` runs beside this thread's Python (then the pool has all the threads)
        self.overlaps = self.kernel is not None and self.num_threads > 1
        # the compiled loop runs on the pool only: a MuJoCo error parks the thread that runs it (mujoco_kernel), which
        # must not be this one; the Python loop lets this thread advance the first chunk rather than wait idle
        pool_threads = self.num_threads if self.kernel is not None else self.num_threads - 1
        self.pool = DaemonThreads(pool_threads) if pool_threads > 0 else None
        #: the MuJoCo error that stopped this twin (its sub-envs are then in an undefined state), else None
        self.failure: mujoco.FatalError | None = None
        #: per gather (before, after the physics): each sub-env's segment addresses, the segments' bytes, the row's width
        #: in float64 and each segment's columns; None: the family gathers the rows' state in Python (``set_up_gathers``)
        self.gathers: list[tuple[np.ndarray, np.ndarray, int, list[slice]]] | None = None

    def set_up_gathers(self, before: Callable[[int], list[np.ndarray]], after: Callable[[int], list[np.ndarray]]) -> None:
        """
        Let the compiled loop copy each stepped row's state (a few float64 arrays of its ``MjData``) before and after
        its physics into one array per step, in place of a Python list of per-row views per step and array (the twin's
        Python per Rand Dir iteration, profiled: 1.8 s before, 0.6 s after; ``docs/results/scaling_engine.md``). Kept off
        without the compiled loop, or where the sub-envs' arrays differ in size (then the family gathers in Python, with
        the same values).

        :param before: sub-env position -> the arrays read before the physics (views into its data, C-contiguous)
        :param after: sub-env position -> the arrays read after it
        """
        if self.kernel is None:
            return
        gathers = []
        for views_of in (before, after):
            views = [views_of(index) for index in range(len(self.envs))]
            sizes = [view.nbytes for view in views[0]]
            if any([view.nbytes for view in row] != sizes for row in views) or not all(
                view.flags.c_contiguous and view.dtype == np.float64 for row in views for view in row
            ):
                return
            sources = np.array([[view.ctypes.data for view in row] for row in views], dtype=np.uint64)
            bounds = np.cumsum([0, *(size // 8 for size in sizes)]).tolist()
            columns = [slice(start, stop) for start, stop in pairwise(bounds)]
            gathers.append((sources, np.array(sizes, dtype=np.int64), bounds[-1], columns))
        self.gathers = gathers

    def gather_buffers(self, n_rows: int) -> tuple[np.ndarray, np.ndarray] | None:
        """:return: the arrays a step of ``n_rows`` rows gathers into (before, after), or None (gathered in Python)"""
        if self.gathers is None:
            return None
        before, after = (np.empty((n_rows, width)) for _sources, _sizes, width, _columns in self.gathers)
        return before, after

    def gathered(self, pending: PendingStep) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """:return: the arrays gathered before and after the physics of ``pending``, each (rows, size) C-contiguous"""
        assert pending.gathered is not None and self.gathers is not None
        # (contiguous copies: a row-wise reduction of a strided view may add in another order than the row alone)
        before, after = (
            [np.ascontiguousarray(values[:, columns]) for columns in gather[3]]
            for values, gather in zip(pending.gathered, self.gathers)
        )
        return before, after

    @classmethod
    def supports(cls, env: Any) -> bool:
        """:return: whether ``env`` (unwrapped) is a family this twin steps exactly, with nothing that it would skip"""
        return type(env) in cls.families and env.render_mode is None

    def _advance(self, rows: list[int], controls: np.ndarray, gathered: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """:param gathered: where the compiled loop copies these rows' state (before, after), or None"""
        if self.kernel is not None:  # one call without the GIL (controls as the float64 that ctrl holds: an exact cast)
            gathers = None
            if gathered is not None and self.gathers is not None:
                gathers = [Gather(sources[rows], sizes, out) for out, (sources, sizes, *_) in zip(gathered, self.gathers)]
            self.kernel(
                self.model_addresses[rows],
                self.data_addresses[rows],
                self.ctrl_addresses[rows],
                np.ascontiguousarray(controls, dtype=np.float64),
                self.frame_skip_array[rows],
                self.reads_contact_forces,
                *(gathers or ()),
            )
            return
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

    def _chunks(self, pending: PendingStep, n_chunks: int) -> list[tuple[list[int], np.ndarray, Any]]:
        """:return: the arguments of ``_advance`` for ``n_chunks`` consecutive chunks of the step's rows"""
        rows, controls, gathered = pending.rows, pending.controls, pending.gathered
        bounds = [len(rows) * chunk // n_chunks for chunk in range(n_chunks + 1)]
        return [
            (rows[start:stop], controls[start:stop], None if gathered is None else tuple(out[start:stop] for out in gathered))
            for start, stop in pairwise(bounds)
        ]

    def _advance_all(self, pending: PendingStep) -> None:
        """Run the physics of ``pending`` (its rows: positions in ``envs`` as Python ints, faster to index a list by)."""
        rows, controls = pending.rows, pending.controls
        if self.pool is None:
            self._advance(rows, controls, pending.gathered)
        elif self.kernel is not None:
            n_chunks = max(1, min(self.num_threads, len(rows) // 2))
            self._settle([self.pool.submit(self._advance, *chunk) for chunk in self._chunks(pending, n_chunks)])
        elif len(rows) < 2 * self.num_threads:
            self._advance(rows, controls)
        else:
            chunks = self._chunks(pending, self.num_threads)
            futures = [self.pool.submit(self._advance, *chunk) for chunk in chunks[1:]]
            try:  # this thread advances the first chunk rather than waiting idle for the pool's
                self._advance(*chunks[0])
            finally:
                self._settle(futures)

    def _settle(self, futures: list[Future]) -> None:
        """Wait for the physics ``futures`` (through a Ctrl-C too); raise MuJoCo's error where one parked a thread."""
        try:
            settle(futures, self._parked)
        except mujoco.FatalError as error:
            self.failure = self.failure or error
            raise

    def _parked(self, future: Future) -> mujoco.FatalError | None:
        """:return: the error of a physics call that will never finish (its thread, or every thread, parked), else None"""
        if self.kernel is None or self.pool is None:
            return None
        message = self.kernel.error_of(getattr(future, "thread_ident", None))
        if message is None and not future.running() and not future.done():
            parked = [self.kernel.error_of(ident) for ident in self.pool.idents]
            if all(parked):  # queued behind threads that will never take it
                message = parked[0]
        return None if message is None else mujoco.FatalError(message)

    def _require_usable(self) -> None:
        if self.failure is not None:
            raise mujoco.FatalError(
                f"the batched MuJoCo twin stopped at an earlier MuJoCo error ({self.failure}); its sub-envs are in an "
                "undefined state: make a new env (the model itself is intact and can be saved)."
            )

    def start(self, indices: np.ndarray, actions: np.ndarray) -> PendingStep:
        """
        Start stepping the sub-envs ``indices`` with ``actions``: their physics runs on the pool's threads, beside
        whatever this thread does until :meth:`finish` (only where :attr:`overlaps`; else it has run on return). The
        sub-envs being stepped must not be touched until then.

        :param indices: positions in ``envs`` (distinct)
        :param actions: their actions (len(indices), action_dim), in each env's action space
        :return: the step in flight, for :meth:`finish`
        """
        self._require_usable()
        pending = self._prepare(np.asarray(indices), actions)
        if not self.overlaps:
            self._advance_all(pending)
        elif pending.rows:
            assert self.pool is not None
            chunks = self._chunks(pending, min(self.num_threads, len(pending.rows)))
            pending.physics = [self.pool.submit(self._advance, *chunk) for chunk in chunks]
        return pending

    def wait(self, pending: PendingStep) -> None:
        """Wait until the physics of ``pending`` has run (it raises what the physics raised)."""
        self._settle(pending.physics)
        pending.physics = []

    def finish(self, pending: PendingStep) -> tuple[np.ndarray, np.ndarray, np.ndarray, RowInfos]:
        """:return: the outcome of the step ``pending`` (see :meth:`step`), once its physics has run"""
        self.wait(pending)
        return self._outcome(pending)

    def step(self, indices: np.ndarray, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, RowInfos]:
        """
        Step the sub-envs ``indices`` with ``actions``, as ``env.step`` would one by one.

        :param indices: positions in ``envs`` (distinct)
        :param actions: their actions (len(indices), action_dim), in each env's action space
        :return: observations (n, obs_dim) float64, rewards (n,) float64, terminated (n,) bool, infos (one dict per
            row, built when read)
        """
        self._require_usable()
        pending = self._prepare(np.asarray(indices), actions)
        self._advance_all(pending)
        return self._outcome(pending)

    def _prepare(self, indices: np.ndarray, actions: np.ndarray) -> PendingStep:
        """:return: the step before its physics: the rows, their controls and what the family reads before it"""
        raise NotImplementedError

    def _outcome(self, pending: PendingStep) -> tuple[np.ndarray, np.ndarray, np.ndarray, RowInfos]:
        """:return: the step's outcome from the sub-envs' state after its physics"""
        raise NotImplementedError

    def _require_tasks(self, envs: list[Any]) -> None:
        """Raise the family's own error if a sub-env has no task (checked in one pass: all of them have one)."""
        if not all(env.task_is_set for env in envs):
            for env in envs:
                env.require_task()

    def _controls(self, envs: list[Any], indices: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """:return: the actuators' controls: ``ScaledActions.step``'s mapping, in its float32 arithmetic"""
        controls = np.array(actions)
        # (the compiled loop copies nu values per row, one row per index: a shorter array would be read past its end)
        if controls.ndim != 2 or len(controls) != len(indices):
            raise ValueError(
                f"actions: expected one row per stepped sub-env, shape ({len(indices)}, action size), got {controls.shape}."
            )
        if self.kernel is not None and controls.shape[-1] != self.control_size:
            raise ValueError(f"actions: expected {self.control_size} values per sub-env, got {controls.shape[-1]}.")
        if self.uniform_scale is not None:  # one elementwise op for all rows: each row's values are the same
            low, high, scale = self.uniform_scale
            return np.clip(low + (controls + scale) * (high - low) / (2 * scale), low, high)
        for k, env in enumerate(envs):
            if self.scales[indices[k]] != 1.0:
                low, high, scale = env.control_low, env.control_high, env.action_scale
                controls[k] = np.clip(low + (np.asarray(actions[k]) + scale) * (high - low) / (2 * scale), low, high)
        return controls

    def _velocity_terms(self, envs: list[Any], indices: np.ndarray, x_velocity: np.ndarray) -> np.ndarray:
        """:return: ``TargetVelocity``'s task term per row, ``±|v_x - v*|`` by the sub-env's ``deviation_sign``"""
        deviations = np.abs(x_velocity - np.array([env.get_task() for env in envs]))
        return np.where(self.deviation_signs[indices] < 0, -deviations, deviations)

    def _with_kept_terms(self, task_terms: np.ndarray, terms: dict[str, Any]) -> np.ndarray:
        """:return: the mixin's ``reward_task + sum(float(info[term]) for term in kept_terms)``, in its order"""
        kept = np.zeros(len(task_terms))
        for term in self.kept_terms:  # (float(value) per value: a conversion to float64, exact, as asarray's)
            kept = kept + np.asarray(terms[term], dtype=np.float64)
        return task_terms + kept

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
    :param compiled: advance the physics with the compiled loop that holds no GIL (``sb3_metarl.tasks.mujoco.kernel``);
        None: where numba can load it, False: the Python loop (the same trajectories either way)
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

    def __init__(self, envs: Sequence[Any], num_threads: int = 1, compiled: bool | None = None):
        super().__init__(envs, num_threads, compiled)
        kind = type(self.envs[0])
        #: Swimmer measures its velocity in the plane and leaves both coordinates out of the observation
        self.planar = issubclass(kind, SwimmerEnv)
        #: the position coordinates that the velocities are measured on
        self.coordinates = slice(0, 2) if self.planar else slice(0, 1)
        #: Walker2d and Hopper: a healthy range, an alive bonus, termination, velocities clipped in the observation
        self.upright = issubclass(kind, (Walker2dEnv, HopperEnv))
        self.hopper = issubclass(kind, HopperEnv)
        #: the task term the family adds to the base env's control (and alive) terms; None: the base env's reward
        self.task_term = None
        if issubclass(kind, Direction):
            self.task_term = "direction"
        elif issubclass(kind, TargetVelocity):
            self.task_term = "velocity"
        if self.upright:  # the healthy ranges, alive bonus and termination switch: constants of each sub-env
            self.healthy_ranges = np.array([(*each.healthy_z_range, *each.healthy_angle_range) for each in self.settings])
            self.healthy_rewards = np.array([each.healthy_reward for each in self.settings])
            self.terminate_when_unhealthy = np.array([each.terminate_when_unhealthy for each in self.settings])
            if self.hopper:
                self.healthy_state_ranges = np.array([each.healthy_state_range for each in self.settings])
        self.set_up_gathers(lambda index: [self.qpos[index]], lambda index: [self.qpos[index], self.qvel[index]])

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

    def _prepare(self, indices: np.ndarray, actions: np.ndarray) -> PendingStep:
        rows = indices.tolist()
        envs = [self.envs[index] for index in rows]
        if self.task_term is not None:
            self._require_tasks(envs)
        controls = self._controls(envs, indices, actions)
        gathered = self.gather_buffers(len(rows))
        if gathered is not None:  # the compiled loop copies the positions before and the state after the physics
            return PendingStep(indices, rows, envs, controls, None, gathered=gathered)
        qpos_views = self.qpos
        before = np.array([qpos_views[index] for index in rows])[:, self.coordinates]
        return PendingStep(indices, rows, envs, controls, before)

    def _outcome(self, pending: PendingStep) -> tuple[np.ndarray, np.ndarray, np.ndarray, RowInfos]:
        indices, rows, envs, controls = pending.indices, pending.rows, pending.envs, pending.controls
        coordinates = self.coordinates
        if pending.gathered is not None:
            (positions_before,), (qpos, qvel) = self.gathered(pending)
            before = positions_before[:, coordinates]
        else:
            qpos_views, qvel_views = self.qpos, self.qvel
            before = pending.before
            qpos = np.array([qpos_views[index] for index in rows])
            qvel = np.array([qvel_views[index] for index in rows])
        velocity = (qpos[:, coordinates] - before) / self.dts[indices][:, None]
        x_velocity = velocity[:, 0]
        forward_reward = self.forward_weights[indices] * x_velocity
        squares = np.sum(np.square(controls), axis=1)  # each row as the env's control_cost sums it
        # per row, the env's own (weight * sum): the product's type follows NumPy's rules for the weight's type and the
        # sum's, the same for a scalar and an array operand (NEP 50), so one weight of one type multiplies all rows
        if self.uniform_ctrl_weight is not None:
            ctrl_cost: Any = self.uniform_ctrl_weight * squares
            reward_ctrl: Any = -ctrl_cost
        else:
            ctrl_cost = [self.ctrl_weights[index] * squares[k] for k, index in enumerate(rows)]
            reward_ctrl = [-cost for cost in ctrl_cost]
        n = len(rows)
        terms: dict[str, Any] = {"reward_ctrl": reward_ctrl}
        terminated = np.zeros(n, dtype=bool)
        if self.upright:
            healthy = self._healthy(indices, qpos, qvel)
            terms["reward_survive"] = healthy * self.healthy_rewards[indices]
            terminated = ~healthy & self.terminate_when_unhealthy[indices]
        task_terms = None
        if self.task_term == "direction":
            task_terms = np.array([env.get_task() for env in envs]) * x_velocity
        elif self.task_term == "velocity":
            task_terms = self._velocity_terms(envs, indices, x_velocity)
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
    :param compiled: advance the physics with the compiled loop that holds no GIL (``sb3_metarl.tasks.mujoco.kernel``);
        None: where numba can load it, False: the Python loop (the same trajectories either way)
    """

    families = (AntVelEnv, AntDirEnv, AntDir2DEnv, AntGoalEnv)

    def __init__(self, envs: Sequence[Any], num_threads: int = 1, compiled: bool | None = None):
        super().__init__(envs, num_threads, compiled)
        self.kind = type(self.envs[0])
        self.main_bodies = [each.main_body for each in self.settings]
        self.contact_weights = [each.contact_cost_weight for each in self.settings]
        self.contact_ranges = [each.contact_force_range for each in self.settings]
        self.healthy_ranges = np.array([each.healthy_z_range for each in self.settings], dtype=float)
        self.healthy_rewards = np.array([each.healthy_reward for each in self.settings])
        self.terminate_when_unhealthy = np.array([each.terminate_when_unhealthy for each in self.settings])
        self.with_contact_forces = [each.include_cfrc_ext for each in self.settings]
        self.xpos = [data.xpos for data in self.datas]
        self.cfrc_ext = [data.cfrc_ext for data in self.datas]
        #: (clip range, contact weight, control weight) when every sub-env has the same: then one elementwise op and one
        #: row-wise sum do all rows (each row's values as its own env computes them); None: row by row
        first = self.settings[0]
        self.uniform_costs = None
        if all(
            tuple(each.contact_force_range) == tuple(first.contact_force_range)
            and each.contact_cost_weight == first.contact_cost_weight
            and each.ctrl_cost_weight == first.ctrl_cost_weight
            for each in self.settings
        ):
            self.uniform_costs = (tuple(first.contact_force_range), first.contact_cost_weight, first.ctrl_cost_weight)
        #: whether every sub-env's observation has the same parts (then they are concatenated for all rows at once)
        self.uniform_observation = len({(flag, forces) for flag, forces in zip(self.excluded, self.with_contact_forces)}) == 1

        def main_body(index: int) -> np.ndarray:
            return self.xpos[index][self.main_bodies[index], :2]

        self.set_up_gathers(
            lambda index: [main_body(index)],
            lambda index: [main_body(index), self.qpos[index], self.qvel[index], self.cfrc_ext[index]],
        )

    def _prepare(self, indices: np.ndarray, actions: np.ndarray) -> PendingStep:
        rows = indices.tolist()
        envs = [self.envs[index] for index in rows]
        self._require_tasks(envs)
        controls = self._controls(envs, indices, actions)
        gathered = self.gather_buffers(len(rows))
        if gathered is not None:  # the compiled loop copies the main body's position before and the state after
            return PendingStep(indices, rows, envs, controls, None, gathered=gathered)
        xpos, main_bodies = self.xpos, self.main_bodies
        before = np.array([xpos[index][main_bodies[index], :2] for index in rows])
        return PendingStep(indices, rows, envs, controls, before)

    def _outcome(self, pending: PendingStep) -> tuple[np.ndarray, np.ndarray, np.ndarray, RowInfos]:
        indices, rows, envs, controls = pending.indices, pending.rows, pending.envs, pending.controls
        if pending.gathered is not None:
            (before,), (after, qpos, qvel, forces) = self.gathered(pending)
            forces = forces.reshape(len(rows), *self.cfrc_ext[0].shape)
        else:
            xpos, main_bodies = self.xpos, self.main_bodies
            before = pending.before
            after = np.array([xpos[index][main_bodies[index], :2] for index in rows])
            qpos = np.array([self.qpos[index] for index in rows])
            qvel = np.array([self.qvel[index] for index in rows])
            forces = np.array([self.cfrc_ext[index] for index in rows])
        velocity = (after - before) / self.dts[indices][:, None]
        x_velocity, y_velocity = velocity[:, 0], velocity[:, 1]
        contact_forces, contact_cost, ctrl_cost = self._costs(rows, controls, forces)
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
        task_terms = self._task_terms(envs, indices, qpos, x_velocity, y_velocity)
        rewards = self._with_kept_terms(task_terms, terms)
        observations = self._observations(rows, qpos, qvel, contact_forces)

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

        return observations, rewards, terminated, RowInfos(len(rows), info)

    def _costs(self, rows: list[int], controls: np.ndarray, forces: np.ndarray) -> tuple[np.ndarray, Any, Any]:
        """
        :param forces: the rows' ``cfrc_ext`` (n, bodies, 6)
        :return: the clipped contact forces (n, bodies, 6), the contact costs and the control costs, each row as Ant-v5
            computes it: the sum of the squares of its (bodies, 6) forces and of its action, times its weight
        """
        if self.uniform_costs is not None:
            # (a row-wise sum of a C-contiguous row adds its elements as the sum of that row alone does; the weights are
            # Python floats, so the products take the types that Ant-v5's scalar products take)
            (low, high), contact_weight, ctrl_weight = self.uniform_costs
            forces = np.clip(forces, low, high)
            contact_cost = contact_weight * np.sum(np.square(forces).reshape(len(rows), -1), axis=1)
            return forces, contact_cost, ctrl_weight * np.sum(np.square(controls), axis=1)
        forces = np.stack([np.clip(forces[k], *self.contact_ranges[index]) for k, index in enumerate(rows)])
        contact_cost = [self.contact_weights[index] * np.sum(np.square(forces[k])) for k, index in enumerate(rows)]
        ctrl_cost = [self.ctrl_weights[index] * np.sum(np.square(controls[k])) for k, index in enumerate(rows)]
        return forces, contact_cost, ctrl_cost

    def _observations(self, rows: list[int], qpos: np.ndarray, qvel: np.ndarray, contact_forces: np.ndarray) -> np.ndarray:
        """:return: Ant-v5's observations: positions (without x, y where excluded), velocities, contact forces"""
        first = rows[0] if rows else 0
        if self.uniform_observation:
            parts = [qpos[:, 2:] if self.excluded[first] else qpos, qvel]
            if self.with_contact_forces[first]:
                parts.append(contact_forces[:, 1:].reshape(len(rows), -1))
            return np.concatenate(parts, axis=1)
        observations = []
        for k, index in enumerate(rows):
            parts = [qpos[k, 2:] if self.excluded[index] else qpos[k], qvel[k]]
            if self.with_contact_forces[index]:
                parts.append(contact_forces[k][1:].flatten())
            observations.append(np.concatenate(parts))
        return np.stack(observations)

    def _task_terms(
        self, envs: list[Any], indices: np.ndarray, qpos: np.ndarray, x_velocity: np.ndarray, y_velocity: np.ndarray
    ) -> np.ndarray:
        """:return: each family's ``_task_reward``, in its float64 arithmetic"""
        if self.kind is AntDirEnv:
            return np.array([env.get_task() for env in envs]) * x_velocity
        if self.kind is AntVelEnv:
            return self._velocity_terms(envs, indices, x_velocity)
        # (the transcendental functions per row, as scalars: numpy's vectorised loops may round differently)
        tasks = [env.get_task() for env in envs]
        if self.kind is AntDir2DEnv:
            return np.array([np.cos(angle) * x_velocity[k] + np.sin(angle) * y_velocity[k] for k, angle in enumerate(tasks)])
        return np.array([-np.hypot(qpos[k, 0] - goal[0], qpos[k, 1] - goal[1]) for k, goal in enumerate(tasks)])
