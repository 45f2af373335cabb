import numpy as np
import pytest
import torch as th

from sb3_metarl import FixedTaskSampler, MetaPolicyGradient

BANDIT_TARGET, BANDIT_MEAN, BANDIT_LOG_STD, BANDIT_INNER_LR = 0.5, 0.2, -0.5, 0.1


def make_bandit_model(mode: str, inner_episodes: int, outer_episodes: int, meta_batch_size: int = 250, inner_steps: int = 1):
    """A Gaussian bandit model on one fixed task, at (mean, log_std) = (0.2, -0.5), no baseline."""
    model = MetaPolicyGradient(
        "MlpPolicy",
        "sb3_metarl/GaussianBandit-v0",
        gradient_mode=mode,
        meta_batch_size=meta_batch_size,
        inner_episodes=inner_episodes,
        outer_episodes=outer_episodes,
        inner_steps=inner_steps,
        inner_lr=BANDIT_INNER_LR,
        baseline=None,
        task_sampler=FixedTaskSampler([BANDIT_TARGET]),
        policy_kwargs=dict(net_arch=[]),
        seed=0,
    )
    with th.no_grad():
        model.policy.action_net.bias.fill_(BANDIT_MEAN)
        model.policy.log_std.fill_(BANDIT_LOG_STD)
    return model


def bandit_estimates(model, calls: int = 2) -> np.ndarray:
    """:return: independent per-task meta-gradient estimates w.r.t. (mean, log_std), shape (calls * B, 2)"""
    estimates = []
    for _ in range(calls):
        grads = model.estimate_meta_gradient(per_task=True)
        estimates.append(th.stack([grads["action_net.bias"][:, 0], grads["log_std"][:, 0]], dim=1))
    return th.cat(estimates).double().cpu().numpy()


def flat_gradient(grads: dict) -> th.Tensor:
    """:return: a gradient dict (name -> tensor) as one vector, names sorted"""
    return th.cat([grads[name].flatten() for name in sorted(grads)])


def flat_per_task_gradient(grads: dict) -> th.Tensor:
    """:return: a per-task gradient dict (name -> (B, ...)) as a (B, n_params) matrix, names sorted"""
    return th.cat([grads[name].flatten(1) for name in sorted(grads)], dim=1)


@pytest.fixture
def tiny_navigation_model():
    return MetaPolicyGradient(
        "MlpPolicy",
        "sb3_metarl/Navigation2D-v0",
        meta_batch_size=2,
        inner_episodes=2,
        outer_episodes=2,
        inner_lr=0.01,
        policy_kwargs=dict(net_arch=[16]),
        seed=0,
    )
