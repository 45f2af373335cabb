import pickle

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env
from stable_baselines3.common.vec_env import DummyVecEnv

import sb3_metarl  # noqa: F401
from sb3_metarl.tasks import BUILTIN_TASK_ENVS, EnvTaskSampler, FixedTaskSampler


@pytest.mark.parametrize("env_id", sorted(BUILTIN_TASK_ENVS))
def test_builtin_envs_pass_checkers_for_several_tasks(env_id):
    env = gym.make(env_id)
    tasks = env.unwrapped.sample_tasks(3, rng=np.random.default_rng(0))
    for task in tasks:
        env.unwrapped.set_task(task)
        check_env(env.unwrapped, warn=False)
        gym_check_env(env.unwrapped, skip_render_check=True)
        assert pickle.loads(pickle.dumps(task)) is not None
    assert env.spec.max_episode_steps == BUILTIN_TASK_ENVS[env_id][1]


@pytest.mark.parametrize(
    "env_id, bad_task",
    [
        ("sb3_metarl/Navigation2D-v0", np.array([2.0, 0.0])),
        ("sb3_metarl/Navigation2D-v0", np.zeros(3)),
        ("sb3_metarl/GaussianBandit-v0", 1.5),
        ("sb3_metarl/TabularMDP-v0", np.zeros((3, 3))),
        ("sb3_metarl/TabularMDP-v0", np.full((20, 5), 2.0)),
    ],
)
def test_set_task_outside_distribution_raises(env_id, bad_task):
    env = gym.make(env_id)
    with pytest.raises(ValueError, match="task must be"):
        env.unwrapped.set_task(bad_task)


def test_navigation_reward_is_minus_distance_to_goal():
    env = gym.make("sb3_metarl/Navigation2D-v0")
    env.unwrapped.set_task(np.array([0.3, -0.4]))
    obs, _ = env.reset(seed=0)
    np.testing.assert_allclose(obs, [0.0, 0.0])
    obs, reward, terminated, truncated, _ = env.step(np.array([1.0, 0.05]))  # x clipped to 0.1
    np.testing.assert_allclose(obs, [0.1, 0.05], atol=1e-7)
    assert reward == pytest.approx(-np.hypot(0.2, 0.45))
    assert not terminated and not truncated


def test_navigation_terminates_at_goal_and_truncates_at_horizon():
    env = gym.make("sb3_metarl/Navigation2D-v0")
    env.unwrapped.set_task(np.array([0.1, 0.1]))
    env.reset(seed=0)
    assert env.step(np.array([0.1, 0.1]))[2]
    env.unwrapped.set_task(np.array([0.5, 0.5]))
    env.reset(seed=0)
    for _ in range(100):
        _, _, terminated, truncated, _ = env.step(np.array([-0.1, -0.1]))
    assert truncated and not terminated


def test_bandit_reward_depends_on_task():
    env = gym.make("sb3_metarl/GaussianBandit-v0")
    for target, action, expected in [(0.5, 0.0, -0.25), (-1.0, 1.0, -4.0)]:
        env.unwrapped.set_task(target)
        env.reset(seed=0)
        _, reward, terminated, _, _ = env.step(np.array([action]))
        assert reward == pytest.approx(expected) and terminated


def test_tabular_rewards_follow_task_and_dynamics_are_shared():
    env_a, env_b = gym.make("sb3_metarl/TabularMDP-v0"), gym.make("sb3_metarl/TabularMDP-v0")
    np.testing.assert_array_equal(env_a.unwrapped.transitions, env_b.unwrapped.transitions)
    np.testing.assert_allclose(env_a.unwrapped.transitions.sum(-1), 1.0)
    rewards = np.zeros((20, 5))
    rewards[:, 3] = 0.7
    env_a.unwrapped.set_task(rewards)
    env_a.reset(seed=1)
    assert env_a.step(3)[1] == pytest.approx(0.7)
    assert env_a.step(0)[1] == 0.0


