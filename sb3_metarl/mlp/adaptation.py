"""
The layered twin of :class:`~sb3_metarl.adaptation.Adaptation` for SB3's default MLP Gaussian actor: the
line search's evaluations and TRPO's KL-Hessian products written out layer by layer (``curvature``), the
same values as the autograd reference up to float rounding, without its per-product graph rebuilding.
"""

import math
from collections.abc import Callable, Iterator

import torch as th
from stable_baselines3.common.distributions import DiagGaussianDistribution

from sb3_metarl.adaptation import Adaptation, MetaSample, Replay, Weighting, per_task_norm
from sb3_metarl.common.buffers import EpisodeBatch
from sb3_metarl.common.functional import FunctionalPolicy, Params, inner_update
from sb3_metarl.gradient_modes import GradientMode
from sb3_metarl.mlp.curvature import (
    GaussianKLHessian,
    GaussianLogLikelihoodHessian,
    GaussianScore,
    MlpActorPass,
    Workspace,
    gaussian_log_likelihood,
)
from sb3_metarl.mlp.layout import MlpActorLayout


def make_adaptation(
    policy: FunctionalPolicy, inner_lr: float, inner_grad_clip: float | None, weighting: Weighting
) -> Adaptation:
    """:return: the layered twin for SB3's default MLP actor (``MlpActorLayout.of``), else the autograd :class:`Adaptation`"""
    if MlpActorLayout.of(policy.policy) is not None:
        return LayeredAdaptation(policy, inner_lr, inner_grad_clip, weighting)
    return Adaptation(policy, inner_lr, inner_grad_clip, weighting)


