import numpy as np
import pytest
import torch as th
from stable_baselines3.common.policies import ActorCriticPolicy

from sb3_metarl import MetaPolicyGradient
from sb3_metarl.meta_pg.policies import MlpPolicy

SMALL = dict(meta_batch_size=2, inner_episodes=2, outer_episodes=2, seed=0)
ARCH = dict(net_arch=dict(pi=[100, 100], vf=[100, 100]))


def _model(**policy_kwargs):
    return MetaPolicyGradient("MlpPolicy", "sb3_metarl/HalfCheetahDir-v0", policy_kwargs={**ARCH, **policy_kwargs}, **SMALL)


def test_the_default_mlp_policy_is_sb3_s_parameter_for_parameter():
    # the runs made with SB3's ActorCriticPolicy (and their checkpoints) are the default's
    ours = _model().policy
    sb3 = MetaPolicyGradient(ActorCriticPolicy, "sb3_metarl/HalfCheetahDir-v0", policy_kwargs=ARCH, **SMALL).policy
    assert isinstance(ours, MlpPolicy) and ours.actor_init is None
    assert [name for name, _ in ours.named_parameters()] == [name for name, _ in sb3.named_parameters()]
    assert all(th.equal(a, b) for a, b in zip(ours.parameters(), sb3.parameters()))


def test_xavier_init_is_glorot_uniform_on_the_actor_and_leaves_the_critic_as_sb3_s():
    xavier, default = _model(actor_init="xavier_uniform").policy, _model().policy
    actor = [*xavier.mlp_extractor.policy_net, xavier.action_net]
    linears = [layer for layer in actor if isinstance(layer, th.nn.Linear)]
    assert [tuple(layer.weight.shape) for layer in linears] == [(100, 17), (100, 100), (6, 100)]
    for layer in linears:
        fan_out, fan_in = layer.weight.shape
        bound = np.sqrt(6.0 / (fan_in + fan_out))
        weight = layer.weight.detach().numpy()
        assert np.abs(weight).max() <= bound and np.abs(weight).max() > 0.95 * bound
        # a uniform on [-b, b] has variance b^2 / 3 = 2 / (fan_in + fan_out); the sample's relative standard error is
        # sqrt(0.8 / n) (its kurtosis 1.8): at most 0.2 % / 0.9 % / 3.7 % for these n
        assert weight.var() == pytest.approx(2.0 / (fan_in + fan_out), rel=5 * np.sqrt(0.8 / weight.size))
        assert not layer.bias.detach().any()
    # SB3's orthogonal action head starts at gain 0.01: its weights are ~100x smaller
    assert default.action_net.weight.abs().max() < 0.02 < xavier.action_net.weight.abs().max()
    # the critic and log_std: SB3's, the same numbers as the default policy's from the same seed
    critic = lambda policy: [*policy.mlp_extractor.value_net.parameters(), *policy.value_net.parameters(), policy.log_std]  # noqa: E731
    assert len(critic(xavier)) == 7 and all(th.equal(a, b) for a, b in zip(critic(xavier), critic(default)))


def test_actor_init_survives_save_and_load_and_a_wrong_value_is_refused(tmp_path):
    model = _model(actor_init="xavier_uniform")
    model.save(tmp_path / "m.zip")
    loaded = MetaPolicyGradient.load(tmp_path / "m.zip")
    assert loaded.policy.actor_init == "xavier_uniform"
    assert all(th.equal(a, b) for a, b in zip(model.policy.parameters(), loaded.policy.parameters()))
    with pytest.raises(ValueError, match=r"actor_init: must be one of \(None, 'xavier_uniform'\).*got 'glorot'"):
        _model(actor_init="glorot")
