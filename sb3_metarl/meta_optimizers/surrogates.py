"""Outer surrogates that stay correct away from the sampling parameters (importance ratios)."""

import torch as th

from sb3_metarl.common.buffers import EpisodeBatch


def importance_ratio(log_prob: th.Tensor, batch: EpisodeBatch) -> th.Tensor:
    """:return: pi(a|s) / pi_old(a|s) per step (B, E, H), 1 where masked; pi_old: the sampling log-likelihoods"""
    return th.exp(log_prob - batch.sampling_log_probs)


def ratio_surrogate(log_prob: th.Tensor, batch: EpisodeBatch) -> th.Tensor:
    """
    TRPO's surrogate ``(1/M) sum sum_t r_t Psi_t`` per task (B,): equal to the policy-gradient
    surrogate's gradient at the sampling parameters, an importance-sampled estimate of the return's
    change elsewhere.
    """
    return (importance_ratio(log_prob, batch) * batch.advantages).sum(dim=(1, 2)) / batch.n_episodes


def clipped_surrogate(log_prob: th.Tensor, batch: EpisodeBatch, clip_range: float) -> tuple[th.Tensor, th.Tensor]:
    """
    PPO's clipped surrogate ``(1/M) sum sum_t min(r_t Psi_t, clip(r_t, 1 - eps, 1 + eps) Psi_t)``.

    :return: the surrogate per task (B,) and the fraction of (unmasked) steps whose ratio was clipped
    """
    ratio = importance_ratio(log_prob, batch)
    unclipped = ratio * batch.advantages
    clipped = th.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range) * batch.advantages
    surrogate = th.minimum(unclipped, clipped).sum(dim=(1, 2)) / batch.n_episodes
    clip_fraction = (((ratio - 1.0).abs() > clip_range).float() * batch.masks).sum() / batch.masks.sum()
    return surrogate, clip_fraction
