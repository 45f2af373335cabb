"""MetaEvalCallback (adaptation-aware evaluation), the rejection of EvalCallback, the transition-counting progress bar."""

import csv

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from stable_baselines3.common.callbacks import EvalCallback
from stable_baselines3.common.logger import configure

from sb3_metarl import MetaEvalCallback, MetaPolicyGradient
from sb3_metarl.common.callbacks import MetaProgressBarCallback

SHAPE = dict(meta_batch_size=2, inner_episodes=2, outer_episodes=2, policy_kwargs=dict(net_arch=[8]))


def test_meta_eval_callback_logs_returns_after_k_steps_and_saves_the_best_model(tmp_path):
    model = MetaPolicyGradient("MlpPolicy", "sb3_metarl/TabularMDP-v0", seed=0, **SHAPE)
    model.set_logger(configure(str(tmp_path / "log"), ["csv"]))
    callback = MetaEvalCallback(n_tasks=3, inner_steps=2, eval_freq=2, best_model_save_path=str(tmp_path / "best"), seed=4)
    model.learn(4 * 160, callback=callback)  # 4 meta-iterations of 160 steps
    assert callback.evaluations_updates == [2, 4]
    # the logged numbers are evaluate_adaptation's on the same held-out tasks (seed 4), after the last update
    table = model.evaluate_adaptation(n_tasks=3, inner_steps=2, seed=4)
    np.testing.assert_allclose(callback.evaluations_results[-1], table["mean"])
    assert callback.best_mean_reward == max(r[-1] for r in callback.evaluations_results)
    assert (tmp_path / "best" / "best_model.zip").exists()
    best = MetaPolicyGradient.load(tmp_path / "best" / "best_model.zip", env="sb3_metarl/TabularMDP-v0")
    assert best.n_updates in callback.evaluations_updates
    with open(tmp_path / "log" / "progress.csv") as handle:
        rows = list(csv.DictReader(handle))
    logged = [row for row in rows if row.get("eval/return_after_2_steps")]
    assert len(logged) == 2
    assert float(logged[-1]["eval/return_after_0_steps"]) == pytest.approx(table["mean"][0], rel=1e-5)
    assert float(logged[-1]["eval/mean_reward"]) == pytest.approx(table["mean"][2], rel=1e-5)


def test_meta_eval_callback_on_a_separate_eval_env_uses_its_tasks():
    model = MetaPolicyGradient("MlpPolicy", "sb3_metarl/Navigation2D-v0", seed=0, **SHAPE)
    callback = MetaEvalCallback(eval_env=gym.make("sb3_metarl/Navigation2D-v0"), n_tasks=2, inner_steps=1)
    model.learn(800, callback=callback)
    assert len(callback.evaluations_results) == 1 and callback.evaluations_results[0].shape == (2,)
    # un-adapted return on two random goals, not the default goal's 0.00 of EvalCallback
    assert callback.evaluations_results[0][0] < -1.0


def _train_with_evaluation(tmp_path, name, env, in_background, **shape):
    """Four meta-iterations with an evaluation every two (or none): the callback, the parameters, the logged rows."""
    model = MetaPolicyGradient("MlpPolicy", env, seed=0, **{**SHAPE, **shape})
    model.set_logger(configure(str(tmp_path / name), ["csv"]))
    callback = None
    if in_background is not None:
        callback = MetaEvalCallback(
            eval_env=env, n_tasks=3, inner_steps=1, eval_freq=2, seed=4, best_model_save_path=str(tmp_path / name),
            in_background=in_background,
        )  # fmt: skip
    model.learn(4 * model.max_steps_per_iteration, callback=callback)
    with open(tmp_path / name / "progress.csv") as handle:
        logged = [row for row in csv.DictReader(handle) if row.get("eval/mean_reward")]
    return callback, model.policy.state_dict(), logged


@pytest.mark.parametrize(
    "env, shape",
    [("sb3_metarl/Navigation2D-v0", {}), ("sb3_metarl/HalfCheetahVel-v0", dict(max_episode_steps=20))],
    ids=["navigation", "halfcheetah_twin"],
)
def test_an_evaluation_in_the_background_gives_the_foreground_s_numbers_and_leaves_training_as_it_was(tmp_path, env, shape):
    foreground, foreground_params, foreground_rows = _train_with_evaluation(tmp_path, "fg", env, False, **shape)
    background, background_params, background_rows = _train_with_evaluation(tmp_path, "bg", env, True, **shape)
    _, unevaluated_params, _ = _train_with_evaluation(tmp_path, "none", env, None, **shape)
    # training is the same bits with either evaluation or none
    for name, value in unevaluated_params.items():
        assert th.equal(foreground_params[name], value) and th.equal(background_params[name], value), name
    # the same meta-updates measured, to the same bits, and the same rows logged (the background's later or at the end)
    assert background.evaluations_updates == foreground.evaluations_updates == [2, 4]
    for ours, theirs in zip(background.evaluations_results, foreground.evaluations_results):
        np.testing.assert_array_equal(ours, theirs)
    assert len(background_rows) == len(foreground_rows) == 2
    for ours, theirs in zip(background_rows, foreground_rows):
        for key in ["eval/n_updates", "eval/return_after_0_steps", "eval/return_after_1_steps", "eval/mean_reward"]:
            assert ours[key] == theirs[key], key
    # best_model.zip is the model that was measured, not the one training had when the result came in
    best = {}
    for name in ["fg", "bg"]:
        best[name] = MetaPolicyGradient.load(tmp_path / name / "best_model.zip", env=env, **shape)
    assert best["bg"].n_updates == best["fg"].n_updates in foreground.evaluations_updates
    for name, value in best["fg"].policy.state_dict().items():
        assert th.equal(best["bg"].policy.state_dict()[name], value), name


