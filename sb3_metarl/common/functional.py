"""Functional evaluation of an SB3 policy with per-task parameters, batched over tasks."""

import contextlib
import copy
from collections.abc import Iterator
from typing import Protocol

import torch as th
from stable_baselines3.common.distributions import (
    BernoulliDistribution,
    CategoricalDistribution,
    DiagGaussianDistribution,
    Distribution,
    MultiCategoricalDistribution,
)
from stable_baselines3.common.policies import ActorCriticPolicy
from torch import nn
from torch.func import functional_call, vmap

#: parameter name -> tensor; "task parameters" carry a leading task dimension.
Params = dict[str, th.Tensor]

SUPPORTED_DISTRIBUTIONS = (
    DiagGaussianDistribution,
    CategoricalDistribution,
    MultiCategoricalDistribution,
    BernoulliDistribution,
)


@contextlib.contextmanager
def _no_distribution_validation() -> Iterator[None]:
    # torch.distributions validates arguments with data-dependent branches, which vmap cannot batch.
    previous = th.distributions.Distribution._validate_args
    th.distributions.Distribution.set_default_validate_args(False)
    try:
        yield
    finally:
        th.distributions.Distribution.set_default_validate_args(previous)


def _forget(dist: Distribution) -> None:
    # SB3 policies keep the last distribution on their shared ``action_dist``; under vmap it holds
    # batched tensors that must not outlive the call (they would break ``deepcopy(policy)``).
    dist.distribution = None


# SB3 registers a shared features extractor under three names (features_extractor,
# pi_features_extractor, vf_features_extractor), all one module object. functional_call's
# tie_weights=True would swap that module's attribute once per name and restore a substituted
# tensor, leaving it on the policy; one canonical name with tie_weights=False swaps and restores
# it once, and every alias sees the substitute because they are the same module.
class _LogProb(nn.Module):
    def __init__(self, policy: ActorCriticPolicy):
        super().__init__()
        self.policy = policy

    def forward(self, obs: th.Tensor, actions: th.Tensor) -> th.Tensor:
        dist = self.policy.get_distribution(obs)
        log_prob = dist.log_prob(actions)
        _forget(dist)
        return log_prob


class _DistributionTensors(nn.Module):
    """Returns the tensors that define the action distribution (vmap cannot return objects)."""

    def __init__(self, policy: ActorCriticPolicy):
        super().__init__()
        self.policy = policy

    def forward(self, obs: th.Tensor) -> tuple[th.Tensor, ...]:
        sb3_dist = self.policy.get_distribution(obs)
        dist = sb3_dist.distribution
        _forget(sb3_dist)
        if isinstance(dist, list):
            return tuple(d.logits for d in dist)
        if isinstance(dist, th.distributions.Normal):
            return dist.loc, dist.scale
        return (dist.logits,)


