"""
The one episode-collection loop: whole episodes of B tasks in waves of lock-steps, an episode that ends masked
out until the wave's longest one ends. Every backend runs it; what differs is how the sub-envs are reset and
stepped (a :class:`Stepper`): directly, below their bookkeeping wrappers or with a batched physics twin
(``GroupRunner``), or through any SB3 VecEnv (:class:`VecEnvStepper`). Where a step's physics can run beside this
thread's Python (an :class:`OverlappingStepper`: the twin's compiled loop on two or more threads), the loop runs the
task groups in two lanes, acting and recording for one while the other's physics runs: the same samples.
"""

from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.preprocessing import get_obs_shape
from stable_baselines3.common.vec_env import VecEnv

from sb3_metarl.common.buffers import TaskRolloutBuffer
from sb3_metarl.common.functional import Params
from sb3_metarl.common.infos import RowInfos
from sb3_metarl.samplers.acting import check_finite_actions, group_generators
from sb3_metarl.samplers.protocol import GroupActor, OverlappingStepper, StepCallback, Stepper, StepResult


def collect_episodes(
    stepper: Stepper,
    policies: GroupActor,
    tasks: Sequence[Any],
    task_params: Params,
    n_episodes: int,
    noise_seeds: Sequence[int],
    step_callback: StepCallback | None = None,
) -> TaskRolloutBuffer | None:
    """
    :param stepper: the sub-envs
    :param policies: per-group copies of the policy (loaded here with ``task_params``)
    :param tasks: one task per group, at most ``stepper.num_envs / envs_per_group`` (the first groups run them)
    :param task_params: per-task parameters (detached), leading dim ``len(tasks)``
    :param n_episodes: episodes per task
    :param noise_seeds: one action-noise seed per task: each group's actions depend only on its parameters, its
        observations and its own noise stream, so a group's samples do not depend on the other groups
    :param step_callback: called after every lock-step with the number of transitions taken
    :return: the episodes, or None if ``step_callback`` stopped sampling
    """
    n_tasks, per_group = len(tasks), stepper.envs_per_group
    if not 0 < n_tasks <= stepper.num_envs // per_group:
        raise ValueError(f"tasks: expected 1 to {stepper.num_envs // per_group} tasks, got {n_tasks}.")
    stepper.set_tasks(tasks)
    policies.load(task_params)
    collection = _Collection(stepper, policies, tasks, n_episodes, group_generators(noise_seeds[:n_tasks]))
    overlapped = getattr(stepper, "overlaps_physics", False) and n_tasks > 1  # (an OverlappingStepper)
    for wave_start in range(0, n_episodes, per_group):
        collection.start_wave(wave_start)
        if overlapped:
            finished = collection.run_wave_overlapped(step_callback)
        else:
            finished = collection.run_wave(step_callback)
        if not finished:
            return None
    return collection.buffer


