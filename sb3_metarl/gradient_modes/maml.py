"""Plain-autodiff MAML: differentiate the policy-gradient surrogate twice."""

import torch as th

from sb3_metarl.common.buffers import EpisodeBatch
from sb3_metarl.gradient_modes.base import GradientMode, policy_gradient_surrogate


class MAML(GradientMode):
    """
    ``S = (1/N) sum log pi * Psi``. Its Hessian misses the score-function term, so the estimate
    covers term (ii) of the exact gradient only: biased for L_N and L_infinity, low variance.
    """

    name = "maml"

    def inner_surrogate(self, log_prob: th.Tensor, batch: EpisodeBatch) -> th.Tensor:
        return policy_gradient_surrogate(log_prob, batch)
