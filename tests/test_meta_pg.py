"""MetaPolicyGradient as an SB3 algorithm: learn, callbacks, logging, save/load, determinism, errors."""

import contextlib
import csv

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from stable_baselines3.common.callbacks import BaseCallback, CheckpointCallback
from stable_baselines3.common.logger import configure
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

from sb3_metarl import EnvTaskSampler, FixedTaskSampler, MetaEvalCallback, MetaPolicyGradient
from sb3_metarl.adaptation import masked_log_prob
from sb3_metarl.estimators.exact import exact_meta_gradient
from sb3_metarl.estimators.study import flat_gradient

TINY = dict(meta_batch_size=2, inner_episodes=2, outer_episodes=2, policy_kwargs=dict(net_arch=[16]))


def _parameters(model):
    return th.cat([p.detach().flatten() for p in model.policy.parameters()])


class CountingCallback(BaseCallback):
    def __init__(self, stop_after=None):
        super().__init__()
        self.stop_after = stop_after
        self.events = []

    def _on_training_start(self):
        self.events.append("start")

    def _on_rollout_end(self):
        self.events.append("rollout_end")

    def _on_step(self):
        assert "dones" in self.locals
        return self.stop_after is None or self.n_calls < self.stop_after

    def _on_training_end(self):
        self.events.append("end")


@pytest.mark.parametrize("mode", ["sf", "lsf", "lvc", "dice", "loaded_dice", "maml", "fomaml"])
def test_every_mode_learns_on_box_and_discrete_actions(mode, make_model):
    for env_id in ["sb3_metarl/Navigation2D-v0", "sb3_metarl/TabularMDP-v0"]:
        model = make_model(env=env_id, gradient_mode=mode, inner_lr=0.01, inner_steps=2, seed=0)
        before = _parameters(model)
        model.learn(1)
        assert not th.equal(before, _parameters(model))
        assert model.n_updates == 1


def test_timesteps_count_every_inner_and_outer_step():
    model = MetaPolicyGradient(
        "MlpPolicy", "sb3_metarl/GaussianBandit-v0", meta_batch_size=3, inner_episodes=4, outer_episodes=5, inner_steps=2
    )
    model.learn(1)
    assert model.num_timesteps == 3 * (2 * 4 + 5)  # one-step episodes


def test_callbacks_logger_keys_and_progress_bar(tmp_path, make_model):
    model = make_model(inner_lr=0.01, seed=0)
    model.set_logger(configure(str(tmp_path / "log"), ["csv"]))
    counting = CountingCallback()
    checkpoint = CheckpointCallback(save_freq=2, save_path=str(tmp_path / "ckpt"), name_prefix="meta")
    evaluation = MetaEvalCallback(n_tasks=2, inner_steps=1, eval_freq=1)
    model.learn(1600, callback=[counting, checkpoint, evaluation], progress_bar=True)
    assert model.num_timesteps == 1600  # 2 iterations x 2 tasks x (2 inner + 2 outer) episodes x 100 steps
    assert counting.events[0] == "start" and counting.events[-1] == "end"
    assert counting.events.count("rollout_end") == model.n_updates == 2
    assert counting.n_calls == 2 * 2  # one per sampled batch: (inner + outer) x iterations
    assert len(list((tmp_path / "ckpt").glob("meta_*_steps.zip"))) >= 2
    assert evaluation.last_mean_reward < 0
    with open(tmp_path / "log" / "progress.csv") as handle:
        rows = list(csv.DictReader(handle))
    keys = set(rows[0])
    for key in [
        "rollout/pre_adaptation_return",
        "rollout/post_adaptation_return",
        "train/meta_grad_norm",
        "train/inner_grad_norm",
        "train/adapted_kl",
        "time/fps",
        "time/total_timesteps",
    ]:
        assert key in keys
    ours = [row for row in rows if row["train/adapted_kl"]]  # EvalCallback dumps rows of its own
    assert len(ours) == 2 and float(ours[-1]["train/adapted_kl"]) > 0
    assert any(row.get("eval/return_after_1_steps") for row in rows)


def test_callback_can_stop_training_without_an_update(make_model):
    model = make_model(seed=0)
    before = _parameters(model)
    model.learn(10_000, callback=CountingCallback(stop_after=1))  # stopped after the first (inner) batch
    assert th.equal(before, _parameters(model)) and model.n_updates == 0


@pytest.mark.parametrize("meta_optimizer", ["trpo", "adam", "ppo"])
def test_a_meta_sample_and_its_graph_are_freed_before_the_next_iteration_samples(meta_optimizer, make_model):
    """An ML10 run was killed for memory at its first evaluation: the last meta-sample's graph was alive through it."""
    import weakref

    class Watch(BaseCallback):
        def __init__(self):
            super().__init__()
            self.last_sample, self.alive_at_next_start = None, []

        def _on_rollout_end(self) -> None:
            sample = self.locals["sample"]
            self.last_sample = weakref.ref(sample), weakref.ref(sample.adapted[next(iter(sample.adapted))])

        def _on_rollout_start(self) -> None:  # where a checkpoint or an evaluation runs between iterations
            if self.last_sample is not None:
                self.alive_at_next_start.append([reference() is not None for reference in self.last_sample])

        def _on_step(self) -> bool:
            return True

    model = make_model(inner_lr=0.01, meta_optimizer=meta_optimizer, seed=0)
    watch = Watch()
    model.learn(3 * 800, callback=watch)  # 3 meta-iterations of 2 tasks x (2 + 2) episodes x 100 steps
    assert model.n_updates == 3
    # freed by reference counting alone: no collector pass needed for the sample and its adapted parameters
    assert watch.alive_at_next_start == [[False, False], [False, False]]


