"""Whole-episode sampling of a block of task groups in one process: the core every backend runs."""

from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from stable_baselines3.common.preprocessing import get_obs_shape

from sb3_metarl.common.buffers import TaskRolloutBuffer
from sb3_metarl.common.functional import Params
from sb3_metarl.common.task_vec_env import check_finite
from sb3_metarl.samplers.base import GroupPolicies, StepCallback, check_finite_actions, group_generators
from sb3_metarl.tasks.mujoco_batched import batched_stepper

#: the ``sampler_kwargs`` that every backend passes on to its runners: the batched physics switch and its threads
RUNNER_ARGUMENTS = ("batched_physics", "num_threads")


def check_runner_arguments(batched_physics: Any, num_threads: Any) -> None:
    """:raises ValueError: naming ``batched_physics`` (not a bool) or ``num_threads`` (not a positive integer)"""
    if not isinstance(batched_physics, bool):
        raise ValueError(f"sampler_kwargs: batched_physics must be True or False, got {batched_physics!r}.")
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"sampler_kwargs: num_threads must be a positive integer, got {num_threads!r}.")


#: wrappers whose step adds nothing the runner needs: it counts episode steps itself and resets before stepping
_BOOKKEEPING_WRAPPERS = (gym.wrappers.TimeLimit, gym.wrappers.OrderEnforcing, gym.wrappers.PassiveEnvChecker)


def step_without_bookkeeping(env: gym.Env) -> tuple[Callable[[Any], tuple[Any, ...]], int | None]:
    """
    :return: the step function of ``env`` below its outer bookkeeping wrappers (time limit, reset-order check,
        passive checker; about a third of a cheap env's step), and the time limit taken off (None if none)
    """
    time_limit = None
    while isinstance(env, _BOOKKEEPING_WRAPPERS):
        if isinstance(env, gym.wrappers.TimeLimit):
            if env.spec is None or env.spec.max_episode_steps is None:
                break  # its limit is not readable: keep it
            limit = int(env.spec.max_episode_steps)
            time_limit = limit if time_limit is None else min(time_limit, limit)
        env = env.env
    return env.step, time_limit