class LayeredAdaptation(Adaptation):
    """
    :class:`Adaptation` for SB3's default MLP Gaussian actor, with :meth:`evaluate` and
    :meth:`kl_hessian_product` written out layer by layer; everything that builds a graph is the base class's.

    :param policy: the functional policy (its actor must be recognised by ``MlpActorLayout.of``)
    :param inner_lr: the inner step size eta
    :param inner_grad_clip: each task's inner gradient is scaled down to this norm when longer; None: no clipping
    :param weighting: gives sampled batches their policy-gradient weights
    :raises ValueError: if the policy's actor is not SB3's default MLP
    """

    def __init__(self, policy: FunctionalPolicy, inner_lr: float, inner_grad_clip: float | None, weighting: Weighting):
        super().__init__(policy, inner_lr, inner_grad_clip, weighting)
        layout = MlpActorLayout.of(policy.policy)
        if layout is None:
            raise ValueError("policy: LayeredAdaptation needs SB3's default MLP Gaussian actor; use Adaptation.")
        #: the actor's parameter names and activations
        self.layout: MlpActorLayout = layout

    def autograd(self) -> Adaptation:
        """:return: the autograd reference with the same policy and settings (to compare with)"""
        return Adaptation(self.policy, self.inner_lr, self.inner_grad_clip, self.weighting)

    def kl_hessian_needs_graph(self, sample: MetaSample) -> bool:
        return len(sample.inner_batches) != 1

    def evaluate(self, sample: MetaSample) -> Replay:
        """
        :meth:`Adaptation.evaluate` written out: the forward and backward passes layer by layer over cache-sized
        blocks of rows, and the outer batch's action distribution. The same values up to float rounding
        (``tests/test_adaptation.py`` measures it).

        :return: a replay whose tensors are all detached
        """
        n_tasks = sample.outer_batch.n_tasks
        theta = self.task_parameters(n_tasks, detach=True)
        params, inner_params, log_probs, norms = theta, [], [], []
        for batch in sample.inner_batches:
            inner_params.append(params)
            params, log_prob, norm = self._layered_inner_step(params, batch, sample.mode)
            log_probs.append(log_prob)
            norms.append(norm)
        means, outer_log_prob = self._layered_log_prob(params, sample.outer_batch)
        log_std = params[self.layout.log_std]
        std = th.exp(log_std).unsqueeze(1).expand_as(means).reshape(-1, means.shape[-1])
        distribution = DiagGaussianDistribution(means.shape[-1])
        distribution.distribution = th.distributions.Normal(means.reshape(-1, means.shape[-1]), std, validate_args=False)
        return Replay(theta, inner_params, log_probs, params, norms, outer_log_prob, distribution)


    def _layered_passes(self, task_params: Params, batch: EpisodeBatch) -> Iterator[tuple[slice, MlpActorPass]]:
        """:return: forward passes of the MLP actor over blocks of ``batch``'s rows (block, pass), one at a time"""
        n_tasks, features = batch.n_tasks, _packed_features(batch)
        width = _hidden_width(self.layout, task_params)
        workspace = Workspace()
        for rows in _row_blocks(features.shape[1], n_tasks * width):
            yield rows, MlpActorPass(self.layout, task_params, features[:, rows], workspace)

    def _layered_log_prob(self, task_params: Params, batch: EpisodeBatch) -> tuple[th.Tensor, th.Tensor]:
        """
        :return: the actor's means (B, K, A) at ``batch``'s packed rows (``EpisodeBatch.row_packing``) and the actions'
            log-likelihoods (B, E, H), zero where masked
        """
        actions = batch.packed_actions().float()
        means, log_probs = [], []
        for rows, forward in self._layered_passes(task_params, batch):
            means.append(forward.mean)
            log_probs.append(gaussian_log_likelihood(forward, actions[:, rows]))
        return th.cat(means, 1), batch.unpack_rows(th.cat(log_probs, 1))

    def _layered_inner_step(
        self, task_params: Params, batch: EpisodeBatch, mode: GradientMode
    ) -> tuple[Params, th.Tensor, th.Tensor]:
        """:meth:`inner_step`'s values (no graph), layer by layer: the new parameters, the log-likelihoods, the norms"""
        _, log_prob = self._layered_log_prob(task_params, batch)
        weights, _ = _log_likelihood_weights(mode, log_prob, batch, create_graph=False)
        masks = batch.packed_masks()
        weights = (batch.pack_rows(weights.reshape(batch.n_tasks, -1)) * masks).unsqueeze(-1)
        actions = batch.packed_actions().float()
        grads: Params = {}
        # the gradient is a sum over rows, weighted by dS/dlog pi, which needs every log-likelihood first: the forward
        # pass is run again per block rather than keeping every block's activations (they would leave the cache)
        for rows, forward in self._layered_passes(task_params, batch):
            score = GaussianScore.of(forward, actions[:, rows], masks[:, rows], weights[:, rows])
            block, _ = forward.backward(score.mean_cotangent, score.log_std_cotangent)
            grads = block if not grads else {n: grads[n] + block[n] for n in grads}
        norms = per_task_norm(grads)
        return inner_update(task_params, grads, self.inner_lr, self.clip_factor(norms)), log_prob, norms

    def kl_hessian_product(self, sample: MetaSample, names: list[str]) -> Callable[[Params], Params]:
        """
        :meth:`Adaptation.kl_hessian_product` written out layer by layer for one inner step (``J_b = I + eta s_b
        Hess S_b`` is then symmetric, s_b the clip factor, a constant), reusing the activations across products
        (``sb3_metarl.mlp.curvature``); with more inner steps, or tangents outside the actor, double backward.
        """
        layout = self.layout
        if len(sample.inner_batches) != 1 or not set(names) <= set(layout.names):
            return super().kl_hessian_product(sample, names)
        batch, outer, mode = sample.inner_batches[0], sample.outer_batch, sample.mode
        n_tasks = outer.n_tasks
        theta = self.task_parameters(n_tasks, detach=True)
        masks = batch.packed_masks()
        weights, log_likelihoods = _log_likelihood_weights(mode, sample.replay.inner_log_probs[0], batch, create_graph=True)
        weights_tangent = None
        if weights.requires_grad:  # S is not linear in the log-likelihoods (DiCE's magic boxes)

            def weights_tangent(tangent: th.Tensor) -> th.Tensor:
                per_step = batch.unpack_rows(tangent)
                product = th.autograd.grad(weights, log_likelihoods, per_step, retain_graph=True)[0]
                return batch.pack_rows(product.reshape(n_tasks, -1)) * masks

        workspace = Workspace()  # the inner and outer products alternate: one set of buffers
        width = _hidden_width(layout, theta)
        features, actions = _packed_features(batch), batch.packed_actions().float()
        row_weights = batch.pack_rows(weights.detach().reshape(n_tasks, -1)) * masks
        # every product is a sum over rows: a linear S (no weights tangent) is taken in blocks of rows whose
        # (B, rows, width) intermediates stay in cache (a non-linear one couples an episode's rows: one block)
        inner_blocks = _row_blocks(masks.shape[1], n_tasks * width) if weights_tangent is None else [slice(None)]
        inner_hessians = [
            GaussianLogLikelihoodHessian(layout, theta, features[:, rows], actions[:, rows], masks[:, rows],
                                         row_weights[:, rows], weights_tangent, workspace)
            for rows in inner_blocks
        ]  # fmt: skip
        step = self.inner_lr * self.clip_scale(sample.replay.inner_grad_norms[0])
        outer_masks = outer.packed_masks()
        outer_features, outer_total = _packed_features(outer), outer_masks.sum().item()
        outer_fishers = [
            GaussianKLHessian(layout, sample.adapted, outer_features[:, rows], outer_masks[:, rows], outer_total, workspace)
            for rows in _row_blocks(outer_masks.shape[1], n_tasks * width)
        ]

        def jacobian(tangent: Params) -> Params:
            if not mode.differentiate_inner_step:
                return tangent
            curvature = _summed([hessian.product(tangent) for hessian in inner_hessians])
            return {n: tangent[n] + step.view(-1, *[1] * (t.dim() - 1)) * curvature[n] for n, t in tangent.items()}

        # the actor's parameters outside ``names`` are held fixed: a zero tangent
        fixed = {n: th.zeros_like(p) for n, p in self.parameters().items() if n in layout.names and n not in names}

        def product(vector: Params) -> Params:
            shared = {**fixed, **{n: vector[n] for n in names}}
            per_task = {n: v.unsqueeze(0).expand(n_tasks, *v.shape) for n, v in shared.items()}
            adapted_tangent = jacobian(per_task)
            result = jacobian(_summed([fisher.product(adapted_tangent) for fisher in outer_fishers]))
            return {n: result[n].sum(0) for n in names}

        return product