@pytest.mark.parametrize("meta_optimizer", ["adam", "trpo", "ppo"])
def test_same_seed_same_parameters(meta_optimizer, make_model):
    runs = []
    for _ in range(2):
        model = make_model(inner_lr=0.01, meta_optimizer=meta_optimizer, seed=3)
        model.learn(1600)
        runs.append(_parameters(model))
    assert th.equal(runs[0], runs[1])
    other = make_model(inner_lr=0.01, seed=4)
    other.learn(1600)
    assert not th.equal(runs[0], _parameters(other))


def test_save_load_round_trip_keeps_evaluation(tmp_path, make_model):
    model = make_model(gradient_mode="lvc", inner_lr=0.01, seed=0)
    model.learn(800)
    expected = model.evaluate_adaptation(n_tasks=3, inner_steps=2, seed=7)
    model.save(tmp_path / "model.zip")
    loaded = MetaPolicyGradient.load(tmp_path / "model.zip", env="sb3_metarl/Navigation2D-v0")
    assert loaded.gradient_mode.name == "lvc" and loaded.inner_lr == 0.01 and loaded.meta_batch_size == 2
    assert th.equal(_parameters(model), _parameters(loaded))
    got = loaded.evaluate_adaptation(n_tasks=3, inner_steps=2, seed=7)
    np.testing.assert_array_equal(got["per_task"], expected["per_task"])
    assert got["per_task"].shape == (3, 3)
    # the evaluation is repeatable and the optimizer state survives, so training goes on
    np.testing.assert_array_equal(
        model.evaluate_adaptation(n_tasks=3, inner_steps=2, seed=7)["per_task"], expected["per_task"]
    )
    loaded.learn(400, reset_num_timesteps=False)
    assert loaded.num_timesteps > model.num_timesteps
    # prediction-only load
    predictor = MetaPolicyGradient.load(tmp_path / "model.zip")
    action, _ = predictor.predict(np.zeros(2, dtype=np.float32), deterministic=True)
    assert action.shape == (2,)
    with pytest.raises(ValueError, match="set_env"):
        predictor.evaluate_adaptation(n_tasks=1)


def test_an_explicit_env_task_sampler_survives_save_and_load(tmp_path):
    venv = DummyVecEnv([lambda: gym.make("sb3_metarl/GaussianBandit-v0")] * 2)
    model = MetaPolicyGradient("MlpPolicy", venv, task_sampler=EnvTaskSampler(venv), meta_batch_size=2, inner_episodes=1)
    model.save(tmp_path / "bandit.zip")
    loaded = MetaPolicyGradient.load(tmp_path / "bandit.zip", env="sb3_metarl/GaussianBandit-v0")
    assert isinstance(loaded.task_sampler, EnvTaskSampler) and loaded.task_sampler.env is loaded.env
    loaded.learn(1)


def test_estimate_meta_gradient_makes_no_update_and_covers_all_parameters(tiny_navigation_model):
    model = tiny_navigation_model
    before = _parameters(model)
    grads = model.estimate_meta_gradient()
    assert th.equal(before, _parameters(model))
    assert set(grads) == {name for name, _ in model.policy.named_parameters()}
    assert grads["log_std"].shape == model.policy.log_std.shape
    per_task = model.estimate_meta_gradient(per_task=True)
    assert per_task["log_std"].shape == (2, *model.policy.log_std.shape)
    assert flat_gradient(grads).abs().sum() > 0


@pytest.mark.parametrize("inner_steps", [1, 2])
def test_a_meta_sample_s_batches_carry_the_learner_s_log_likelihoods_under_their_sampling_parameters(inner_steps, make_model):
    """The sampling log-likelihoods are computed once, with the graph, and stored detached (inner and outer)."""
    model = make_model(inner_lr=0.05, inner_steps=inner_steps, max_episode_steps=10, seed=1)
    tasks = model.task_sampler.sample(2, np.random.default_rng(0))
    sample = model.collect_meta_sample(tasks)
    replay = sample.replay
    points = [*replay.inner_params, replay.adapted]
    for params, batch in zip(points, [*sample.inner_batches, sample.outer_batch]):
        expected = masked_log_prob(model.functional_policy, {n: p.detach() for n, p in params.items()}, batch)
        assert batch.log_probs.abs().sum() > 1.0  # not left at the sampler's zeros
        assert th.allclose(batch.log_probs, expected, rtol=0, atol=1e-5)
        assert not batch.log_probs.requires_grad
    for log_prob, batch in zip(replay.inner_log_probs, sample.inner_batches):
        assert th.equal(batch.log_probs, log_prob.detach())
    # the public sampling method computes them itself
    batch = model.sample_episodes(tasks, None, 2)
    expected = masked_log_prob(model.functional_policy, model.initial_task_params(2), batch)
    assert th.allclose(batch.log_probs, expected, rtol=0, atol=1e-6) and batch.log_probs.abs().sum() > 1.0


