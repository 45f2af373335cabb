"""The interface every meta-gradient mode implements (see docs/meta-gradients.md)."""

from abc import ABC, abstractmethod

import torch as th

from sb3_metarl.common.buffers import EpisodeBatch


def magic_box(x: th.Tensor, x_old: th.Tensor | None = None) -> th.Tensor:
    """
    DiCE's magic box written as ``exp(x - x_old)``, its gradient is ``magic_box(x) * grad(x)``.

    :param x: log-likelihoods under the current (graph-carrying) parameters
    :param x_old: the same log-likelihoods stored at sampling time. At the sampling parameters the box
        evaluates to 1; re-evaluated elsewhere (PPO epochs, a TRPO line search) it is the importance
        weight of the samples. None: ``x.detach()``, a box that is 1 wherever it is evaluated.
    """
    return th.exp(x - (x.detach() if x_old is None else x_old))


def policy_gradient_surrogate(log_prob: th.Tensor, batch: EpisodeBatch) -> th.Tensor:
    """
    :param log_prob: log pi(a_t|s_t) (B, E, H), zero where masked
    :param batch: episodes with weights
    :return: ``(1/E) sum_e sum_t log_prob * Psi_t`` per task (B,): its gradient is the plain policy gradient
    """
    return (log_prob * batch.advantages).sum(dim=(1, 2)) / batch.n_episodes


class GradientMode(ABC):
    """
    A meta-gradient estimator, defined by its inner surrogate S (whose gradient is the inner step)
    and an optional correction C added to the outer objective. The meta-gradient is the gradient
    of ``O(theta_zeta(theta)) + C(theta)`` with the inner steps differentiated through. The outer
    surrogate O is not the mode's: it is the policy-gradient surrogate, or the meta-optimizer's
    (TRPO's importance ratio, PPO's clipped ratio), all with the same gradient at the sampling
    parameters (``sb3_metarl.adaptation.Adaptation.objective`` combines them).

    All methods return one value per task, shape (B,).
    """

    #: registry name
    name: str = ""
    #: False for first-order modes: the inner step's gradient is treated as a constant
    differentiate_inner_step: bool = True
    #: False for modes built on raw rewards, which a standardized advantage cannot enter
    supports_normalized_advantage: bool = True
    #: True where the inner surrogate weighs each sample by its likelihood ratio to the stored sampling
    #: log-likelihoods (magic boxes, LVC ratios): off-policy samples are then importance-weighted in the graph
    weighs_by_likelihood_ratio: bool = False

    @abstractmethod
    def inner_surrogate(self, log_prob: th.Tensor, batch: EpisodeBatch) -> th.Tensor:
        """
        :param log_prob: log-likelihoods of ``batch`` under the current (graph-carrying) parameters (B, E, H)
        :param batch: the inner episodes with weights
        :return: S per task (B,)
        """

    def correction(
        self, inner_log_probs: list[th.Tensor], inner_batches: list[EpisodeBatch], outer_batch: EpisodeBatch
    ) -> th.Tensor | None:
        """
        :param inner_log_probs: for each inner step k, log-likelihoods of D_k under theta_k (graph-carrying)
        :param inner_batches: the inner batches D_k
        :param outer_batch: the outer batch D'
        :return: C per task (B,), or None
        """
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
