"""MuJoCo locomotion task families: checkers, task-dependent rewards, parameter restore, meta-training smoke."""

import pickle

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env

from sb3_metarl import MetaPolicyGradient
from sb3_metarl.tasks import MUJOCO_TASK_ENVS


@pytest.mark.parametrize("env_id", MUJOCO_TASK_ENVS)
def test_family_passes_checkers_for_several_tasks_and_tasks_pickle(env_id):
    env = gym.make(env_id)
    assert env.spec.max_episode_steps == 200
    for task in env.unwrapped.sample_tasks(2, rng=np.random.default_rng(0)):
        env.unwrapped.set_task(pickle.loads(pickle.dumps(task)))
        check_env(env.unwrapped, warn=False)
        gym_check_env(env.unwrapped, skip_render_check=True)


def _rollout_rewards(env_id, task, steps=20):
    env = gym.make(env_id)
    env.unwrapped.set_task(task)
    env.reset(seed=0)
    env.action_space.seed(0)
    rows = []
    for _ in range(steps):
        _, reward, terminated, truncated, info = env.step(env.action_space.sample())
        rows.append((reward, info))
        if terminated or truncated:
            break
    return rows


@pytest.mark.parametrize(
    "env_id, task, task_term, kept",
    [
        ("sb3_metarl/HalfCheetahVel-v0", 1.5, lambda i: -abs(i["x_velocity"] - 1.5), ["reward_ctrl"]),
        ("sb3_metarl/HalfCheetahDir-v0", -1.0, lambda i: -i["x_velocity"], ["reward_ctrl"]),
        (
            "sb3_metarl/AntVel-v0",
            2.0,
            lambda i: -abs(i["x_velocity"] - 2.0),
            ["reward_ctrl", "reward_contact", "reward_survive"],
        ),
        ("sb3_metarl/AntDir-v0", 1.0, lambda i: i["x_velocity"], ["reward_ctrl", "reward_contact", "reward_survive"]),
        (
            "sb3_metarl/AntDir2D-v0",
            np.pi / 2,
            lambda i: np.cos(np.pi / 2) * i["x_velocity"] + i["y_velocity"],
            ["reward_ctrl", "reward_contact", "reward_survive"],
        ),
        (
            "sb3_metarl/AntGoal-v0",
            np.array([1.0, -2.0]),
            lambda i: -np.hypot(i["x_position"] - 1.0, i["y_position"] + 2.0),
            ["reward_ctrl", "reward_contact", "reward_survive"],
        ),
        ("sb3_metarl/Walker2dVel-v0", 0.5, lambda i: -abs(i["x_velocity"] - 0.5), ["reward_ctrl", "reward_survive"]),
        ("sb3_metarl/SwimmerVel-v0", 0.3, lambda i: -abs(i["x_velocity"] - 0.3), ["reward_ctrl"]),
    ],
)
def test_reward_is_the_documented_task_term_plus_the_kept_costs(env_id, task, task_term, kept):
    rows = _rollout_rewards(env_id, task)
    for reward, info in rows:
        assert info["reward_task"] == pytest.approx(task_term(info))
        assert reward == pytest.approx(task_term(info) + sum(info[k] for k in kept))


@pytest.mark.parametrize(
    "env_id, first, second",
    [
        ("sb3_metarl/HalfCheetahVel-v0", 0.0, 2.0),
        ("sb3_metarl/HalfCheetahDir-v0", 1.0, -1.0),
        ("sb3_metarl/AntDir2D-v0", 0.0, 3.0),
    ],
)
def test_same_actions_different_tasks_give_different_rewards(env_id, first, second):
    rewards_first = [r for r, _ in _rollout_rewards(env_id, first)]
    rewards_second = [r for r, _ in _rollout_rewards(env_id, second)]
    assert not np.allclose(rewards_first, rewards_second)


@pytest.mark.parametrize(
    "env_id, bad_task",
    [
        ("sb3_metarl/HalfCheetahVel-v0", 2.5),
        ("sb3_metarl/HalfCheetahDir-v0", 0.5),
        ("sb3_metarl/AntVel-v0", -0.1),
        ("sb3_metarl/AntDir2D-v0", 7.0),
        ("sb3_metarl/AntGoal-v0", np.array([3.0, 3.0])),
        ("sb3_metarl/SwimmerVel-v0", 0.6),
        ("sb3_metarl/HopperRandParams-v0", {"body_mass": np.full(3, 2.0)}),
        ("sb3_metarl/HopperRandParams-v0", {"gravity": 1.0}),
    ],
)
def test_task_outside_the_distribution_raises(env_id, bad_task):
    with pytest.raises(ValueError, match="task"):
        gym.make(env_id).unwrapped.set_task(bad_task)


