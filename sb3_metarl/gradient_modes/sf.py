"""The unbiased score-function estimator of the N-sample objective (E-MAML, SG-MRL)."""

import torch as th

from sb3_metarl.common.buffers import EpisodeBatch
from sb3_metarl.gradient_modes.maml import MAML


class SF(MAML):
    """
    ``maml`` plus the correction ``stop_grad(V_hat(theta_zeta)) * sum_k sum_{tau in D_k} l_{theta_k}(tau)``,
    the score of the inner samples' distribution (term (i)). Unbiased for the gradient of L_N at
    every N; its variance grows linearly in N. V_hat is the mean discounted outer return per task.
    """

    name = "sf"

    def correction(
        self, inner_log_probs: list[th.Tensor], inner_batches: list[EpisodeBatch], outer_batch: EpisodeBatch
    ) -> th.Tensor:
        outer_value = outer_batch.discounted_returns.mean(dim=1).detach()
        inner_log_likelihood = sum(log_prob.sum(dim=(1, 2)) for log_prob in inner_log_probs)
        return outer_value * inner_log_likelihood