#: elements of a (B, rows, width) intermediate of the layered products that stay in cache on common CPUs (2 MB)
_BLOCK_ELEMENTS = 2**19


def _hidden_width(layout: MlpActorLayout, task_params: Params) -> int:
    """:return: the widest hidden layer of the MLP actor (1 without hidden layers), the width of the passes' intermediates"""
    return max((task_params[weight].shape[1] for weight, _, _ in layout.hidden), default=1)


def _log_likelihood_weights(
    mode: GradientMode, log_prob: th.Tensor, batch: EpisodeBatch, create_graph: bool
) -> tuple[th.Tensor, th.Tensor]:
    """
    :return: the inner surrogate's derivative in each log-likelihood, ``dS/dlog pi`` (shaped as ``log_prob``), taken
        on a small graph of its own (DiCE's boxes are not linear in them), and the log-likelihood leaves it was taken at
        (with ``create_graph``, the weights stay differentiable in them: S's own curvature)
    """
    leaves = log_prob.detach().requires_grad_(True)
    with th.enable_grad():
        weights = th.autograd.grad(mode.inner_surrogate(leaves, batch).sum(), leaves, create_graph=create_graph)[0]
    return weights, leaves


def _row_blocks(n_rows: int, elements_per_row: int) -> list[slice]:
    """:return: about equal blocks of ``n_rows`` rows of at most about ``_BLOCK_ELEMENTS`` elements each"""
    n_blocks = max(1, math.ceil(n_rows * elements_per_row / _BLOCK_ELEMENTS))
    size = math.ceil(n_rows / n_blocks)
    return [slice(start, min(start + size, n_rows)) for start in range(0, n_rows, size)]


def _summed(products: list[Params]) -> Params:
    """:return: the sum of per-block products, by name"""
    total = products[0]
    for product in products[1:]:
        total = {name: total[name] + product[name] for name in total}
    return total


def _packed_features(batch: EpisodeBatch) -> th.Tensor:
    """:return: the batch's observations at its packed rows as a flattened-Box features extractor sees them (B, K, D)"""
    obs = batch.packed_observations()
    return obs.reshape(obs.shape[0], obs.shape[1], -1).float()