@pytest.mark.parametrize("env_id", ["sb3_metarl/HopperRandParams-v0", "sb3_metarl/Walker2dRandParams-v0"])
def test_random_parameters_are_set_on_the_model_and_restored_exactly(env_id):
    env = gym.make(env_id).unwrapped
    original = {name: getattr(env.model, name).copy() for name in env.parameter_names}
    task = env.sample_tasks(1, rng=np.random.default_rng(0))[0]
    env.set_task(task)
    for name in env.parameter_names:
        np.testing.assert_allclose(getattr(env.model, name), original[name] * task[name])
    env.set_task(env.sample_tasks(1, rng=np.random.default_rng(1))[0])
    env.set_task({name: np.ones_like(value) for name, value in original.items()})
    for name in env.parameter_names:
        np.testing.assert_array_equal(getattr(env.model, name), original[name])
    assert set(env.get_task()) == set(env.parameter_names)


@pytest.mark.parametrize("env_id", MUJOCO_TASK_ENVS)
def test_meta_training_smoke(env_id):
    model = MetaPolicyGradient(
        "MlpPolicy",
        env_id,
        env_kwargs=dict(max_episode_steps=10),
        meta_batch_size=2,
        inner_episodes=2,
        outer_episodes=2,
        inner_lr=1e-3,
        policy_kwargs=dict(net_arch=[16]),
        seed=0,
    )
    assert model.episode_sampler.horizon == 10
    model.learn(1)
    assert model.n_updates == 1 and 0 < model.num_timesteps <= 2 * 4 * 10
    table = model.evaluate_adaptation(n_tasks=2, inner_steps=1)
    assert np.all(np.isfinite(table["mean"]))


@pytest.mark.slow
def test_families_run_in_subprocesses():
    from stable_baselines3.common.vec_env import SubprocVecEnv

    model = MetaPolicyGradient(
        "MlpPolicy",
        "sb3_metarl/HopperRandParams-v0",
        env_kwargs=dict(max_episode_steps=5),
        vec_env_cls=SubprocVecEnv,
        meta_batch_size=2,
        inner_episodes=1,
        outer_episodes=1,
        seed=0,
    )
    try:
        model.learn(1)
        tasks = model.get_env().env_method("get_task")
        assert tasks[0]["body_mass"].shape == tasks[1]["body_mass"].shape and not np.allclose(
            tasks[0]["body_mass"], tasks[1]["body_mass"]
        )
    finally:
        model.env.close()


def test_half_cheetah_loads_without_settotalmass_and_keeps_the_base_model_exactly(monkeypatch):
    import mujoco
    from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv

    base = HalfCheetahEnv()
    compiled = []
    from_path, from_string = mujoco.MjModel.from_xml_path, mujoco.MjModel.from_xml_string
    def read(path):
        with open(path) as handle:
            return handle.read()

    monkeypatch.setattr(mujoco.MjModel, "from_xml_path", lambda path, *a: compiled.append(read(path)) or from_path(path, *a))
    monkeypatch.setattr(mujoco.MjModel, "from_xml_string", lambda xml, *a: compiled.append(xml) or from_string(xml, *a))
    ours = gym.make("sb3_metarl/HalfCheetahVel-v0").unwrapped
    # MuJoCo 4 warns about the deprecated attribute once per compiled model, i.e. per sub-env
    assert compiled and not any("settotalmass" in xml for xml in compiled)
    for field in ["body_mass", "body_inertia", "body_subtreemass", "dof_invweight0", "body_invweight0", "dof_M0"]:
        np.testing.assert_array_equal(getattr(ours.model, field), getattr(base.model, field))
    assert abs(ours.model.body_mass.sum() - 14.0) < 1e-9


@pytest.mark.parametrize("env_id", MUJOCO_TASK_ENVS)
def test_action_scale_maps_the_policy_s_range_onto_the_actuators(env_id):
    """action_scale=10 (rllab / ProMP / pytorch-maml-rl): a in [-10, 10] steps the env as a / 10 does unscaled."""
    scaled, plain = gym.make(env_id, action_scale=10.0), gym.make(env_id)
    assert np.all(scaled.action_space.high == 10.0) and np.all(scaled.action_space.low == -10.0)
    task = plain.unwrapped.sample_tasks(1, np.random.default_rng(0))[0]
    for env in (scaled, plain):
        env.unwrapped.set_task(task)
        env.reset(seed=3)
    rng = np.random.default_rng(4)
    for _ in range(30):
        action = np.clip(rng.normal(size=plain.action_space.shape), -1.2, 1.2)  # past the range: clipped by both
        first, second = scaled.step(10.0 * action), plain.step(np.clip(action, -1.0, 1.0))
        # (a + 10) * 2 / 20 - 1 and a / 10 differ by float rounding
        np.testing.assert_allclose(first[0], second[0], rtol=1e-9, atol=1e-9)
        assert first[1] == pytest.approx(second[1], rel=1e-9, abs=1e-9) and first[2:4] == second[2:4]
    copied = pickle.loads(pickle.dumps(scaled.unwrapped))
    assert copied.action_scale == 10.0 and np.all(copied.action_space.high == 10.0)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), "10", True])
