"""The episode-sampler seam: the same samples on every backend, faults that name their worker, no wasted steps."""

import os
import signal
import subprocess
import sys
import time

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from conftest import deadline  # the tests' directory is on sys.path (pytest's default import mode)
from stable_baselines3.common.callbacks import BaseCallback

from sb3_metarl import MetaPolicyGradient
from sb3_metarl.samplers import EpisodeSampler, ShardedVecEnv, VecEnvSampler
from sb3_metarl.samplers.processes import SamplerClosedError, WorkerDiedError
from sb3_metarl.tasks import TaskEnv

SMALL = dict(meta_batch_size=4, inner_episodes=3, outer_episodes=3, seed=3)
TWO_WORKERS = dict(num_workers=2, timeout=120.0)


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _parameters(model: MetaPolicyGradient) -> th.Tensor:
    return th.cat([p.detach().flatten() for p in model.policy.parameters()])


def _iterate(model: MetaPolicyGradient, iterations: int) -> None:
    """Run exactly ``iterations`` meta-iterations (``learn`` finishes the iteration it starts)."""
    for _ in range(iterations):
        model.learn(1, reset_num_timesteps=False)


def _train(env_id: str, sampler: str, iterations: int = 2, **kwargs) -> MetaPolicyGradient:
    sampler_kwargs = None if sampler == "vec_env" else TWO_WORKERS
    model = MetaPolicyGradient("MlpPolicy", env_id, sampler=sampler, sampler_kwargs=sampler_kwargs, **SMALL, **kwargs)
    _iterate(model, iterations)
    return model


@pytest.mark.parametrize(
    "env_id, kwargs",
    [
        ("sb3_metarl/Navigation2D-v0", dict(meta_optimizer="trpo")),
        ("sb3_metarl/TabularMDP-v0", dict(gradient_mode="lvc")),  # discrete actions
        ("sb3_metarl/AntDir-v0", dict(max_episode_steps=30)),  # episodes that end early (the ant falls)
    ],
)
@pytest.mark.slow
def test_subproc_gives_bit_identical_training_to_vec_env(env_id, kwargs):
    default = _train(env_id, "vec_env", **kwargs)
    with deadline(240):
        sharded = _train(env_id, "subproc", **kwargs)
    try:
        assert isinstance(sharded.get_env(), ShardedVecEnv) and len(sharded.get_env().workers) == 2
        assert sharded.num_timesteps == default.num_timesteps
        assert th.equal(_parameters(sharded), _parameters(default))
        # and the meta-test evaluation (its own seeded streams) too
        for model in (default, sharded):
            model.result = model.evaluate_adaptation(n_tasks=4, inner_steps=1, seed=5)["per_task"]
        np.testing.assert_array_equal(sharded.result, default.result)
    finally:
        sharded.get_env().close()


@pytest.mark.slow
def test_ray_gives_bit_identical_training_to_vec_env(local_ray):
    default = _train("sb3_metarl/AntDir-v0", "vec_env", max_episode_steps=30)
    with deadline(240):
        on_ray = _train("sb3_metarl/AntDir-v0", "ray", max_episode_steps=30)
    try:
        assert on_ray.get_env().backend == "ray"
        assert on_ray.num_timesteps == default.num_timesteps
        assert th.equal(_parameters(on_ray), _parameters(default))
    finally:
        on_ray.get_env().close()


@pytest.mark.slow
def test_subproc_save_load_continue_is_bit_identical(tmp_path):
    kwargs = dict(sampler="subproc", sampler_kwargs=TWO_WORKERS, **SMALL)
    with deadline(240):
        uninterrupted = MetaPolicyGradient("MlpPolicy", "sb3_metarl/Navigation2D-v0", **kwargs)
        _iterate(uninterrupted, 2)
        first = MetaPolicyGradient("MlpPolicy", "sb3_metarl/Navigation2D-v0", **kwargs)
        _iterate(first, 1)
        first.save(tmp_path / "model.zip")
        first.get_env().close()
        resumed = MetaPolicyGradient.load(tmp_path / "model.zip", env="sb3_metarl/Navigation2D-v0")
        assert resumed.sampler == "subproc" and isinstance(resumed.get_env(), ShardedVecEnv)
        _iterate(resumed, 1)
    try:
        assert resumed.num_timesteps == uninterrupted.num_timesteps
        assert th.equal(_parameters(resumed), _parameters(uninterrupted))
    finally:
        uninterrupted.get_env().close()
        resumed.get_env().close()


