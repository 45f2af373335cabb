"""Discounted returns and generalized advantages on episode tensors of shape (B, E, H)."""

import torch as th


def step_discounts(horizon: int, gamma: float, device: th.device | str = "cpu") -> th.Tensor:
    """:return: ``gamma ** t`` for t < horizon, shape (horizon,)"""
    return gamma ** th.arange(horizon, dtype=th.float32, device=device)


def returns_to_go(rewards: th.Tensor, masks: th.Tensor, gamma: float) -> th.Tensor:
    """
    :param rewards: (B, E, H), zero where masked
    :param masks: (B, E, H), 1 on valid steps
    :return: ``G_t = sum_{t' >= t} gamma^(t'-t) r_t'`` within each episode, shape (B, E, H)
    """
    return generalized_advantages(rewards, th.zeros_like(rewards), masks, gamma, 1.0)


def generalized_advantages(
    rewards: th.Tensor, values: th.Tensor, masks: th.Tensor, gamma: float, gae_lambda: float
) -> th.Tensor:
    """
    GAE(gamma, lambda) with ``values`` as the baseline; the value after the last valid step is zero
    (the horizon ends the problem, so there is nothing to bootstrap). ``gae_lambda = 1`` gives
    ``G_t - values_t``.

    :param rewards: (B, E, H), zero where masked
    :param values: baseline predictions (B, E, H)
    :param masks: (B, E, H), 1 on valid steps
    :param gamma: discount factor
    :param gae_lambda: GAE's lambda
    :return: advantages (B, E, H), zero where masked
    """
    advantages = th.zeros_like(rewards)
    next_value = th.zeros_like(rewards[..., 0])
    next_advantage = th.zeros_like(rewards[..., 0])
    for t in reversed(range(rewards.shape[-1])):
        delta = rewards[..., t] + gamma * next_value - values[..., t]
        next_advantage = (delta + gamma * gae_lambda * next_advantage) * masks[..., t]
        advantages[..., t] = next_advantage
        next_value = values[..., t] * masks[..., t]
    return advantages
