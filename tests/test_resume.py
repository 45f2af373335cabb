"""Exact resume: save -> load -> learn, and a checkpoint written during learn, continue the run bit for bit."""

import glob
import os

import numpy as np
import pytest
import torch as th
from stable_baselines3.common.callbacks import BaseCallback, CheckpointCallback

from sb3_metarl import MetaPolicyGradient

SHAPE = dict(meta_batch_size=2, inner_episodes=2, outer_episodes=2, policy_kwargs=dict(net_arch=[8]))
# TabularMDP: stochastic transitions and random initial states, so the env's random streams matter
ENVS = ["sb3_metarl/Navigation2D-v0", "sb3_metarl/TabularMDP-v0"]


def _parameters(model):
    return th.cat([p.detach().flatten() for p in model.policy.parameters()])


class _CallCounter(BaseCallback):
    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def _on_step(self):
        return True

    def _on_rollout_end(self):
        self.calls.append(self.n_calls)


def _model(env_id, meta_optimizer, mode, **kwargs):
    return MetaPolicyGradient(
        "MlpPolicy", env_id, meta_optimizer=meta_optimizer, gradient_mode=mode, seed=3, **SHAPE, **kwargs
    )


@pytest.mark.parametrize("env_id", ENVS)
@pytest.mark.parametrize("meta_optimizer", ["adam", "sgd", "trpo", "ppo"])
@pytest.mark.parametrize("mode", ["lsf", "lvc", "sf"])
def test_save_load_continue_and_checkpoint_resume_are_bit_identical(tmp_path, env_id, meta_optimizer, mode):
    per_iteration = 2 * 2 * 2 * (100 if "Navigation" in env_id else 20)  # tasks x (inner + outer) x episodes x H
    uninterrupted = _model(env_id, meta_optimizer, mode)
    calls_at_rollout_end = []
    uninterrupted.learn(4 * per_iteration, callback=_CallCounter(calls_at_rollout_end))

    first = _model(env_id, meta_optimizer, mode)
    first.learn(2 * per_iteration)
    first.save(tmp_path / "half.zip")
    resumed = MetaPolicyGradient.load(tmp_path / "half.zip", env=env_id)
    # Navigation2D's episodes can end early: continue to the uninterrupted run's total, not K more steps
    resumed.learn(4 * per_iteration - resumed.num_timesteps, reset_num_timesteps=False)
    assert th.equal(_parameters(resumed), _parameters(uninterrupted))
    assert resumed.n_updates == uninterrupted.n_updates and resumed.num_timesteps == uninterrupted.num_timesteps

    # a checkpoint written by a callback in the middle of the third iteration's sampling
    checkpointed = _model(env_id, meta_optimizer, mode)
    # on_step is called once per sampled batch (inner, then outer); save after the third iteration's inner batch
    assert calls_at_rollout_end[:3] == [2, 4, 6]  # (Navigation2D: early ends leave room for a fifth iteration)
    third = calls_at_rollout_end[1] + 1
    callback = CheckpointCallback(save_freq=third, save_path=str(tmp_path / "ckpt"))
    checkpointed.learn(3 * per_iteration, callback=callback)
    (checkpoint,) = sorted(os.listdir(tmp_path / "ckpt"))[:1]
    from_checkpoint = MetaPolicyGradient.load(tmp_path / "ckpt" / checkpoint, env=env_id)
    assert from_checkpoint.n_updates == 2  # the zip holds the third iteration's start, not its partial count
    from_checkpoint.learn(4 * per_iteration - from_checkpoint.num_timesteps, reset_num_timesteps=False)
    assert th.equal(_parameters(from_checkpoint), _parameters(uninterrupted))


