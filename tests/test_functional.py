import gymnasium as gym
import numpy as np
import pytest
import torch as th
from stable_baselines3.common.policies import ActorCriticPolicy

from sb3_metarl.common.functional import FunctionalPolicy, kl_divergence

SPACES = [
    (gym.spaces.Box(-1, 1, (3,)), gym.spaces.Box(-1, 1, (2,))),
    (gym.spaces.Discrete(5), gym.spaces.Discrete(4)),
    (gym.spaces.Box(-1, 1, (3,)), gym.spaces.MultiDiscrete([3, 2])),
    (gym.spaces.Box(-1, 1, (3,)), gym.spaces.MultiBinary(3)),
]


def _batch(space, shape, seed):
    space.seed(seed)
    values = np.stack([space.sample() for _ in range(int(np.prod(shape)))])
    return th.as_tensor(values).reshape(*shape, *values.shape[1:]).float()


@pytest.mark.parametrize("obs_space, action_space", SPACES)
def test_batched_log_prob_matches_each_policy(obs_space, action_space):
    th.manual_seed(0)
    policies = [ActorCriticPolicy(obs_space, action_space, lambda _: 1e-3) for _ in range(3)]
    functional = FunctionalPolicy(policies[0])
    task_params = {n: th.stack([dict(p.named_parameters())[n] for p in policies]) for n in functional.parameters()}
    obs, actions = _batch(obs_space, (3, 7), 0), _batch(action_space, (3, 7), 1)
    if isinstance(action_space, gym.spaces.Discrete):
        actions = actions.long()
    log_prob = functional.log_prob(task_params, obs, actions)
    for b, policy in enumerate(policies):
        expected = policy.get_distribution(obs[b]).log_prob(actions[b])
        th.testing.assert_close(log_prob[b], expected, atol=1e-5, rtol=1e-5)
    # the batched distribution agrees with the batched log-likelihood
    dist = functional.distribution(task_params, obs)
    th.testing.assert_close(
        dist.log_prob(actions.reshape(21, *actions.shape[2:])).reshape(3, 7), log_prob, atol=1e-5, rtol=1e-5
    )
    assert kl_divergence(dist, dist).abs().max() < 1e-5


def test_log_prob_is_differentiable_through_task_params():
    policy = ActorCriticPolicy(gym.spaces.Box(-1, 1, (3,)), gym.spaces.Box(-1, 1, (2,)), lambda _: 1e-3)
    functional = FunctionalPolicy(policy)
    theta = functional.parameters()
    task_params = FunctionalPolicy.expand(theta, 2)
    obs, actions = th.randn(2, 5, 3), th.randn(2, 5, 2)
    functional.log_prob(task_params, obs, actions).sum().backward()
    expected = th.autograd.grad(
        policy.get_distribution(obs.reshape(10, 3)).log_prob(actions.reshape(10, 2)).sum(), policy.log_std
    )
    th.testing.assert_close(policy.log_std.grad, expected[0])


def test_rejects_state_dependent_exploration():
    policy = ActorCriticPolicy(gym.spaces.Box(-1, 1, (3,)), gym.spaces.Box(-1, 1, (2,)), lambda _: 1e-3, use_sde=True)
    with pytest.raises(ValueError, match="use_sde"):
        FunctionalPolicy(policy)


def test_shared_parameters_take_the_plain_path_with_the_same_result():
    th.manual_seed(0)
    policy = ActorCriticPolicy(gym.spaces.Box(-1, 1, (3,)), gym.spaces.Box(-1, 1, (2,)), lambda _: 1e-3)
    functional = FunctionalPolicy(policy)
    shared = FunctionalPolicy.expand(functional.parameters(), 4)
    copies = {name: p.clone() for name, p in shared.items()}  # same values, but not views
    assert FunctionalPolicy.is_shared(shared) and not FunctionalPolicy.is_shared(copies)
    obs = th.randn(4, 5, 3)
    mean_shared = functional.distribution(shared, obs).distribution.loc
    mean_copies = functional.distribution(copies, obs).distribution.loc
    th.testing.assert_close(mean_shared, mean_copies)
    th.testing.assert_close(mean_shared, policy.get_distribution(obs.reshape(20, 3)).distribution.loc)