def test_adapt_returns_a_policy_of_the_same_class(tiny_navigation_model):
    model = tiny_navigation_model
    adapted = model.adapt(np.array([0.3, 0.3]), inner_steps=2)
    assert type(adapted) is type(model.policy)
    assert not th.equal(adapted.log_std, model.policy.log_std)
    action, _ = adapted.predict(np.zeros(2, dtype=np.float32))
    assert action.shape == (2,)
    unchanged = model.adapt(np.array([0.3, 0.3]), inner_steps=0)
    assert th.equal(unchanged.log_std, model.policy.log_std)


@pytest.mark.slow
def test_env_factory_vec_env_and_subprocess(tmp_path):
    def factory():
        return gym.make("sb3_metarl/GaussianBandit-v0")

    kwargs = dict(meta_batch_size=2, inner_episodes=2, outer_episodes=2, seed=0)
    from_factory = MetaPolicyGradient("MlpPolicy", factory, **kwargs)
    assert from_factory.env.num_envs == 4
    vec_env = DummyVecEnv([factory] * 6)
    from_vec_env = MetaPolicyGradient("MlpPolicy", vec_env, **kwargs)
    assert from_vec_env.episode_sampler.envs_per_group == 3
    from_vec_env.learn(1)
    subprocess_model = MetaPolicyGradient("MlpPolicy", "sb3_metarl/GaussianBandit-v0", vec_env_cls=SubprocVecEnv, **kwargs)
    try:
        subprocess_model.learn(1)
        assert subprocess_model.num_timesteps == 2 * (2 + 2)
    finally:
        subprocess_model.env.close()


def test_more_episodes_than_sub_envs_run_in_waves():
    model = MetaPolicyGradient(
        "MlpPolicy", "sb3_metarl/GaussianBandit-v0", meta_batch_size=2, inner_episodes=5, outer_episodes=3, n_envs=4, seed=0
    )
    model.learn(1)
    assert model.num_timesteps == 2 * (5 + 3)


#: (constructor arguments, what the error must name)
BAD_ARGUMENTS = [
    (dict(gradient_mode="reinforce"), "gradient_mode"),
    (dict(baseline="critic"), "baseline"),
    (dict(meta_batch_size=0), "meta_batch_size"),
    (dict(inner_episodes=-1), "inner_episodes"),
    (dict(outer_episodes=2.5), "outer_episodes"),
    (dict(inner_steps=0), "inner_steps"),
    (dict(inner_lr=float("nan")), "inner_lr"),
    (dict(meta_optimizer="rmsprop"), "meta_optimizer"),
    (dict(n_envs=3, meta_batch_size=2), "n_envs"),
    (dict(gamma=0.0), "gamma"),
    (dict(gamma="0.99"), "gamma"),
    (dict(meta_batch_size=True), "meta_batch_size"),
    (dict(gradient_mode=["lsf"]), "gradient_mode"),
    (dict(meta_optimizer="trpo", meta_optimizer_kwargs=dict(maxkl=0.1)), r"valid keys: \['max_kl'"),
    (dict(inner_lr="fast"), "inner_lr"),
    (dict(max_episode_steps=0), "max_episode_steps"),
    (dict(vec_env_cls="ray"), "vec_env_cls"),
    (dict(gradient_mode="dice", normalize_advantage=True), "normalize_advantage"),
    (dict(policy_kwargs=dict(use_sde=True)), "use_sde"),
    (dict(meta_optimizer="sgd", policy_kwargs=dict(optimizer_class=th.optim.Adam)), "optimizer_class"),
]


@pytest.mark.all_cases
@pytest.mark.parametrize("kwargs, match", BAD_ARGUMENTS)
def test_bad_arguments_fail_early_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MetaPolicyGradient("MlpPolicy", "sb3_metarl/GaussianBandit-v0", **kwargs)


