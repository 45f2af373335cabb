"""
The MuJoCo task families stepped together: a batched twin of their per-env ``step``.

``BatchedHalfCheetah`` steps many HalfCheetahVel / HalfCheetahDir sub-envs in one call: each sub-env's own
``MjData`` advances by MuJoCo's ``mj_step`` exactly as Gymnasium's ``do_simulation`` does it (the same calls
on the same data, so the trajectory is the per-env step's, warm start included), optionally on a few threads
(MuJoCo releases the GIL inside ``mj_step``), and the observations, rewards and infos of all of them are computed
at once in numpy, with the same operations in the same floating-point types as the per-env code: the results
are bit-identical (tested against ``env.step`` over thousands of steps and resets). It skips the per-env Python
work that makes Gymnasium's step far slower than MuJoCo's own stepping.
"""

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import mujoco
import numpy as np

from sb3_metarl.tasks.mujoco import HalfCheetahDirEnv, HalfCheetahVelEnv


class BatchedHalfCheetah:
    """
    HalfCheetahVel / HalfCheetahDir sub-envs (``env.unwrapped`` of each, in any mix of the two families and of
    their arguments) stepped together.

    :param envs: the unwrapped sub-envs
    :param num_threads: threads that advance the physics (1: this thread only); the results do not depend on it
    """

    families = (HalfCheetahVelEnv, HalfCheetahDirEnv)

    def __init__(self, envs: Sequence[Any], num_threads: int = 1):
        self.envs = list(envs)
        self.models = [env.model for env in self.envs]
        self.datas = [env.data for env in self.envs]
        self.frame_skips = [env.frame_skip for env in self.envs]
        self.dts = np.array([env.dt for env in self.envs])
        self.forward_weights = np.array([env._forward_reward_weight for env in self.envs])
        self.ctrl_weights = [env._ctrl_cost_weight for env in self.envs]
        self.exclude_x = [env._exclude_current_positions_from_observation for env in self.envs]
        self.scales = [env.action_scale for env in self.envs]
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
        self.pool = ThreadPoolExecutor(self.num_threads) if self.num_threads > 1 else None

    @classmethod
    def supports(cls, env: Any) -> bool:
        """:return: whether ``env`` (unwrapped) is a family this twin steps exactly, with nothing that it would skip"""
        return type(env) in cls.families and env.render_mode is None

    def _advance(self, indices: np.ndarray, controls: np.ndarray) -> None:
        for k, index in enumerate(indices):
            model, data = self.models[index], self.datas[index]
            data.ctrl[:] = controls[k]
            mujoco.mj_step(model, data, nstep=self.frame_skips[index])
            mujoco.mj_rnePostConstraint(model, data)

    def step(self, indices: np.ndarray, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict]]:
        """
        Step the sub-envs ``indices`` with ``actions``, as ``env.step`` would one by one.

        :param indices: positions in ``envs`` (distinct)
        :param actions: their actions (len(indices), action_dim), in each env's action space
        :return: observations (n, obs_dim) float64, rewards (n,) float64, terminated (n,) bool, infos
        """
        envs = [self.envs[index] for index in indices]
        for env in envs:
            env.require_task()
        controls = np.array(actions)
        if self.uniform_scale is not None:  # _ScaledActions.step, in its float32 arithmetic, for all rows at once
            low, high, scale = self.uniform_scale
            controls = np.clip(low + (controls + scale) * (high - low) / (2 * scale), low, high)
        else:
            for k, env in enumerate(envs):
                if self.scales[indices[k]] != 1.0:
                    low, high, scale = env._control_low, env._control_high, env.action_scale
                    controls[k] = np.clip(low + (np.asarray(actions[k]) + scale) * (high - low) / (2 * scale), low, high)
        before = np.array([self.datas[index].qpos[0] for index in indices])
        if self.pool is None or len(indices) < 2 * self.num_threads:
            self._advance(indices, controls)
        else:
            chunks = np.array_split(np.arange(len(indices)), self.num_threads)
            list(self.pool.map(lambda chunk: self._advance(indices[chunk], controls[chunk]), chunks))
        qpos = np.stack([self.datas[index].qpos for index in indices])
        qvel = np.stack([self.datas[index].qvel for index in indices])
        x_velocity = (qpos[:, 0] - before) / self.dts[indices]
        forward_reward = self.forward_weights[indices] * x_velocity
        squares = np.sum(np.square(controls), axis=1)  # each row as HalfCheetah's control_cost sums it
        ctrl_cost = [self.ctrl_weights[index] * squares[k] for k, index in enumerate(indices)]
        task_terms = np.array(
            [
                env._direction * x_velocity[k] if isinstance(env, HalfCheetahDirEnv) else -abs(x_velocity[k] - env._target)
                for k, env in enumerate(envs)
            ]
        )
        rewards = task_terms + np.array([float(-cost) for cost in ctrl_cost])
        positions = qpos[:, 1:] if all(self.exclude_x[index] for index in indices) else None
        if positions is None:
            observations = np.stack(
                [
                    np.concatenate((qpos[k, 1:] if self.exclude_x[index] else qpos[k], qvel[k]))
                    for k, index in enumerate(indices)
                ]
            )
        else:
            observations = np.concatenate((positions, qvel), axis=1)
        infos = [
            {
                "x_position": qpos[k, 0],
                "x_velocity": x_velocity[k],
                "reward_forward": forward_reward[k],
                "reward_ctrl": -ctrl_cost[k],
                "reward_task": task_terms[k],
            }
            for k in range(len(indices))
        ]
        return observations, rewards, np.zeros(len(indices), dtype=bool), infos

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False)


#: the batched twins, tried in order
BATCHED_FAMILIES = (BatchedHalfCheetah,)


def batched_stepper(envs: Sequence[Any], num_threads: int = 1) -> BatchedHalfCheetah | None:
    """
    :param envs: unwrapped sub-envs
    :param num_threads: threads that advance the physics
    :return: a twin that steps all of ``envs`` exactly as their own ``step``, or None if none does
    """
    for twin in BATCHED_FAMILIES:
        if envs and all(twin.supports(env) for env in envs):
            return twin(envs, num_threads)
    return None