class _KillWorker(BaseCallback):
    """Kills sampler worker 1 after the first sampled batch."""

    def __init__(self, kill):
        super().__init__()
        self.kill, self.killed = kill, False

    def _on_step(self) -> bool:
        if not self.killed:
            self.kill(self.model.get_env())
            self.killed = True
        return True


@pytest.mark.slow
def test_a_killed_subproc_worker_raises_an_error_naming_it_within_seconds(tmp_path):
    model = MetaPolicyGradient(
        "MlpPolicy", "sb3_metarl/Navigation2D-v0", sampler="subproc", sampler_kwargs=TWO_WORKERS, **SMALL
    )
    env = model.get_env()
    with deadline(60):
        start = time.monotonic()
        with pytest.raises(WorkerDiedError, match=r"sampler worker 1 \(subproc; task groups 2-3.*died with exit code -9"):
            model.learn(10_000, callback=_KillWorker(lambda venv: os.kill(venv.worker_pids()[1], signal.SIGKILL)))
        assert time.monotonic() - start < 30
        # still saveable (the sub-envs' streams as of the failed iteration's start; the workers are not asked)
        model.save(tmp_path / "after_failure.zip")
        env.close()  # never hangs, with one worker dead
    assert all(th.isfinite(p).all() for p in model.policy.parameters())
    with deadline(120):  # and a resumed run samples the failed iteration again, on new workers
        resumed = MetaPolicyGradient.load(tmp_path / "after_failure.zip", env="sb3_metarl/Navigation2D-v0")
        _iterate(resumed, 1)
        assert resumed.n_updates == 1
        resumed.get_env().close()


@pytest.mark.slow
def test_a_killed_ray_actor_raises_an_error_naming_it(local_ray):
    model = MetaPolicyGradient("MlpPolicy", "sb3_metarl/Navigation2D-v0", sampler="ray", sampler_kwargs=TWO_WORKERS, **SMALL)
    with deadline(90):
        with pytest.raises(WorkerDiedError, match=r"sampler worker 0 \(ray; task groups 0-1.*died"):
            model.learn(10_000, callback=_KillWorker(lambda venv: local_ray.kill(venv.workers[0].actor)))
        model.get_env().close()