class FunctionalPolicy:
    """
    Evaluates an SB3 actor-critic policy with parameters given as tensors, one set per task, in one
    batched (``torch.func.vmap``) pass. The tensors may carry an autograd graph (adapted
    parameters), so log-likelihoods stay differentiable with respect to the meta-parameters.

    :param policy: the SB3 policy whose architecture is evaluated
    """

    def __init__(self, policy: ActorCriticPolicy):
        if not isinstance(policy.action_dist, SUPPORTED_DISTRIBUTIONS):
            raise ValueError(
                f"policy: action distribution {type(policy.action_dist).__name__} is not supported "
                f"(use_sde must be False); supported: {[d.__name__ for d in SUPPORTED_DISTRIBUTIONS]}."
            )
        self.policy = policy
        self._log_prob = _LogProb(policy)
        self._tensors = _DistributionTensors(policy)
        value_only = ("mlp_extractor.value_net.", "value_net.", "vf_features_extractor.")
        #: the parameters the action distribution depends on (not the value head's)
        self.actor_names = [
            name for name in self.parameters() if not name.startswith(value_only) or name.startswith("features_extractor.")
        ]

    def parameters(self) -> Params:
        """:return: the policy's trainable parameters by name (the meta-parameters theta)"""
        return {name: p for name, p in self.policy.named_parameters() if p.requires_grad}

    @staticmethod
    def expand(params: Params, n_tasks: int) -> Params:
        """:return: per-task views of shared parameters (leading dim ``n_tasks``), keeping their graph"""
        return {name: p.unsqueeze(0).expand(n_tasks, *p.shape) for name, p in params.items()}

    def _prefixed(self, task_params: Params) -> Params:
        return {"policy." + name: value for name, value in task_params.items()}

    def log_prob(self, task_params: Params, obs: th.Tensor, actions: th.Tensor) -> th.Tensor:
        """
        :param task_params: parameters with a leading task dim B
        :param obs: observations (B, K, *obs_shape)
        :param actions: actions (B, K, ...) in the policy's format
        :return: log-likelihoods (B, K), differentiable with respect to ``task_params``
        """

        def single(params: Params, task_obs: th.Tensor, task_actions: th.Tensor) -> th.Tensor:
            return functional_call(self._log_prob, params, (task_obs, task_actions), tie_weights=False)

        with _no_distribution_validation():
            return vmap(single)(self._prefixed(task_params), obs, actions)

    @staticmethod
    def is_shared(task_params: Params) -> bool:
        """:return: whether every task holds the same parameters (views made by ``expand``, or a single task)"""
        return all(p.shape[0] == 1 or p.stride(0) == 0 for p in task_params.values())

    def single_distribution(self, params: Params, obs: th.Tensor) -> Distribution:
        """
        The action distribution of one parameter set, in one plain (not batched over tasks) call with
        only the actor's parameters substituted: the cheapest evaluation, whose results do not depend
        on any other task's (a batched matmul's last bits depend on the batch it is part of).

        :param params: parameters by name (no task dim; at least the actor's)
        :param obs: observations (K, *obs_shape)
        :return: an SB3 distribution over the K observations
        """
        actor = self._prefixed({name: params[name] for name in self.actor_names})
        with _no_distribution_validation():
            return self._as_distribution(functional_call(self._tensors, actor, (obs,), tie_weights=False))

    def _as_distribution(self, flat: tuple[th.Tensor, ...] | list[th.Tensor]) -> Distribution:
        dist = copy.copy(self.policy.action_dist)
        if isinstance(dist, DiagGaussianDistribution):
            dist.distribution = th.distributions.Normal(*flat)
        elif isinstance(dist, MultiCategoricalDistribution):
            dist.distribution = [th.distributions.Categorical(logits=logits) for logits in flat]
        elif isinstance(dist, BernoulliDistribution):
            dist.distribution = th.distributions.Bernoulli(logits=flat[0])
        else:
            dist.distribution = th.distributions.Categorical(logits=flat[0])
        return dist

    def distribution(self, task_params: Params, obs: th.Tensor) -> Distribution:
        """
        :param task_params: parameters with a leading task dim B
        :param obs: observations (B, K, *obs_shape)
        :return: an SB3 distribution over the flattened batch of B*K observations (task-major), as
            SB3's distributions sum log-likelihoods over dim 1 and so expect a 2-D batch
        """

        def single(params: Params, task_obs: th.Tensor) -> tuple[th.Tensor, ...]:
            return functional_call(self._tensors, params, (task_obs,), tie_weights=False)

        with _no_distribution_validation():
            if self.is_shared(task_params):
                # one plain batched forward: vmap's per-call overhead dominates these small networks
                shared = self._prefixed({name: p[0] for name, p in task_params.items()})
                flat = single(shared, obs.reshape(-1, *obs.shape[2:]))
            else:
                tensors = vmap(single)(self._prefixed(task_params), obs)
                flat = [t.reshape(-1, *t.shape[2:]) for t in tensors]
            return self._as_distribution(flat)


def grad_params(output: th.Tensor, params: Params, create_graph: bool = False, retain_graph: bool | None = None) -> Params:
    """
    :param output: a scalar
    :param params: tensors (leaves or not) that ``output`` may depend on
    :param create_graph: keep the graph of the gradient (for higher-order derivatives)
    :param retain_graph: keep ``output``'s graph for another differentiation (default: ``create_graph``)
    :return: d output / d params by name; zeros for parameters ``output`` does not depend on
        (such as the value head, which no policy-gradient surrogate touches)
    """
    names = list(params)
    grads = th.autograd.grad(
        output, [params[n] for n in names], create_graph=create_graph, retain_graph=retain_graph, allow_unused=True
    )
    return {n: th.zeros_like(params[n]) if g is None else g for n, g in zip(names, grads)}


