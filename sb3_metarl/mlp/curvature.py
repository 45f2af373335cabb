"""
Exact first- and second-order products of SB3's default MLP Gaussian actor, batched over tasks, layer
by layer from cached activations.

A TRPO meta-update multiplies the same curvature by ten or more vectors at one point. Autograd's double
backward rebuilds every activation derivative (and its derivative) for each product; here the forward
pass and the primal backward pass are evaluated once (:class:`MlpActorPass`) and each product is a few
batched matmuls (Pearlmutter's R-operator, written out for ``Linear -> activation`` stacks). The results
are the same derivatives as autograd's, up to float rounding (``tests/test_mlp_curvature.py``).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch as th

from sb3_metarl.common.functional import Params
from sb3_metarl.mlp.layout import MlpActorLayout


@dataclass
class _Tangent:
    """The forward pass's directional derivatives along a parameter tangent."""

    pre_activations: list[th.Tensor]  # R a_i per hidden block
    activations: list[th.Tensor | None]  # R h_i, h_0 = the features (None: zero)
    mean: th.Tensor
    log_std: th.Tensor


@dataclass
class _Backward:
    """A backward pass's cotangents of each hidden block (kept for the R-operator of that backward pass)."""

    mean: th.Tensor
    pre_activations: list[th.Tensor] = field(default_factory=list)  # d/da_i
    #: d/dh_i * act''(a_i) per block (None where act'' is zero)
    curvature_products: list[th.Tensor | None] = field(default_factory=list)


def _linear(inputs: th.Tensor, weight: th.Tensor, bias: th.Tensor | None = None) -> th.Tensor:
    """inputs (B, N, in) @ weight (B, out, in)^T [+ bias (B, out)] -> (B, N, out)"""
    if bias is None:
        return th.bmm(inputs, weight.transpose(1, 2))
    return th.baddbmm(bias.unsqueeze(1), inputs, weight.transpose(1, 2))


def _outer(cotangent: th.Tensor, inputs: th.Tensor) -> th.Tensor:
    """sum over rows of cotangent (B, N, out) x inputs (B, N, in) -> (B, out, in), a linear layer's weight gradient"""
    # the thinner factor goes first, transposed: with a thin second factor (the observations, or the mean's
    # cotangent) the reduction over rows runs several times slower
    if cotangent.shape[-1] <= inputs.shape[-1]:
        return th.bmm(cotangent.transpose(1, 2), inputs)
    return th.bmm(inputs.transpose(1, 2), cotangent).transpose(1, 2)


class Workspace:
    """
    Buffers for the (B, N, width) intermediates of repeated products, written in place: a fresh
    allocation of that size per intermediate costs as much as the arithmetic (the allocator returns
    such blocks to the system and takes them back page by page).
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, int, th.Size], th.Tensor] = {}

    def __call__(self, role: str, index: int, like: th.Tensor) -> th.Tensor:
        """:return: the buffer of ``role`` for block ``index`` with ``like``'s shape and dtype (contents undefined)"""
        key = (role, index, like.shape)
        buffer = self.buffers.get(key)
        if buffer is None:
            buffer = self.buffers[key] = th.empty_like(like)
        return buffer