@pytest.mark.slow
def test_the_interpreter_exits_with_live_workers():
    """A script that never closes its sampler still exits (the workers are daemons), with no hang."""
    script = (
        "from sb3_metarl import MetaPolicyGradient\n"
        "if __name__ == '__main__':\n"
        "    model = MetaPolicyGradient('MlpPolicy', 'sb3_metarl/Navigation2D-v0', meta_batch_size=2,\n"
        "                               inner_episodes=2, outer_episodes=2, sampler='subproc',\n"
        "                               sampler_kwargs=dict(num_workers=2), seed=0)\n"
        "    model.learn(1)\n"
        "    print('pids', model.get_env().worker_pids())\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    pids = [int(p) for p in result.stdout.split("pids")[1].strip(" []\n").split(",")]

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    # no orphaned worker either: they exit on their own within seconds (a loaded machine takes longer than 0.5 s)
    give_up = time.monotonic() + 10
    while any(alive(pid) for pid in pids) and time.monotonic() < give_up:
        time.sleep(0.1)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


class _FallingEnv(TaskEnv):
    """Episode i of a task ends after ``task`` steps; counts every step and reset it is asked for."""

    steps = 0

    def __init__(self):
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.task, self.t = 1, 0

    def sample_tasks(self, n, rng=None):
        return [int(x) for x in (rng or np.random.default_rng()).integers(1, 10, n)]

    def set_task(self, task):
        self.task = task

    def get_task(self):
        return self.task

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(1, np.float32), {}

    def step(self, action):
        type(self).steps += 1
        self.t += 1
        return np.zeros(1, np.float32), 1.0, self.t >= self.task, False, {}


def test_finished_episodes_are_not_stepped_until_the_wave_ends():
    model = MetaPolicyGradient("MlpPolicy", _FallingEnv, max_episode_steps=50, **SMALL)
    tasks = [1, 3, 9, 2]
    _FallingEnv.steps = 0
    batch = model.sample_episodes(tasks, None, 5)  # 3 sub-envs per task: two waves
    lengths = batch.masks.sum(-1)
    np.testing.assert_array_equal(lengths.numpy(), np.repeat(np.array(tasks, dtype=np.float32)[:, None], 5, axis=1))
    # every env step taken was a stored transition: none after an episode's end
    assert _FallingEnv.steps == int(lengths.sum()) == 5 * sum(tasks)


class _CountingSampler(EpisodeSampler):
    """A user's sampler: delegates to the default one and counts its calls."""

    def __init__(self, venv, n_groups):
        self.inner = VecEnvSampler(venv, n_groups)
        self.n_groups, self.envs_per_group, self.horizon = n_groups, self.inner.envs_per_group, self.inner.horizon
        self.calls = 0

    def attach_policy(self, policy):
        self.inner.attach_policy(policy)

    def sample(self, tasks, task_params, n_episodes, noise_seeds, step_callback=None):
        self.calls += 1
        return self.inner.sample(tasks, task_params, n_episodes, noise_seeds, step_callback)


def test_an_episode_sampler_instance_is_used_and_gives_the_default_samples():
    from stable_baselines3.common.vec_env import DummyVecEnv

    from sb3_metarl.samplers.factory import make_task_env

    venv = DummyVecEnv([lambda: make_task_env("sb3_metarl/Navigation2D-v0")] * 12)
    sampler = _CountingSampler(venv, 4)
    custom = MetaPolicyGradient("MlpPolicy", "sb3_metarl/Navigation2D-v0", sampler=sampler, **SMALL)
    custom.calibrate_inner_lr()
    assert sampler.calls == 8  # inner_lr="auto" calibrates on 16 tasks: 4 x 2 independent batches of 4
    custom.learn(1)
    assert sampler.calls == 10  # the iteration's inner and outer batch
    default = MetaPolicyGradient("MlpPolicy", "sb3_metarl/Navigation2D-v0", **SMALL)
    default.learn(1)
    assert th.equal(_parameters(custom), _parameters(default))


class _PlainSampler(EpisodeSampler):
    """The issue's minimal protocol: sample(tasks, task_params, n_episodes) -> EpisodeBatch, its own randomness."""

    def __init__(self, venv, n_groups):
        self.inner = VecEnvSampler(venv, n_groups)
        self.n_groups, self.envs_per_group, self.horizon = n_groups, self.inner.envs_per_group, self.inner.horizon
        self.steps_returned = 0

    def attach_policy(self, policy):
        self.inner.attach_policy(policy)

    def sample(self, tasks, task_params, n_episodes):
        batch = self.inner.sample(tasks, task_params, n_episodes)
        self.steps_returned += int(batch.masks.sum())
        return batch


def test_a_minimal_episode_sampler_trains_and_its_steps_are_counted_per_batch():
    from stable_baselines3.common.vec_env import DummyVecEnv

    from sb3_metarl.samplers.factory import make_task_env

    venv = DummyVecEnv([lambda: make_task_env("sb3_metarl/Navigation2D-v0")] * 12)
    sampler = _PlainSampler(venv, 4)
    model = MetaPolicyGradient("MlpPolicy", "sb3_metarl/Navigation2D-v0", sampler=sampler, **SMALL)
    model.calibrate_inner_lr()
    sampler.steps_returned = 0  # count the iteration's batches only, not the inner-lr calibration's
    model.learn(1)
    assert model.n_updates == 1
    # The sampler draws its own noise, so an episode may end early at the goal: the count is the
    # transitions in the iteration's batches (4 tasks x (3 inner + 3 outer) episodes, at most 100 steps each).
    assert model.num_timesteps == sampler.steps_returned
    assert 4 * 6 * 50 < model.num_timesteps <= 4 * 6 * 100


class _HalfSeededSampler(_PlainSampler):
    def sample(self, tasks, task_params, n_episodes, noise_seeds=None):
        return self.inner.sample(tasks, task_params, n_episodes, noise_seeds)


def test_a_sampler_is_checked_against_the_contract_once_where_it_is_given():
    from stable_baselines3.common.vec_env import DummyVecEnv

    from sb3_metarl.samplers import conforming_sampler
    from sb3_metarl.samplers.factory import make_task_env

    venv = DummyVecEnv([lambda: make_task_env("sb3_metarl/Navigation2D-v0")] * 12)
    seeded = _CountingSampler(venv, 4)
    assert conforming_sampler(seeded) is seeded  # the full contract: used as given
    plain = conforming_sampler(_PlainSampler(venv, 4))  # the minimal one: held to the contract, its own noise
    assert plain.n_groups == 4 and plain.horizon == 100
    with pytest.raises(ValueError, match=r"sampler: _HalfSeededSampler\.sample does not take step_callback"):
        MetaPolicyGradient("MlpPolicy", "sb3_metarl/Navigation2D-v0", sampler=_HalfSeededSampler(venv, 4), **SMALL)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sampler="threads"), "sampler: unknown sampler 'threads'"),
        (
            dict(sampler="vec_env", sampler_kwargs=dict(num_workers=2)),
            r"sampler_kwargs: sampler='vec_env' takes only \['batched_physics', 'num_threads'\]",
        ),
        (dict(sampler="subproc", sampler_kwargs=[2]), "sampler_kwargs: must be a dict"),
        (dict(sampler="subproc", vec_env_cls="SubprocVecEnv"), "vec_env_cls: sampler='subproc' builds the sub-envs"),
        (dict(sampler="subproc", sampler_kwargs=dict(num_workers=0)), "num_workers must be a positive integer"),
        (dict(sampler="subproc", sampler_kwargs=dict(workers=2)), r"sampler_kwargs: unknown argument\(s\) \['workers'\]"),
    ],
)
def test_bad_sampler_arguments_fail_early_with_the_argument_named(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        MetaPolicyGradient("MlpPolicy", "sb3_metarl/Navigation2D-v0", **SMALL, **kwargs)


def test_a_sharded_sampler_needs_a_factory_not_a_vec_env():
    from stable_baselines3.common.vec_env import DummyVecEnv

    from sb3_metarl.samplers.factory import make_task_env

    venv = DummyVecEnv([lambda: make_task_env("sb3_metarl/Navigation2D-v0")] * 12)
    with pytest.raises(ValueError, match="env: sampler='subproc' builds the sub-envs in its workers"):
        MetaPolicyGradient("MlpPolicy", venv, sampler="subproc", **SMALL)


@pytest.mark.parametrize("activation", [th.nn.Tanh, th.nn.ReLU])
def test_layered_acting_is_the_policy_s_own_gaussian_sample(activation):
    """The layer-by-layer path (layers and std read once per load) samples bit for bit what the policy's modules do."""
    from gymnasium import spaces
    from stable_baselines3.common.policies import ActorCriticPolicy

    from sb3_metarl.samplers.acting import GroupPolicies

    observation_space = spaces.Box(-np.inf, np.inf, (3,), np.float32)
    action_space = spaces.Box(-1, 1, (2,), np.float32)
    policy = ActorCriticPolicy(observation_space, action_space, lambda _: 1e-3, activation_fn=activation)
    generator = th.Generator().manual_seed(0)
    task_params = {n: p.detach() + 0.3 * th.randn(4, *p.shape, generator=generator) for n, p in policy.named_parameters()}
    plain, generic = GroupPolicies(policy), GroupPolicies(policy)
    generic.layout = None
    assert plain.layout is not None
    observations = th.randn(4 * 5, 3, generator=generator).numpy()
    for policies in (plain, generic):
        policies.load(task_params)
    actions = [
        policies.act(observations, 5, np.arange(4), [th.Generator().manual_seed(seed) for seed in range(4)])
        for policies in (plain, generic)
    ]
    np.testing.assert_array_equal(actions[0], actions[1])
    # a reload takes the new parameters (the cached layers are the copies' tensors, the std is re-read)
    task_params["log_std"] = task_params["log_std"] + 1.0
    plain.load(task_params)
    wider = plain.act(observations, 5, np.arange(4), [th.Generator().manual_seed(seed) for seed in range(4)])
    old_std, new_std = np.exp(task_params["log_std"].numpy() - 1.0), np.exp(task_params["log_std"].numpy())
    noise = (actions[0][:5] - wider[:5]) / (old_std[0] - new_std[0])  # group 0: same mean and noise, another std
    np.testing.assert_allclose(noise, th.randn(5, 2, generator=th.Generator().manual_seed(0)).numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("time_limit", [None, 30])
def test_stepping_below_the_bookkeeping_wrappers_samples_what_the_wrapped_envs_do(time_limit):
    """The runner steps envs below TimeLimit / OrderEnforcing / PassiveEnvChecker and counts the limit itself."""
    from stable_baselines3.common.policies import ActorCriticPolicy
    from stable_baselines3.common.vec_env import DummyVecEnv

    from sb3_metarl.samplers.factory import make_task_env
    from sb3_metarl.samplers.runner import step_without_bookkeeping

    def make():
        env = make_task_env("sb3_metarl/Navigation2D-v0")
        return env if time_limit is None else gym.wrappers.TimeLimit(env, time_limit)

    samplers, batches, dones, policy = [], [], [], None
    for bypass in (True, False):
        sampler = VecEnvSampler(DummyVecEnv([make] * 6), 3)
        if not bypass:  # through every wrapper, as a VecEnv steps them
            sampler.runner.step_functions = [env.step for env in sampler.runner.envs]
            sampler.runner.time_limits = [None] * len(sampler.runner.envs)
        policy = policy or ActorCriticPolicy(sampler.venv.observation_space, sampler.venv.action_space, lambda _: 1e-3)
        sampler.attach_policy(policy)
        params = {n: p.detach().unsqueeze(0).expand(3, *p.shape) for n, p in policy.named_parameters()}
        seen = []
        tasks = [np.array([0.3, -0.2]), np.array([-0.4, 0.1]), np.array([0.05, 0.45])]
        def record(n_steps, local, seen=seen):
            seen.append(local["dones"].copy())
            return True

        batches.append(sampler.sample(tasks, params, 4, noise_seeds=[1, 2, 3], step_callback=record))
        dones.append(seen)
        samplers.append(sampler)
    assert step_without_bookkeeping(samplers[0].runner.envs[0])[1] == (time_limit or 100)
    for field in ("observations", "actions", "rewards", "masks"):
        th.testing.assert_close(getattr(batches[0], field), getattr(batches[1], field), rtol=0, atol=0)
    assert len(dones[0]) == len(dones[1]) and all(np.array_equal(a, b) for a, b in zip(*dones))
    assert batches[0].masks.sum(-1).max().item() == (time_limit or 100)


def _probe_sharded(**kwargs):
    import functools

    from worker_envs import probe_env

    return ShardedVecEnv([functools.partial(probe_env, **kwargs.pop("env_kwargs", {}))] * 4, 2, num_workers=2, **kwargs)


@pytest.mark.slow
def test_a_late_answer_of_a_sampler_worker_is_never_taken_for_the_next_call():
    venv = _probe_sharded(timeout=0.5)
    try:
        with deadline(60):
            with pytest.raises(WorkerDiedError, match="is alive but did not answer"):
                venv.env_method("slow", 1.5)
            time.sleep(2.0)  # the late answers are now in the pipes
            assert venv.get_attr("marker") == ["marker"] * 4
            assert venv.env_method("pid", indices=[0, 2]) == venv.worker_pids()
    finally:
        venv.close()


@pytest.mark.slow
def test_a_sampler_call_has_one_deadline_and_close_one_grace_period():
    venv = _probe_sharded(timeout=3.0, close_timeout=2.0)
    with deadline(60):
        start = time.monotonic()
        with pytest.raises(WorkerDiedError, match="did not answer"):
            venv.env_method("slow", 30.0)  # both workers hang: 3 s in all, not 3 s each
        assert time.monotonic() - start < 5.0
        pids = [worker.process.pid for worker in venv.workers]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        start = time.monotonic()
        venv.close()
        assert time.monotonic() - start < 5.5
    assert not any(worker.process.is_alive() for worker in venv.workers)


@pytest.mark.slow
def test_a_closed_sampler_says_it_is_closed():
    model = MetaPolicyGradient("MlpPolicy", "sb3_metarl/Navigation2D-v0", sampler="subproc", sampler_kwargs=TWO_WORKERS,
                               inner_lr=1e-3, **SMALL)  # fmt: skip
    model.get_env().close()
    with deadline(30), pytest.raises(SamplerClosedError, match=r"sampler \(subproc\): its workers were closed"):
        model.learn(1)


@pytest.mark.parametrize("timeout", [0, -5, "10", float("nan"), True])
def test_a_bad_timeout_is_refused_at_construction(timeout):
    with pytest.raises(ValueError, match=r"sampler_kwargs: timeout must be a finite number of seconds > 0 or None"):
        MetaPolicyGradient("MlpPolicy", "sb3_metarl/Navigation2D-v0", sampler="subproc",
                           sampler_kwargs=dict(timeout=timeout), **SMALL)  # fmt: skip


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_gone(pids, seconds=15.0):
    give_up = time.monotonic() + seconds
    while any(_alive(pid) for pid in pids) and time.monotonic() < give_up:
        time.sleep(0.1)
    return [pid for pid in pids if _alive(pid)]


_WORKER_SCRIPT = (
    "import functools, os, signal, sys, time\n"
    "sys.path.insert(0, 'tests')\n"
    "from worker_envs import probe_env\n"
    "from sb3_metarl import MetaPolicyGradient\n"
    "if __name__ == '__main__':\n"
    "    model = MetaPolicyGradient('MlpPolicy', functools.partial(probe_env, ignore_sigterm=True), meta_batch_size=2,\n"
    "                               inner_episodes=2, outer_episodes=2, inner_lr=1e-3, sampler='subproc',\n"
    "                               sampler_kwargs=dict(num_workers=2, close_timeout=1.0), seed=0)\n"
    "    model.learn(1)\n"
    "    pids = model.get_env().worker_pids()\n"
    "    print('pids', pids, flush=True)\n"
)


@pytest.mark.slow
def test_the_interpreter_exits_with_frozen_and_sigterm_ignoring_workers_and_leaves_none_behind():
    script = _WORKER_SCRIPT + "    os.kill(pids[0], signal.SIGSTOP)\n"  # a frozen worker, the other ignores SIGTERM
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    pids = [int(p) for p in result.stdout.split("pids")[1].strip(" []\n").split(",")]
    assert _wait_gone(pids) == []


@pytest.mark.slow
def test_workers_die_with_a_killed_learner():
    # killed while its workers are busy (an env call of 10 minutes): they must not run on without it
    script = _WORKER_SCRIPT + "    model.get_env().env_method('slow', 600.0)\n"
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        with deadline(120):
            line = process.stdout.readline()
        pids = [int(p) for p in line.split("pids")[1].strip(" []\n").split(",")]
        process.kill()  # SIGKILL: no exit handler runs; the workers ignore SIGTERM
        process.wait(timeout=30)
        assert _wait_gone(pids) == []
    finally:
        process.kill()


@pytest.mark.slow
def test_workers_ignore_the_terminal_s_sigint():
    """Ctrl-C reaches the whole process group: a worker that died of it surfaced as WorkerDiedError in the learner."""
    model = MetaPolicyGradient("MlpPolicy", "sb3_metarl/Navigation2D-v0", sampler="subproc", sampler_kwargs=TWO_WORKERS,
                               inner_lr=1e-3, max_episode_steps=5, **SMALL)  # fmt: skip
    try:
        with deadline(60):
            model.learn(1)
            for pid in model.get_env().worker_pids():
                os.kill(pid, signal.SIGINT)
            time.sleep(0.5)
            model.learn(1, reset_num_timesteps=False)
        assert model.n_updates == 2
    finally:
        model.get_env().close()


@pytest.mark.slow
def test_ctrl_c_is_a_keyboard_interrupt_and_the_model_is_saved(tmp_path):
    script = (
        "import faulthandler, signal, sys\n"
        "from sb3_metarl import MetaPolicyGradient\n"
        "from sb3_metarl.samplers.processes import SamplerClosedError, WorkerDiedError\n"
        "if __name__ == '__main__':\n"
        "    faulthandler.register(signal.SIGUSR1, all_threads=True)  # where it is, should it ever hang\n"
        "    # a terminal's interpreter turns SIGINT into KeyboardInterrupt; one started from a background job of a\n"
        "    # non-interactive shell (a CI script) inherits SIGINT ignored, and Python then keeps it ignored\n"
        "    signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "    model = MetaPolicyGradient('MlpPolicy', 'sb3_metarl/Navigation2D-v0', meta_batch_size=4, inner_episodes=3,\n"
        "                               outer_episodes=3, inner_lr=1e-3, sampler='subproc',\n"
        "                               sampler_kwargs=dict(num_workers=2), seed=0)\n"
        "    model.learn(1)\n"
        "    print('ready', flush=True)\n"
        "    try:\n"
        "        model.learn(10**9)\n"
        "    except KeyboardInterrupt:\n"
        "        print('caught KeyboardInterrupt', flush=True)\n"
        "    except WorkerDiedError as error:\n"
        "        print('caught WorkerDiedError', error, flush=True)\n"
        f"    model.save({str(tmp_path / 'after_ctrl_c.zip')!r})\n"
        "    print('saved', flush=True)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # fmt: skip
    try:
        with deadline(120):
            assert process.stdout.readline().strip() == "ready"
        time.sleep(1.0)
        os.killpg(process.pid, signal.SIGINT)  # what the terminal does: the whole process group
        try:
            out, err = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGUSR1)  # the learner's threads' stacks, into its stderr
            time.sleep(2.0)
            process.kill()
            out, err = process.communicate()
            raise AssertionError(f"no exit 60 s after Ctrl-C; stdout:\n{out}\nstderr (stacks last):\n{err[-6000:]}") from None
        assert "caught KeyboardInterrupt" in out and "saved" in out, out + err[-2000:]
        assert (tmp_path / "after_ctrl_c.zip").exists()
    finally:
        process.kill()


def test_more_ray_workers_than_cpus_fail_fast_with_the_numbers(local_ray):
    with deadline(30), pytest.raises(ValueError, match=r"num_workers=3 Ray actors need 3 CPUs, but the Ray cluster has 2"):
        MetaPolicyGradient("MlpPolicy", "sb3_metarl/Navigation2D-v0", sampler="ray", sampler_kwargs=dict(num_workers=3),
                           **SMALL)  # fmt: skip


@pytest.mark.slow
def test_closing_after_ray_shut_down_does_not_start_ray_again():
    script = (
        "import ray\n"
        "from sb3_metarl import MetaPolicyGradient\n"
        "if __name__ == '__main__':\n"
        "    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)\n"
        "    model = MetaPolicyGradient('MlpPolicy', 'sb3_metarl/Navigation2D-v0', meta_batch_size=2, inner_episodes=2,\n"
        "                               outer_episodes=2, inner_lr=1e-3, sampler='ray', sampler_kwargs=dict(num_workers=2))\n"
        "    model.learn(1)\n"
        "    ray.shutdown()\n"
        "    model.get_env().close()\n"
        "    print('initialized after close:', ray.is_initialized(), flush=True)\n"
        "    model2 = MetaPolicyGradient('MlpPolicy', 'sb3_metarl/Navigation2D-v0', meta_batch_size=2, inner_episodes=2,\n"
        "                                outer_episodes=2, inner_lr=1e-3, sampler='ray', sampler_kwargs=dict(num_workers=2))\n"
        "    model2.learn(1)\n"
        "    print('exiting without close', flush=True)\n"
    )
    pytest.importorskip("ray")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "initialized after close: False" in result.stdout and "exiting without close" in result.stdout


def test_acting_uses_cpu_copies_whatever_the_learner_s_device():
    """The per-group copies live on the CPU and take parameters from any device (one transfer per phase); the
    batches are built on the learner's device."""
    model = MetaPolicyGradient("MlpPolicy", "sb3_metarl/Navigation2D-v0", device="cpu", **SMALL)
    tasks = model.sample_tasks(model.meta_batch_size, np.random.default_rng(0))
    batch = model.sample_episodes(tasks, None, 2)
    policies = model.episode_sampler.policies
    assert policies.copies and all(p.device.type == "cpu" for copy in policies.copies for p in copy.parameters())
    assert all(copy.optimizer is None for copy in policies.copies)
    assert batch.observations.device == model.device


@pytest.mark.skipif(not th.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_learner_samples_the_cpu_learner_s_episodes():
    batches = []
    for device in ("cpu", "cuda"):
        model = MetaPolicyGradient("MlpPolicy", "sb3_metarl/Navigation2D-v0", device=device, **SMALL)
        tasks = model.sample_tasks(model.meta_batch_size, np.random.default_rng(0))
        batches.append(model.sample_episodes(tasks, None, 4))
    assert batches[1].observations.device.type == "cuda"
    for field in ("observations", "actions", "rewards", "masks"):
        assert th.equal(getattr(batches[0], field), getattr(batches[1], field).cpu()), field


class _RecordingRunner:
    """Builds a GroupRunner that records the steps it starts and settles (finished or abandoned)."""

    @staticmethod
    def make(env_id: str, n_groups: int, per_group: int, horizon: int, num_threads: int):
        from sb3_metarl.samplers.runner import GroupRunner

        class Recording(GroupRunner):
            def start_step(self, rows, env_actions):
                pending = super().start_step(rows, env_actions)
                self.started.append((pending, list(pending.physics)))
                return pending

            def finish_step(self, obs, pending, step):
                self.settled.append(pending)
                return super().finish_step(obs, pending, step)

            def abandon_step(self, pending):
                self.settled.append(pending)
                super().abandon_step(pending)

        envs = [gym.make(env_id) for _ in range(n_groups * per_group)]
        for index, env in enumerate(envs):
            env.reset(seed=index)  # (each sub-env's stream seeded; its resets draw from it)
        runner = Recording(envs, per_group, horizon, envs[0].observation_space, envs[0].action_space, num_threads=num_threads)
        runner.started, runner.settled = [], []
        return runner


def _collect_lanes(num_threads: int, step_callback=None, n_tasks: int = 3, runners: list | None = None):
    """
    Walker2dVel, 3 tasks (lanes of 1 and 2 groups) x 2 sub-envs, 4 episodes of up to 20 steps (falls end some).

    :param runners: the runner is appended there before sampling (read it when sampling raised)
    """
    from stable_baselines3.common.policies import ActorCriticPolicy

    from sb3_metarl.samplers.acting import GroupPolicies
    from sb3_metarl.samplers.collection import collect_episodes

    runner = _RecordingRunner.make("sb3_metarl/Walker2dVel-v0", n_tasks, 2, 20, num_threads)
    if runners is not None:
        runners.append(runner)
    th.manual_seed(0)
    policy = ActorCriticPolicy(runner.observation_space, runner.action_space, lambda _: 1e-3, net_arch=[8])
    generator = th.Generator().manual_seed(1)
    params = {n: p.detach() + 0.1 * th.randn(n_tasks, *p.shape, generator=generator) for n, p in policy.named_parameters()}
    tasks = runner.envs[0].unwrapped.sample_tasks(n_tasks, np.random.default_rng(2))
    buffer = collect_episodes(runner, GroupPolicies(policy), tasks, params, 4, [11, 12, 13][:n_tasks], step_callback)
    return runner, buffer


def test_two_lanes_sample_what_the_lock_step_loop_samples():
    """
    With the compiled physics on two threads the loop runs two lanes of task groups (one lane's physics beside this
    thread's acting for the other): the same episodes, bit for bit, with lanes of unequal size and falls.
    """
    plain_runner, plain = _collect_lanes(1)
    lanes_runner, lanes = _collect_lanes(2)
    assert not plain_runner.overlaps_physics and lanes_runner.overlaps_physics
    assert lanes_runner.started and all(physics for _, physics in lanes_runner.started)  # each step ran on the pool
    for name in ("observations", "actions", "rewards", "masks"):
        np.testing.assert_array_equal(getattr(lanes, name), getattr(plain, name))
    lengths = plain.masks.sum(axis=0)
    assert lengths.min() < 20 and lengths.max() == 20  # some episodes fell, some ran to the horizon
    # the step callback saw each lock-step once, with both lanes' rows in the lock-step loop's order
    seen = {1: [], 2: []}
    for threads in (1, 2):
        calls = seen[threads]
        _collect_lanes(threads, lambda n, step_vars, calls=calls: calls.append((n, step_vars["rewards"].copy())) or True)
    assert len(seen[2]) == len(seen[1]) and all(
        n == m and np.array_equal(a, b) for (n, a), (m, b) in zip(seen[2], seen[1])
    )


@pytest.mark.parametrize("stop", ["returns False", "raises"])
def test_a_stopped_or_failed_lane_loop_leaves_no_physics_running(stop):
    """However sampling ends, every started step's physics has run before the loop returns or raises."""
    calls = []

    def callback(n, step_vars):
        calls.append(n)
        if len(calls) == 5:
            if stop == "raises":
                raise RuntimeError("stop here")
            return False
        return True

    runners = []
    if stop == "raises":
        with pytest.raises(RuntimeError, match="stop here"):
            _collect_lanes(2, callback, runners=runners)
    else:
        assert _collect_lanes(2, callback, runners=runners)[1] is None
    runner = runners[0]
    assert len(calls) == 5
    assert len(runner.started) > 10 and {id(p) for p, _ in runner.started} == {id(p) for p in runner.settled}
    assert all(future.done() for _, physics in runner.started for future in physics)


def test_learn_after_closing_the_in_process_sampler_says_so():
    # before: "cannot schedule new futures after shutdown" from the twin's thread pool
    from sb3_metarl.samplers.processes import SamplerClosedError

    model = MetaPolicyGradient("MlpPolicy", "sb3_metarl/HalfCheetahVel-v0", meta_batch_size=2, inner_episodes=2,
                               outer_episodes=2, inner_lr=1e-3, max_episode_steps=10, seed=0)  # fmt: skip
    model.episode_sampler.close()
    with pytest.raises(SamplerClosedError, match=r"sampler \(vec_env\): it was closed.*model.set_env"):
        model.learn(1)
    model.set_env("sb3_metarl/HalfCheetahVel-v0")
    model.learn(1, reset_num_timesteps=False)
    assert model.n_updates == 1