@pytest.fixture(scope="module")
def saved_bandit(tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "bandit.zip"
    MetaPolicyGradient("MlpPolicy", "sb3_metarl/GaussianBandit-v0", meta_batch_size=2, inner_episodes=2, outer_episodes=2,
                       inner_lr=0.1, seed=0).save(path)  # fmt: skip
    return path


@pytest.mark.parametrize(
    "kwargs, match",
    [
        *[case for case in BAD_ARGUMENTS if "policy_kwargs" not in case[0]],
        (dict(inner_lr=-1e-3), "inner_lr"),
        (dict(gamma=2), "gamma"),
    ],
)
@pytest.mark.all_cases
def test_load_checks_its_arguments_as_the_constructor_does(saved_bandit, kwargs, match):
    # before: load set them unchecked (inner_lr=-1e-3 trained, gradient_mode="maml" stayed a string, meta_batch_size=0 was
    # a ZeroDivisionError at learn, gamma=2 a FloatingPointError blaming the inner lr)
    with pytest.raises(ValueError, match=match) as constructed:
        MetaPolicyGradient("MlpPolicy", "sb3_metarl/GaussianBandit-v0", **kwargs)
    with pytest.raises(ValueError, match=match) as loaded:
        MetaPolicyGradient.load(saved_bandit, env="sb3_metarl/GaussianBandit-v0", **kwargs)
    assert str(loaded.value) == str(constructed.value)


def test_load_refuses_what_is_not_an_argument_and_converts_what_is(saved_bandit):
    with pytest.raises(ValueError, match=r"inner_step: not an argument of the model.*Did you mean 'inner_steps'"):
        MetaPolicyGradient.load(saved_bandit, inner_step=2)
    with pytest.raises(ValueError, match="gradient_mode_kwargs: pass gradient_mode with it"):
        MetaPolicyGradient.load(saved_bandit, gradient_mode_kwargs=dict(dice_lambda=1.0))
    model = MetaPolicyGradient.load(saved_bandit, env="sb3_metarl/GaussianBandit-v0", gradient_mode="maml",
                                    meta_optimizer="sgd", inner_lr=1, gamma=1)  # fmt: skip
    assert model.gradient_mode.name == "maml" and model.meta_optimizer.name == "sgd"
    assert model.inner_lr == 1.0 and isinstance(model.inner_lr, float) and model.gamma == 1.0
    model.learn(1)
    assert model.num_timesteps == 2 * (2 + 2)


def test_bad_environments_fail_early():
    with pytest.raises(ValueError, match="set_task"):
        MetaPolicyGradient("MlpPolicy", "CartPole-v1", meta_batch_size=2, inner_episodes=2, outer_episodes=2)
    with pytest.raises(ValueError, match="max_episode_steps"):
        MetaPolicyGradient("MlpPolicy", lambda: gym.make("sb3_metarl/GaussianBandit-v0").unwrapped, meta_batch_size=1)
    with pytest.raises(ValueError, match="sample_tasks"):
        MetaPolicyGradient("MlpPolicy", lambda: _NoSampler(), meta_batch_size=1, inner_episodes=1, outer_episodes=1)
    # with an explicit sampler an env without sample_tasks is fine
    MetaPolicyGradient(
        "MlpPolicy",
        lambda: _NoSampler(),
        meta_batch_size=1,
        inner_episodes=1,
        outer_episodes=1,
        task_sampler=FixedTaskSampler([0.0]),
    ).learn(1)


class _NoSamplerEnv(gym.Env):
    """A task-aware env with ``set_task`` but no ``sample_tasks``."""

    observation_space = gym.spaces.Box(-1, 1, (1,))
    action_space = gym.spaces.Box(-1, 1, (1,))

    def set_task(self, task):
        self.task = task

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(1, dtype=np.float32), {}

    def step(self, action):
        return np.zeros(1, dtype=np.float32), -(float(action[0] - self.task) ** 2), True, False, {}


def _NoSampler():
    return gym.wrappers.TimeLimit(_NoSamplerEnv(), max_episode_steps=1)


def test_incompatible_spaces_on_load(tmp_path):
    model = MetaPolicyGradient(
        "MlpPolicy", "sb3_metarl/GaussianBandit-v0", meta_batch_size=1, inner_episodes=1, outer_episodes=1
    )
    model.save(tmp_path / "bandit.zip")
    with pytest.raises(ValueError, match="space"):
        MetaPolicyGradient.load(tmp_path / "bandit.zip", env="sb3_metarl/Navigation2D-v0")


def test_sgd_meta_optimizer_and_learning_rate_schedule(make_model):
    model = make_model(meta_optimizer="sgd", inner_lr=0.001, learning_rate=lambda progress: 1e-5 * progress)
    assert isinstance(model.policy.optimizer, th.optim.SGD)
    model.learn(1600)
    assert model.policy.optimizer.param_groups[0]["lr"] < 1e-5


def test_update_to_non_finite_parameters_is_undone(tmp_path, make_model):
    model = make_model(
        meta_optimizer="sgd", inner_lr=0.001, learning_rate=1e38, meta_optimizer_kwargs=dict(max_grad_norm=None), seed=0
    )
    before = _parameters(model)
    with pytest.raises(FloatingPointError, match="restored"):
        model.learn(10_000)
    assert th.equal(before, _parameters(model)) and model.n_updates == 0
    # the model stays usable and saveable after the error
    model.save(tmp_path / "after_error.zip")
    loaded = MetaPolicyGradient.load(tmp_path / "after_error.zip", env="sb3_metarl/Navigation2D-v0", learning_rate=1e-3)
    assert th.equal(before, _parameters(loaded))
    loaded.learn(800, reset_num_timesteps=False)
    # an iteration is at most 800 steps (2 tasks x 4 episodes x 100; fewer when an episode reaches its goal)
    assert loaded.n_updates >= 1 and loaded.num_timesteps >= 800
    assert th.isfinite(_parameters(loaded)).all() and not th.equal(before, _parameters(loaded))


@pytest.mark.skipif(not th.cuda.is_available(), reason="needs a GPU")
def test_gpu_exact_gradient_matches_cpu_and_every_mode_trains(make_model):
    tasks = [np.random.default_rng(0).uniform(0, 1, size=(20, 5))]
    grads = {}
    for device in ["cpu", "cuda"]:
        model = make_model(env="sb3_metarl/TabularMDP-v0", inner_lr=5.0, inner_steps=2, device=device, seed=0)
        grads[device] = flat_gradient(exact_meta_gradient(model, tasks)).cpu()
    # float32 policies: measured max abs difference 5e-6 on an H100
    th.testing.assert_close(grads["cuda"], grads["cpu"], rtol=1e-3, atol=2e-5)
    for mode in ["sf", "lsf", "lvc", "dice", "loaded_dice", "maml", "fomaml"]:
        model = make_model(gradient_mode=mode, inner_lr=1e-3, device="cuda")
        before = _parameters(model)
        model.learn(1)
        after = _parameters(model)
        assert after.device.type == "cuda" and th.isfinite(after).all() and not th.equal(before, after)
        assert model.evaluate_adaptation(n_tasks=2, inner_steps=1)["per_task"].shape == (2, 2)


class _SquareFeatures(BaseFeaturesExtractor):
    """A custom features extractor with its own parameters."""

    def __init__(self, observation_space):
        super().__init__(observation_space, features_dim=4)
        self.linear = th.nn.Linear(observation_space.shape[0], 4)

    def forward(self, observations):
        return self.linear(observations) ** 2


def test_custom_features_extractor_is_meta_trained():
    model = MetaPolicyGradient(
        "MlpPolicy",
        "sb3_metarl/Navigation2D-v0",
        inner_lr=0.001,
        meta_batch_size=2,
        inner_episodes=2,
        outer_episodes=2,
        policy_kwargs=dict(features_extractor_class=_SquareFeatures, net_arch=[8]),
        seed=0,
    )
    before = model.policy.features_extractor.linear.weight.detach().clone()
    grads = model.estimate_meta_gradient()
    assert grads["features_extractor.linear.weight"].abs().sum() > 0
    model.learn(1)
    assert not th.equal(before, model.policy.features_extractor.linear.weight)


def test_cuda_without_a_gpu_is_an_error():
    if th.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="device"):
        MetaPolicyGradient("MlpPolicy", "sb3_metarl/GaussianBandit-v0", device="cuda")