class MlpActorPass:
    """
    One forward pass of an MLP Gaussian actor with per-task parameters, with what every product at
    these parameters reuses.

    :param layout: the actor's parameter names
    :param task_params: per-task parameters (leading dim B), detached
    :param features: flattened observations (B, N, D)
    :param workspace: buffers shared with other passes whose products alternate with this one's
    """

    def __init__(self, layout: MlpActorLayout, task_params: Params, features: th.Tensor, workspace: "Workspace | None" = None):
        self.layout = layout
        self.params = {name: task_params[name].detach() for name in layout.names}
        self.activations = [features]  # h_0 .. h_L
        self.slopes: list[th.Tensor] = []  # act'(a_i)
        self.workspace = workspace or Workspace()
        hidden = features
        for weight, bias, activation in layout.hidden:
            pre = _linear(hidden, self.params[weight], self.params[bias])
            hidden = activation.function(pre)
            self.slopes.append(activation.slope(pre, hidden))
            self.activations.append(hidden)
        weight, bias = layout.output
        self.mean = _linear(hidden, self.params[weight], self.params[bias])
        #: 1 / sigma^2 per task and action dimension, (B, 1, A)
        self.inverse_variance = th.exp(-2.0 * self.params[layout.log_std]).unsqueeze(1)

    def tangent(self, vector: Params) -> _Tangent:
        """
        :return: the forward pass's derivatives along the per-task parameter tangent ``vector`` (its
            hidden-layer tensors live in this pass's workspace until the next call)
        """
        pre_tangents: list[th.Tensor] = []
        tangents: list[th.Tensor | None] = [None]
        for index, (weight, bias, _) in enumerate(self.layout.hidden):
            inputs = self.activations[index]
            pre = self.workspace("pre_tangent", index, self.slopes[index])
            th.baddbmm(vector[bias].unsqueeze(1), inputs, vector[weight].transpose(1, 2), out=pre)
            if tangents[index] is not None:
                pre.baddbmm_(tangents[index], self.params[weight].transpose(1, 2))
            pre_tangents.append(pre)
            tangents.append(th.mul(self.slopes[index], pre, out=self.workspace("tangent", index, pre)))
        weight, bias = self.layout.output
        mean = _linear(self.activations[-1], vector[weight], vector[bias])
        if tangents[-1] is not None:
            mean = mean + _linear(tangents[-1], self.params[weight])
        return _Tangent(pre_tangents, tangents, mean, vector[self.layout.log_std])

    def _output_grads(self, mean_cotangent: th.Tensor, log_std_cotangent: th.Tensor) -> Params:
        weight, bias = self.layout.output
        return {
            self.layout.log_std: log_std_cotangent,
            weight: _outer(mean_cotangent, self.activations[-1]),
            bias: mean_cotangent.sum(1),
        }

    def backward(
        self, mean_cotangent: th.Tensor, log_std_cotangent: th.Tensor, keep: bool = False
    ) -> tuple[Params, _Backward | None]:
        """
        The vector-Jacobian product: gradients of ``sum(mean_cotangent * mean) + sum(log_std_cotangent * log_std)``.

        :param mean_cotangent: (B, N, A)
        :param log_std_cotangent: (B, A)
        :param keep: return the pass's cotangents (for :meth:`backward_tangent`); else they live in the workspace
        :return: per-task gradients by name, and the pass's cotangents if ``keep``
        """
        grads = self._output_grads(mean_cotangent, log_std_cotangent)
        cotangents = _Backward(mean_cotangent)
        last = len(self.layout.hidden) - 1
        if last < 0:
            return grads, cotangents if keep else None
        out = None if keep else self.workspace("up", last, self.slopes[last])
        upstream = th.bmm(mean_cotangent, self.params[self.layout.output[0]], out=out)
        for index in reversed(range(len(self.layout.hidden))):
            weight, bias, _ = self.layout.hidden[index]
            if keep:
                cotangents.curvature_products.insert(0, self._curvature_product(upstream, index))
            pre = upstream * self.slopes[index] if keep else th.mul(upstream, self.slopes[index], out=upstream)
            cotangents.pre_activations.insert(0, pre)
            grads[weight] = _outer(pre, self.activations[index])
            grads[bias] = pre.sum(1)
            if index > 0:
                out = None if keep else self.workspace("up", index - 1, self.slopes[index - 1])
                upstream = th.bmm(pre, self.params[weight], out=out)
        return grads, cotangents if keep else None

    def backward_tangent(
        self, vector: Params, tangent: _Tangent, cotangents: _Backward, mean_cotangent: th.Tensor, log_std_cotangent: th.Tensor
    ) -> Params:
        """
        The derivative of :meth:`backward` (with ``cotangents`` its result at these parameters) along
        ``vector``, when its mean cotangent changes by ``mean_cotangent`` and its log-std cotangent by
        ``log_std_cotangent`` along the same direction: the R-operator of the backward pass.

        :return: per-task derivatives of the gradients by name
        """
        grads = self._output_grads(mean_cotangent, log_std_cotangent)
        weight = self.layout.output[0]
        if tangent.activations[-1] is not None:
            grads[weight] = grads[weight] + _outer(cotangents.mean, tangent.activations[-1])
        if not self.layout.hidden:
            return grads
        last = len(self.layout.hidden) - 1
        upstream = th.bmm(mean_cotangent, self.params[weight], out=self.workspace("r_up", last, self.slopes[last]))
        upstream.baddbmm_(cotangents.mean, vector[weight])
        for index in reversed(range(len(self.layout.hidden))):
            weight, bias, _ = self.layout.hidden[index]
            pre = th.mul(upstream, self.slopes[index], out=upstream)
            curvature_product = cotangents.curvature_products[index]
            if curvature_product is not None:
                pre.addcmul_(curvature_product, tangent.pre_activations[index])
            grads[weight] = _outer(pre, self.activations[index])
            if tangent.activations[index] is not None:
                grads[weight] = grads[weight] + _outer(cotangents.pre_activations[index], tangent.activations[index])
            grads[bias] = pre.sum(1)
            if index > 0:
                upstream = th.bmm(pre, self.params[weight], out=self.workspace("r_up", index - 1, self.slopes[index - 1]))
                upstream.baddbmm_(cotangents.pre_activations[index], vector[weight])
        return grads

    def _curvature_product(self, upstream: th.Tensor, index: int) -> th.Tensor | None:
        """:return: ``d/dh_i * act''(a_i)``, None where act'' is zero (ReLU)"""
        curvature = self.layout.hidden[index][2].curvature
        return None if curvature is None else curvature(upstream, self.activations[index + 1], self.slopes[index])