def test_save_keeps_the_optimizer_state_and_load_keeps_the_global_rng(tmp_path):
    model = _model("sb3_metarl/Navigation2D-v0", "adam", "lvc")
    model.learn(1600)
    model.save(tmp_path / "m.zip")
    th.manual_seed(123)
    np.random.seed(123)
    expected_torch, expected_numpy = th.rand(3), np.random.rand(3)
    th.manual_seed(123)
    np.random.seed(123)
    loaded = MetaPolicyGradient.load(tmp_path / "m.zip", env="sb3_metarl/Navigation2D-v0")
    assert th.equal(th.rand(3), expected_torch) and np.array_equal(np.random.rand(3), expected_numpy)
    saved, restored = model.policy.optimizer.state_dict(), loaded.policy.optimizer.state_dict()
    assert len(saved["state"]) == len(restored["state"]) > 0
    for key, state in saved["state"].items():
        assert int(restored["state"][key]["step"]) == int(state["step"]) == model.n_updates > 0
        assert th.equal(restored["state"][key]["exp_avg_sq"], state["exp_avg_sq"])
    # two loads of the same zip continue identically on a stochastic env
    runs = []
    for _ in range(2):
        again = MetaPolicyGradient.load(tmp_path / "m.zip", env="sb3_metarl/Navigation2D-v0")
        again.learn(800, reset_num_timesteps=False)
        runs.append(_parameters(again))
    assert th.equal(runs[0], runs[1])


def test_evaluation_during_training_does_not_change_the_run():
    plain = _model("sb3_metarl/TabularMDP-v0", "adam", "lvc")
    plain.learn(480)
    plain.learn(480, reset_num_timesteps=False)
    evaluated = _model("sb3_metarl/TabularMDP-v0", "adam", "lvc")
    evaluated.learn(480)
    evaluated.evaluate_adaptation(n_tasks=3, inner_steps=1, seed=5)
    evaluated.adapt(evaluated.task_sampler.sample(1, np.random.default_rng(0))[0], seed=1)
    evaluated.learn(480, reset_num_timesteps=False)
    assert th.equal(_parameters(plain), _parameters(evaluated))


def test_rollout_statistics_survive_learn_calls_and_training_mode_is_set():
    modes = []

    class Spy(MetaPolicyGradient):
        def train(self, sample):
            modes.append(("rollout", sample_mode[0]))
            super().train(sample)
            modes.append(("train", self.policy.training))

    sample_mode = [None]
    model = Spy("MlpPolicy", "sb3_metarl/Navigation2D-v0", seed=0, **SHAPE)
    model.policy.set_training_mode(True)
    original_rollout = model.sample_episodes

    def rollout(*args, **kwargs):
        batch = original_rollout(*args, **kwargs)
        sample_mode[0] = model.policy.training
        return batch

    model.sample_episodes = rollout
    model.learn(800)
    model.learn(800, reset_num_timesteps=False)
    assert len(model.pre_adaptation_returns) == 2  # SB3 keeps its buffers across learn calls
    model.learn(800)
    assert len(model.pre_adaptation_returns) == 1  # ... and resets them with the counters
    assert ("rollout", False) in modes and ("train", True) in modes and ("rollout", True) not in modes