class _Collection:
    """The state of one sampling phase's loop: the observations, the running episodes, the actions, the episodes."""

    def __init__(
        self, stepper: Stepper, policies: GroupActor, tasks: Sequence[Any], n_episodes: int, generators: list[th.Generator]
    ):
        self.stepper, self.policies, self.tasks, self.generators = stepper, policies, tasks, generators
        self.n_tasks, self.per_group, self.n_episodes = len(tasks), stepper.envs_per_group, n_episodes
        observation_space, self.action_space = stepper.observation_space, stepper.action_space
        self.buffer = TaskRolloutBuffer(
            stepper.horizon, self.n_tasks, n_episodes, observation_space, self.action_space, policies.policy.device
        )
        self.n_used = self.n_tasks * self.per_group
        self.group = np.arange(stepper.num_envs) // self.per_group
        self.slot = np.arange(stepper.num_envs) % self.per_group
        self.obs = np.zeros((stepper.num_envs, *get_obs_shape(observation_space)), dtype=observation_space.dtype)
        self.clip = isinstance(self.action_space, spaces.Box)
        self.actions: np.ndarray | None = None
        self.zeros = np.zeros(self.n_used, dtype=np.float32)  # the log-likelihoods: the learner recomputes them
        self.active = np.zeros(stepper.num_envs, dtype=bool)
        self.columns = np.zeros(stepper.num_envs, dtype=np.int64)

    def check(self, values: np.ndarray, what: str, rows: np.ndarray) -> None:
        check_finite(values, what, self.tasks, self.per_group, rows, self.stepper.first_env_index)

    def start_wave(self, wave_start: int) -> None:
        """Reset the sub-envs that run an episode of the wave starting at episode ``wave_start`` of each task."""
        episode = wave_start + self.slot
        self.active = (self.group < self.n_tasks) & (episode < self.n_episodes)
        self.columns = self.group * self.n_episodes + episode
        self.stepper.reset(self.obs, self.active)
        self.check(self.obs[self.active], "observation", np.flatnonzero(self.active))

    def act(self, lane: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """
        Act for the running sub-envs among the rows ``lane`` (whole groups).

        :return: those rows, their observations before the step, the actions to step them with (clipped to a box)
        """
        active = self.active[lane]
        rows = np.flatnonzero(active) + lane.start
        first_group = lane.start // self.per_group
        running = np.flatnonzero(active.reshape(-1, self.per_group).any(axis=1)) + first_group
        self.actions = self.policies.act(self.obs, self.per_group, running, self.generators, self.actions)
        check_finite_actions(self.actions[rows])
        env_actions = np.clip(self.actions, self.action_space.low, self.action_space.high) if self.clip else self.actions
        return rows, self.obs[rows].copy(), env_actions

    def record(self, step: int, rows: np.ndarray, step_obs: np.ndarray, outcome: StepResult) -> None:
        """Store the lock-step's transitions of ``rows`` and end the episodes that ended."""
        rewards, dones, infos = outcome
        self.check(rewards, "reward", rows)
        assert self.actions is not None
        self.buffer.add_step(step, self.columns[rows], step_obs, self.actions[rows], rewards, self.zeros[: len(rows)])
        if infos and "success" in infos[0]:
            self.buffer.add_successes(self.columns[rows], np.array([info["success"] for info in infos]))
        self.active[rows[dones]] = False

    def run_wave(self, step_callback: StepCallback | None) -> bool:
        """Run the wave's lock-steps; :return: False if ``step_callback`` stopped sampling"""
        every = slice(0, self.n_used)
        for step in range(self.stepper.horizon):
            rows, step_obs, env_actions = self.act(every)
            outcome = self.stepper.step(self.obs, rows, env_actions, step)
            self.record(step, rows, step_obs, outcome)
            rewards, dones, infos = outcome
            step_vars = {"new_obs": self.obs[rows], "rewards": rewards, "dones": dones, "infos": infos}
            if step_callback is not None and not step_callback(len(rows), step_vars):
                return False
            if not self.active.any():
                break
            self.check(self.obs[rows], "observation", rows)
        return True

    def run_wave_overlapped(self, step_callback: StepCallback | None) -> bool:
        """
        Run the wave's lock-steps in two lanes of task groups, each lane's physics running while this thread acts
        and records for the other (the same samples as :meth:`run_wave`: a group's actions depend on its own
        observations and noise only, and each sub-env's physics on its own data).

        :return: False if ``step_callback`` stopped sampling
        """
        stepper = cast(OverlappingStepper, self.stepper)
        half = self.n_tasks // 2 * self.per_group
        lanes = (slice(0, half), slice(half, self.n_used))
        in_flight: list[tuple[np.ndarray, np.ndarray, Any] | None] = [None, None]

        def start(lane: int) -> None:
            if self.active[lanes[lane]].any():
                rows, step_obs, env_actions = self.act(lanes[lane])
                in_flight[lane] = (rows, step_obs, stepper.start_step(rows, env_actions))

        try:
            start(0)
            start(1)
            for step in range(stepper.horizon):
                finished = []
                for lane in (0, 1):
                    started, in_flight[lane] = in_flight[lane], None
                    if started is None:
                        continue
                    rows, step_obs, pending = started
                    outcome = stepper.finish_step(self.obs, pending, step)
                    self.record(step, rows, step_obs, outcome)
                    finished.append((rows, outcome))
                    if step + 1 < stepper.horizon:  # its next step runs while this thread finishes the other lane
                        self.check(self.obs[rows], "observation", rows)
                        start(lane)
                if step_callback is not None and not step_callback(*self.joined(finished)):
                    return False
                if not self.active.any():
                    break
        finally:  # stopped or failed: no physics may still run on the sub-envs when this returns
            for started in in_flight:
                if started is not None:
                    stepper.abandon_step(started[2])
        return True

    def joined(self, finished: list[tuple[np.ndarray, StepResult]]) -> tuple[int, dict[str, Any]]:
        """:return: the lanes' outcomes of one lock-step as ``step_callback`` receives the lock-step's"""
        rows = np.concatenate([rows for rows, _ in finished])
        rewards = np.concatenate([outcome[0] for _, outcome in finished])
        dones = np.concatenate([outcome[1] for _, outcome in finished])
        parts = [outcome[2] for _, outcome in finished]
        bounds = np.cumsum([0] + [len(part) for part in parts])

        def info(k: int) -> dict[str, Any]:
            lane = int(np.searchsorted(bounds, k, side="right")) - 1
            return parts[lane][k - bounds[lane]]

        infos = RowInfos(len(rows), info)
        return len(rows), {"new_obs": self.obs[rows], "rewards": rewards, "dones": dones, "infos": infos}


def episode_horizon(venv: VecEnv, max_episode_steps: int | None = None) -> int:
    """
    :param max_episode_steps: the horizon given by the user, which takes precedence
    :return: the horizon H: ``max_episode_steps`` if given, else the sub-envs' own (a registered
        ``max_episode_steps`` or a ``TimeLimit``), with a clear error when there is none
    """
    if max_episode_steps is not None:
        return int(max_episode_steps)
    spec = venv.get_attr("spec", indices=[0])[0]
    horizon = getattr(spec, "max_episode_steps", None)
    if horizon is None and venv.has_attr("_max_episode_steps"):
        # a TimeLimit applied by hand to an env made without a spec
        horizon = venv.get_attr("_max_episode_steps", indices=[0])[0]
    if horizon is None:
        raise ValueError(
            "env: episodes need a finite horizon; pass `max_episode_steps=H` to MetaPolicyGradient (episodes that "
            "end earlier, e.g. a one-step bandit, simply end), register the env with `max_episode_steps` or wrap it "
            "in `gymnasium.wrappers.TimeLimit(env, max_episode_steps=H)`."
        )
    return int(horizon)


def check_finite(
    values: np.ndarray,
    what: str,
    tasks: Sequence[Any],
    per_group: int,
    env_indices: np.ndarray | None = None,
    first_env_index: int = 0,
) -> None:
    """
    :param values: one value (or row) per sub-env
    :param env_indices: the sub-env of each row (default: row i is sub-env i)
    :param first_env_index: the model-wide index of sub-env 0 here (a worker's block starts further on)
    :raises ValueError: naming the first sub-env, and its task, that returned a non-finite ``what``
    """
    values = np.asarray(values)
    if not np.issubdtype(values.dtype, np.floating) or np.isfinite(values).all():  # integer (e.g. image) values are finite
        return
    row = int(np.flatnonzero(~np.isfinite(values.reshape(len(values), -1)).all(axis=1))[0])
    env_index = row if env_indices is None else int(env_indices[row])
    task = tasks[min(env_index // per_group, len(tasks) - 1)]
    raise ValueError(
        f"env: sub-env {first_env_index + env_index} returned a non-finite {what} (task {task!r:.80}); "
        "the env must return finite rewards and observations."
    )
