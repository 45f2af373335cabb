"""``inner_sample_reuse``: the first inner step also uses earlier first inner batches of the same task."""

import hashlib
import math
import pickle
import warnings
from collections import deque
from typing import Any

import torch as th

from sb3_metarl.adaptation import MetaSample, masked_log_prob
from sb3_metarl.common.buffers import EpisodeBatch
from sb3_metarl.common.functional import Params

#: batches are kept for the ``REUSE_TASKS_PER_META_BATCH * meta_batch_size`` most recently sampled tasks (a fixed
#: task set of up to that size is kept whole; tasks that never recur cannot fill memory)
REUSE_TASKS_PER_META_BATCH = 10
#: warn when no meta-batch could reuse anything in this many meta-iterations
REUSE_WARNING_ITERATIONS = 10


def task_key(task: Any) -> str:
    """:return: a key identifying a task by value (the digest of its pickle), for the per-task reuse buffers"""
    return hashlib.sha256(pickle.dumps(task)).hexdigest()


def with_reused_episodes(model: Any, tasks: list[Any], params: Params, fresh: EpisodeBatch) -> EpisodeBatch:
    """
    The first inner batch with the ``inner_sample_reuse`` most recent stored batches of each task appended
    (as many as every task of the meta-batch has), marked as reused: their stored log-likelihoods are the
    behaviour policy's, so the mode's boxes and ratios weigh them by their importance ratio, each step's
    ratio at the current parameters truncated at ``reuse_importance_clip`` (the behaviour log-likelihood is
    raised where the ratio would exceed it).

    :param model: a ``MetaPolicyGradient`` (its ``reusable_inner_batches`` and ``iterations_without_reuse``)
    :param tasks: the meta-batch's tasks
    :param params: the per-task parameters the fresh batch was sampled with
    :param fresh: the fresh first inner batch
    :return: the batch to take the first inner step on
    """
    stored = [model.reusable_inner_batches.get(task_key(task), ()) for task in tasks]
    n_reused = min(model.inner_sample_reuse, *(len(batches) for batches in stored))
    # (zips saved before the counter existed load without it)
    model.iterations_without_reuse = 0 if n_reused else getattr(model, "iterations_without_reuse", 0) + 1
    if model.iterations_without_reuse == REUSE_WARNING_ITERATIONS:
        warnings.warn(
            f"inner_sample_reuse={model.inner_sample_reuse}: no meta-batch could reuse earlier episodes in "
            f"{REUSE_WARNING_ITERATIONS} meta-iterations; reuse needs tasks that recur (a fixed task set, e.g. "
            "task_sampler=FixedTaskSampler(tasks)), which a continuous task distribution never gives. Only the "
            f"{REUSE_TASKS_PER_META_BATCH * model.meta_batch_size} most recent tasks' batches are kept.",
            stacklevel=3,
        )
    if n_reused == 0:
        return fresh
    reused = EpisodeBatch.stack_tasks([EpisodeBatch.concatenate(list(batches)[-n_reused:]) for batches in stored])
    with th.no_grad():
        current = masked_log_prob(model.functional_policy, {n: p.detach() for n, p in params.items()}, reused)
    reused.log_probs = th.maximum(reused.log_probs, current - math.log(model.reuse_importance_clip)) * reused.masks
    reused.reused = th.ones(reused.masks.shape[:2], dtype=th.bool, device=reused.masks.device)
    return model.weighting(EpisodeBatch.concatenate([fresh.samples(), reused]))


def remember_inner_batch(model: Any, tasks: list[Any], sample: MetaSample) -> None:
    """Store each task's fresh first inner batch of ``sample`` for reuse by later meta-iterations."""
    batch = sample.inner_batches[0]
    fresh = batch.samples() if batch.reused is None else batch.select_episodes(~batch.reused[0])
    store = model.reusable_inner_batches
    for index, task in enumerate(tasks):
        key = task_key(task)
        # most recently sampled last (a dict keeps insertion order, and is saved with it)
        stored = store.pop(key, None) or deque(maxlen=model.inner_sample_reuse)
        stored.append(fresh.select_tasks([index]))
        store[key] = stored
    while len(store) > REUSE_TASKS_PER_META_BATCH * model.meta_batch_size:
        del store[next(iter(store))]
