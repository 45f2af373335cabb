"""
The one episode-collection loop: whole episodes of B tasks in waves of lock-steps, an episode that ends masked
out until the wave's longest one ends. Every backend runs it; what differs is how the sub-envs are reset and
stepped (a :class:`Stepper`): directly, below their bookkeeping wrappers or with a batched physics twin
(``GroupRunner``), or through any SB3 VecEnv (:class:`VecEnvStepper`).
"""

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.preprocessing import get_obs_shape
from stable_baselines3.common.vec_env import VecEnv

from sb3_metarl.common.buffers import TaskRolloutBuffer
from sb3_metarl.common.functional import Params

#: a lock-step's outcome per stepped row: the rewards, whether the episode ended (terminated or truncated), the infos
StepResult = tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]
#: (number of valid transitions since the last call, the step's variables) -> continue? (every sampler calls it so)
StepCallback = Callable[[int, dict[str, Any]], bool]


class Stepper(Protocol):
    """How the loop's sub-envs (group-major, ``envs_per_group`` per task) are given tasks, reset and stepped."""

    num_envs: int
    envs_per_group: int
    horizon: int
    observation_space: spaces.Space
    action_space: spaces.Space
    #: the model-wide index of sub-env 0 here (errors name sub-envs by it)
    first_env_index: int

    def set_tasks(self, tasks: Sequence[Any]) -> None:
        """Give the first ``len(tasks) * envs_per_group`` sub-envs their group's task."""

    def reset(self, obs: np.ndarray, active: np.ndarray) -> None:
        """Reset (at least) the sub-envs where ``active`` is True, writing their first observations into ``obs``."""

    def step(self, obs: np.ndarray, rows: np.ndarray, env_actions: np.ndarray, step: int) -> StepResult:
        """
        Step (at least) the sub-envs ``rows`` with their rows of ``env_actions`` (the ``step``-th step of the wave),
        writing their next observations into ``obs[rows]``.

        :return: per row: the rewards, whether the episode ended (terminated or truncated), the infos
        """


class GroupActor(Protocol):
    """Per-group copies of the policy (``samplers.base.GroupPolicies``)."""

    policy: ActorCriticPolicy

    def load(self, task_params: Params) -> None:
        """:param task_params: per-group parameters (leading dim: the groups)"""

    def act(
        self, obs: np.ndarray, envs_per_group: int, groups: np.ndarray, generators: list[th.Generator], out: Any = None
    ) -> np.ndarray:
        """:return: one action per sub-env; the rows of ``groups`` sampled, each group with its generator"""


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
    generators = group_generators(noise_seeds[:n_tasks])
    observation_space, action_space = stepper.observation_space, stepper.action_space
    buffer = TaskRolloutBuffer(stepper.horizon, n_tasks, n_episodes, observation_space, action_space, policies.policy.device)
    n_used, first = n_tasks * per_group, stepper.first_env_index
    group = np.arange(stepper.num_envs) // per_group
    slot = np.arange(stepper.num_envs) % per_group
    obs = np.zeros((stepper.num_envs, *get_obs_shape(observation_space)), dtype=observation_space.dtype)
    clip = isinstance(action_space, spaces.Box)
    actions = None
    zeros = np.zeros(n_used, dtype=np.float32)  # the log-likelihoods: the learner recomputes them
    for wave_start in range(0, n_episodes, per_group):
        episode = wave_start + slot
        active = (group < n_tasks) & (episode < n_episodes)
        columns = group * n_episodes + episode
        stepper.reset(obs, active)
        check_finite(obs[active], "observation", tasks, per_group, np.flatnonzero(active), first)
        for step in range(stepper.horizon):
            running = np.flatnonzero(active[:n_used].reshape(n_tasks, per_group).any(axis=1))
            actions = policies.act(obs, per_group, running, generators, actions)
            rows = np.flatnonzero(active)
            check_finite_actions(actions[rows])
            env_actions = np.clip(actions, action_space.low, action_space.high) if clip else actions
            step_obs = obs[rows].copy()
            rewards, dones, infos = stepper.step(obs, rows, env_actions, step)
            check_finite(rewards, "reward", tasks, per_group, rows, first)
            buffer.add_step(step, columns[rows], step_obs, actions[rows], rewards, zeros[: len(rows)])
            if infos and "success" in infos[0]:
                buffer.add_successes(columns[rows], np.array([info["success"] for info in infos]))
            active[rows[dones]] = False
            step_vars = {"new_obs": obs[rows], "rewards": rewards, "dones": dones, "infos": infos}
            if step_callback is not None and not step_callback(len(rows), step_vars):
                return None
            if not active.any():
                break
            check_finite(obs[rows], "observation", tasks, per_group, rows, first)
    return buffer

