"""The iterated prisoner's dilemma: the exact value against closed forms, rollouts and the env; LOLA-DiCE's estimates."""

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from gymnasium.utils.env_checker import check_env

import sb3_metarl  # noqa: F401  (registers the envs)
from sb3_metarl.lola import LOLADiCE, ipd_exact_value
from sb3_metarl.tasks.ipd import play

GAMMA = 0.96
COOPERATE, DEFECT = th.full((5,), 30.0), th.full((5,), -30.0)
#: tit for tat: cooperate at the start and after the other cooperated (CC, DC), defect after CD, DD
TIT_FOR_TAT = th.tensor([30.0, 30.0, -30.0, 30.0, -30.0])


def test_exact_value_closed_forms():
    geometric = 1 / (1 - GAMMA)
    cases = [
        (COOPERATE, COOPERATE, (-geometric, -geometric)),
        (DEFECT, DEFECT, (-2 * geometric, -2 * geometric)),
        (COOPERATE, DEFECT, (-3 * geometric, 0.0)),
        # tit for tat against always-defect: exploited once, then mutual defection
        (TIT_FOR_TAT, DEFECT, (-3 - 2 * GAMMA * geometric, 0 - 2 * GAMMA * geometric)),
        # two tit-for-tat players cooperate forever
        (TIT_FOR_TAT, TIT_FOR_TAT, (-geometric, -geometric)),
    ]
    for theta1, theta2, (v1, v2) in cases:
        value1, value2 = ipd_exact_value(theta1.double(), theta2.double(), GAMMA)
        assert value1.item() == pytest.approx(v1, rel=1e-9, abs=1e-9)
        assert value2.item() == pytest.approx(v2, rel=1e-9, abs=1e-9)
    # a finite horizon: the partial sum
    value1, _ = ipd_exact_value(DEFECT.double(), DEFECT.double(), GAMMA, horizon=3)
    assert value1.item() == pytest.approx(-2 * (1 + GAMMA + GAMMA**2), rel=1e-9)
    # the players are symmetric: swapping them swaps the values
    theta1, theta2 = th.randn(5, dtype=th.float64), th.randn(5, dtype=th.float64)
    forward, backward = ipd_exact_value(theta1, theta2, GAMMA), ipd_exact_value(theta2, theta1, GAMMA)
    assert forward[0].item() == pytest.approx(backward[1].item()) and forward[1].item() == pytest.approx(backward[0].item())


def test_exact_value_is_the_mean_discounted_return_of_sampled_games():
    generator = th.Generator().manual_seed(0)
    theta1, theta2 = th.randn(5, generator=generator), th.randn(5, generator=generator)
    horizon = 30
    games = play(theta1, theta2, 20000, horizon, generator)
    discounts = GAMMA ** th.arange(horizon, dtype=th.float64)
    returns = (games.rewards.double() * discounts.view(1, -1, 1)).sum(1)  # (E, 2)
    exact = ipd_exact_value(theta1.double(), theta2.double(), GAMMA, horizon=horizon)
    for player in range(2):
        standard_error = returns[:, player].std().item() / len(returns) ** 0.5
        assert abs(returns[:, player].mean().item() - exact[player].item()) < 4 * standard_error


def test_env_plays_the_same_game():
    env = gym.make("sb3_metarl/IPD-v0")
    check_env(env.unwrapped)
    assert env.spec.max_episode_steps == 100
    # both players' policies through the env's API: the mean discounted return matches the exact value
    theta1, theta2 = th.tensor([1.0, 2.0, -1.0, 0.5, -2.0]), th.tensor([0.0, 1.5, -0.5, -1.0, 1.0])
    p1, p2 = th.sigmoid(theta1).numpy(), th.sigmoid(theta2).numpy()
    rng = np.random.default_rng(0)
    returns = []
    for _ in range(1500):
        obs, info = env.reset()
        other, total = info["other_observation"], np.zeros(2)
        for step in range(20):
            action = np.array([rng.random() >= p1[obs], rng.random() >= p2[other]], dtype=np.int64)
            obs, reward, _, _, info = env.step(action)
            assert reward == info["rewards"][0]
            total += GAMMA**step * info["rewards"]
            other = info["other_observation"]
        returns.append(total)
    returns = np.array(returns)
    exact = ipd_exact_value(theta1.double(), theta2.double(), GAMMA, horizon=20)
    for player in range(2):
        assert abs(returns[:, player].mean() - exact[player].item()) < 4 * returns[:, player].std() / len(returns) ** 0.5