def test_a_bad_action_scale_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="action_scale"):
        gym.make("sb3_metarl/HalfCheetahDir-v0", action_scale=bad)


def _random_params_task_with_nan():
    env = gym.make("sb3_metarl/HopperRandParams-v0").unwrapped
    task = env.sample_tasks(1, np.random.default_rng(0))[0]
    task["body_mass"][1] = np.nan
    return task


@pytest.mark.parametrize(
    "env_id, task, message",
    [
        # before: "cannot reshape array of size 2 into shape ()", a bare float() TypeError; NaN passed
        ("sb3_metarl/HalfCheetahVel-v0", [0.5, 0.7], r"HalfCheetahVelEnv: task must be a target velocity in \[0.0, 2.0\]"),
        ("sb3_metarl/HalfCheetahVel-v0", None, "HalfCheetahVelEnv: task must be a target velocity"),
        ("sb3_metarl/HalfCheetahDir-v0", "forward", r"HalfCheetahDirEnv: task must be a direction, 1.0 or -1.0 \(one finite"),
        ("sb3_metarl/AntGoal-v0", [np.nan, 0.0], r"AntGoalEnv: task must be a goal within radius 3.0 \(finite numbers of"),
        ("sb3_metarl/AntDir2D-v0", float("nan"), "AntDir2DEnv: task must be an angle"),
        ("sb3_metarl/HopperRandParams-v0", _random_params_task_with_nan(), "task must be factors for 'body_mass'"),
        ("sb3_metarl/Navigation2D-v0", [0.1, np.nan], "Navigation2DEnv: task must be a goal inside"),
        ("sb3_metarl/GaussianBandit-v0", [0.1, 0.2], "GaussianBandit"),
    ],
)
def test_set_task_refuses_what_is_not_a_task_naming_the_env_and_what_a_task_is(env_id, task, message):
    env = gym.make(env_id).unwrapped
    with pytest.raises(ValueError, match=message):
        env.set_task(task)
    assert not env.task_is_set


@pytest.mark.parametrize("bad", [0, 2, -1.5, True, "up"])
def test_a_bad_deviation_sign_is_refused_by_name(bad):
    with pytest.raises(ValueError, match=r"deviation_sign: must be -1 \(track the target velocity\) or \+1"):
        gym.make("sb3_metarl/SwimmerVel-v0", deviation_sign=bad)


@pytest.mark.parametrize("env_id", ["sb3_metarl/SwimmerVel-v0", "sb3_metarl/AntVel-v0"])
def test_deviation_sign_plus_one_rewards_the_deviation_as_maml_zoo_s_swimmer(env_id):
    # maml_zoo's SwimmerRandVelEnv (ProMP, SG-MRL): reward = |v_x - v*| - 1e-4 |a|^2; the default tracks: -|v_x - v*|
    tracking, deviating = gym.make(env_id), gym.make(env_id, deviation_sign=1)
    action = np.full(tracking.action_space.shape, 0.5, dtype=np.float32)
    for env in (tracking, deviating):
        env.unwrapped.set_task(0.15 if "Swimmer" in env_id else 1.0)
        env.reset(seed=3)
    for _ in range(5):
        _, tracked, *_, tracked_info = tracking.step(action)
        _, deviated, *_, deviated_info = deviating.step(action)
        deviation = abs(tracked_info["x_velocity"] - tracking.unwrapped.get_task())
        assert deviation > 0 and tracked_info["reward_task"] == -deviation and deviated_info["reward_task"] == deviation
        assert deviated - tracked == pytest.approx(2 * deviation, rel=1e-12)
    # the argument survives a copy through the env's constructor arguments (Gymnasium's EzPickle)
    assert pickle.loads(pickle.dumps(deviating.unwrapped)).deviation_sign == 1


@pytest.mark.parametrize("bad", [(0, 1, 2), (0,), "fast", (0, float("nan")), (2.0, 1.0)])
def test_a_bad_velocity_range_is_refused_by_name(bad):
    # before: (0, 1, 2) was "too many values to unpack"
    with pytest.raises(ValueError, match=r"velocity_range: must be finite \(low, high\) with low <= high"):
        gym.make("sb3_metarl/HalfCheetahVel-v0", velocity_range=bad)