def gaussian_log_likelihood(forward: MlpActorPass, actions: th.Tensor) -> th.Tensor:
    """:return: the log-likelihoods (B, N) of ``actions`` (B, N, A) under ``forward``'s diagonal Gaussian, as SB3's"""
    log_std = forward.params[forward.layout.log_std].unsqueeze(1)
    z = (actions - forward.mean) * th.exp(-log_std)
    return (-0.5 * z * z - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


@dataclass
class GaussianScore:
    """
    The derivative of ``sum(weights * log pi(a | s))`` (per task) in the mean and the log std of a diagonal
    Gaussian actor, the cotangents of :meth:`MlpActorPass.backward`.
    """

    scaled_residual: th.Tensor  # d log pi / d mean = (a - mu) / sigma^2, zero on padded rows (which may hold anything)
    squared_z: th.Tensor  # ((a - mu) / sigma)^2
    mean_cotangent: th.Tensor  # (B, N, A)
    log_std_cotangent: th.Tensor  # (B, A)

    @staticmethod
    def of(forward: MlpActorPass, actions: th.Tensor, masks: th.Tensor, weights: th.Tensor) -> "GaussianScore":
        """
        :param forward: the actor's pass on the rows
        :param actions: (B, N, A)
        :param masks: 1 for the valid rows, 0 for padding (B, N)
        :param weights: ``d S / d log pi`` per row (B, N, 1)
        :return: the cotangents of ``sum(weights * log pi)`` at ``forward``'s means
        """
        residual = (actions - forward.mean) * masks.unsqueeze(-1)
        scaled_residual = residual * forward.inverse_variance
        squared_z = residual * scaled_residual
        log_std_cotangent = (weights * (squared_z - masks.unsqueeze(-1))).sum(1)
        return GaussianScore(scaled_residual, squared_z, weights * scaled_residual, log_std_cotangent)


class GaussianLogLikelihoodHessian:
    """
    Hessian-vector products, per task, of ``S_b(log pi_theta_b(a | s))`` for a per-task scalar function
    S of the (masked) log-likelihoods of B batches of actions, at fixed parameters.

    :param layout: the actor's parameter names
    :param task_params: per-task parameters (leading dim B)
    :param features: flattened observations (B, N, D)
    :param actions: (B, N, A)
    :param masks: 1 for the valid rows, 0 for padding (B, N)
    :param log_likelihood_weights: ``dS/d log pi`` per row (B, N), zero where masked
    :param weights_tangent: None if S is linear in the log-likelihoods; else a map from the
        log-likelihoods' directional derivative (B, N) to that of the weights (B, N) (S's own curvature)
    :param workspace: buffers shared with passes whose products alternate with this one's
    """

    def __init__(
        self,
        layout: MlpActorLayout,
        task_params: Params,
        features: th.Tensor,
        actions: th.Tensor,
        masks: th.Tensor,
        log_likelihood_weights: th.Tensor,
        weights_tangent: Callable[[th.Tensor], th.Tensor] | None = None,
        workspace: Workspace | None = None,
    ):
        self.forward = MlpActorPass(layout, task_params, features, workspace)
        self.masks = masks
        self.weights = log_likelihood_weights.unsqueeze(-1)
        score = GaussianScore.of(self.forward, actions, masks, self.weights)
        self.scaled_residual, self.squared_z = score.scaled_residual, score.squared_z
        self.weights_tangent = weights_tangent
        #: dS/dtheta per task
        self.gradient, cotangents = self.forward.backward(score.mean_cotangent, score.log_std_cotangent, keep=True)
        assert cotangents is not None
        self.cotangents = cotangents

    def product(self, vector: Params) -> Params:
        """:return: per-task ``H_b v_b`` for per-task tangents ``vector`` (leading dim B)"""
        tangent = self.forward.tangent(vector)
        log_std = tangent.log_std.unsqueeze(1)
        residual_tangent = -tangent.mean * self.forward.inverse_variance - 2.0 * log_std * self.scaled_residual
        squared_z_tangent = -2.0 * self.scaled_residual * tangent.mean - 2.0 * log_std * self.squared_z
        mean_cotangent = self.weights * residual_tangent
        log_std_cotangent = self.weights * squared_z_tangent
        if self.weights_tangent is not None:
            masks = self.masks.unsqueeze(-1)
            log_likelihood_tangent = (self.scaled_residual * tangent.mean + log_std * (self.squared_z - masks)).sum(-1)
            weights_tangent = self.weights_tangent(log_likelihood_tangent).unsqueeze(-1)
            mean_cotangent = mean_cotangent + weights_tangent * self.scaled_residual
            log_std_cotangent = log_std_cotangent + weights_tangent * (self.squared_z - masks)
        return self.forward.backward_tangent(vector, tangent, self.cotangents, mean_cotangent, log_std_cotangent.sum(1))


class GaussianKLHessian:
    """
    Products with the Hessian, at equal parameters, of ``sum_b sum_rows mask KL(pi_old || pi_theta_b) / total``
    with respect to each task's parameters (the Fisher information of the actions' distribution, pulled
    back through the network): ``1 / sigma^2`` on the mean, 2 on each log std.

    :param layout: the actor's parameter names
    :param task_params: per-task parameters (leading dim B)
    :param features: flattened observations (B, N, D)
    :param masks: (B, N)
    :param total: the normalizer (the number of valid rows over all tasks)
    :param workspace: buffers shared with passes whose products alternate with this one's
    """

    def __init__(
        self,
        layout: MlpActorLayout,
        task_params: Params,
        features: th.Tensor,
        masks: th.Tensor,
        total: float,
        workspace: Workspace | None = None,
    ):
        self.forward = MlpActorPass(layout, task_params, features, workspace)
        self.row_weights = (masks / total).unsqueeze(-1)
        self.log_std_weights = 2.0 * masks.sum(1, keepdim=True) / total

    def product(self, vector: Params) -> Params:
        """:return: per-task ``G_b v_b`` for per-task tangents ``vector`` (leading dim B)"""
        tangent = self.forward.tangent(vector)
        mean_cotangent = tangent.mean * self.forward.inverse_variance * self.row_weights
        grads, _ = self.forward.backward(mean_cotangent, self.log_std_weights * tangent.log_std)
        return grads