def test_a_single_env_instance_is_copied_into_the_sub_envs(make_model):
    prototype = gym.make("sb3_metarl/Navigation2D-v0")
    model = make_model(env=prototype, seed=0)
    envs = model.get_env().envs
    assert len(envs) == 4 and all(env is not prototype for env in envs)
    model.learn(800)
    assert model.n_updates == 1

    class Uncopyable(gym.Wrapper):
        def __deepcopy__(self, memo):
            raise TypeError("holds a live connection")

    with pytest.raises(ValueError, match=r"cannot be copied.*registered id or a factory"):
        make_model(env=Uncopyable(prototype))


def test_an_env_without_a_time_limit_takes_max_episode_steps():
    bandit = lambda: gym.make("sb3_metarl/GaussianBandit-v0").unwrapped  # noqa: E731  (always terminates, no TimeLimit)
    with pytest.raises(ValueError, match="max_episode_steps"):
        MetaPolicyGradient("MlpPolicy", bandit, meta_batch_size=1)
    model = MetaPolicyGradient("MlpPolicy", bandit, max_episode_steps=1, meta_batch_size=2, inner_episodes=3, outer_episodes=3)
    model.learn(1)
    assert model.num_timesteps == 2 * (3 + 3)


class _NaNReward(gym.Wrapper):
    def step(self, action):
        obs, _, terminated, truncated, info = self.env.step(action)
        return obs, float("nan"), terminated, truncated, info


def test_nan_reward_and_short_task_lists_fail_early_naming_the_culprit(make_model):
    model = make_model(env=lambda: _NaNReward(gym.make("sb3_metarl/Navigation2D-v0")))
    with pytest.raises(ValueError, match=r"env: sub-env 0 returned a non-finite reward"):
        model.learn(1)

    class Short(FixedTaskSampler):
        def sample(self, n, rng):
            return super().sample(n, rng)[:-1]

    model = make_model(task_sampler=Short([np.zeros(2)]), inner_lr=1e-3)
    with pytest.raises(ValueError, match=r"task_sampler: Short.sample\(2, rng\) returned 1 tasks"):
        model.learn(1)


def test_trpo_with_no_finite_line_search_point_raises(make_model):
    model = make_model(meta_optimizer="trpo", seed=0)
    original = model.meta_optimizer.surrogate
    model.meta_optimizer.surrogate = lambda m, replay, sample: (
        original(m, replay, sample) * (float("nan") if not th.is_grad_enabled() else 1.0)
    )
    before = _parameters(model)
    with pytest.raises(FloatingPointError, match="line search"):
        model.learn(1)
    assert th.equal(before, _parameters(model))


# ------------------------------------------------------------------------------------------ inner-sample reuse


class _InnerBatches(BaseCallback):
    """Records each meta-iteration's first inner batch and the importance ratios of its reused episodes."""

    def __init__(self):
        super().__init__()
        self.episodes, self.ratios = [], []

    def _on_step(self):
        return True

    def _on_rollout_end(self):
        batch = self.locals["sample"].inner_batches[0]
        self.episodes.append(batch.n_episodes)
        if batch.reused is not None:
            with th.no_grad():
                log_prob = self.model.adaptation.log_prob(self.model.initial_task_params(batch.n_tasks), batch)
            self.ratios.append(th.exp(log_prob - batch.sampling_log_probs)[batch.reused & (batch.masks.sum(-1) > 0)])