class GroupRunner:
    """
    Samples whole episodes on ``len(envs) / envs_per_group`` task groups: every sub-env of a group
    runs the group's task; all are reset at the start of a wave, stepped with one policy call per
    running group and step, and a sub-env whose episode ended is not stepped again in that wave (an
    Ant that falls costs nothing until the wave's longest episode ends). Each sub-env's random stream
    is consumed only by its own resets and steps, and each group's action noise by its own episodes
    (``GroupPolicies``), so a group's samples do not depend on the other groups or on the process.

    :param envs: the sub-envs, group-major (task-aware: ``set_task`` on ``env.unwrapped``)
    :param envs_per_group: sub-envs per group
    :param horizon: episode length H (episodes are cut there)
    :param observation_space: the envs' observation space
    :param action_space: the envs' action space
    :param first_env_index: the model-wide index of ``envs[0]`` (errors name sub-envs by it)
    :param batched_physics: step the sub-envs with their family's batched twin where there is one
        (``sb3_metarl.tasks.mujoco_batched``: the same trajectories, bit for bit, without the per-env Python step);
        False: always one ``step`` per sub-env
    :param num_threads: threads that advance the batched twin's physics (the samples do not depend on it)
    """

    def __init__(
        self,
        envs: Sequence[gym.Env],
        envs_per_group: int,
        horizon: int,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        first_env_index: int = 0,
        batched_physics: bool = True,
        num_threads: int = 1,
    ):
        if len(envs) % envs_per_group != 0:
            raise ValueError(f"envs: {len(envs)} sub-envs do not split into groups of {envs_per_group}.")
        check_runner_arguments(batched_physics, num_threads)
        self.envs = list(envs)
        # each sub-env is reset through all its wrappers but stepped below the bookkeeping ones; their time limit,
        # counted here from the wave's reset, ends an episode as the wrapper would (truncated)
        stepping = [step_without_bookkeeping(env) for env in self.envs]
        self.step_functions = [step for step, _ in stepping]
        self.time_limits = [limit for _, limit in stepping]
        # the twin replaces exactly the step the per-env path calls: only where nothing sits between it and the env
        direct = all(getattr(step, "__self__", None) is env.unwrapped for env, step in zip(self.envs, self.step_functions))
        unwrapped = [env.unwrapped for env in self.envs]
        self.batched = batched_stepper(unwrapped, num_threads) if batched_physics and direct else None
        self.limits = np.array([np.inf if limit is None else limit for limit in self.time_limits])
        self.envs_per_group = envs_per_group
        self.n_groups = len(envs) // envs_per_group
        self.horizon = horizon
        self.observation_space, self.action_space = observation_space, action_space
        self.obs_shape = get_obs_shape(observation_space)
        self.clip = isinstance(action_space, spaces.Box)
        self.first_env_index = first_env_index

    def run(
        self,
        policies: GroupPolicies,
        tasks: Sequence[Any],
        task_params: Params,
        n_episodes: int,
        noise_seeds: Sequence[int],
        step_callback: StepCallback | None = None,
    ) -> TaskRolloutBuffer | None:
        """
        :param policies: per-group copies of the policy (loaded here with ``task_params``)
        :param tasks: one task per group, at most ``n_groups`` (the first groups run them)
        :param task_params: per-task parameters (detached), leading dim ``len(tasks)``
        :param n_episodes: episodes per task
        :param noise_seeds: one action-noise seed per task
        :param step_callback: called after every step with the number of transitions taken
        :return: the episodes, or None if ``step_callback`` stopped sampling
        """
        n_tasks, per_group = len(tasks), self.envs_per_group
        if not 0 < n_tasks <= self.n_groups:
            raise ValueError(f"tasks: expected 1 to {self.n_groups} tasks, got {n_tasks}.")
        n_used = n_tasks * per_group
        for index in range(n_used):
            self.envs[index].unwrapped.set_task(tasks[index // per_group])
        policies.load(task_params)
        generators = group_generators(noise_seeds[:n_tasks])
        device = policies.policy.device
        buffer = TaskRolloutBuffer(self.horizon, n_tasks, n_episodes, self.observation_space, self.action_space, device)
        group = np.arange(n_used) // per_group
        slot = np.arange(n_used) % per_group
        obs = np.zeros((n_used, *self.obs_shape), dtype=self.observation_space.dtype)
        actions = None
        zeros = np.zeros(n_used, dtype=np.float32)
        for wave_start in range(0, n_episodes, per_group):
            episode = wave_start + slot
            active = episode < n_episodes
            columns = group * n_episodes + episode
            for index in np.flatnonzero(active):
                obs[index] = self.envs[index].reset()[0]
            check_finite(obs[active], "observation", tasks, per_group, np.flatnonzero(active), self.first_env_index)
            for step in range(self.horizon):
                running = np.flatnonzero(active.reshape(n_tasks, per_group).any(axis=1))
                actions = policies.act(obs, per_group, running, generators, actions)
                rows = np.flatnonzero(active)
                check_finite_actions(actions[rows])
                env_actions = np.clip(actions, self.action_space.low, self.action_space.high) if self.clip else actions
                step_obs = obs[rows].copy()
                rewards = np.zeros(len(rows), dtype=np.float32)
                dones = np.zeros(len(rows), dtype=bool)
                infos: list[dict[str, Any]] = []
                if self.batched is not None:
                    obs[rows], rewards[:], terminated, infos = self.batched.step(rows, env_actions[rows])
                    dones[:] = terminated | (step + 1 >= self.limits[rows])
                for j, index in enumerate(rows if self.batched is None else ()):
                    obs[index], rewards[j], terminated, truncated, info = self.step_functions[index](env_actions[index])
                    limit = self.time_limits[index]
                    dones[j] = terminated or truncated or (limit is not None and step + 1 >= limit)
                    infos.append(info)
                check_finite(rewards, "reward", tasks, per_group, rows, self.first_env_index)
                buffer.add_step(step, columns[rows], step_obs, actions[rows], rewards, zeros[: len(rows)])
                if infos and "success" in infos[0]:
                    buffer.add_successes(columns[rows], np.array([info["success"] for info in infos]))
                active[rows[dones]] = False
                step_vars = {"new_obs": obs[rows], "rewards": rewards, "dones": dones, "infos": infos}
                if step_callback is not None and not step_callback(len(rows), step_vars):
                    return None
                if not active.any():
                    break
                check_finite(obs[rows], "observation", tasks, per_group, rows, self.first_env_index)
        return buffer