def test_an_error_of_a_background_evaluation_is_raised_by_learn(tmp_path):
    class BrokenAtReset(gym.Wrapper):
        def reset(self, **kwargs):
            raise RuntimeError("the evaluation env is broken")

    model = MetaPolicyGradient("MlpPolicy", "sb3_metarl/Navigation2D-v0", seed=0, **SHAPE)
    callback = MetaEvalCallback(
        eval_env=lambda: BrokenAtReset(gym.make("sb3_metarl/Navigation2D-v0")), n_tasks=2, in_background=True
    )
    with pytest.raises(RuntimeError, match="the evaluation env is broken"):
        model.learn(2 * model.max_steps_per_iteration, callback=callback)
    assert model.n_updates >= 1  # training went on while the evaluation ran; the model is usable after the error
    model.save(tmp_path / "after_error")


def test_an_evaluation_in_the_background_needs_an_env_of_its_own():
    with pytest.raises(ValueError, match="eval_env: in_background=True"):
        MetaEvalCallback(in_background=True)


def test_plain_eval_callback_is_rejected_with_a_pointer():
    model = MetaPolicyGradient("MlpPolicy", "sb3_metarl/Navigation2D-v0", seed=0, **SHAPE)
    with pytest.raises(ValueError, match="MetaEvalCallback"):
        model.learn(800, callback=[EvalCallback(gym.make("sb3_metarl/Navigation2D-v0"))])


def test_progress_bar_counts_real_transitions(monkeypatch):
    counted = []
    monkeypatch.setattr(MetaProgressBarCallback, "_on_step", lambda self: counted.append(self.locals["n_transitions"]) or True)
    # 3 tasks over 4 sub-env groups, 3 episodes in waves of 2: spare sub-envs step but are not transitions
    model = MetaPolicyGradient(
        "MlpPolicy", "sb3_metarl/GaussianBandit-v0", meta_batch_size=3, inner_episodes=3, outer_episodes=1, n_envs=6
    )
    model.learn(1, progress_bar=True)
    assert sum(counted) == model.num_timesteps == 3 * (3 + 1)


@pytest.mark.parametrize("sampler", ["vec_env", "subproc"])
def test_sb3_callbacks_see_one_call_per_sampled_batch_on_every_backend(tmp_path, sampler):
    # before: every lock-step in process (2 x 20 calls per iteration here) and once per batch on "subproc"
    from stable_baselines3.common.callbacks import CheckpointCallback, StopTrainingOnMaxEpisodes

    model = MetaPolicyGradient("MlpPolicy", "sb3_metarl/HalfCheetahVel-v0", meta_batch_size=2, inner_episodes=2,
                               outer_episodes=2, inner_lr=0.01, max_episode_steps=20, seed=0, sampler=sampler,
                               sampler_kwargs=dict(num_workers=2) if sampler == "subproc" else None)  # fmt: skip
    try:
        checkpoints = CheckpointCallback(save_freq=2, save_path=str(tmp_path), name_prefix="batch")
        episodes = StopTrainingOnMaxEpisodes(max_episodes=1000)
        model.learn(3 * 2 * 4 * 20, callback=[checkpoints, episodes])
        assert checkpoints.n_calls == 3 * 2  # (inner + outer) batches x iterations
        assert sorted(path.name for path in tmp_path.glob("batch_*.zip")) == [
            "batch_160_steps.zip", "batch_320_steps.zip", "batch_480_steps.zip"
        ]  # fmt: skip
        assert episodes.n_episodes == 3 * 2 * 2 * 2  # every episode counted once, through the batches' dones
    finally:
        model.get_env().close()


def test_meta_checkpoint_callback_saves_every_k_meta_iterations_and_resumes_exactly(tmp_path):
    from sb3_metarl import MetaCheckpointCallback

    kwargs = dict(meta_batch_size=2, inner_episodes=2, outer_episodes=2, inner_lr=0.01, inner_steps=2, seed=0,
                  policy_kwargs=dict(net_arch=[16]))  # fmt: skip
    per_iteration = 2 * (2 * 2 + 2) * 100
    uninterrupted = MetaPolicyGradient("MlpPolicy", "sb3_metarl/Navigation2D-v0", **kwargs)
    uninterrupted.learn(5 * per_iteration)
    model = MetaPolicyGradient("MlpPolicy", "sb3_metarl/Navigation2D-v0", **kwargs)
    model.learn(5 * per_iteration, callback=MetaCheckpointCallback(save_every=2, save_path=str(tmp_path), name_prefix="m"))
    saved = sorted(tmp_path.glob("m_*_steps.zip"), key=lambda path: int(path.name.split("_")[1]))
    assert [MetaPolicyGradient.load(path).n_updates for path in saved] == [2, 4]
    resumed = MetaPolicyGradient.load(saved[0], env="sb3_metarl/Navigation2D-v0")
    resumed.learn(5 * per_iteration - resumed.num_timesteps, reset_num_timesteps=False)
    assert resumed.n_updates == 5
    for name, value in uninterrupted.policy.state_dict().items():
        assert th.equal(value, resumed.policy.state_dict()[name]), name
    with pytest.raises(ValueError, match="save_every: must be an integer >= 1"):
        MetaCheckpointCallback(save_every=0, save_path=str(tmp_path))