def test_inner_sample_reuse_appends_truncated_importance_weighted_earlier_batches():
    from sb3_metarl.estimators.setups import make_tabular_model

    model, _ = make_tabular_model(
        "lvc", inner_episodes=3, meta_batch_size=2, inner_sample_reuse=2, reuse_importance_clip=1.01, learning_rate=0.05
    )
    recorder = _InnerBatches()
    model.learn(4 * 2 * 6 * 20, callback=recorder)
    # iteration 1: fresh only; then the task's two stored batches (the two slots run the same task) are appended
    assert recorder.episodes == [3, 9, 9, 9]
    ratios = th.cat([r.flatten() for r in recorder.ratios])
    assert ratios.max() <= 1.01 + 1e-5  # truncated at the clip
    assert (ratios - 1).abs().max() > 1e-3  # the parameters moved: the reused episodes are off-policy


def test_load_with_another_reuse_bound_keeps_the_stored_batches_under_the_new_bound(tmp_path):
    from sb3_metarl.estimators.setups import make_tabular_model

    model, _ = make_tabular_model("lvc", inner_episodes=3, meta_batch_size=2, inner_sample_reuse=2, learning_rate=0.05)
    model.learn(3 * 2 * 6 * 20)
    stored = {key: len(batches) for key, batches in model.inner_reuse.batches.items()}
    assert stored and max(stored.values()) == 2
    model.save(tmp_path / "reuse.zip")
    loaded = MetaPolicyGradient.load(tmp_path / "reuse.zip", env=model.get_env(), inner_sample_reuse=1)
    # the reuse is rebuilt from the settings (load changed one) and holds what the zip stored
    assert loaded.inner_reuse.max_batches == 1 and loaded.inner_reuse.max_tasks == 10 * 2
    assert {key: len(batches) for key, batches in loaded.inner_reuse.batches.items()} == stored
    recorder = _InnerBatches()
    loaded.learn(1, callback=recorder)
    assert recorder.episodes == [3 + 3]  # one stored batch per task appended now, not two


def test_estimating_with_another_mode_and_n_is_the_estimate_of_a_model_built_with_them():
    from sb3_metarl.gradient_modes import make_gradient_mode

    common = dict(inner_lr=0.05, n_envs=2 * 4, seed=7, **{**TINY, "inner_episodes": 2})
    env_id = "sb3_metarl/Navigation2D-v0"
    model = MetaPolicyGradient("MlpPolicy", env_id, gradient_mode="lsf", **common)
    other = MetaPolicyGradient("MlpPolicy", env_id, gradient_mode="lvc", **{**common, "inner_episodes": 4})
    asked = model.estimate_meta_gradient(gradient_mode=make_gradient_mode("lvc"), inner_episodes=4, per_task=True)
    built = other.estimate_meta_gradient(per_task=True)
    for name in built:
        assert th.equal(asked[name], built[name]), name
    assert model.gradient_mode.name == "lsf" and model.inner_episodes == 2  # the model is not reconfigured


def test_inner_sample_reuse_arguments(make_model):
    with pytest.raises(ValueError, match="does not weigh samples"):
        make_model(gradient_mode="maml", inner_sample_reuse=1)
    with pytest.raises(ValueError, match="inner_sample_reuse"):
        make_model(inner_sample_reuse=-1)
    with pytest.raises(ValueError, match="reuse_importance_clip"):
        make_model(inner_sample_reuse=1, reuse_importance_clip=0.5)


def test_a_schedule_never_sees_a_negative_progress(make_model):
    """learn finishes the iteration it starts: the last one of learn(P + 1) must not run at progress < 0."""
    lr0, per_iteration = 0.01, 2 * 2 * 2 * 20
    seen = []

    def schedule(progress):
        seen.append(progress)
        return lr0 * progress

    model = make_model(
        env="sb3_metarl/TabularMDP-v0", meta_optimizer="sgd", learning_rate=schedule, inner_lr=0.1, seed=0
    )
    model.learn(per_iteration + 1)
    assert model.n_updates == 2
    assert min(seen) == 0.0 and max(seen) <= 1.0
    assert model.policy.optimizer.param_groups[0]["lr"] == 0.0  # today's code: lr0 * (1 - 2P / (P + 1)) < 0


@pytest.mark.slow
def test_a_save_that_fails_part_way_leaves_the_previous_zip_loadable(tmp_path):
    """A full disk (a file-size limit here) during save must not truncate the last good zip."""
    import subprocess
    import sys

    script = (
        "import resource, signal, sys\n"
        "from sb3_metarl import MetaPolicyGradient\n"
        "path = sys.argv[1]\n"
        "model = MetaPolicyGradient('MlpPolicy', 'sb3_metarl/Navigation2D-v0', meta_batch_size=2, inner_episodes=2,\n"
        "                           outer_episodes=2, inner_lr=1e-3, seed=0)\n"
        "model.save(path)\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (2000, resource.RLIM_INFINITY))\n"
        "try:\n"
        "    model.save(path)\n"
        "except OSError as error:\n"
        "    print('save failed:', error)\n"
    )
    path = tmp_path / "model.zip"
    result = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "save failed" in result.stdout, result.stderr[-2000:]
    loaded = MetaPolicyGradient.load(path)
    assert loaded.meta_batch_size == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.zip"]  # no temporary file left behind