def test_exact_value_gradient_matches_finite_differences():
    theta1, theta2 = th.randn(5, dtype=th.float64, requires_grad=True), th.randn(5, dtype=th.float64)
    (gradient,) = th.autograd.grad(ipd_exact_value(theta1, theta2, GAMMA)[0], theta1)
    for index in range(5):
        offset = th.zeros(5, dtype=th.float64)
        offset[index] = 1e-6
        plus = ipd_exact_value(theta1.detach() + offset, theta2, GAMMA)[0]
        minus = ipd_exact_value(theta1.detach() - offset, theta2, GAMMA)[0]
        assert gradient[index].item() == pytest.approx(((plus - minus) / 2e-6).item(), rel=1e-5, abs=1e-8)


def _estimates(learner, n_batches):
    """Sampled estimates of player 2's inner gradient and player 1's LOLA meta-gradient, one per independent batch."""
    inner, meta = [], []
    for _ in range(n_batches):
        theta2_adapted = learner.lookahead(0)
        objective, _ = learner.objective(0, learner.thetas[0], theta2_adapted, "sampled", learner.batch_size)
        meta.append(th.autograd.grad(objective, learner.thetas[0])[0])
        inner.append((theta2_adapted.detach() - learner.thetas[1].detach()) / learner.inner_lr)
    return th.stack(inner), th.stack(meta)


def test_dice_estimates_the_exact_inner_gradient_and_lola_meta_gradient():
    """
    Unbiased: the means over independent batches of the DiCE estimates are within 4 standard errors of the exact
    ones; and the meta-gradient's LOLA term (through the opponent's step) is resolved: the naive gradient (the
    opponent held fixed) is rejected.
    """
    learner = LOLADiCE(batch_size=256, rollout_length=20, seed=0)
    exact = LOLADiCE(rollout_length=20, inner="exact", outer="exact")
    with th.no_grad():
        for one, other in zip(learner.thetas, exact.thetas):
            values = th.randn(5, generator=th.Generator().manual_seed(len(learner.history) + 7))
            one.copy_(values)
            other.copy_(values)
    inner, meta = _estimates(learner, 80)
    theta2_adapted = exact.lookahead(0)
    exact_inner = (theta2_adapted.detach() - exact.thetas[1].detach()) / exact.inner_lr
    exact_meta = th.autograd.grad(exact.objective(0, exact.thetas[0], theta2_adapted, "exact", 0)[0], exact.thetas[0])[0]
    naive_value = ipd_exact_value(exact.thetas[0], exact.thetas[1].detach(), GAMMA, horizon=20)[0]
    naive_meta = th.autograd.grad(naive_value, exact.thetas[0])[0]
    for estimates, expected in ((inner, exact_inner), (meta, exact_meta)):
        standard_error = estimates.std(0) / len(estimates) ** 0.5
        assert ((estimates.mean(0) - expected).abs() < 4 * standard_error).all(), (estimates.mean(0), expected)
    assert (exact_inner.abs() / (inner.std(0) / len(inner) ** 0.5)).max() > 10
    assert ((meta.mean(0) - naive_meta).abs() / (meta.std(0) / len(meta) ** 0.5)).max() > 4


@pytest.mark.slow
def test_lola_exact_cooperates_where_naive_learners_defect():
    lola, naive = LOLADiCE(inner="exact", outer="exact"), LOLADiCE(inner="exact", outer="exact", opponent_shaping=False)
    for learner in (lola, naive):
        learner.learn(300 * learner.timesteps_per_update)
    assert len(lola.history) == len(naive.history) == 300
    for player in (1, 2):
        assert lola.history[-1][f"average_reward_{player}"] > -1.3
        assert naive.history[-1][f"average_reward_{player}"] < -1.9