def test_tabular_transitions_follow_kernel():
    env = gym.make("sb3_metarl/TabularMDP-v0", n_states=3, n_actions=2).unwrapped
    env.set_task(np.zeros((3, 2)))
    env.reset(seed=0)
    counts = np.zeros(3)
    for _ in range(4000):
        env._state[0] = 1  # (the state is a one-element array: the batched twin may hold it as a row)
        counts[env.step(1)[0]] += 1
    np.testing.assert_allclose(counts / counts.sum(), env.transitions[1, 1], atol=0.03)


def test_fixed_task_sampler():
    sampler = FixedTaskSampler(["a", "b", "c"])
    draws = sampler.sample(300, np.random.default_rng(0))
    assert set(draws) == {"a", "b", "c"}
    assert FixedTaskSampler([1, 2], cycle=True).sample(5, np.random.default_rng(0)) == [1, 2, 1, 2, 1]
    with pytest.raises(ValueError, match="tasks"):
        FixedTaskSampler([])


def test_env_task_sampler_is_seeded_by_caller():
    venv = DummyVecEnv([lambda: gym.make("sb3_metarl/Navigation2D-v0")])
    sampler = EnvTaskSampler(venv)
    first = sampler.sample(4, np.random.default_rng(3))
    again = sampler.sample(4, np.random.default_rng(3))
    np.testing.assert_array_equal(np.stack(first), np.stack(again))
    assert np.all(np.abs(np.stack(first)) <= 0.5)


def test_env_task_sampler_requires_sample_tasks():
    venv = DummyVecEnv([lambda: gym.make("CartPole-v1")])
    with pytest.raises(ValueError, match="sample_tasks"):
        EnvTaskSampler(venv)


@pytest.mark.all_cases
@pytest.mark.parametrize("env_id", [e for e in sorted(BUILTIN_TASK_ENVS) if "RandParams" not in e])
def test_a_task_env_without_a_task_refuses_to_step_and_says_what_to_do(env_id):
    """Navigation2D's placeholder goal is the start point: evaluate_policy on a fresh env scored -0.002 for any policy."""
    env = gym.make(env_id)
    env.reset(seed=0)
    with pytest.raises(RuntimeError, match=r"no task is set.*set_task\(task\).*evaluate_adaptation.*MetaEvalCallback"):
        env.step(env.action_space.sample())
    env.unwrapped.set_task(env.unwrapped.sample_tasks(1, rng=np.random.default_rng(0))[0])
    env.step(env.action_space.sample())


def test_evaluate_policy_on_a_fresh_navigation_env_is_refused():
    from stable_baselines3.common.evaluation import evaluate_policy

    from sb3_metarl import MetaPolicyGradient

    model = MetaPolicyGradient("MlpPolicy", "sb3_metarl/Navigation2D-v0", meta_batch_size=2, inner_episodes=2,
                               outer_episodes=2, inner_lr=1e-3, seed=0)  # fmt: skip
    with pytest.raises(RuntimeError, match="no task is set"):
        evaluate_policy(model, gym.make("sb3_metarl/Navigation2D-v0"), n_eval_episodes=2)


def test_navigation_at_sg_mrl_s_setting_clips_the_position_and_maps_actions_from_plus_minus_10():
    # SG-MRL's point env (point_env_2d_v2.py) under ProMP's normalize: position in [-0.5, 0.5]^2, actions [-10, 10] -> 0.1
    env = gym.make("sb3_metarl/Navigation2D-v0", position_limit=0.5, action_scale=10.0).unwrapped
    assert env.action_space.high.tolist() == [10.0, 10.0]
    env.set_task(np.array([0.5, -0.5]))
    env.reset(seed=0)
    obs, reward, *_ = env.step(np.array([5.0, -10.0], np.float32))
    assert obs.tolist() == pytest.approx([0.05, -0.1]) and reward == pytest.approx(-np.hypot(0.45, 0.4))
    for _ in range(10):
        obs, *_ = env.step(np.array([10.0, -20.0], np.float32))  # beyond the range: clipped to the move's 0.1
    assert obs.tolist() == pytest.approx([0.5, -0.5])  # held at the position limit, not beyond
    plain = gym.make("sb3_metarl/Navigation2D-v0").unwrapped  # the default: unbounded, actions clipped to 0.1
    plain.set_task(np.array([0.5, -0.5]))
    plain.reset(seed=0)
    for _ in range(10):
        obs, *_ = plain.step(np.array([0.1, -0.1], np.float32))
    assert plain.action_space.high.tolist() == pytest.approx([0.1, 0.1])
    with pytest.raises(ValueError, match="position_limit"):
        gym.make("sb3_metarl/Navigation2D-v0", position_limit=-1)


