"""Reference set-ups of the estimator study: models on the Gaussian bandit and the tabular MDP whose meta-batch slots
all run one task, so that every slot's estimate is an independent draw."""

from typing import Any

import numpy as np
import torch as th

from sb3_metarl.gradient_modes import GradientMode
from sb3_metarl.meta_pg import MetaPolicyGradient
from sb3_metarl.tasks import FixedTaskSampler

#: the Gaussian-bandit setting of the tests and benchmarks: target, initial mean and log-std, inner lr
BANDIT_TARGET, BANDIT_MEAN, BANDIT_LOG_STD, BANDIT_INNER_LR = 0.5, 0.2, -0.5, 0.1


def make_bandit_model(
    gradient_mode: str | GradientMode,
    inner_episodes: int,
    outer_episodes: int,
    meta_batch_size: int = 250,
    inner_steps: int = 1,
    seed: int = 0,
    **kwargs: Any,
) -> MetaPolicyGradient:
    """
    A model on ``GaussianBandit-v0`` with one fixed target, a policy N(mean, std^2) set to
    (``BANDIT_MEAN``, exp(``BANDIT_LOG_STD``)) and no baseline, so that the path-wise reference of
    :func:`sb3_metarl.estimators.exact.bandit_pathwise_gradient` applies. Each of the ``meta_batch_size`` task
    slots gives one independent estimate (``estimate_meta_gradient(per_task=True)``).
    """
    model = MetaPolicyGradient(
        "MlpPolicy",
        "sb3_metarl/GaussianBandit-v0",
        gradient_mode=gradient_mode,
        meta_batch_size=meta_batch_size,
        inner_episodes=inner_episodes,
        outer_episodes=outer_episodes,
        inner_steps=inner_steps,
        inner_lr=BANDIT_INNER_LR,
        baseline=None,
        task_sampler=FixedTaskSampler([BANDIT_TARGET]),
        policy_kwargs=dict(net_arch=[]),
        seed=seed,
        **kwargs,
    )
    with th.no_grad():
        model.policy.action_net.bias.fill_(BANDIT_MEAN)
        model.policy.log_std.fill_(BANDIT_LOG_STD)
    return model


def bandit_estimates(model: MetaPolicyGradient, calls: int = 2) -> np.ndarray:
    """:return: independent estimates of the gradient w.r.t. (mean, log_std), shape (calls * B, 2)"""
    rows = []
    for _ in range(calls):
        grads = model.estimate_meta_gradient(per_task=True)
        rows.append(th.stack([grads["action_net.bias"][:, 0], grads["log_std"][:, 0]], dim=1))
    return th.cat(rows).double().cpu().numpy()


def make_tabular_model(
    gradient_mode: str | GradientMode,
    inner_episodes: int,
    inner_steps: int = 1,
    task_seed: int = 0,
    meta_batch_size: int = 10,
    seed: int = 0,
    **kwargs: Any,
) -> tuple[MetaPolicyGradient, np.ndarray]:
    """
    A model on ``TabularMDP-v0`` in the setting of Liu et al. (2022): a tabular softmax policy
    (``net_arch=[]``, near-uniform at initialisation), inner lr 10, gamma 0.8, one fixed reward matrix
    drawn with ``task_seed``; ``outer_episodes`` equals ``inner_episodes``.

    :return: the model and its task
    """
    task = np.random.default_rng(task_seed).uniform(0, 1, size=(20, 5))
    settings = dict(inner_lr=10.0, gamma=0.8, policy_kwargs=dict(net_arch=[]))
    settings.update(kwargs)
    model = MetaPolicyGradient(
        "MlpPolicy",
        "sb3_metarl/TabularMDP-v0",
        gradient_mode=gradient_mode,
        meta_batch_size=meta_batch_size,
        inner_episodes=inner_episodes,
        outer_episodes=inner_episodes,
        inner_steps=inner_steps,
        task_sampler=FixedTaskSampler([task]),
        seed=seed,
        **settings,
    )
    return model, task


