"""``inner_sample_reuse``: the first inner step also uses earlier first inner batches of the same task."""

import hashlib
import math
import pickle
import warnings
from collections import deque
from typing import Any

import torch as th

from sb3_metarl.adaptation import MetaSample, Weighting, masked_log_prob
from sb3_metarl.common.buffers import EpisodeBatch
from sb3_metarl.common.functional import FunctionalPolicy, Params

#: batches are kept for the ``REUSE_TASKS_PER_META_BATCH * meta_batch_size`` most recently sampled tasks (a fixed
#: task set of up to that size is kept whole; tasks that never recur cannot fill memory)
REUSE_TASKS_PER_META_BATCH = 10
#: warn when no meta-batch could reuse anything in this many meta-iterations
REUSE_WARNING_ITERATIONS = 10


def task_key(task: Any) -> str:
    """:return: a key identifying a task by value (the digest of its pickle), for the per-task reuse buffers"""
    return hashlib.sha256(pickle.dumps(task)).hexdigest()


class InnerSampleReuse:
    """
    ``inner_sample_reuse``'s state: per task (keyed by its pickled value, ``task_key``), the first inner batches of
    earlier meta-iterations, newest last, for the ``max_tasks`` most recently sampled tasks; and the count of
    meta-iterations in a row whose meta-batch could reuse nothing (a warning at ``REUSE_WARNING_ITERATIONS``).

    :param max_batches: batches kept and reused per task (the model's ``inner_sample_reuse``)
    :param importance_clip: each reused step's likelihood ratio is truncated at this value
    :param max_tasks: tasks whose batches are kept (older ones are dropped)
    """

    def __init__(self, max_batches: int, importance_clip: float, max_tasks: int) -> None:
        self.max_batches = max_batches
        self.importance_clip = importance_clip
        self.max_tasks = max_tasks
        #: task key -> its stored first inner batches, newest last (a dict keeps insertion order: most recent task last)
        self.batches: dict[str, deque] = {}
        #: meta-iterations in a row whose meta-batch could reuse nothing
        self.iterations_without_reuse = 0

    @classmethod
    def built_over(
        cls, attributes: dict[str, Any], max_batches: int, importance_clip: float, max_tasks: int
    ) -> "InnerSampleReuse":
        """
        :param attributes: a model's attributes (its ``__dict__``): the reuse a loaded model holds is taken out of them
            (or, from a zip saved before the reuse was one object, its two attributes)
        :return: a reuse with these settings (``load`` may have changed them) holding what the model stored, if anything
        """
        loaded = attributes.pop("inner_reuse", None)
        reuse = cls(max_batches, importance_clip, max_tasks)
        reuse.batches = attributes.pop("reusable_inner_batches", {} if loaded is None else loaded.batches)
        default = 0 if loaded is None else loaded.iterations_without_reuse
        reuse.iterations_without_reuse = attributes.pop("iterations_without_reuse", default)
        return reuse

    def extend(
        self, tasks: list[Any], params: Params, fresh: EpisodeBatch, policy: FunctionalPolicy, weighting: Weighting
    ) -> EpisodeBatch:
        """
        The first inner batch with the ``max_batches`` most recent stored batches of each task appended (as many
        as every task of the meta-batch has), marked as reused: their stored log-likelihoods are the behaviour
        policy's, so the mode's boxes and ratios weigh them by their importance ratio, each step's ratio at the
        current parameters truncated at ``importance_clip`` (the behaviour log-likelihood is raised where the ratio
        would exceed it).

        :param tasks: the meta-batch's tasks
        :param params: the per-task parameters the fresh batch was sampled with
        :param fresh: the fresh first inner batch
        :param policy: the functional policy (the reused steps' likelihoods at ``params``)
        :param weighting: the policy-gradient weights of the combined batch
        :return: the batch to take the first inner step on
        """
        stored = [self.batches.get(task_key(task), ()) for task in tasks]
        n_reused = min(self.max_batches, *(len(batches) for batches in stored))
        self.iterations_without_reuse = 0 if n_reused else self.iterations_without_reuse + 1
        if self.iterations_without_reuse == REUSE_WARNING_ITERATIONS:
            warnings.warn(
                f"inner_sample_reuse={self.max_batches}: no meta-batch could reuse earlier episodes in "
                f"{REUSE_WARNING_ITERATIONS} meta-iterations; reuse needs tasks that recur (a fixed task set, e.g. "
                "task_sampler=FixedTaskSampler(tasks)), which a continuous task distribution never gives. Only the "
                f"{self.max_tasks} most recent tasks' batches are kept.",
                stacklevel=3,
            )
        if n_reused == 0:
            return fresh
        reused = EpisodeBatch.stack_tasks([EpisodeBatch.concatenate(list(batches)[-n_reused:]) for batches in stored])
        with th.no_grad():
            current = masked_log_prob(policy, {n: p.detach() for n, p in params.items()}, reused)
        reused.log_probs = th.maximum(reused.log_probs, current - math.log(self.importance_clip)) * reused.masks
        reused.reused = th.ones(reused.masks.shape[:2], dtype=th.bool, device=reused.masks.device)
        return weighting(EpisodeBatch.concatenate([fresh.samples(), reused]))

    def remember(self, tasks: list[Any], sample: MetaSample) -> None:
        """Store each task's fresh first inner batch of ``sample`` for reuse by later meta-iterations."""
        batch = sample.inner_batches[0]
        fresh = batch.samples() if batch.reused is None else batch.select_episodes(~batch.reused[0])
        for index, task in enumerate(tasks):
            key = task_key(task)
            # most recently sampled last (a dict keeps insertion order, and is saved with it)
            stored = self.batches.pop(key, None) or deque(maxlen=self.max_batches)
            stored.append(fresh.select_tasks([index]))
            self.batches[key] = stored
        while len(self.batches) > self.max_tasks:
            del self.batches[next(iter(self.batches))]