def test_best_model_is_replaced_atomically(tmp_path, monkeypatch, make_model):
    """MetaEvalCallback re-saves best_model.zip: an error while writing the new one keeps the old one."""
    from stable_baselines3.common.base_class import BaseAlgorithm

    model = make_model(inner_lr=1e-3, seed=0)
    model.save(tmp_path / "best_model")
    before = (tmp_path / "best_model.zip").read_bytes()
    original = BaseAlgorithm.save

    def save_then_fail(self, path, *args, **kwargs):
        original(self, path, *args, **kwargs)
        with open(path, "r+b") as file:
            file.truncate(10)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(BaseAlgorithm, "save", save_then_fail)
    with pytest.raises(OSError, match="No space left"):
        model.save(tmp_path / "best_model")
    assert (tmp_path / "best_model.zip").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["best_model.zip"]


def test_reuse_buffers_are_bounded_and_a_warning_says_nothing_recurs(make_model):
    """Continuous goals never recur: the per-task store stays bounded and a warning explains why nothing is reused."""
    model = make_model(gradient_mode="lvc", inner_sample_reuse=2, inner_lr=1e-3, seed=0, max_episode_steps=5)  # fmt: skip
    with pytest.warns(UserWarning, match=r"inner_sample_reuse=2: no meta-batch could reuse earlier episodes in 10"):
        for _ in range(40):
            model.learn(1, reset_num_timesteps=False)
    assert len(model.inner_reuse.batches) == 10 * model.meta_batch_size  # today: 80, one per task ever seen
    # a fixed task set that fits is kept whole, and reused
    goals = FixedTaskSampler([np.array([0.1, 0.2]), np.array([-0.3, 0.1])])
    fixed = make_model(
        gradient_mode="lvc", inner_sample_reuse=2, task_sampler=goals, inner_lr=1e-3, seed=0, max_episode_steps=5
    )
    for _ in range(3):
        fixed.learn(1, reset_num_timesteps=False)
    assert len(fixed.inner_reuse.batches) == 2 and fixed.inner_reuse.iterations_without_reuse == 0


def test_inputs_that_would_fail_late_fail_at_construction_naming_the_argument(tmp_path, make_model):
    with pytest.raises(ValueError, match=r"task_sampler: must be a TaskSampler.*got list.*FixedTaskSampler\(tasks\)"):
        make_model(task_sampler=[np.zeros(2)])
    with pytest.raises(ValueError, match=r"policy: 'MultiInputPolicy' \(Dict observations\) is not supported.*Flatten"):
        MetaPolicyGradient("MultiInputPolicy", "sb3_metarl/Navigation2D-v0", **TINY)

    class DictObservations(gym.ObservationWrapper):
        def __init__(self, env):
            super().__init__(env)
            self.observation_space = gym.spaces.Dict({"position": env.observation_space})

        def observation(self, observation):
            return {"position": observation}

    with pytest.raises(ValueError, match=r"env: Dict observation spaces are not supported.*FlattenObservation"):
        make_model(env=lambda: DictObservations(gym.make("sb3_metarl/Navigation2D-v0")))


def test_loading_another_algorithm_s_zip_or_a_missing_file_is_an_error(tmp_path, make_model):
    from stable_baselines3 import PPO

    PPO("MlpPolicy", "Pendulum-v1", n_steps=64).save(tmp_path / "ppo.zip")
    with pytest.raises(ValueError, match=r"holds another algorithm's model \(it has no meta_batch_size\)"):
        MetaPolicyGradient.load(tmp_path / "ppo.zip")
    with pytest.raises(FileNotFoundError, match=r"no saved model at '.*missing' nor '.*missing.zip'"):
        MetaPolicyGradient.load(str(tmp_path / "missing"))
    model = make_model()
    model.save(tmp_path / "nav")  # SB3 adds .zip
    assert MetaPolicyGradient.load(tmp_path / "nav").env_id == "sb3_metarl/Navigation2D-v0"


def test_tensorboard_log_writes_the_meta_rl_keys(tmp_path, make_model):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = make_model(inner_lr=1e-3, seed=0, tensorboard_log=str(tmp_path), max_episode_steps=10)  # fmt: skip
    model.learn(1)
    (run,) = tmp_path.iterdir()
    events = EventAccumulator(str(run))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"rollout/post_adaptation_return", "train/meta_grad_norm", "train/inner_lr"} <= tags


