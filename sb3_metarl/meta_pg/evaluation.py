"""Meta-test time: adapt a trained model to tasks and measure the return before and after each inner step."""

import copy
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
import torch as th
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.type_aliases import GymEnv
from stable_baselines3.common.vec_env import VecEnv

from sb3_metarl.common.buffers import EpisodeBatch
from sb3_metarl.common.functional import Params
from sb3_metarl.common.rng import seed_env_rngs
from sb3_metarl.samplers import EpisodeSampler, VecEnvSampler
from sb3_metarl.tasks import EnvTaskSampler, TaskSampler

if TYPE_CHECKING:  # (the model's type for the checker only: at run time this room sits below the class)
    from sb3_metarl.meta_pg.meta_pg import MetaPolicyGradient


def _check_count(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}: must be an integer >= {minimum}, got {value!r}.")


def adapt_and_measure(
    model: "MetaPolicyGradient",
    tasks: list[Any],
    inner_steps: int,
    final_episodes: int | None,
    generator: th.Generator | None = None,
    sampler: EpisodeSampler | None = None,
) -> tuple[Params, np.ndarray, np.ndarray | None]:
    """
    Adapt ``model``'s policy to each task with ``inner_steps`` steps (no meta-graph).

    :param model: a ``MetaPolicyGradient`` (its inner step size calibrated)
    :param tasks: at most as many tasks as the sampler has groups of sub-envs
    :param final_episodes: episodes to sample with the adapted parameters (None: none)
    :param generator: the action noise's stream (default: training's)
    :param sampler: the episode sampler (default: the model's)
    :return: the adapted per-task parameters (detached), the mean undiscounted return per task
        of the episodes sampled before each step (and after the last one when ``final_episodes``),
        and the same for the success rate (None if the env reports no ``info["success"]``)
    """

    def inner_batch(_: int, params: Params) -> EpisodeBatch | None:
        return model.sample_episodes(tasks, params, model.inner_episodes, generator=generator, sampler=sampler)

    leaves = {n: p.clone().requires_grad_(True) for n, p in model.initial_task_params(len(tasks)).items()}
    unrolled = model.adaptation.unroll(leaves, inner_steps, inner_batch, model.gradient_mode, False, at_sampling=True)
    assert unrolled is not None  # no callback: never stopped
    replay, batches, _ = unrolled
    params = {n: p.detach() for n, p in replay.adapted.items()}
    if final_episodes is not None:
        batches.append(model.sample_episodes(tasks, params, final_episodes, generator=generator, sampler=sampler))
    if not batches:
        return params, np.zeros((len(tasks), 0)), None
    returns = th.stack([batch.episode_returns.mean(1) for batch in batches], dim=1).cpu().numpy()
    if batches[0].successes is None:
        return params, returns, None
    return params, returns, th.stack([batch.successes.mean(1) for batch in batches], dim=1).cpu().numpy()


def adapt(model: "MetaPolicyGradient", task: Any, inner_steps: int = 1, seed: int | None = None) -> ActorCriticPolicy:
    """
    Adapt ``model``'s policy to one task by ``inner_steps`` inner steps on fresh episodes (sampled outside
    training's random streams: a later ``learn`` is not changed by it).

    :param model: a ``MetaPolicyGradient`` with an env
    :param task: the task (passed to the env's ``set_task``)
    :param inner_steps: number of adaptation steps
    :param seed: seed of the adaptation episodes' noise (None: fresh entropy)
    :return: a new policy of the same class holding the adapted parameters
    """
    _check_count("inner_steps", inner_steps, 0)
    model.calibrate_inner_lr()
    with model.streams.isolated(model.env, seed) as generator:
        params, _, _ = adapt_and_measure(model, [task], inner_steps, final_episodes=None, generator=generator)
    adapted = copy.deepcopy(model.policy)
    with th.no_grad():
        for name, param in adapted.named_parameters():
            if name in params:
                param.copy_(params[name][0])
    return adapted


