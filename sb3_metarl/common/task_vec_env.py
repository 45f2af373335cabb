"""Lock-step episode collection for B tasks over one SB3 VecEnv."""

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from gymnasium import spaces
from stable_baselines3.common.vec_env import VecEnv

from sb3_metarl.common.buffers import TaskRolloutBuffer

#: obs (n_envs, *obs_shape) -> (actions as sampled, log-likelihoods), both numpy, n_envs rows
ActFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
#: (number of valid transitions since the last call, the step's variables) -> continue? (every sampler calls it so)
StepCallback = Callable[[int, dict[str, Any]], bool]


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


class TaskVecEnv:
    """
    Splits the ``num_envs`` sub-envs of a VecEnv into ``n_groups`` equal groups, one per task, and
    collects whole episodes in lock-step: all sub-envs are reset together, stepped with one batched
    policy call per step, and an episode that ends is masked out until the slowest one ends.
    E episodes per task take ``ceil(E / envs_per_group)`` such waves.

    :param venv: the vectorized env; every sub-env must have ``set_task`` on ``env.unwrapped``
    :param n_groups: number of task groups B (must divide ``venv.num_envs``)
    :param max_episode_steps: the horizon H (default: the sub-envs' own ``max_episode_steps``)
    """

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
        self.n_groups = n_groups
        self.envs_per_group = venv.num_envs // n_groups
        self.horizon = episode_horizon(venv, max_episode_steps)

    def set_tasks(self, tasks: Sequence[Any]) -> None:
        """
        :param tasks: one task per group, at most ``n_groups``; spare groups repeat the last task
        """
        if not 0 < len(tasks) <= self.n_groups:
            raise ValueError(f"tasks: expected 1 to {self.n_groups} tasks, got {len(tasks)}.")
        for group in range(self.n_groups):
            task = tasks[min(group, len(tasks) - 1)]
            first = group * self.envs_per_group
            self.venv.env_method("set_task", task, indices=range(first, first + self.envs_per_group))

    def collect(
        self,
        tasks: Sequence[Any],
        act: ActFn,
        buffer: TaskRolloutBuffer,
        step_callback: StepCallback | None = None,
    ) -> bool:
        """
        Fill ``buffer`` with ``buffer.n_episodes`` episodes of each task.

        :param tasks: the tasks (``buffer.n_tasks`` of them)
        :param act: the batched policy call
        :param buffer: receives the transitions
        :param step_callback: called after every lock-step
        :return: False if ``step_callback`` asked to stop (the buffer is then incomplete)
        """
        self.set_tasks(tasks)
        per_group = self.envs_per_group
        group = np.arange(self.venv.num_envs) // per_group
        slot = np.arange(self.venv.num_envs) % per_group
        clip = isinstance(self.venv.action_space, spaces.Box)
        for wave_start in range(0, buffer.n_episodes, per_group):
            episode = wave_start + slot
            used = (group < buffer.n_tasks) & (episode < buffer.n_episodes)
            columns = group * buffer.n_episodes + episode
            active = used.copy()
            obs = self.venv.reset()
            check_finite(obs, "observation", tasks, per_group)
            for step in range(self.horizon):
                actions, log_probs = act(obs)
                env_actions = np.clip(actions, self.venv.action_space.low, self.venv.action_space.high) if clip else actions
                new_obs, rewards, dones, infos = self.venv.step(env_actions)
                rows = np.flatnonzero(active)
                check_finite(rewards, "reward", tasks, per_group)
                buffer.add_step(step, columns[rows], obs[rows], actions[rows], rewards[rows], log_probs[rows])
                if rows.size and "success" in infos[rows[0]]:
                    buffer.add_successes(columns[rows], np.array([infos[i]["success"] for i in rows]))
                active &= ~dones
                step_vars = {"new_obs": new_obs, "rewards": rewards, "dones": dones, "infos": infos}
                if step_callback is not None and not step_callback(len(rows), step_vars):
                    return False
                if not active.any():
                    break
                obs = new_obs
                check_finite(obs, "observation", tasks, per_group)
        return True


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