def group_generators(seeds: Sequence[int]) -> list[th.Generator]:
    """:return: one CPU generator per task group, seeded with the group's noise seed for this sampling phase"""
    return [th.Generator().manual_seed(int(seed)) for seed in seeds]


def check_finite_actions(actions: np.ndarray) -> None:
    """:raises FloatingPointError: if a sampled action is not finite (the policy's parameters are broken)"""
    if not np.isfinite(actions).all():
        raise FloatingPointError(
            "policy: non-finite actions sampled (the current or adapted parameters are not finite or too large); "
            "lower inner_lr or learning_rate."
        )


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


class VecEnvStepper:
    """
    Any SB3 VecEnv as the loop's sub-envs (a ``SubprocVecEnv``, a wrapper such as SB3's image transposition):
    every sub-env is reset at a wave's start and stepped at every lock-step until the wave ends (the VecEnv API
    steps all of them; the loop keeps the rows of the running episodes).

    :param venv: the vectorized env; every sub-env must have ``set_task`` on ``env.unwrapped``
    :param n_groups: number of task groups B (must divide ``venv.num_envs``)
    :param max_episode_steps: the horizon H (default: the sub-envs' own ``max_episode_steps``)
    """

    first_env_index = 0

    def __init__(self, venv: VecEnv, n_groups: int, max_episode_steps: int | None = None):
        if venv.num_envs % n_groups != 0:
            raise ValueError(
                f"n_envs: the env has {venv.num_envs} sub-envs, which is not a multiple of meta_batch_size={n_groups}; "
                "use n_envs = meta_batch_size * k."
            )
        if not venv.has_attr("set_task"):
            raise ValueError(
                "env: the environment has no `set_task(task)` method on `env.unwrapped`; meta-RL needs task-aware envs "
                "(see sb3_metarl.tasks.TaskEnv, or the built-in ids under 'sb3_metarl/')."
            )
        self.venv = venv
        self.num_envs = venv.num_envs
        self.n_groups = n_groups
        self.envs_per_group = venv.num_envs // n_groups
        self.horizon = episode_horizon(venv, max_episode_steps)
        self.observation_space, self.action_space = venv.observation_space, venv.action_space

    def set_tasks(self, tasks: Sequence[Any]) -> None:
        """:param tasks: one task per group, at most ``n_groups``; spare groups repeat the last task"""
        for group in range(self.n_groups):
            first = group * self.envs_per_group
            task = tasks[min(group, len(tasks) - 1)]
            self.venv.env_method("set_task", task, indices=range(first, first + self.envs_per_group))

    def reset(self, obs: np.ndarray, active: np.ndarray) -> None:
        obs[:] = np.asarray(self.venv.reset()).reshape(obs.shape)  # (a Discrete space's (n,) into its (n, 1))

    def step(self, obs: np.ndarray, rows: np.ndarray, env_actions: np.ndarray, step: int) -> StepResult:
        new_obs, rewards, dones, infos = self.venv.step(env_actions)
        obs[rows] = np.asarray(new_obs)[rows].reshape(obs[rows].shape)
        return rewards[rows], dones[rows], [infos[row] for row in rows]


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
