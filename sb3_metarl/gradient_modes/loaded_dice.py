"""Loaded DiCE (Farquhar et al. 2019): discounted magic boxes trade Hessian bias for variance."""

import torch as th

from sb3_metarl.common.buffers import EpisodeBatch
from sb3_metarl.gradient_modes.base import GradientMode, magic_box


class LoadedDiCE(GradientMode):
    """
    ``S = (1/N) sum_i sum_t (box(w_t) - box(w_{t-1})) Psi_t`` with
    ``w_t = sum_{t'<=t} lambda^(t-t') log pi_t'`` and ``w_{-1} = 0``. ``lambda = 1`` is DiCE with a
    baseline (its first derivative is then exactly the policy gradient); smaller lambda forgets the
    influence of earlier actions on later advantages, lowering variance at the price of bias.

    :param dice_lambda: the discount lambda of the magic boxes, in [0, 1]
    """

    name = "loaded_dice"
    weighs_by_likelihood_ratio = True

    def __init__(self, dice_lambda: float = 0.95):
        if isinstance(dice_lambda, bool) or not isinstance(dice_lambda, (int, float)) or not 0.0 <= dice_lambda <= 1.0:
            raise ValueError(f"dice_lambda: must be a number in [0, 1], got {dice_lambda!r}.")
        self.dice_lambda = dice_lambda

    def _discounted_cumsum(self, log_prob: th.Tensor) -> th.Tensor:
        weights = []
        running = th.zeros_like(log_prob[..., 0])
        for t in range(log_prob.shape[-1]):
            running = self.dice_lambda * running + log_prob[..., t]
            weights.append(running)
        return th.stack(weights, dim=-1)

    def inner_surrogate(self, log_prob: th.Tensor, batch: EpisodeBatch) -> th.Tensor:
        boxes = magic_box(self._discounted_cumsum(log_prob), self._discounted_cumsum(batch.sampling_log_probs))
        previous = th.cat([th.ones_like(boxes[..., :1]), boxes[..., :-1]], dim=-1)
        return ((boxes - previous) * batch.advantages).sum(dim=(1, 2)) / batch.n_episodes

    def __repr__(self) -> str:
        return f"LoadedDiCE(dice_lambda={self.dice_lambda})"