def test_sampled_learning_is_reproducible_and_arguments_are_checked():
    first = LOLADiCE(batch_size=16, rollout_length=10, seed=3).learn(3 * 640)
    second = LOLADiCE(batch_size=16, rollout_length=10, seed=3).learn(3 * 640)
    assert first.history == second.history
    np.testing.assert_array_equal(first.cooperation_probabilities(), second.cooperation_probabilities())
    with pytest.raises(ValueError, match="inner"):
        LOLADiCE(inner="analytic")
    with pytest.raises(ValueError, match="batch_size"):
        LOLADiCE(batch_size=0)


def test_off_policy_dice_estimates_the_exact_inner_gradient_and_its_hessian_term():
    """
    Games played by other policies, weighed by off-policy DiCE's magic box (taken against the behaviour
    log-likelihoods), estimate the current policies' inner gradient and its derivative in the other player's
    logits without bias; the same games without the weights are rejected (the test's power).
    """
    rollout, generator = 8, th.Generator().manual_seed(1)
    learner = LOLADiCE(rollout_length=rollout, seed=0)
    theta1, theta2 = th.randn(5, generator=generator), th.randn(5, generator=generator)
    behaviour1 = theta1 + 0.4 * th.randn(5, generator=generator)
    behaviour2 = theta2 + 0.4 * th.randn(5, generator=generator)
    direction = th.randn(5, generator=generator)

    def inner_gradient_and_hessian_term(theta1, theta2, objective):
        (gradient,) = th.autograd.grad(objective, theta2, create_graph=True)
        (hessian_term,) = th.autograd.grad(gradient @ direction, theta1)  # d/dtheta1 of <grad_2 V_2, u>
        return th.cat([gradient.detach(), hessian_term])

    def leaves():
        return theta1.clone().requires_grad_(True), theta2.clone().requires_grad_(True)

    exact = inner_gradient_and_hessian_term(*(pair := leaves()), ipd_exact_value(*pair, GAMMA, horizon=rollout)[1])
    weighted, unweighted = [], []
    for _ in range(40):
        games = play(behaviour1, behaviour2, 1000, rollout, generator)
        for off_policy, estimates in ((True, weighted), (False, unweighted)):
            pair = leaves()
            estimates.append(inner_gradient_and_hessian_term(*pair, learner.surrogate(1, games, *pair, off_policy=off_policy)))
    weighted, unweighted = th.stack(weighted), th.stack(unweighted)
    standard_error = weighted.std(0) / len(weighted) ** 0.5
    assert ((weighted.mean(0) - exact).abs() < 4 * standard_error).all(), (weighted.mean(0), exact)
    unweighted_error = unweighted.std(0) / len(unweighted) ** 0.5
    assert ((unweighted.mean(0) - exact).abs() / unweighted_error).max() > 8


def _lookahead_with_buffer(**kwargs):
    """Player 1's virtual step of player 2 at fixed logits, after the same off-policy games were stored."""
    learner = LOLADiCE(batch_size=32, rollout_length=10, buffer_size=96, seed=5, **kwargs)
    generator = th.Generator().manual_seed(11)
    with th.no_grad():
        learner.thetas[0].copy_(th.randn(5, generator=generator))
        learner.thetas[1].copy_(th.randn(5, generator=generator))
    learner.remember(play(learner.thetas[0] + 0.3, learner.thetas[1] - 0.3, 64, 10, generator))
    theta2_adapted = learner.lookahead(0)
    jacobian = th.stack([th.autograd.grad(theta2_adapted[i], learner.thetas[0], retain_graph=True)[0] for i in range(5)])
    return theta2_adapted.detach(), jacobian, learner


def test_off_policy_inner_step_takes_its_value_and_its_derivative_from_the_chosen_games():
    on_on = _lookahead_with_buffer()
    off_off = _lookahead_with_buffer(off_policy_value=True, off_policy_hessian=True)
    off_on = _lookahead_with_buffer(off_policy_value=True)
    on_off = _lookahead_with_buffer(off_policy_hessian=True)
    # the fresh games (32) joined the stored ones (64) in the buffer, played by the current policies
    buffer = off_off[2].replay_games
    assert len(buffer) == 96
    fresh = buffer.last(32)
    current = fresh.log_prob(0, off_off[2].thetas[0].detach()) + fresh.log_prob(1, off_off[2].thetas[1].detach())
    th.testing.assert_close(fresh.behaviour_log_probs, current)
    # the stop-gradient decomposition: value from the first source, derivative from the second
    th.testing.assert_close(off_on[0], off_off[0])
    th.testing.assert_close(on_off[0], on_on[0])
    th.testing.assert_close(off_on[1], on_on[1])
    th.testing.assert_close(on_off[1], off_off[1])
    # and the sources differ: the buffer's estimate is not the fresh games'
    assert (off_off[0] - on_on[0]).abs().max() > 1e-3 and (off_off[1] - on_on[1]).abs().max() > 1e-3


