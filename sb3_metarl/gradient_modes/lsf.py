"""The linearized score-function estimator (Tang 2022)."""

import torch as th

from sb3_metarl.common.buffers import EpisodeBatch
from sb3_metarl.gradient_modes.base import GradientMode, magic_box


class LSF(GradientMode):
    """
    ``S = (1/N) sum_i box(l(tau_i)) (R(tau_i) - b)`` with a magic box over each whole trajectory and
    the trajectory return R (b: the per-task batch mean when a baseline is used, else 0). Its Hessian
    is ``(1/N) sum_i (R_i - b)(u_i u_i^T + grad^2 l(tau_i))``: bias O(1/sqrt(N)), variance O(1/N).
    """

    name = "lsf"
    weighs_by_likelihood_ratio = True

    def inner_surrogate(self, log_prob: th.Tensor, batch: EpisodeBatch) -> th.Tensor:
        box = magic_box(log_prob.sum(dim=2), batch.sampling_log_probs.sum(dim=2))
        return (box * batch.trajectory_advantages).sum(dim=1) / batch.n_episodes
