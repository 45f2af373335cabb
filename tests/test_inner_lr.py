"""inner_lr="auto": a step size whose first inner step has a fixed KL, whatever the horizon or the reward scale."""

import gymnasium as gym
import numpy as np
import pytest
import torch as th

from sb3_metarl import MetaPolicyGradient
from sb3_metarl.meta_pg.inner_lr import (
    AUTO_INNER_KL,
    AUTO_SIGNAL_POWER,
    per_task_step_kl,
    reference_direction,
    signal_fraction,
)
from sb3_metarl.tasks import BUILTIN_TASK_ENVS, MUJOCO_TASK_ENVS

SHAPE = dict(meta_batch_size=2, inner_episodes=2, outer_episodes=2, inner_steps=2)


class _ScaledReward(gym.Wrapper):
    def __init__(self, env, scale):
        super().__init__(env)
        self.scale = scale

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, self.scale * reward, terminated, truncated, info


def _calibrated_kl(model):
    """The median over fresh tasks of the KL of a calibrated step along the reference direction."""
    tasks = model.task_sampler.sample(model.meta_batch_size, np.random.default_rng(9))
    params = model.initial_task_params(len(tasks))
    batch = model.sample_episodes(tasks, params, model.inner_episodes, generator=th.Generator().manual_seed(9))
    direction = reference_direction(model.functional_policy, params, batch, model.gamma)
    step_sizes = th.full((len(tasks),), model.inner_lr)
    return per_task_step_kl(model.functional_policy, params, direction, step_sizes, batch).median().item()


@pytest.mark.parametrize("mode", ["lsf", "lvc", "sf"])
def test_auto_step_does_not_grow_with_reward_scale_or_horizon(mode):
    rates, kls = {}, {}
    for scale, horizon in [(1.0, 100), (100.0, 100), (1.0, 25)]:
        model = MetaPolicyGradient(
            "MlpPolicy",
            lambda s=scale: _ScaledReward(gym.make("sb3_metarl/Navigation2D-v0"), s),
            gradient_mode=mode,
            max_episode_steps=horizon,
            seed=0,
            meta_batch_size=8,
            inner_episodes=8,
            outer_episodes=1,
        )
        rates[(scale, horizon)] = model.calibrate_inner_lr()
        # the KL-calibrated step is shortened by the signal fraction^p: its KL by fraction^(2p)
        kls[(scale, horizon)] = _calibrated_kl(model) / model.inner_signal_fraction ** (2 * AUTO_SIGNAL_POWER)
    # 100x the rewards: 100x smaller steps (the gradient is linear in the rewards)
    assert rates[(100.0, 100)] == pytest.approx(rates[(1.0, 100)] / 100, rel=0.1)
    # the step's KL stays near the target on fresh samples, at every reward scale and horizon
    for kl in kls.values():
        assert AUTO_INNER_KL / 4 < kl < AUTO_INNER_KL * 4


def test_auto_is_calibrated_once_saved_and_logged(tmp_path):
    model = MetaPolicyGradient("MlpPolicy", "sb3_metarl/TabularMDP-v0", seed=0, **SHAPE)
    assert model.inner_lr == "auto"
    model.learn(1)
    value = model.inner_lr
    assert isinstance(value, float) and value > 0
    model.save(tmp_path / "m.zip")
    assert MetaPolicyGradient.load(tmp_path / "m.zip").inner_lr == value


@pytest.mark.parametrize("env_id", list(BUILTIN_TASK_ENVS))
@pytest.mark.slow
def test_every_family_mode_and_optimizer_trains_from_defaults(env_id):
    # the settings of `benchmarks/defaults_sweep.py --mujoco-horizon 10 --navigation-horizon 20` (short, for speed)
    env_kwargs = dict(max_episode_steps=10) if env_id in MUJOCO_TASK_ENVS else None
    if "Navigation" in env_id:
        env_kwargs = dict(max_episode_steps=20)
    for meta_optimizer in ["adam", "sgd", "trpo", "ppo"]:
        for mode in ["sf", "lsf", "lvc", "dice", "loaded_dice", "maml", "fomaml"]:
            model = MetaPolicyGradient(
                "MlpPolicy", env_id, gradient_mode=mode, meta_optimizer=meta_optimizer, env_kwargs=env_kwargs, seed=0, **SHAPE
            )
            model.learn(1)
            model.learn(5 * model.num_timesteps, reset_num_timesteps=False)
            assert model.n_updates >= 5, (meta_optimizer, mode)
            assert all(th.isfinite(p).all() for p in model.policy.parameters()), (meta_optimizer, mode)


def test_signal_fraction_measures_the_share_of_signal_in_a_noisy_gradient():
    """Two independent noisy gradients g = s + noise: the estimate is |s|^2 / (|s|^2 + E|noise|^2)."""
    generator = th.Generator().manual_seed(0)
    signal = th.randn(64, 500, generator=generator)  # 64 tasks, 500 parameters each
    for noise_scale, expected in [(0.0, 1.0), (1.0, 0.5), (2.0, 0.2)]:
        first, second = ({"w": signal + noise_scale * th.randn(64, 500, generator=generator)} for _ in range(2))
        assert signal_fraction(first, second) == pytest.approx(expected, abs=0.03)
    assert signal_fraction({"w": th.zeros(2, 3)}, {"w": th.zeros(2, 3)}) == 1.0


@pytest.mark.slow
def test_auto_steps_shrink_with_the_inner_gradient_s_noise():
    """
    A newcomer's small run (Navigation2D, B = 4, the defaults): "auto" took 4.6e-3 at N = 4, about 5x the tuned
    1e-3, and one inner step made the held-out return worse (-100 -> -189). The step now follows the noise of an
    N-episode gradient: below the tuned step at N = 4, and growing with N (docs/results/auto_inner_lr_defaults.md).
    """
    etas, fractions = {}, {}
    for episodes in (4, 40):
        model = MetaPolicyGradient("MlpPolicy", "sb3_metarl/Navigation2D-v0", meta_batch_size=4, inner_episodes=episodes,
                                   outer_episodes=episodes, seed=0)  # fmt: skip
        etas[episodes], fractions[episodes] = model.calibrate_inner_lr(), model.inner_signal_fraction
    assert etas[4] < 1e-3 < etas[40]
    assert fractions[4] < 0.3 < 0.6 < fractions[40] <= 1.0