@pytest.mark.parametrize("meta_optimizer", ["adam", "trpo"])
def test_resume_with_inner_sample_reuse_is_bit_identical(tmp_path, meta_optimizer):
    """The reuse buffers are training state: saved, loaded, and a mid-iteration checkpoint holds them as of its start."""
    from sb3_metarl import FixedTaskSampler

    tasks = [np.random.default_rng(seed).uniform(0, 1, (20, 5)) for seed in range(2)]
    per_iteration = 2 * 2 * 2 * 20
    kwargs = dict(inner_sample_reuse=2, task_sampler=FixedTaskSampler(tasks))
    uninterrupted = _model(ENVS[1], meta_optimizer, "lvc", **kwargs)
    calls_at_rollout_end = []
    uninterrupted.learn(5 * per_iteration, callback=_CallCounter(calls_at_rollout_end))
    first = _model(ENVS[1], meta_optimizer, "lvc", **kwargs)
    first.learn(2 * per_iteration)
    first.save(tmp_path / "half.zip")
    resumed = MetaPolicyGradient.load(tmp_path / "half.zip", env=ENVS[1])
    assert sum(len(b) for b in resumed.inner_reuse.batches.values()) > 0
    resumed.learn(5 * per_iteration - resumed.num_timesteps, reset_num_timesteps=False)
    assert th.equal(_parameters(resumed), _parameters(uninterrupted))
    checkpointed = _model(ENVS[1], meta_optimizer, "lvc", **kwargs)
    third = calls_at_rollout_end[1] + (calls_at_rollout_end[2] - calls_at_rollout_end[1]) // 3
    checkpointed.learn(3 * per_iteration, callback=CheckpointCallback(save_freq=third, save_path=str(tmp_path / "ckpt")))
    (checkpoint,) = sorted(os.listdir(tmp_path / "ckpt"))[:1]
    from_checkpoint = MetaPolicyGradient.load(tmp_path / "ckpt" / checkpoint, env=ENVS[1])
    from_checkpoint.learn(5 * per_iteration - from_checkpoint.num_timesteps, reset_num_timesteps=False)
    assert th.equal(_parameters(from_checkpoint), _parameters(uninterrupted))


class _KillAt(BaseCallback):
    """SIGKILLs sampler worker 1 at the given hook of the first meta-iteration (after its sampling, or before the next)."""

    def __init__(self, hook):
        super().__init__()
        self.hook, self.rollout_starts = hook, 0

    def _kill(self):
        import signal

        os.kill(self.model.get_env().workers[1].process.pid, signal.SIGKILL)

    def _on_rollout_start(self):
        self.rollout_starts += 1
        if self.hook == "on_rollout_start" and self.rollout_starts == 2:
            self._kill()

    def _on_rollout_end(self):
        if self.hook == "on_rollout_end" and self.rollout_starts == 1:
            self._kill()  # the meta-update of this iteration still runs

    def _on_step(self):
        return True


SUBPROC = dict(sampler="subproc", sampler_kwargs=dict(num_workers=2, timeout=60.0), seed=5, inner_lr=1e-3, **SHAPE)


@pytest.mark.parametrize("when", ["on_rollout_end", "on_rollout_start", "closed", "interrupted_evaluation"])
@pytest.mark.slow
def test_a_model_is_saveable_whatever_its_workers_did_and_resumes_exactly(tmp_path, when):
    from conftest import deadline

    from sb3_metarl.samplers.processes import WorkerDiedError

    env_id = "sb3_metarl/TabularMDP-v0"
    per_iteration = 2 * 2 * 2 * 20
    with deadline(240):
        uninterrupted = MetaPolicyGradient("MlpPolicy", env_id, **SUBPROC)
        uninterrupted.learn(2 * per_iteration)
        uninterrupted.get_env().close()

        model = MetaPolicyGradient("MlpPolicy", env_id, **SUBPROC)
        if when in ("on_rollout_end", "on_rollout_start"):
            with pytest.raises(WorkerDiedError):
                model.learn(10 * per_iteration, callback=_KillAt(when))
        elif when == "closed":
            model.learn(per_iteration)
            model.get_env().close()
        else:  # Ctrl-C during a held-out evaluation, the workers gone with it (a terminal's SIGINT)
            import signal

            model.learn(per_iteration)
            sample = model.get_env().sample

            def interrupted(*args, **kwargs):
                sample(*args, **kwargs)
                os.kill(model.get_env().workers[0].process.pid, signal.SIGKILL)
                raise KeyboardInterrupt

            model.get_env().sample = interrupted
            with pytest.raises(KeyboardInterrupt):
                model.evaluate_adaptation(n_tasks=2, inner_steps=1)
        assert model.n_updates == 1
        model.save(tmp_path / "model.zip")  # never asks the (dead, killed or closed) workers
        model.get_env().close()
        resumed = MetaPolicyGradient.load(tmp_path / "model.zip", env=env_id)
        resumed.learn(2 * per_iteration - resumed.num_timesteps, reset_num_timesteps=False)
        resumed.get_env().close()
    assert th.equal(_parameters(resumed), _parameters(uninterrupted))