@pytest.mark.parametrize(
    "settings",
    [
        [{}] * 12,
        [dict(position_limit=0.5, action_scale=10.0)] * 12,
        [{}, dict(position_limit=0.5, action_scale=10.0), dict(action_limit=0.2, success_radius=0.05)] * 4,
    ],
)
def test_the_navigation_twin_steps_exactly_as_each_env_s_own_step(settings):
    from sb3_metarl.samplers.runner import step_without_bookkeeping
    from sb3_metarl.tasks.navigation import BatchedNavigation
    from sb3_metarl.tasks.twins import batched_stepper

    per_env = [gym.make("sb3_metarl/Navigation2D-v0", **kwargs) for kwargs in settings]
    batched = [gym.make("sb3_metarl/Navigation2D-v0", **kwargs) for kwargs in settings]
    twin = batched_stepper([env.unwrapped for env in batched])
    assert isinstance(twin, BatchedNavigation) and not twin.overlaps
    steps = [step_without_bookkeeping(env)[0] for env in per_env]
    rng = np.random.default_rng(0)
    ends = 0
    for wave in range(4):
        for index, (first, second) in enumerate(zip(per_env, batched)):
            goal = rng.uniform(-0.5, 0.5, size=2) if wave < 3 else np.zeros(2)  # the start: small moves terminate
            first.unwrapped.set_task(goal)
            second.unwrapped.set_task(goal)
            first.reset(seed=index)
            second.reset(seed=index)
        running = np.ones(12, dtype=bool)
        for _ in range(100):
            high = np.array([env.action_space.high for env in per_env])
            spread = 1.5 if wave < 3 else 0.01  # beyond the range too (clipped); the last wave stays near the start
            actions = (rng.normal(size=(12, 2)) * high * spread).astype(np.float32)
            rows = np.flatnonzero(running & (rng.uniform(size=12) < 0.8))
            if len(rows) == 0:
                continue
            outcomes = [steps[index](actions[index]) for index in rows]
            observations, rewards, terminated, infos = twin.step(rows, actions[rows])
            assert np.array_equal(observations, np.array([outcome[0] for outcome in outcomes]))
            assert observations.dtype == np.float32
            assert rewards.tolist() == [outcome[1] for outcome in outcomes]  # the same floats, not close ones
            assert terminated.tolist() == [outcome[2] for outcome in outcomes] and infos == [{}] * len(rows)
            running[rows[terminated]] = False
            ends += int(terminated.sum())
    assert ends > 0  # terminations were compared, not only moves
    with pytest.raises(ValueError, match="actions: expected shape"):
        twin.step(np.arange(3), np.zeros((2, 2), np.float32))


def test_navigation_meta_trains_the_same_with_and_without_its_twin():
    import torch as th

    from sb3_metarl import MetaPolicyGradient

    kwargs = dict(meta_batch_size=2, inner_episodes=3, outer_episodes=2, inner_lr=0.01, seed=0,
                  env_kwargs=dict(position_limit=0.5, action_scale=10.0))  # fmt: skip
    models = {
        batched: MetaPolicyGradient(
            "MlpPolicy", "sb3_metarl/Navigation2D-v0", sampler_kwargs=dict(batched_physics=batched), **kwargs
        )
        for batched in (True, False)
    }
    assert models[True].episode_sampler.runner.batched is not None and models[False].episode_sampler.runner.batched is None
    for model in models.values():
        model.learn(3 * 2 * 5 * 100)
    assert models[True].num_timesteps == models[False].num_timesteps
    for name, value in models[False].policy.state_dict().items():
        assert th.equal(value, models[True].policy.state_dict()[name]), name


