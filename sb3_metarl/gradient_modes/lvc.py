"""The low-variance curvature estimator of ProMP (Rothfuss et al. 2019)."""

import torch as th

from sb3_metarl.common.buffers import EpisodeBatch
from sb3_metarl.gradient_modes.base import GradientMode


class LVC(GradientMode):
    """
    ``S = (1/N) sum sum_t [pi(a_t|s_t) / pi_old(a_t|s_t)] Psi_t``: per-step likelihood ratios against
    the sampling policy (stored log-likelihoods), the same first derivative as the policy gradient at
    the sampling parameters and a biased, low-variance Hessian.
    """

    name = "lvc"
    weighs_by_likelihood_ratio = True

    def inner_surrogate(self, log_prob: th.Tensor, batch: EpisodeBatch) -> th.Tensor:
        ratio = th.exp(log_prob - batch.sampling_log_probs)
        return (ratio * batch.advantages).sum(dim=(1, 2)) / batch.n_episodes
