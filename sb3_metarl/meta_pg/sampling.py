"""One meta-iteration's samples: tasks, weighted episodes, and the meta-objective's graph built over them."""

from typing import TYPE_CHECKING, Any

import numpy as np
import torch as th

from sb3_metarl.adaptation import MetaSample, masked_log_prob
from sb3_metarl.common.buffers import EpisodeBatch
from sb3_metarl.common.functional import Params
from sb3_metarl.common.threads import ACTING_THREADS, torch_threads
from sb3_metarl.gradient_modes import GradientMode
from sb3_metarl.samplers import EpisodeSampler, StepCallback, draw_noise_seeds
from sb3_metarl.tasks import TaskSampler

if TYPE_CHECKING:  # (the model's type for the checker only: at run time this room sits below the class)
    from sb3_metarl.meta_pg.meta_pg import MetaPolicyGradient


def sample_tasks(task_sampler: TaskSampler, n_tasks: int, rng: np.random.Generator) -> list[Any]:
    """
    :param task_sampler: the task distribution
    :param n_tasks: the number of tasks
    :param rng: the task stream to draw from
    :return: ``n_tasks`` tasks, checked (a short or empty list is an error, not a smaller batch)
    """
    tasks = task_sampler.sample(n_tasks, rng)
    if tasks is None or len(tasks) != n_tasks:
        got = "None" if tasks is None else f"{len(tasks)}"
        raise ValueError(
            f"task_sampler: {type(task_sampler).__name__}.sample({n_tasks}, rng) returned {got} tasks; "
            f"it must return a list of exactly {n_tasks} tasks."
        )
    return list(tasks)


def sample_episodes(
    model: "MetaPolicyGradient",
    tasks: list[Any],
    task_params: Params | None,
    n_episodes: int,
    step_callback: StepCallback | None = None,
    generator: th.Generator | None = None,
    sampler: EpisodeSampler | None = None,
    with_log_probs: bool = True,
) -> EpisodeBatch | None:
    """
    Sample ``n_episodes`` episodes per task with the given per-task parameters, and weigh them.

    :param model: a ``MetaPolicyGradient``
    :param tasks: at most ``meta_batch_size`` tasks
    :param task_params: per-task parameters (leading dim ``len(tasks)``; detached here); None: the current policy
    :param step_callback: receives the batch's transition count and its episodes (``dones``: one True per episode),
        once the batch is sampled
    :param generator: the action noise's stream (default: training's); one seed per task is drawn from it
    :param sampler: the episode sampler (default: the model's)
    :param with_log_probs: recompute the batch's sampling log-likelihoods under ``task_params`` here; False: they are
        left zero for a caller that computes them with a graph and stores them before anything reads them
    :return: the episodes with their policy-gradient weights, or None if a callback stopped training
    """
    # the model's own sub-envs: their streams are the run's (a model loaded without an env has none)
    own = sampler is None or (model.env is not None and sampler is model.episode_sampler)
    sampler = sampler or model.episode_sampler
    if own:
        model.streams.env.refresh(model.env)
    if task_params is None:
        task_params = model.initial_task_params(len(tasks))
    noise_seeds = draw_noise_seeds(generator or model.streams.torch_generator, len(tasks))
    model.policy.set_training_mode(False)
    params = {n: p.detach() for n, p in task_params.items()}
    # the callback is called once per sampled batch, on every backend: in this process it could be after every
    # lock-step, in a worker only per batch, and a callback's count (CheckpointCallback's save_freq) must mean the same
    with torch_threads(ACTING_THREADS):
        batch = sampler.sample(tasks, params, n_episodes, noise_seeds=noise_seeds, step_callback=None)
    if batch is None:
        return None
    if own:
        model.streams.env.record(model.env, sampler)
    if step_callback is not None:
        n_batch_episodes = batch.masks.shape[0] * batch.masks.shape[1]  # (B, E, H)
        batch_locals = {"dones": np.ones(n_batch_episodes, dtype=bool), "infos": [{}] * n_batch_episodes}
        if not step_callback(int(batch.masks.sum().item()), batch_locals):
            return None
    if with_log_probs:  # the learner's own log-likelihoods, not the backend's: no sampler is trusted for gradients
        with th.no_grad():
            batch.log_probs = masked_log_prob(model.functional_policy, params, batch)
    return model.weighting(batch)


def collect_meta_sample(
    model: "MetaPolicyGradient",
    tasks: list[Any],
    mode: GradientMode,
    inner_episodes: int,
    step_callback: StepCallback | None = None,
) -> MetaSample | None:
    """
    Sample the inner and outer episodes of ``tasks`` (adapting between them) and build the meta-objective's graph.

    :param model: a ``MetaPolicyGradient`` (its inner step size calibrated)
    :param tasks: at most ``meta_batch_size`` tasks
    :param mode: the gradient mode of the inner steps and the objective
    :param inner_episodes: episodes per task and inner step (N)
    :param step_callback: receives the transition counts
    :return: the samples and objective, or None if a callback stopped training
    """
    adaptation = model.adaptation

    # (each batch's sampling log-likelihoods are the graph-carrying ones computed below, detached: the inner steps
    # store them at sampling, and the outer ones are stored after the adaptation: one forward pass over each batch,
    # not two)
    def inner_batch(step: int, params: Params) -> EpisodeBatch | None:
        batch = sample_episodes(model, tasks, params, inner_episodes, step_callback, with_log_probs=False)
        if step == 0 and batch is not None and model.inner_sample_reuse:
            batch = model.inner_reuse.extend(tasks, params, batch, model.functional_policy, model.weighting)
        return batch

    unrolled = adaptation.unroll(
        adaptation.task_parameters(len(tasks)), model.inner_steps, inner_batch, mode, create_graph=True, at_sampling=True
    )
    if unrolled is None:
        return None
    replay, inner_batches, inner_norms = unrolled
    outer_batch = sample_episodes(model, tasks, replay.adapted, model.outer_episodes, step_callback, with_log_probs=False)
    if outer_batch is None:
        return None
    replay.outer_log_prob = adaptation.log_prob(replay.adapted, outer_batch)
    outer_batch.log_probs = replay.outer_log_prob.detach()
    objective = adaptation.objective(replay, inner_batches, outer_batch, mode)
    return MetaSample(mode, replay, objective, inner_batches, outer_batch, float(np.mean(inner_norms)))
