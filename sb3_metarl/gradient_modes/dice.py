"""DiCE (Foerster et al. 2018) with the baseline term of Mao et al. (2019)."""

import torch as th

from sb3_metarl.common.buffers import EpisodeBatch
from sb3_metarl.gradient_modes.base import GradientMode, magic_box


class DiCE(GradientMode):
    """
    ``S = (1/N) sum_i [ sum_t box(sum_{t'<=t} log pi_t') gamma^t r_t + sum_t (1 - box(log pi_t)) gamma^t b_t ]``:
    the causal magic box; any-order derivatives are unbiased. Its first derivative equals the
    policy gradient with ``Psi_t = gamma^t (G_t - b_t)``; it uses raw rewards, so it ignores
    ``gae_lambda`` and cannot use ``normalize_advantage``.
    """

    name = "dice"
    weighs_by_likelihood_ratio = True
    supports_normalized_advantage = False

    def inner_surrogate(self, log_prob: th.Tensor, batch: EpisodeBatch) -> th.Tensor:
        sampling_log_prob = batch.sampling_log_probs
        reward_term = magic_box(th.cumsum(log_prob, dim=2), th.cumsum(sampling_log_prob, dim=2)) * batch.discounted_rewards
        baseline_term = (1.0 - magic_box(log_prob, sampling_log_prob)) * batch.discounted_baseline
        return (reward_term + baseline_term).sum(dim=(1, 2)) / batch.n_episodes
