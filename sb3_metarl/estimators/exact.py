"""
Exact references for the meta-gradient (no estimator involved):

- the Gaussian bandit: ``V_g(mu, sigma) = -(mu - g)^2 - sigma^2`` in closed form, so the MAML
  gradient (the N -> infinity limit) is closed-form, and the gradient of the N-sample objective
  L_N is an expectation over the reparametrized inner samples, estimated path-wise with tiny variance;
- the tabular MDP: finite-horizon policy evaluation by dynamic programming is differentiable, so the
  MAML meta-gradient for any number of inner steps is computed by autodiff with no sampling.
"""

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch as th

from sb3_metarl.common.functional import FunctionalPolicy, Params, grad_params

if TYPE_CHECKING:  # (the model's type for the checker: the exact references only read it)
    from sb3_metarl.meta_pg import MetaPolicyGradient

# ---------------------------------------------------------------------------------------------- bandit


def bandit_value(mean: th.Tensor, log_std: th.Tensor, target: float) -> th.Tensor:
    """:return: the expected reward ``-(mean - target)^2 - exp(log_std)^2`` of N(mean, std^2)"""
    return -((mean - target) ** 2) - th.exp(2 * log_std)


def bandit_maml_gradient(mean: float, log_std: float, target: float, inner_lr: float, inner_steps: int = 1) -> np.ndarray:
    """
    The gradient of ``L_inf(theta) = V(theta_zeta)`` with ``theta_{k+1} = theta_k + inner_lr * grad V(theta_k)``.

    :return: gradient with respect to (mean, log_std), shape (2,)
    """
    theta = th.tensor([mean, log_std], dtype=th.float64, requires_grad=True)
    params = theta
    for _ in range(inner_steps):
        (grad,) = th.autograd.grad(bandit_value(params[0], params[1], target), params, create_graph=True)
        params = params + inner_lr * grad
    (meta_grad,) = th.autograd.grad(bandit_value(params[0], params[1], target), theta)
    return meta_grad.numpy()