def test_off_policy_buffer_keeps_the_most_recent_games_and_arguments_are_checked():
    learner = LOLADiCE(batch_size=16, rollout_length=10, buffer_size=40, off_policy_value=True, seed=0).learn(640)
    # one update: both players' virtual steps played 16 games each at the initial (uniform) policies
    assert len(learner.replay_games) == 32
    th.testing.assert_close(learner.replay_games.behaviour_log_probs, th.full((32, 10), 2 * np.log(0.5)))
    learner.learn(640)
    assert len(learner.replay_games) == 40
    for kwargs in (dict(off_policy_value=True), dict(off_policy_hessian=True, buffer_size=8, batch_size=16)):
        with pytest.raises(ValueError, match="buffer_size"):
            LOLADiCE(**kwargs)
    with pytest.raises(ValueError, match="inner='sampled'"):
        LOLADiCE(inner="exact", buffer_size=1024, off_policy_value=True)
    with pytest.raises(ValueError, match="buffer_size"):
        LOLADiCE(buffer_size=-1)


def test_learn_counts_rounds_as_sb3_timesteps_and_takes_sb3_callbacks(tmp_path):
    """One update counts both players' outer and inner games' rounds; an SB3 CheckpointCallback saves the learner."""
    from stable_baselines3.common.callbacks import CheckpointCallback

    learner = LOLADiCE(batch_size=16, inner_batch_size=8, rollout_length=10, seed=0)
    assert learner.timesteps_per_update == 2 * (16 + 8) * 10
    with pytest.raises(ValueError, match="total_timesteps: counts rounds of the IPD"):
        learner.learn(3)  # (before 0.2 the argument counted updates)
    checkpoints = CheckpointCallback(save_freq=2, save_path=str(tmp_path), name_prefix="lola")
    learner.learn(5 * learner.timesteps_per_update - 1, callback=[checkpoints])
    assert learner.n_updates == 5 and learner.num_timesteps == 5 * 480
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lola_1920_steps.zip", "lola_960_steps.zip"]
    stops = []
    learner.learn(10 * 480, callback=lambda model, record: stops.append(record["update"]) or len(stops) < 3)
    assert stops == [6.0, 7.0, 8.0] and learner.num_timesteps == 3 * 480


@pytest.mark.parametrize("kwargs", [dict(), dict(buffer_size=48, off_policy_value=True, off_policy_hessian=True)])
def test_save_load_continue_is_bit_identical_to_not_stopping(tmp_path, kwargs):
    """Logits, baselines, both Adams, the games' stream, the off-policy buffer and the counters are saved."""
    def make():
        return LOLADiCE(batch_size=16, rollout_length=10, seed=4, **kwargs)

    straight = make().learn(5 * 640)
    first = make().learn(2 * 640)
    first.save(tmp_path / "lola")
    resumed = LOLADiCE.load(tmp_path / "lola.zip")
    assert resumed.n_updates == 2 and resumed.num_timesteps == 2 * 640 and resumed.buffer_size == first.buffer_size
    resumed.learn(3 * 640, reset_num_timesteps=False)
    assert resumed.history == straight.history and resumed.num_timesteps == straight.num_timesteps
    for mine, theirs in zip([*resumed.thetas, *resumed.values], [*straight.thetas, *straight.values]):
        assert th.equal(mine, theirs)
    with pytest.raises(ValueError, match="does not hold a LOLADiCE learner"):
        from sb3_metarl import MetaPolicyGradient

        MetaPolicyGradient("MlpPolicy", "sb3_metarl/Navigation2D-v0", meta_batch_size=2, inner_episodes=2,
                           outer_episodes=2, inner_lr=0.1).save(tmp_path / "other")  # fmt: skip
        LOLADiCE.load(tmp_path / "other.zip")
