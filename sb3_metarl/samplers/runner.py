"""Whole-episode sampling of a block of task groups in one process: the core every backend runs."""

import os
from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from sb3_metarl.samplers.protocol import StepResult
from sb3_metarl.tasks.mujoco.batched import PendingStep
from sb3_metarl.tasks.twins import batched_stepper

#: the ``sampler_kwargs`` that every backend passes on to its runners: the batched physics switch and its threads
RUNNER_ARGUMENTS = ("batched_physics", "num_threads")


def check_runner_arguments(batched_physics: Any, num_threads: Any) -> None:
    """:raises ValueError: naming ``batched_physics`` (not a bool) or ``num_threads`` (not None or a positive integer)"""
    if not isinstance(batched_physics, bool):
        raise ValueError(f"sampler_kwargs: batched_physics must be True or False, got {batched_physics!r}.")
    if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1):
        raise ValueError(f"sampler_kwargs: num_threads must be a positive integer (or None: the cores), got {num_threads!r}.")


def available_cores() -> int:
    """:return: the cores this process may run on (its affinity mask where the OS tells it, else the machine's)"""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # (not on every OS)
        return os.cpu_count() or 1


def physics_threads(num_threads: int | None, processes: int = 1) -> int:
    """:return: ``num_threads``, or by default the available cores divided among ``processes`` sampling processes"""
    return num_threads if num_threads is not None else max(1, available_cores() // processes)


#: wrappers whose step adds nothing the runner needs: it counts episode steps itself and resets before stepping
_BOOKKEEPING_WRAPPERS = (gym.wrappers.TimeLimit, gym.wrappers.OrderEnforcing, gym.wrappers.PassiveEnvChecker)


def step_without_bookkeeping(env: gym.Env) -> tuple[Callable[[Any], tuple[Any, ...]], int | None]:
    """
    :return: the step function of ``env`` below its outer bookkeeping wrappers (time limit, reset-order check,
        passive checker: per-step Python work of the size of a cheap env's own step), and the time limit taken off (None
        if none)
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
    Samples whole episodes on ``len(envs) / envs_per_group`` task groups (the :class:`~sb3_metarl.samplers.collection.
    Stepper` of every backend's own sub-envs): every sub-env of a group runs the group's task; the active ones
    are reset at the start of a wave, stepped with one policy call per running group and step, and a sub-env
    whose episode ended is not stepped again in that wave (an Ant that falls costs nothing until the wave's
    longest episode ends). Each sub-env's random stream
    is consumed only by its own resets and steps, and each group's action noise by its own episodes
    (``GroupPolicies``), so a group's samples do not depend on the other groups or on the process.

    :param envs: the sub-envs, group-major (task-aware: ``set_task`` on ``env.unwrapped``)
    :param envs_per_group: sub-envs per group
    :param horizon: episode length H (episodes are cut there)
    :param observation_space: the envs' observation space
    :param action_space: the envs' action space
    :param first_env_index: the model-wide index of ``envs[0]`` (errors name sub-envs by it)
    :param batched_physics: step the sub-envs with their family's batched twin where there is one
        (``sb3_metarl.tasks.mujoco.batched``: the same trajectories, bit for bit, without the per-env Python step);
        False: always one ``step`` per sub-env
    :param num_threads: threads that advance the batched twin's physics (the samples do not depend on it); None:
        the cores available to this process
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
        num_threads: int | None = None,
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
        self.batched = batched_stepper(unwrapped, physics_threads(num_threads)) if batched_physics and direct else None
        self.limits = np.array([np.inf if limit is None else limit for limit in self.time_limits])
        self.num_envs = len(self.envs)
        self.envs_per_group = envs_per_group
        self.n_groups = len(envs) // envs_per_group
        self.horizon = horizon
        self.observation_space, self.action_space = observation_space, action_space
        self.first_env_index = first_env_index

    def set_tasks(self, tasks: Sequence[Any]) -> None:
        """:param tasks: one task per group, at most ``n_groups`` (the first groups run them; the others idle)"""
        for index in range(len(tasks) * self.envs_per_group):
            self.envs[index].unwrapped.set_task(tasks[index // self.envs_per_group])

    def reset(self, obs: np.ndarray, active: np.ndarray) -> None:
        for index in np.flatnonzero(active):
            obs[index] = self.envs[index].reset()[0]

    def close(self) -> None:
        """Stop the batched twin's physics threads (the sub-envs are closed by their owner)."""
        if self.batched is not None:
            self.batched.close()

    @property
    def overlaps_physics(self) -> bool:
        """Whether a step's physics can run beside this thread's Python (:meth:`start_step`, :meth:`finish_step`)."""
        return self.batched is not None and self.batched.overlaps

    def step(self, obs: np.ndarray, rows: np.ndarray, env_actions: np.ndarray, step: int) -> StepResult:
        if self.batched is not None:  # (its step: this thread advances a chunk too, where start leaves it idle)
            return self._batched_result(obs, rows, self.batched.step(rows, env_actions[rows]), step)
        rewards = np.zeros(len(rows), dtype=np.float32)
        dones = np.zeros(len(rows), dtype=bool)
        infos: list[dict[str, Any]] = []
        for j, index in enumerate(rows):
            obs[index], rewards[j], terminated, truncated, info = self.step_functions[index](env_actions[index])
            limit = self.time_limits[index]
            dones[j] = terminated or truncated or (limit is not None and step + 1 >= limit)
            infos.append(info)
        return rewards, dones, infos

    def start_step(self, rows: np.ndarray, env_actions: np.ndarray) -> PendingStep:
        """
        Start stepping the sub-envs ``rows`` with their rows of ``env_actions`` on the batched twin; where
        :attr:`overlaps_physics`, their physics runs on the twin's threads until :meth:`finish_step`.

        :return: the step in flight
        """
        assert self.batched is not None, "only the batched twin starts a step"
        return self.batched.start(rows, env_actions[rows])

    def finish_step(self, obs: np.ndarray, pending: PendingStep, step: int) -> StepResult:
        """
        Finish a step started by :meth:`start_step` (the ``step``-th of the wave), writing the next observations of
        its rows into ``obs``.

        :return: per row: the rewards, whether the episode ended (terminated or truncated), the infos
        """
        assert self.batched is not None, "only the batched twin finishes a step"
        return self._batched_result(obs, pending.indices, self.batched.finish(pending), step)

    def _batched_result(self, obs: np.ndarray, rows: np.ndarray, outcome: tuple, step: int) -> StepResult:
        """:return: the twin's ``outcome`` for ``rows`` as a :class:`StepResult` (time limits applied), observations
        written into ``obs``"""
        rewards = np.zeros(len(rows), dtype=np.float32)
        obs[rows], rewards[:], terminated, infos = outcome
        return rewards, terminated | (step + 1 >= self.limits[rows]), infos

    def abandon_step(self, pending: PendingStep) -> None:
        """Wait for the physics of a started step whose outcome is not wanted (sampling stopped or failed)."""
        assert self.batched is not None, "only the batched twin starts a step"
        self.batched.wait(pending)
