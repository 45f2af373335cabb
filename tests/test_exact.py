"""The exact references themselves: closed forms against Monte Carlo and finite differences."""

import numpy as np
import pytest
import torch as th

from sb3_metarl import FixedTaskSampler, MetaPolicyGradient
from sb3_metarl.estimators.exact import (
    bandit_maml_gradient,
    bandit_pathwise_gradient,
    bandit_value,
    exact_meta_gradient,
    exact_value,
    tabular_values,
)
from sb3_metarl.estimators.setups import make_tabular_model


def test_bandit_value_matches_monte_carlo():
    rng = np.random.default_rng(0)
    actions = 0.3 + np.exp(-0.7) * rng.standard_normal(1_000_000)
    rewards = -((actions - 0.8) ** 2)
    closed_form = bandit_value(th.tensor(0.3), th.tensor(-0.7), 0.8).item()
    assert abs(rewards.mean() - closed_form) < 4 * rewards.std() / np.sqrt(len(rewards))


def _bandit_maml_objective(mean, log_std, target, inner_lr, steps):
    for _ in range(steps):
        mean, log_std = mean + inner_lr * (-2 * (mean - target)), log_std + inner_lr * (-2 * np.exp(2 * log_std))
    return -((mean - target) ** 2) - np.exp(2 * log_std)


@pytest.mark.parametrize("steps", [1, 3])
def test_bandit_maml_gradient_matches_finite_differences(steps):
    grad = bandit_maml_gradient(0.2, -0.5, 0.5, 0.1, steps)
    eps = 1e-6
    numeric = [
        (_bandit_maml_objective(0.2 + eps, -0.5, 0.5, 0.1, steps) - _bandit_maml_objective(0.2 - eps, -0.5, 0.5, 0.1, steps))
        / 2
        / eps,
        (_bandit_maml_objective(0.2, -0.5 + eps, 0.5, 0.1, steps) - _bandit_maml_objective(0.2, -0.5 - eps, 0.5, 0.1, steps))
        / 2
        / eps,
    ]
    np.testing.assert_allclose(grad, numeric, rtol=1e-6)


@pytest.mark.slow
def test_pathwise_gradient_tends_to_the_maml_gradient_as_n_grows():
    maml = bandit_maml_gradient(0.2, -0.5, 0.5, 0.1)
    distances = []
    for n in (2, 32, 512):
        mean, se = bandit_pathwise_gradient(0.2, -0.5, 0.5, 0.1, n, n_samples=50_000)
        distances.append(np.linalg.norm(mean - maml))
        assert np.all(se < 0.01)
    assert distances[0] > distances[1] > distances[2] and distances[2] < 0.01


def test_tabular_value_matches_monte_carlo_returns():
    model, task = make_tabular_model("lsf", inner_episodes=2000, meta_batch_size=1, inner_lr=1.0)
    with th.no_grad():
        model.policy.action_net.weight.normal_(0, 1.0)  # a non-uniform policy
    value = exact_value(model, [task]).item()
    batch = model.sample_episodes([task], None, 2000)
    returns = batch.discounted_returns[0].double()
    assert abs(returns.mean().item() - value) < 4 * returns.std().item() / np.sqrt(len(returns))


def test_tabular_meta_gradient_matches_an_independent_float64_implementation():
    """
    The SB3 tabular policy (net_arch=[], one-hot states) is softmax(W^T + b). Re-implemented here in
    float64, its two-step MAML objective is checked by finite differences, and its autodiff gradient
    against ``exact_meta_gradient`` (which goes through the SB3 policy, in float32).
    """
    model = MetaPolicyGradient(
        "MlpPolicy",
        "sb3_metarl/TabularMDP-v0",
        env_kwargs=dict(n_states=4, n_actions=3),
        meta_batch_size=1,
        inner_episodes=1,
        outer_episodes=1,
        inner_steps=2,
        inner_lr=5.0,
        gamma=0.9,
        task_sampler=FixedTaskSampler([np.zeros((4, 3))]),
        policy_kwargs=dict(net_arch=[]),
        seed=0,
    )
    task = np.random.default_rng(1).uniform(size=(4, 3))
    grads = exact_meta_gradient(model, [task])
    kernel = th.tensor(model.get_env().get_attr("transitions", indices=[0])[0])
    initial = th.tensor(model.get_env().get_attr("initial_distribution", indices=[0])[0])
    rewards = th.tensor(task)[None]

    def value(weight, bias):
        return tabular_values(th.log_softmax(weight.T + bias, -1)[None], kernel, rewards, initial, 20, 0.9)[0]

    def maml_objective(weight, bias):
        for _ in range(2):
            grad_weight, grad_bias = th.autograd.grad(value(weight, bias), (weight, bias), create_graph=True)
            weight, bias = weight + 5.0 * grad_weight, bias + 5.0 * grad_bias
        return value(weight, bias)

    weight0 = model.policy.action_net.weight.detach().double().cpu()
    bias0 = model.policy.action_net.bias.detach().double().cpu()
    weight, bias = weight0.clone().requires_grad_(True), bias0.clone().requires_grad_(True)
    expected_weight, expected_bias = th.autograd.grad(maml_objective(weight, bias), (weight, bias))
    th.testing.assert_close(grads["action_net.weight"].double().cpu(), expected_weight, rtol=1e-4, atol=1e-6)
    th.testing.assert_close(grads["action_net.bias"].double().cpu(), expected_bias, rtol=1e-4, atol=1e-6)
    for index in [(0, 0), (2, 3), (1, 2)]:
        delta = th.zeros_like(weight0)
        delta[index] = 1e-5
        plus = maml_objective((weight0 + delta).requires_grad_(True), bias0.clone().requires_grad_(True))
        minus = maml_objective((weight0 - delta).requires_grad_(True), bias0.clone().requires_grad_(True))
        assert expected_weight[index].item() == pytest.approx(((plus - minus) / 2e-5).item(), rel=1e-6, abs=1e-9)


def test_exact_references_need_a_tabular_env(tiny_navigation_model):
    with pytest.raises(ValueError, match="TabularMDP"):
        exact_value(tiny_navigation_model, [np.zeros((20, 5))])