def inner_update(
    params: Params,
    gradient: Params,
    step_size: float,
    scale: th.Tensor | None = None,
    derivative: Params | None = None,
) -> Params:
    """
    The inner step, written once for every inner loop (the adaptation, its layered twin, the ``inner_lr="auto"``
    calibration, the bias decomposition, LOLA): ``theta' = theta + eta * s * g`` per task.

    :param params: per-task parameters theta (leading dim: the tasks)
    :param gradient: the ascent direction g by name (parameters without one keep their value)
    :param step_size: eta
    :param scale: a per-task factor s (B,) (a clip factor, or per-task step sizes with ``step_size=1``); None: 1
    :param derivative: where given, the step takes its value from ``gradient`` and its derivatives from
        ``derivative``: ``g = stop(gradient) + derivative - stop(derivative)`` (Liu et al.'s decomposition of the
        meta-gradient, LOLA's off-policy Hessian)
    :return: the new per-task parameters (graph-carrying where ``params``, ``gradient`` or ``derivative`` are)
    """
    stepped = {}
    for name, param in params.items():
        if name not in gradient:
            stepped[name] = param
            continue
        direction = gradient[name]
        if derivative is not None:
            direction = direction.detach() + derivative[name] - derivative[name].detach()
        if scale is not None:
            direction = direction * scale.view(-1, *[1] * (direction.dim() - 1)).to(direction)
        stepped[name] = param + step_size * direction
    return stepped


def kl_divergence(dist_p: Distribution, dist_q: Distribution) -> th.Tensor:
    """:return: KL(p || q) per sample (summed over action dimensions) for two distributions of the same kind"""
    if isinstance(dist_p.distribution, list):
        return sum(th.distributions.kl_divergence(p, q) for p, q in zip(dist_p.distribution, dist_q.distribution))
    kl = th.distributions.kl_divergence(dist_p.distribution, dist_q.distribution)
    return kl.sum(-1) if isinstance(dist_p, (DiagGaussianDistribution, BernoulliDistribution)) else kl


class ActionNoise(Protocol):
    """Where sampled actions get their randomness: draws with a leading dimension of one row per action."""

    def normal(self, shape: tuple[int, ...], dtype: th.dtype) -> th.Tensor:
        """:return: standard normal draws of ``shape`` (on the CPU)"""

    def uniform(self, shape: tuple[int, ...], dtype: th.dtype) -> th.Tensor:
        """:return: uniform [0, 1) draws of ``shape`` (on the CPU)"""


class GeneratorNoise:
    """
    :class:`ActionNoise` from one CPU ``torch.Generator``.

    :param generator: the generator
    """

    def __init__(self, generator: th.Generator):
        self.generator = generator

    def normal(self, shape: tuple[int, ...], dtype: th.dtype) -> th.Tensor:
        return th.randn(shape, generator=self.generator, dtype=dtype)

    def uniform(self, shape: tuple[int, ...], dtype: th.dtype) -> th.Tensor:
        return th.rand(shape, generator=self.generator, dtype=dtype)


def sample_actions(dist: Distribution, noise: "ActionNoise | th.Generator") -> th.Tensor:
    """
    Sample actions from an SB3 distribution with noise drawn on the CPU from a stream of the model's own
    (saved and restored with it, the caller's global torch generator untouched), so that the same seed
    gives the same actions on every device.

    :param dist: a distribution returned by ``FunctionalPolicy.distribution``
    :param noise: the draws' source (e.g. one stream per task group), or a CPU ``torch.Generator``
    :return: actions in SB3's format
    """
    if isinstance(noise, th.Generator):
        noise = GeneratorNoise(noise)

    def uniform(shape: th.Size, like: th.Tensor) -> th.Tensor:
        return noise.uniform(tuple(shape), like.dtype).to(like.device)

    def categorical(probs: th.Tensor) -> th.Tensor:
        # inverse CDF; the clamp guards against a last cumulative probability rounded below 1
        below = probs.cumsum(-1) < uniform(probs.shape[:-1], probs).unsqueeze(-1)
        return below.sum(-1).clamp(max=probs.shape[-1] - 1)

    inner = dist.distribution
    if isinstance(dist, DiagGaussianDistribution):
        return inner.loc + inner.scale * noise.normal(tuple(inner.loc.shape), inner.loc.dtype).to(inner.loc.device)
    if isinstance(dist, MultiCategoricalDistribution):
        # one uniform per row and action dimension, drawn row-major so that a row's draws are contiguous
        draws = uniform(th.Size((inner[0].probs.shape[0], len(inner))), inner[0].probs)
        return th.stack(
            [(d.probs.cumsum(-1) < draws[:, i : i + 1]).sum(-1).clamp(max=d.probs.shape[-1] - 1) for i, d in enumerate(inner)],
            dim=1,
        )
    if isinstance(dist, BernoulliDistribution):
        return (uniform(inner.probs.shape, inner.probs) < inner.probs).to(inner.probs.dtype)
    return categorical(inner.probs)
