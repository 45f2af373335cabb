"""The default backend: the model's own VecEnv, sampled in this process (``VecEnvSampler``), and any SB3 VecEnv as the
loop's sub-envs (``VecEnvStepper``)."""

from collections.abc import Sequence
from typing import Any

import numpy as np
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv

from sb3_metarl.common.buffers import EpisodeBatch
from sb3_metarl.common.functional import Params
from sb3_metarl.common.rng import get_env_rng_states
from sb3_metarl.samplers.acting import GroupPolicies, fresh_noise_seeds
from sb3_metarl.samplers.collection import collect_episodes, episode_horizon
from sb3_metarl.samplers.processes import SamplerClosedError
from sb3_metarl.samplers.protocol import EpisodeSampler, StepCallback, StepResult
from sb3_metarl.samplers.runner import GroupRunner


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


class VecEnvSampler(EpisodeSampler):
    """
    ``sampler="vec_env"``: samples on a VecEnv in this process, in lock-step, calling back after every
    step. On a plain ``DummyVecEnv`` it steps the sub-envs itself (``GroupRunner``: finished episodes
    are not stepped, and the samples are bit-identical to the ``"subproc"`` and ``"ray"`` backends for
    the same seed and sub-env layout); on any other VecEnv (a ``SubprocVecEnv``, a wrapper such as
    SB3's image transposition) it goes through the VecEnv API (``VecEnvStepper``), stepping every sub-env
    until the wave ends. Both run the one collection loop (``collection.collect_episodes``).

    :param venv: the sub-envs
    :param n_groups: task groups B (divides ``venv.num_envs``)
    :param max_episode_steps: the horizon H (default: the sub-envs' own)
    :param batched_physics: step the sub-envs with their family's batched twin where there is one (``GroupRunner``)
    :param num_threads: threads that advance the batched twin's physics (the samples do not depend on it); None: the
        cores available to this process
    """

    def __init__(
        self,
        venv: VecEnv,
        n_groups: int,
        max_episode_steps: int | None = None,
        batched_physics: bool = True,
        num_threads: int | None = None,
    ):
        self.vec_env_stepper = VecEnvStepper(venv, n_groups, max_episode_steps)
        self.venv = venv
        self.n_groups, self.envs_per_group = n_groups, self.vec_env_stepper.envs_per_group
        self.horizon = self.vec_env_stepper.horizon
        self.runner = None
        if type(venv) is DummyVecEnv:
            self.runner = GroupRunner(
                venv.envs,
                self.envs_per_group,
                self.horizon,
                venv.observation_space,
                venv.action_space,
                batched_physics=batched_physics,
                num_threads=num_threads,
            )
        self.policies: GroupPolicies | None = None
        #: whether :meth:`close` was called (then :meth:`sample` raises ``SamplerClosedError``)
        self.closed = False

    def attach_policy(self, policy: ActorCriticPolicy) -> None:
        self.policies = GroupPolicies(policy)

    def sample(
        self,
        tasks: Sequence[Any],
        task_params: Params,
        n_episodes: int,
        noise_seeds: Sequence[int] | None = None,
        step_callback: StepCallback | None = None,
    ) -> EpisodeBatch | None:
        if self.closed:
            raise SamplerClosedError(
                "sampler (vec_env): it was closed (close() was called); give the model a new env (model.set_env(...)) to "
                "sample again."
            )
        if self.policies is None:
            raise RuntimeError("sampler: attach_policy(policy) must be called before sample.")
        noise_seeds = fresh_noise_seeds(noise_seeds, len(tasks))
        stepper = self.runner if self.runner is not None else self.vec_env_stepper
        buffer = collect_episodes(stepper, self.policies, tasks, task_params, n_episodes, noise_seeds, step_callback)
        return None if buffer is None else buffer.to_batch()

    def env_rng_states(self) -> list[dict[str, Any]]:
        # in this process (or, through SubprocVecEnv, from workers that have just answered)
        return get_env_rng_states(self.venv)

    def close(self) -> None:
        """Stop the batched twin's physics threads (the VecEnv itself is the model's, closed with it)."""
        self.closed = True
        if self.runner is not None:
            self.runner.close()