def bandit_pathwise_gradient(
    mean: float,
    log_std: float,
    target: float,
    inner_lr: float,
    inner_episodes: int,
    inner_steps: int = 1,
    n_samples: int = 100_000,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """
    Path-wise Monte-Carlo estimate of the gradient of the N-sample objective
    ``L_N(theta) = E_D[V(theta + inner_lr * g_hat(theta; D))]``, where ``g_hat`` is the policy gradient
    ``(1/N) sum_i score(a_i) r_i`` (no baseline). With ``a_i = mean + std * eps_i`` the adapted
    parameters are a differentiable function of (theta, eps), so the gradient of V at the adapted
    parameters, averaged over eps, is unbiased for grad L_N with no score-function variance.

    :param inner_episodes: N, the samples of each inner step
    :param n_samples: independent draws of the inner samples
    :param seed: seed of the draws
    :return: mean and standard error of the gradient with respect to (mean, log_std), each shape (2,)
    """
    generator = th.Generator().manual_seed(seed)
    theta = th.tensor([[mean, log_std]], dtype=th.float64).repeat(n_samples, 1).requires_grad_(True)
    params = theta
    for _ in range(inner_steps):
        eps = th.randn(n_samples, inner_episodes, dtype=th.float64, generator=generator)
        mu, log_sigma = params[:, :1], params[:, 1:]
        sigma = th.exp(log_sigma)
        actions = mu + sigma * eps
        rewards = -((actions - target) ** 2)
        # score of N(a; mu, sigma) w.r.t. (mu, log sigma) at the sampled actions
        score_mean = (actions - mu) / sigma**2
        score_log_std = (actions - mu) ** 2 / sigma**2 - 1.0
        inner_grad = th.stack([(score_mean * rewards).mean(1), (score_log_std * rewards).mean(1)], dim=1)
        params = params + inner_lr * inner_grad
    (per_sample,) = th.autograd.grad(bandit_value(params[:, 0], params[:, 1], target).sum(), theta)
    return per_sample.mean(0).numpy(), (per_sample.std(0) / np.sqrt(n_samples)).numpy()


def bandit_policy_parameters(params: Params) -> tuple[str, str]:
    """
    The names of the Gaussian mean and log-std in an SB3 ``MlpPolicy`` built with ``net_arch=[]``
    on the bandit (whose zero observation makes the mean equal the action net's bias).

    :param params: the policy's parameters by name
    :return: (name of the mean, name of the log-std)
    """
    if "action_net.bias" not in params or "log_std" not in params or params["log_std"].numel() != 1:
        raise ValueError("policy: the bandit reference needs an MlpPolicy with net_arch=[] on GaussianBandit-v0.")
    return "action_net.bias", "log_std"


# --------------------------------------------------------------------------------------------- tabular


def tabular_log_policy(functional_policy: FunctionalPolicy, task_params: Params, n_states: int, n_actions: int) -> th.Tensor:
    """:return: ``log pi(a|s)`` for every state and action, shape (B, n_states, n_actions)"""
    reference = next(iter(task_params.values()))
    n_tasks = reference.shape[0]
    states = th.arange(n_states, device=reference.device).repeat_interleave(n_actions)
    actions = th.arange(n_actions, device=reference.device).repeat(n_states)
    obs = states.to(reference.dtype).view(1, -1, 1).expand(n_tasks, -1, 1)
    log_prob = functional_policy.log_prob(task_params, obs, actions.view(1, -1).expand(n_tasks, -1))
    return log_prob.reshape(n_tasks, n_states, n_actions)


def tabular_values(
    log_policy: th.Tensor,
    transitions: th.Tensor,
    rewards: th.Tensor,
    initial_distribution: th.Tensor,
    horizon: int,
    gamma: float,
) -> th.Tensor:
    """
    Finite-horizon policy evaluation: ``V = E[sum_{t<H} gamma^t r_t]`` under a stationary policy.

    :param log_policy: (B, S, A)
    :param transitions: (S, A, S)
    :param rewards: (B, S, A)
    :param initial_distribution: (S,)
    :param horizon: H
    :param gamma: discount factor
    :return: the values (B,), differentiable with respect to ``log_policy``
    """
    policy = th.exp(log_policy)
    value = th.zeros(rewards.shape[:2], dtype=rewards.dtype, device=rewards.device)
    for _ in range(horizon):
        q_value = rewards + gamma * th.einsum("sat,bt->bsa", transitions, value)
        value = (policy * q_value).sum(-1)
    return value @ initial_distribution


def tabular_maml_gradient(
    functional_policy: FunctionalPolicy,
    params: Params,
    tasks: list[Any],
    transitions: np.ndarray,
    initial_distribution: np.ndarray,
    horizon: int,
    gamma: float,
    inner_lr: float,
    inner_steps: int = 1,
) -> tuple[dict[str, th.Tensor], th.Tensor]:
    """
    The exact MAML meta-gradient ``grad_theta mean_g V_g(theta_zeta)`` with exact inner steps
    ``theta_{k+1} = theta_k + inner_lr * grad V_g(theta_k)``.

    :param functional_policy: evaluates the policy with given parameters
    :param params: the meta-parameters theta by name
    :param tasks: reward matrices (S, A)
    :param transitions: (S, A, S)
    :param initial_distribution: (S,)
    :param horizon: H
    :param gamma: discount factor
    :param inner_lr: inner step size
    :param inner_steps: number of inner steps
    :return: the meta-gradient by parameter name (mean over tasks) and the post-adaptation values (B,)
    """
    device = next(iter(params.values())).device
    rewards = th.as_tensor(np.stack(tasks), dtype=th.float64, device=device)
    kernel = th.as_tensor(transitions, dtype=th.float64, device=device)
    initial = th.as_tensor(initial_distribution, dtype=th.float64, device=device)
    n_states, n_actions = rewards.shape[1:]

    def values(task_params: Params) -> th.Tensor:
        log_policy = tabular_log_policy(functional_policy, task_params, n_states, n_actions).double()
        return tabular_values(log_policy, kernel, rewards, initial, horizon, gamma)

    task_theta = FunctionalPolicy.expand({n: p.detach().requires_grad_(True) for n, p in params.items()}, len(tasks))
    task_params = task_theta
    for _ in range(inner_steps):
        grads = grad_params(values(task_params).sum(), task_params, create_graph=True)
        task_params = {n: task_params[n] + inner_lr * g for n, g in grads.items()}
    adapted_values = values(task_params)
    meta_grad = {n: g.mean(0).float() for n, g in grad_params(adapted_values.sum(), task_theta).items()}
    return meta_grad, adapted_values.detach()


def _tabular_problem(model: "MetaPolicyGradient") -> tuple[np.ndarray, np.ndarray]:
    """:return: the transition kernel and initial distribution of a model's TabularMDP env"""
    model.episode_sampler  # noqa: B018  (a clear error when the model has no env)
    venv = model.get_env()
    if not venv.has_attr("transitions"):
        raise ValueError(
            "env: the exact tabular reference (and 'exact' pieces of decomposed_meta_gradient) needs a model on "
            "sb3_metarl/TabularMDP-v0 (with `transitions`); use sampled estimates on other envs."
        )
    return venv.get_attr("transitions", indices=[0])[0], venv.get_attr("initial_distribution", indices=[0])[0]


def tabular_value_function(model: "MetaPolicyGradient", tasks: list[Any]) -> Callable[[Params], th.Tensor]:
    """
    :param model: a MetaPolicyGradient on a TabularMDP env
    :param tasks: reward matrices
    :return: per-task parameters (leading dim ``len(tasks)``) -> the exact values (B,) by dynamic programming
        (float64), differentiable with respect to the parameters to any order
    """
    transitions, initial_distribution = _tabular_problem(model)
    rewards = th.as_tensor(np.stack(tasks), dtype=th.float64, device=model.device)
    kernel = th.as_tensor(transitions, dtype=th.float64, device=model.device)
    initial = th.as_tensor(initial_distribution, dtype=th.float64, device=model.device)
    horizon, gamma = model.episode_sampler.horizon, model.gamma

    def values(task_params: Params) -> th.Tensor:
        log_policy = tabular_log_policy(model.functional_policy, task_params, *rewards.shape[1:]).double()
        return tabular_values(log_policy, kernel, rewards, initial, horizon, gamma)

    return values


def exact_value(model: "MetaPolicyGradient", tasks: list[Any]) -> th.Tensor:
    """
    The exact value ``V_g(theta) = E[sum_{t<H} gamma^t r_t]`` of a ``MetaPolicyGradient`` model's
    current policy on ``TabularMDP-v0`` tasks, by dynamic programming.

    :param model: a MetaPolicyGradient on a TabularMDP env
    :param tasks: reward matrices
    :return: the values (B,)
    """
    values = tabular_value_function(model, tasks)
    with th.no_grad():
        return values(FunctionalPolicy.expand(model.functional_policy.parameters(), len(tasks)))


def exact_meta_gradient(model: "MetaPolicyGradient", tasks: list[Any]) -> dict[str, th.Tensor]:
    """
    The exact MAML meta-gradient of a ``MetaPolicyGradient`` model on ``TabularMDP-v0`` tasks,
    using the model's ``inner_lr``, ``inner_steps``, ``gamma`` and its env's dynamics and horizon.

    :param model: a MetaPolicyGradient on a TabularMDP env
    :param tasks: reward matrices
    :return: the meta-gradient by policy parameter name
    """
    transitions, initial_distribution = _tabular_problem(model)
    grads, _ = tabular_maml_gradient(
        model.functional_policy,
        model.functional_policy.parameters(),
        tasks,
        transitions,
        initial_distribution,
        model.episode_sampler.horizon,
        model.gamma,
        model.calibrate_inner_lr(),
        model.inner_steps,
    )
    return grads
