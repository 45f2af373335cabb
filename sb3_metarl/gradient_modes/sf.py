"""The unbiased score-function estimator of the N-sample objective (E-MAML, SG-MRL)."""

import torch as th

from sb3_metarl.common.buffers import EpisodeBatch
from sb3_metarl.gradient_modes.base import magic_box
from sb3_metarl.gradient_modes.maml import MAML


class SF(MAML):
    """
    ``maml`` plus the correction ``stop_grad(V_hat(theta_zeta)) * sum_k sum_{tau in D_k} box(l_{theta_k}(tau))``,
    whose gradient at the sampling parameters is the score of the inner samples' distribution
    (term (i)). Unbiased for the gradient of L_N at every N; its variance grows linearly in N.
    V_hat is the mean discounted outer return per task. The box is taken per trajectory against the
    stored sampling log-likelihood, so that re-evaluations away from the sampling parameters (PPO
    epochs, a TRPO line search) weight each trajectory's score by its importance weight; the
    constant -1 makes the correction's value 0 at the sampling parameters. With
    ``normalize_advantage`` V_hat is scaled by the outer advantages' per-task factor 1 / std.
    """

    name = "sf"

    def correction(
        self, inner_log_probs: list[th.Tensor], inner_batches: list[EpisodeBatch], outer_batch: EpisodeBatch
    ) -> th.Tensor:
        # on the outer term's scale: standardized advantages (normalize_advantage) divide it by the
        # per-task std, so V_hat is divided by the same factor and the two terms stay consistent
        outer_value = (outer_batch.discounted_returns.mean(dim=1) * outer_batch.advantage_scale).detach()
        boxes = sum(
            (magic_box(log_prob.sum(dim=2), batch.sampling_log_probs.sum(dim=2)) - 1.0).sum(dim=1)
            for log_prob, batch in zip(inner_log_probs, inner_batches)
        )
        return outer_value * boxes