def evaluation_env(
    model: "MetaPolicyGradient", env: GymEnv | str | Callable[[], gym.Env] | None
) -> tuple[EpisodeSampler, TaskSampler]:
    """:return: the episode sampler and task distribution to evaluate ``model`` on: its own, or ``env``'s"""
    if env is None:
        return model.episode_sampler, model.task_sampler
    # as many sub-envs as training steps (each task's episodes in one wave, acted on in one policy call per step)
    venv = model.make_sub_envs(env, model.n_envs, sampler="vec_env")
    # one task per group of sub-envs: as many groups as the meta-batch, or fewer if the sub-envs do not divide
    groups = math.gcd(venv.num_envs, model.meta_batch_size)
    sampler = VecEnvSampler(venv, groups, model.max_episode_steps)
    sampler.attach_policy(model.policy)
    return sampler, EnvTaskSampler(venv)


def evaluate_adaptation(
    model: "MetaPolicyGradient",
    n_tasks: int = 40,
    inner_steps: int = 3,
    seed: int = 0,
    tasks: list[Any] | None = None,
    env: GymEnv | str | Callable[[], gym.Env] | None = None,
) -> dict[str, np.ndarray]:
    """
    Mean return of ``model`` on held-out tasks before adaptation and after 1..``inner_steps`` inner steps
    (meta-learning's ``evaluate_policy``). The tasks come from a stream seeded by ``seed``, separate from
    training's, and the sampling noise and the sub-envs' generators are seeded too, so the result depends
    only on the parameters and ``seed``; training's random streams are left as they were (calling it
    during training does not change the run).

    :param model: a ``MetaPolicyGradient``
    :param n_tasks: number of held-out tasks (ignored when ``tasks`` is given)
    :param inner_steps: number of adaptation steps
    :param seed: seed of the task stream, the env and the action noise
    :param tasks: explicit tasks to evaluate on
    :param env: the env to evaluate on (an id, an instance, a factory or a VecEnv; its own task
        distribution); None: the model's env
    :return: ``inner_steps`` (0..K), ``mean`` and ``std`` over tasks of the per-task mean
        undiscounted return, ``per_task`` (n_tasks, K + 1), and ``success_rate`` (K + 1) when the
        env reports ``info["success"]`` (Meta-World)
    """
    _check_count("n_tasks", n_tasks, 1)
    _check_count("inner_steps", inner_steps, 0)
    episode_sampler, task_sampler = evaluation_env(model, env)
    model.calibrate_inner_lr()
    if tasks is None:
        tasks = model.sample_tasks(n_tasks, np.random.default_rng([1, seed]), task_sampler)
    returns, successes = [], []
    try:
        with model.streams.isolated(model.env, seed) as generator:
            if env is not None:
                seed_env_rngs(episode_sampler.venv, seed)  # another env's sub-envs: not the model's streams
            for start in range(0, len(tasks), episode_sampler.n_groups):
                chunk = list(tasks[start : start + episode_sampler.n_groups])
                _, chunk_returns, chunk_successes = adapt_and_measure(
                    model, chunk, inner_steps, model.outer_episodes, generator=generator, sampler=episode_sampler
                )
                returns.append(chunk_returns)
                successes.append(chunk_successes)
    finally:
        if env is not None:
            episode_sampler.close()  # (its batched twin's threads)
            if not isinstance(env, VecEnv):
                episode_sampler.venv.close()
    per_task = np.concatenate(returns, axis=0)
    table = {
        "inner_steps": np.arange(inner_steps + 1),
        "mean": per_task.mean(axis=0),
        "std": per_task.std(axis=0),
        "per_task": per_task,
    }
    if successes[0] is not None:
        table["success_rate"] = np.concatenate(successes, axis=0).mean(axis=0)
    return table


def format_adaptation_table(table: dict[str, np.ndarray]) -> str:
    """:return: a Markdown table of ``evaluate_adaptation``'s result"""
    lines = ["| inner steps | mean return | std over tasks |", "|---:|---:|---:|"]
    for steps, mean, std in zip(table["inner_steps"], table["mean"], table["std"]):
        lines.append(f"| {steps} | {mean:.2f} | {std:.2f} |")
    return "\n".join(lines)
