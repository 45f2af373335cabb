"""MetaGradientA2C: differentiable GAE, the meta-gradient against finite differences, LVC, save/load, logging."""

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.logger import configure
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn

from sb3_metarl import MetaGradientA2C
from sb3_metarl.meta_gradient_rl import rollout_advantages


class SharedExtractor(BaseFeaturesExtractor):
    """A features extractor with parameters, shared by actor and critic: the value loss then moves the policy."""

    def __init__(self, observation_space: gym.Space):
        super().__init__(observation_space, features_dim=8)
        self.layer = nn.Sequential(nn.Linear(int(np.prod(observation_space.shape)), 8), nn.Tanh())

    def forward(self, observations: th.Tensor) -> th.Tensor:
        return self.layer(observations)


def _model(**kwargs):
    settings = dict(n_steps=8, seed=0, device="cpu", virtual_learning_rate=0.5,
                    policy_kwargs=dict(features_extractor_class=SharedExtractor, net_arch=[8]))  # fmt: skip
    settings.update(kwargs)
    return MetaGradientA2C("MlpPolicy", make_vec_env("CartPole-v1", n_envs=2, seed=0), **settings)


def test_rollout_advantages_are_sb3s():
    rng = np.random.default_rng(0)
    buffer = RolloutBuffer(6, gym.spaces.Box(-1, 1, (2,)), gym.spaces.Discrete(2), gamma=0.9, gae_lambda=0.8, n_envs=3)
    for _ in range(6):
        buffer.add(rng.normal(size=(3, 2)), rng.integers(0, 2, (3, 1)), rng.normal(size=3), rng.random(3) < 0.3,
                   th.as_tensor(rng.normal(size=3)), th.as_tensor(rng.normal(size=3)))  # fmt: skip
    last_values, dones = th.as_tensor(rng.normal(size=3)), rng.random(3) < 0.5
    buffer.compute_returns_and_advantage(last_values=last_values, dones=dones)
    ours = rollout_advantages(
        *(th.as_tensor(getattr(buffer, n)).double() for n in ("rewards", "values", "episode_starts")),
        last_values.double(), th.as_tensor(dones).double(), th.tensor(0.9, dtype=th.float64), th.tensor(0.8, dtype=th.float64),
    )  # fmt: skip
    np.testing.assert_allclose(ours.numpy(), buffer.advantages, rtol=1e-5, atol=1e-6)


def test_meta_gradient_matches_finite_differences():
    model = _model(virtual_steps=2)
    model.learn(16)  # one rollout in the buffer
    rollout = model.rollout_tensors()
    learned = dict(model.meta_module.named_parameters())
    objective = model.meta_objective(rollout)
    grads = dict(zip(learned, th.autograd.grad(objective, list(learned.values()))))
    for name, param in learned.items():
        with th.no_grad():
            param += 1e-2
            plus = model.meta_objective(rollout).item()
            param -= 2e-2
            minus = model.meta_objective(rollout).item()
            param += 1e-2
        assert grads[name].item() == pytest.approx((plus - minus) / 2e-2, rel=0.05, abs=1e-6), name
        assert grads[name].abs().item() > 1e-5, name  # every meta-parameter moves the outer objective here


def test_lvc_and_autodiff_agree_with_one_virtual_step_only():
    gradients = {}
    for steps in (1, 3):
        for mode in ("autodiff", "lvc"):
            model = _model(virtual_steps=steps, meta_gradient=mode)
            model.learn(16)
            rollout = model.rollout_tensors()
            with th.no_grad():  # as in train(): the virtual steps start at the parameters that sampled the rollout
                _, log_prob, _ = model.policy.evaluate_actions(rollout["observations"], rollout["actions"])
            rollout["log_probs"] = log_prob.reshape(rollout["rewards"].shape)
            learned = [p for p in model.meta_module.parameters() if p.requires_grad]
            gradients[(steps, mode)] = th.stack(th.autograd.grad(model.meta_objective(rollout), learned))
    th.testing.assert_close(gradients[(1, "autodiff")], gradients[(1, "lvc")], rtol=1e-4, atol=1e-7)
    difference = (gradients[(3, "autodiff")] - gradients[(3, "lvc")]).norm() / gradients[(3, "lvc")].norm()
    assert difference > 1e-3  # the later virtual steps' curvature differs


def test_learn_logs_meta_parameters_and_save_load_keeps_them(tmp_path):
    model = _model(meta_learning_rate=0.05, meta_parameters=("gamma", "ent_coef"))
    model.set_logger(configure(str(tmp_path), ["csv"]))
    model.learn(160, log_interval=1)
    values = model.meta_parameter_values()
    assert values["gamma"] != pytest.approx(0.99, abs=1e-4) and values["ent_coef"] != pytest.approx(0.01, rel=1e-3)
    assert values["gae_lambda"] == pytest.approx(0.95) and values["vf_coef"] == pytest.approx(0.5)  # not learned
    # the learned values are the ones A2C uses
    assert model.gamma == pytest.approx(values["gamma"]) and model.rollout_buffer.gamma == pytest.approx(values["gamma"])
    log = (tmp_path / "progress.csv").read_text().splitlines()[0].split(",")
    assert {"meta/gamma", "meta/ent_coef", "meta/objective", "meta/grad_norm"} <= set(log)
    model.save(tmp_path / "mgrl.zip")
    loaded = MetaGradientA2C.load(tmp_path / "mgrl.zip", env=model.get_env(), device="cpu")
    assert loaded.meta_parameter_values() == pytest.approx(values)
    optimizer_state = loaded.meta_optimizer.state_dict()["state"]
    assert optimizer_state and all(s["step"] > 0 for s in optimizer_state.values())
    loaded.learn(32)  # continues


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(meta_parameters=("alpha",)), "meta_parameters"),
        (dict(meta_gradient="dice"), "meta_gradient"),
        (dict(virtual_steps=0), "virtual_steps"),
        (dict(gamma=1.0), "gamma"),
        (dict(ent_coef=0.0), "ent_coef"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MetaGradientA2C("MlpPolicy", "CartPole-v1", **kwargs)
