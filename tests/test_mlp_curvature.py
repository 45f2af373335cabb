"""The layer-by-layer products of SB3's MLP Gaussian actor against autograd (double backward)."""

import gymnasium as gym
import pytest
import torch as th
from stable_baselines3.common.policies import ActorCriticPolicy
from torch import nn

from sb3_metarl.common.functional import FunctionalPolicy, grad_params, kl_divergence
from sb3_metarl.mlp import MlpActorLayout
from sb3_metarl.mlp.curvature import GaussianKLHessian, GaussianLogLikelihoodHessian

N_TASKS, N_ROWS = 3, 11
ARCHITECTURES = [([], nn.Tanh), ([6], nn.Tanh), ([5, 4], nn.Tanh), ([5, 4], nn.ReLU)]


def _setup(net_arch, activation_fn, seed=0):
    th.manual_seed(seed)
    policy = ActorCriticPolicy(
        gym.spaces.Box(-1, 1, (3,)),
        gym.spaces.Box(-1, 1, (2,)),
        lambda _: 1e-3,
        net_arch=net_arch,
        activation_fn=activation_fn,
        log_std_init=-0.5,
    )
    functional = FunctionalPolicy(policy)
    layout = MlpActorLayout.of(policy)
    assert layout is not None and set(layout.names) == set(functional.actor_names)
    # distinct parameters per task
    task_params = {
        n: p.detach() + 0.3 * th.randn(N_TASKS, *p.shape, dtype=p.dtype) for n, p in functional.parameters().items()
    }
    obs = th.randn(N_TASKS, N_ROWS, 3)
    actions = th.randn(N_TASKS, N_ROWS, 2)
    masks = th.ones(N_TASKS, N_ROWS)
    masks[1, -4:] = 0  # a shorter episode: padded rows must not count
    obs[1, -4:] = 1e3
    vector = {n: th.randn(N_TASKS, *functional.parameters()[n].shape) for n in layout.names}
    return functional, layout, task_params, obs, actions, masks, vector


def _autograd_hvp(function, task_params, names, vector):
    leaves = {n: p.clone().requires_grad_(n in names) for n, p in task_params.items()}
    grads = th.autograd.grad(function(leaves), [leaves[n] for n in names], create_graph=True)
    inner = sum((g * vector[n]).sum() for n, g in zip(names, grads))
    return {n: g.detach() for n, g in zip(names, grads)}, grad_params(inner, {n: leaves[n] for n in names})


@pytest.mark.parametrize("net_arch, activation_fn", ARCHITECTURES)
@pytest.mark.parametrize("linear", [True, False])
def test_log_likelihood_hessian_matches_double_backward(net_arch, activation_fn, linear):
    functional, layout, task_params, obs, actions, masks, vector = _setup(net_arch, activation_fn)
    weights = th.randn(N_TASKS, N_ROWS) * masks

    def surrogate(log_prob):  # linear: the policy gradient's; else a DiCE-like magic box per task
        return (weights * log_prob).sum() if linear else th.exp((weights * log_prob).sum(1) / 10).sum()

    def objective(params):
        return surrogate(functional.log_prob(params, obs, actions) * masks)

    gradient, expected = _autograd_hvp(objective, task_params, layout.names, vector)
    log_prob = (functional.log_prob(task_params, obs, actions) * masks).requires_grad_(True)
    row_weights = th.autograd.grad(surrogate(log_prob), log_prob, create_graph=True)[0]

    def weights_tangent(tangent):
        return th.autograd.grad(row_weights, log_prob, tangent, retain_graph=True)[0] * masks

    hessian = GaussianLogLikelihoodHessian(
        layout, task_params, obs, actions, masks, row_weights.detach() * masks, None if linear else weights_tangent
    )
    assert linear == (not row_weights.requires_grad)
    for name in layout.names:
        th.testing.assert_close(hessian.gradient[name], gradient[name], rtol=1e-4, atol=1e-5)
    # the products reuse the workspace: a second call with another vector is still exact
    hessian.product({n: -2 * v for n, v in vector.items()})
    product = hessian.product(vector)
    for name in layout.names:
        th.testing.assert_close(product[name], expected[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("net_arch, activation_fn", ARCHITECTURES)
def test_kl_hessian_is_the_fisher_information(net_arch, activation_fn):
    functional, layout, task_params, obs, _, masks, vector = _setup(net_arch, activation_fn)
    old = functional.distribution(task_params, obs)
    flat_masks = masks.reshape(-1)

    def mean_kl(params):
        return (kl_divergence(old, functional.distribution(params, obs)) * flat_masks).sum() / flat_masks.sum()

    gradient, expected = _autograd_hvp(mean_kl, task_params, layout.names, vector)
    assert max(g.abs().max().item() for g in gradient.values()) == 0.0  # the KL is stationary at equal parameters
    product = GaussianKLHessian(layout, task_params, obs, masks, flat_masks.sum().item()).product(vector)
    for name in layout.names:
        th.testing.assert_close(product[name], expected[name], rtol=1e-4, atol=1e-5)


def test_mean_matches_the_policy():
    functional, layout, task_params, obs, *_ = _setup([5, 4], nn.Tanh)
    from sb3_metarl.mlp.curvature import MlpActorPass

    mean = MlpActorPass(layout, task_params, obs).mean
    th.testing.assert_close(mean.reshape(-1, 2), functional.distribution(task_params, obs).distribution.loc)


@pytest.mark.parametrize(
    "policy_kwargs",
    [dict(use_sde=True), dict(squash_output=True, use_sde=True), dict(activation_fn=nn.ELU)],
)
def test_other_actors_have_no_layout(policy_kwargs):
    policy = ActorCriticPolicy(gym.spaces.Box(-1, 1, (3,)), gym.spaces.Box(-1, 1, (2,)), lambda _: 1e-3, **policy_kwargs)
    assert MlpActorLayout.of(policy) is None
    discrete = ActorCriticPolicy(gym.spaces.Box(-1, 1, (3,)), gym.spaces.Discrete(3), lambda _: 1e-3)
    assert MlpActorLayout.of(discrete) is None