#: the cheap families' twins: env id -> (per-sub-env arguments, the twin's class name, an action of the row's env)
CHEAP_TWINS = {
    "sb3_metarl/TabularMDP-v0": (
        [{}, {}, dict(transition_seed=3), dict(dirichlet_alpha=0.1)] * 3,
        "BatchedTabularMDP",
        lambda rng, env: rng.integers(env.action_space.n),  # (a Discrete action: one integer, as the sampler passes it)
    ),
    "sb3_metarl/GaussianBandit-v0": ([{}] * 12, "BatchedGaussianBandit", lambda rng, env: rng.normal(size=1) * 3),
    "sb3_metarl/IPD-v0": ([{}] * 12, "BatchedIPD", lambda rng, env: rng.integers(2, size=2)),
}


@pytest.mark.parametrize("env_id", list(CHEAP_TWINS))
def test_the_cheap_families_twins_step_exactly_as_each_env_s_own_step(env_id):
    from sb3_metarl.samplers.runner import step_without_bookkeeping
    from sb3_metarl.tasks.twins import batched_stepper

    settings, twin_name, draw_action = CHEAP_TWINS[env_id]
    per_env = [gym.make(env_id, **kwargs) for kwargs in settings]
    batched = [gym.make(env_id, **kwargs) for kwargs in settings]
    twin = batched_stepper([env.unwrapped for env in batched])
    assert type(twin).__name__ == twin_name and not twin.overlaps
    steps = [step_without_bookkeeping(env)[0] for env in per_env]
    rng = np.random.default_rng(0)
    compared = 0
    for wave in range(3):
        for index, (first, second) in enumerate(zip(per_env, batched)):
            if hasattr(first.unwrapped, "set_task"):
                task = first.unwrapped.sample_tasks(1, np.random.default_rng([wave, index]))[0]
                first.unwrapped.set_task(task)
                second.unwrapped.set_task(task)
            assert np.array_equal(first.reset(seed=10 * wave + index)[0], second.reset(seed=10 * wave + index)[0])
        for _ in range(30):
            rows = np.flatnonzero(rng.uniform(size=12) < 0.7)
            if len(rows) == 0:
                continue
            actions = np.array([draw_action(rng, per_env[row]) for row in rows])
            outcomes = [steps[row](action) for row, action in zip(rows, actions)]
            observations, rewards, terminated, infos = twin.step(rows, actions)
            expected = np.array([outcome[0] for outcome in outcomes]).reshape(len(rows), -1)
            assert np.array_equal(observations.reshape(len(rows), -1), expected)
            assert rewards.tolist() == [o[1] for o in outcomes]  # the same floats, not close ones
            assert terminated.tolist() == [o[2] for o in outcomes]
            for info, outcome in zip(infos, outcomes):
                assert info.keys() == outcome[4].keys() and all(np.array_equal(info[k], outcome[4][k]) for k in info)
            compared += len(rows)
    assert compared > 500
    # the envs' own state is the twin's: a per-env step after the twin's continues where the twin left off
    row = 0
    action = draw_action(rng, per_env[row])
    assert np.array_equal(per_env[row].unwrapped.step(action)[0], batched[row].unwrapped.step(action)[0])


@pytest.mark.parametrize("env_id", ["sb3_metarl/TabularMDP-v0", "sb3_metarl/GaussianBandit-v0"])
def test_the_cheap_families_meta_train_the_same_with_and_without_their_twin(env_id):
    import torch as th

    from sb3_metarl import MetaPolicyGradient

    kwargs = dict(meta_batch_size=2, inner_episodes=3, outer_episodes=2, inner_lr=0.05, seed=0)
    models = {
        batched: MetaPolicyGradient("MlpPolicy", env_id, sampler_kwargs=dict(batched_physics=batched), **kwargs)
        for batched in (True, False)
    }
    assert models[True].episode_sampler.runner.batched is not None and models[False].episode_sampler.runner.batched is None
    for model in models.values():
        model.learn(2 * 2 * 5 * 20)
    assert models[True].num_timesteps == models[False].num_timesteps
    for name, value in models[False].policy.state_dict().items():
        assert th.equal(value, models[True].policy.state_dict()[name]), name