def test_an_interrupted_evaluation_leaves_the_run_unchanged_in_the_same_process():
    """The sub-envs' streams are put back before the next sampling even when the evaluation was interrupted."""
    env_id = "sb3_metarl/TabularMDP-v0"
    kwargs = dict(seed=5, inner_lr=1e-3, **SHAPE)
    uninterrupted = MetaPolicyGradient("MlpPolicy", env_id, **kwargs)
    uninterrupted.learn(2 * 160)
    model = MetaPolicyGradient("MlpPolicy", env_id, **kwargs)
    model.learn(160)
    sampler, sample = model.episode_sampler, model.episode_sampler.sample
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        batch = sample(*args, **kwargs)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return batch

    sampler.sample = interrupted
    with pytest.raises(KeyboardInterrupt):
        model.evaluate_adaptation(n_tasks=2, inner_steps=2)
    sampler.sample = sample
    model.learn(160, reset_num_timesteps=False)
    assert th.equal(_parameters(model), _parameters(uninterrupted))


@pytest.mark.parametrize("name", ["trpo_lvc", "adam_lsf_reuse", "ppo_maml_auto"])
def test_a_zip_saved_by_version_0_1_0_loads_and_continues_exactly(name):
    """
    tests/data/v0_1_0 holds zips saved before the restructuring (the meta-optimizer then saved as ``meta_updater``,
    its classes named Adam / TRPO / PPO, no ``discount_from_start``), with the parameters that 0.1.0 reached one
    meta-iteration later on each CPU it was run on (an AMD EPYC, an AVX-512 Xeon: their kernels round differently,
    by about 1e-3 after an iteration): the current code continues them to one of those, bit for bit (on a CPU of a new
    kind, tests/data/v0_1_0/continue_zips.py writes 0.1.0's).
    """
    import warnings

    folder = os.path.join(os.path.dirname(__file__), "data", "v0_1_0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the old class names resolve through deprecated aliases
        model = MetaPolicyGradient.load(os.path.join(folder, f"{name}.zip"), env="sb3_metarl/Navigation2D-v0")
    assert model.meta_optimizer.name == name.split("_")[0]
    model.learn(model.max_steps_per_iteration, reset_num_timesteps=False)
    reached = th.nn.utils.parameters_to_vector(model.policy.parameters()).detach().numpy()
    continuations = [np.load(path) for path in sorted(glob.glob(os.path.join(folder, f"{name}_next_*.npy")))]
    assert len(continuations) >= 2
    same = [expected for expected in continuations if np.array_equal(reached, expected)]
    nearest = min(np.abs(reached - expected).max() for expected in continuations)
    assert len(same) == 1, f"matches none of 0.1.0's continuations (nearest: {nearest:.3g} away)"


def test_the_run_s_streams_pickle_as_of_the_iteration_s_start_and_stay_live():
    import pickle

    from sb3_metarl.meta_pg.streams import RunStreams

    streams = RunStreams(3)
    streams.begin_iteration(num_timesteps=10)
    start_task, start_noise = streams.task_rng.random(4), th.rand(4, generator=streams.torch_generator)
    saved = pickle.loads(pickle.dumps(streams))
    # the copy draws what the iteration drew; the live streams went on
    assert np.array_equal(saved.task_rng.random(4), start_task)
    assert th.equal(th.rand(4, generator=saved.torch_generator), start_noise)
    live_task = streams.task_rng.random(2)
    assert not np.array_equal(live_task, start_task[:2])
    assert saved.iteration_start is None and saved.env.states is None
    streams.end_iteration()
    after = pickle.loads(pickle.dumps(streams))
    assert np.array_equal(after.task_rng.random(3), streams.task_rng.random(3))  # between iterations: as they are
    assert streams.saved(num_timesteps=20).num_timesteps == 20 and streams.restore(saved.snapshot(5)) == 5
