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
from sb3_metarl.mgrl import rollout_advantages


class SharedExtractor(BaseFeaturesExtractor):
    """A features extractor with parameters, shared by actor and critic: the value loss then moves the policy."""

    def __init__(self, observation_space: gym.Space):
        super().__init__(observation_space, features_dim=8)
        self.layer = nn.Sequential(nn.Linear(int(np.prod(observation_space.shape)), 8), nn.Tanh())

    def forward(self, observations: th.Tensor) -> th.Tensor:
        return self.layer(observations)


def _model(**kwargs):
    settings = dict(n_steps=8, seed=0, device="cpu", virtual_update="sgd", virtual_learning_rate=0.5,
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


def _assert_meta_gradient_matches_finite_differences(model):
    """Central differences (step 1e-2) of the outer objective on the current rollout, for every meta-parameter."""
    rollout = model.rollout_tensors()
    learned = dict(model.meta_module.named_parameters())
    grads = dict(zip(learned, th.autograd.grad(model.meta_objective(rollout), list(learned.values()))))
    for name, param in learned.items():
        with th.no_grad():
            param += 1e-2
            plus = model.meta_objective(rollout).item()
            param -= 2e-2
            minus = model.meta_objective(rollout).item()
            param += 1e-2
        assert grads[name].item() == pytest.approx((plus - minus) / 2e-2, rel=0.05, abs=1e-6), name
        assert grads[name].abs().item() > 1e-5, name  # every meta-parameter moves the outer objective here


def test_meta_gradient_matches_finite_differences():
    model = _model(virtual_steps=2)
    model.learn(16)  # one rollout in the buffer
    _assert_meta_gradient_matches_finite_differences(model)


@pytest.mark.parametrize("use_rms_prop", [True, False])
def test_a_virtual_optimizer_step_is_the_agent_s_own_update(use_rms_prop):
    """One virtual step (default virtual_update) equals A2C's real update: its optimizer, statistics and clipping."""
    import copy

    from stable_baselines3 import A2C
    from stable_baselines3.common.callbacks import BaseCallback

    model = _model(virtual_update="optimizer", virtual_learning_rate=None, virtual_steps=1, use_rms_prop=use_rms_prop,
                   max_grad_norm=0.05)  # fmt: skip
    compared = []

    class Compare(BaseCallback):
        def _on_step(self) -> bool:
            return True

        def _on_rollout_end(self) -> None:  # a fresh rollout, its advantages computed, before the update
            if model.num_timesteps < 48:  # from the third rollout: the optimizer holds statistics
                return
            model.policy.action_dist.distribution = None  # SB3 keeps the last update's distribution (not deep-copyable)
            real = copy.deepcopy(model)
            meta = {name: model.meta_module.value(name).detach() for name in ("gamma", "gae_lambda", "vf_coef", "ent_coef")}
            virtual = model.virtual_parameters(model.rollout_tensors(), meta)
            A2C.train(real)  # the plain A2C update on the buffer's advantages (the model's gamma and lambda)
            before = {n: p.detach().clone() for n, p in model.policy.named_parameters()}
            compared.append((virtual, dict(real.policy.named_parameters()), before))

    model.learn(48, callback=Compare())
    (virtual, real, before), = compared
    for name, param in real.items():
        th.testing.assert_close(virtual[name], param, rtol=1e-5, atol=1e-6, msg=name)
    assert max((virtual[n] - p).abs().max().item() for n, p in before.items()) > 1e-4  # the step is not empty
    for state in model.policy.optimizer.state.values():  # the agent's optimizer is left as it was
        assert all(not th.is_tensor(v) or v.grad_fn is None for v in state.values())


def test_meta_gradient_through_optimizer_steps_matches_finite_differences():
    """Through two RMSprop virtual steps from the optimizer's statistics after a real update."""
    model = _model(virtual_update="optimizer", virtual_learning_rate=0.01, virtual_steps=2)
    model.learn(32)
    _assert_meta_gradient_matches_finite_differences(model)


@pytest.mark.parametrize("optimizer_class", [th.optim.RMSprop, th.optim.Adam, th.optim.SGD])
def test_virtual_optimizer_step_is_torch_s_step_and_differentiable_at_zero_statistics(optimizer_class):
    from sb3_metarl.mgrl import VirtualOptimizerStep

    param = th.nn.Parameter(th.tensor([0.5, -1.0, 2.0]))
    optimizer = optimizer_class([param], lr=0.1, weight_decay=0.01)
    for _ in range(2):  # statistics from two steps
        param.grad = th.tensor([0.3, -0.2, 0.0])  # the third entry never gets a gradient
        optimizer.step()
    scale = th.tensor(2.0, requires_grad=True)
    gradient = th.stack([0.4 * scale, -0.1 * scale, 0.0 * scale])
    step = VirtualOptimizerStep(optimizer, ["p"], 0.1, max_grad_norm=None)
    virtual = step({"p": param}, {"p": gradient})["p"]
    param.grad = gradient.detach().clone()
    expected = param.detach().clone()
    optimizer.step()
    th.testing.assert_close(virtual.detach(), param.detach(), rtol=1e-6, atol=1e-7)
    assert not th.equal(expected, param.detach())
    (derivative,) = th.autograd.grad(virtual.sum(), scale)
    assert th.isfinite(derivative)  # the entry whose second moment is exactly zero adds no NaN


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
    optimizer_state = loaded.meta_parameter_optimizer.state_dict()["state"]
    assert optimizer_state and all(s["step"] > 0 for s in optimizer_state.values())
    loaded.learn(32)  # continues


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(meta_parameters=("alpha",)), "meta_parameters"),
        (dict(meta_gradient="dice"), "meta_gradient"),
        (dict(virtual_steps=0), "virtual_steps"),
        (dict(virtual_update="adam"), "virtual_update"),
        (dict(virtual_learning_rate=0.0), "virtual_learning_rate"),
        (dict(policy_kwargs=dict(optimizer_class=th.optim.RMSprop, optimizer_kwargs={"momentum": 0.9})), "update='sgd'"),
        (dict(gamma=1.0), "gamma"),
        (dict(ent_coef=0.0), "ent_coef"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MetaGradientA2C("MlpPolicy", "CartPole-v1", **kwargs)


@pytest.mark.slow
def test_defaults_train_on_atari_with_a_cnn():
    """Plain virtual gradient steps diverged on a CNN (NaN logits within one update); the optimizer's steps do not."""
    pytest.importorskip("cv2")
    ale_py = pytest.importorskip("ale_py")
    from stable_baselines3.common.env_util import make_atari_env
    from stable_baselines3.common.vec_env import VecFrameStack

    gym.register_envs(ale_py)
    env = VecFrameStack(make_atari_env("ALE/Breakout-v5", n_envs=2, seed=0), 4)
    model = MetaGradientA2C("CnnPolicy", env, n_steps=5, seed=0, device="cpu", meta_learning_rate=1e-2)
    model.learn(100)  # 10 meta-updates through 3 virtual RMSprop steps each
    values = model.meta_parameter_values()
    assert all(np.isfinite(list(values.values())))
    assert all(th.isfinite(p).all() for p in model.policy.parameters())
    assert values["gamma"] != pytest.approx(0.99, abs=1e-4)  # the meta-gradient is not zero either
    with pytest.raises(FloatingPointError):  # what the old default did: plain steps of 0.1 on the CNN
        MetaGradientA2C("CnnPolicy", env, n_steps=5, seed=0, device="cpu", virtual_update="sgd").learn(100)
