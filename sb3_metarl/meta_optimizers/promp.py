"""ProMP's meta-update: several epochs of a clipped post-adaptation surrogate with an inner-KL penalty."""

import warnings

import torch as th

from sb3_metarl.adaptation import Adaptation, MetaSample, Replay
from sb3_metarl.common.buffers import EpisodeBatch
from sb3_metarl.common.functional import Params
from sb3_metarl.meta_optimizers.base import MetaOptimizer, check_finite_gradient, gradient_norm, restore_on_failure
from sb3_metarl.meta_optimizers.surrogates import clipped_surrogate


class ProMP(MetaOptimizer):
    """
    ProMP (Rothfuss et al. 2019): ``n_epochs`` steps of the policy's Adam optimizer (at
    ``learning_rate``) on

        mean over tasks of [ clipped outer surrogate(theta'(theta)) + C(theta) ]
        - sum_k coef_k * KL(pi_{theta_k,old} || pi_{theta_k(theta)})

    where theta_k(theta) re-runs the adaptation on the stored inner samples every epoch, the outer
    ratios and the gradient mode's magic boxes / LVC ratios are taken against the stored sampling
    log-likelihoods (so later epochs are importance-weighted correctly), and the inner-KL term (on
    each inner batch's observations) keeps the pre-update policies close to those that sampled.
    With ``adaptive_inner_kl`` each coef_k is halved when its KL falls below ``target_inner_kl / 1.5``
    and doubled above ``target_inner_kl * 1.5``, as ProMP's class does by default (its MuJoCo run script keeps the
    weight fixed at 5e-4: ``adaptive_inner_kl=False``).

    :param n_epochs: optimizer steps per meta-iteration
    :param clip_range: the ratio clipping epsilon
    :param inner_kl_coef: the initial inner-KL penalty coefficient (per inner step)
    :param target_inner_kl: the inner KL the adaptive coefficient aims at
    :param adaptive_inner_kl: adapt the coefficients after every meta-update
    """

    name = "ppo"

    def __init__(
        self,
        n_epochs: int = 5,
        clip_range: float = 0.3,
        inner_kl_coef: float = 5e-4,
        target_inner_kl: float = 0.01,
        adaptive_inner_kl: bool = True,
    ):
        if n_epochs < 1:
            raise ValueError(f"n_epochs: must be >= 1, got {n_epochs}.")
        if not clip_range > 0:
            raise ValueError(f"clip_range: must be > 0, got {clip_range}.")
        if inner_kl_coef < 0 or not target_inner_kl > 0:
            raise ValueError(f"inner_kl_coef must be >= 0 and target_inner_kl > 0, got {inner_kl_coef} and {target_inner_kl}.")
        self.n_epochs = n_epochs
        self.clip_range = clip_range
        self.inner_kl_coef = inner_kl_coef
        self.target_inner_kl = target_inner_kl
        self.adaptive_inner_kl = adaptive_inner_kl
        #: the current coefficient per inner step (set on the first update)
        self.inner_kl_coefs: list[float] | None = None

    def objective(
        self, adaptation: Adaptation, replay: Replay, sample: MetaSample, old_inner_params: list[Params]
    ) -> tuple[th.Tensor, th.Tensor, list[th.Tensor]]:
        """
        :param replay: the adaptation from the current parameters on ``sample``'s inner episodes
        :param old_inner_params: the parameters each inner batch was sampled with
        :return: the clipped meta-objective (mean over tasks), the clipped fraction of outer steps and
            the mean KL(pi_{theta_k,old} || pi_{theta_k(theta)}) of each inner step
        """
        _, clip_fraction = clipped_surrogate(replay.outer_log_prob, sample.outer_batch, self.clip_range)
        objective = adaptation.sample_objective(sample, replay, self.outer_surrogate).mean()
        inner_kls = [
            adaptation.mean_kl(old, new, batch)
            for old, new, batch in zip(old_inner_params, replay.inner_params, sample.inner_batches)
        ]
        return objective, clip_fraction, inner_kls

    def outer_surrogate(self, log_prob: th.Tensor, batch: EpisodeBatch) -> th.Tensor:
        """:return: the clipped outer surrogate per task (B,)"""
        return clipped_surrogate(log_prob, batch, self.clip_range)[0]

    def step(self, adaptation: Adaptation, sample: MetaSample, optimizer: th.optim.Optimizer) -> dict[str, float]:
        params = adaptation.parameters()
        old_inner_params = sample.inner_params
        if self.inner_kl_coefs is None or len(self.inner_kl_coefs) != len(old_inner_params):
            self.inner_kl_coefs = [self.inner_kl_coef] * len(old_inner_params)
        first_grad_norm, objectives = 0.0, []
        with restore_on_failure(params, optimizer):
            for epoch in range(self.n_epochs):
                # the first epoch is at the sampling parameters: the sample's own graph is that adaptation
                replay = sample.replay if epoch == 0 else adaptation.replay(sample)
                objective, clip_fraction, inner_kls = self.objective(adaptation, replay, sample, old_inner_params)
                loss = -objective + sum(coef * kl for coef, kl in zip(self.inner_kl_coefs, inner_kls))
                optimizer.zero_grad()
                loss.backward()
                grads = {n: -p.grad for n, p in params.items() if p.grad is not None}
                check_finite_gradient(grads)
                if epoch == 0:
                    first_grad_norm = gradient_norm(grads)
                optimizer.step()
                objectives.append(objective.item())
        inner_kl_values = [kl.item() for kl in inner_kls]
        if self.adaptive_inner_kl:
            for k, kl in enumerate(inner_kl_values):
                if kl < self.target_inner_kl / 1.5:
                    self.inner_kl_coefs[k] /= 2.0
                elif kl > self.target_inner_kl * 1.5:
                    self.inner_kl_coefs[k] *= 2.0
        return {
            "meta_grad_norm": first_grad_norm,
            "surrogate_improvement": objectives[-1] - objectives[0],
            "clip_fraction": clip_fraction.item(),
            "inner_kl": float(sum(inner_kl_values) / len(inner_kl_values)),
            "inner_kl_coef": float(sum(self.inner_kl_coefs) / len(self.inner_kl_coefs)),
        }

    def __repr__(self) -> str:
        settings = f"n_epochs={self.n_epochs}, clip_range={self.clip_range}, target_inner_kl={self.target_inner_kl}"
        return f"{type(self).__name__}({settings})"


def __getattr__(name: str) -> type:
    # the class's name in 0.1 (its zips, tests/data/v0_1_0 among them, pickle it by that name): a pickle path only
    if name == "PPO":
        warnings.warn("sb3_metarl.meta_optimizers.PPO is deprecated; use ProMP.", DeprecationWarning, stacklevel=2)
        return ProMP
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