def test_acting_runs_on_one_torch_thread_and_the_update_on_the_caller_s(make_model):
    """More intra-op threads only slow a group's small policy call (8x on a loaded 2-core machine): acting uses one."""
    threads = th.get_num_threads()
    th.set_num_threads(2)
    try:
        model = make_model(inner_lr=1e-3, seed=0, max_episode_steps=5)  # fmt: skip
        sampler, sample = model.episode_sampler, model.episode_sampler.sample
        while_sampling, while_updating = [], []

        def recording_sample(*args, **kwargs):
            while_sampling.append(th.get_num_threads())
            return sample(*args, **kwargs)

        sampler.sample = recording_sample
        step = model.meta_optimizer.step
        model.meta_optimizer.step = lambda *args: while_updating.append(th.get_num_threads()) or step(*args)
        model.learn(1)
        assert set(while_sampling) == {1} and while_updating == [2] and th.get_num_threads() == 2
    finally:
        th.set_num_threads(threads)


def test_discount_from_start_chooses_between_gamma_t_weights_and_the_papers_advantage_weights(tmp_path):
    """True: Psi_t = gamma^t A_t (the spec); False: Psi_t = A_t (rllab / ProMP / pytorch-maml-rl); old zips keep gamma^t."""
    common = dict(meta_batch_size=2, inner_episodes=3, outer_episodes=3, inner_lr=0.05, gamma=0.9, seed=0)
    spec = MetaPolicyGradient("MlpPolicy", "sb3_metarl/Navigation2D-v0", **common)
    papers = MetaPolicyGradient("MlpPolicy", "sb3_metarl/Navigation2D-v0", discount_from_start=False, **common)
    tasks = spec.task_sampler.sample(2, np.random.default_rng(0))
    batch = spec.sample_episodes(tasks, None, 3)
    weighted_spec = spec.weighting(batch.samples()).advantages
    weighted_papers = papers.weighting(batch.samples()).advantages
    steps = 0.9 ** th.arange(batch.masks.shape[-1], dtype=th.float32)
    th.testing.assert_close(weighted_spec, weighted_papers * steps)
    assert not th.allclose(weighted_spec, weighted_papers)
    with pytest.raises(ValueError, match="discount_from_start"):
        MetaPolicyGradient("MlpPolicy", "sb3_metarl/Navigation2D-v0", gradient_mode="dice", discount_from_start=False)
    with pytest.raises(ValueError, match="discount_from_start"):
        MetaPolicyGradient("MlpPolicy", "sb3_metarl/Navigation2D-v0", discount_from_start=1)
    papers.save(tmp_path / "papers.zip")
    assert MetaPolicyGradient.load(tmp_path / "papers.zip").discount_from_start is False
    del spec.__dict__["discount_from_start"]  # a zip saved before the argument existed
    spec.save(tmp_path / "old.zip")
    old = MetaPolicyGradient.load(tmp_path / "old.zip", env="sb3_metarl/Navigation2D-v0")
    th.testing.assert_close(old.weighting(batch.samples()).advantages, weighted_spec)


def test_load_parameters_reads_only_tensors_where_load_would_run_the_file_s_code(tmp_path):
    import base64
    import json
    import zipfile

    import cloudpickle

    kwargs = dict(meta_batch_size=2, inner_episodes=2, outer_episodes=2, inner_lr=0.01, policy_kwargs=dict(net_arch=[16]))
    model = MetaPolicyGradient("MlpPolicy", "sb3_metarl/Navigation2D-v0", seed=0, **kwargs)
    model.learn(800)
    model.save(tmp_path / "clean.zip")
    marker = tmp_path / "code_ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    # a tampered zip: one of the data's entries replaced by a pickle that runs code (here: creates a file)
    with zipfile.ZipFile(tmp_path / "clean.zip") as source, zipfile.ZipFile(tmp_path / "tampered.zip", "w") as target:
        for item in source.infolist():
            content = source.read(item.filename)
            if item.filename == "data":
                data = json.loads(content)
                data["gamma"] = {":type:": "<class 'Payload'>",
                                 ":serialized:": base64.b64encode(cloudpickle.dumps(Payload())).decode()}  # fmt: skip
                content = json.dumps(data).encode()
            target.writestr(item, content)
    safe = MetaPolicyGradient.load_parameters(tmp_path / "tampered.zip", "sb3_metarl/Navigation2D-v0", **kwargs)
    assert not marker.exists()
    for name, value in model.policy.state_dict().items():
        assert th.equal(value, safe.policy.state_dict()[name]), name
    with pytest.raises(RuntimeError):  # another architecture than the file's
        MetaPolicyGradient.load_parameters(tmp_path / "clean.zip", "sb3_metarl/Navigation2D-v0",
                                           **{**kwargs, "policy_kwargs": dict(net_arch=[8])})  # fmt: skip
    with contextlib.suppress(Exception):
        MetaPolicyGradient.load(tmp_path / "tampered.zip")
    assert marker.exists()  # what load does with a file it cannot trust: the warning in its docstring and docs/resume.md


def test_load_checks_arguments_for_a_subclass_whose_init_takes_kwargs(saved_bandit):
    class Tuned(MetaPolicyGradient):
        def __init__(self, policy, env, **kwargs):
            kwargs.setdefault("inner_lr", 0.05)
            super().__init__(policy, env, **kwargs)

    assert Tuned.load(saved_bandit, inner_lr=0.2).inner_lr == 0.2
    with pytest.raises(ValueError, match="inner_lr: must be 'auto' or a finite number >= 0"):
        Tuned.load(saved_bandit, inner_lr=-1.0)
