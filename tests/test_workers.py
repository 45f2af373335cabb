"""GuardedSubprocVecEnv: a dead worker is named within seconds, late answers are dropped, and close never hangs."""

import os
import signal
import time

import pytest
from conftest import deadline  # the tests' directory is on sys.path (pytest's default import mode)
from stable_baselines3.common.vec_env import SubprocVecEnv

from sb3_metarl import MetaPolicyGradient
from sb3_metarl.samplers.processes import GuardedSubprocVecEnv, SamplerClosedError, WorkerDiedError, resolve_vec_env_cls


@pytest.mark.slow
def test_killed_worker_mid_learn_raises_naming_it_and_close_is_bounded():
    model = MetaPolicyGradient(
        "MlpPolicy",
        "sb3_metarl/Navigation2D-v0",
        vec_env_cls=SubprocVecEnv,
        meta_batch_size=2,
        inner_episodes=1,
        outer_episodes=1,
        inner_lr=1e-3,
    )
    venv = model.get_env()
    assert isinstance(venv, GuardedSubprocVecEnv)
    victim = venv.processes[1]

    def kill_on_step(locals_, globals_):
        if locals_.get("dones") is not None and victim.is_alive():
            os.kill(victim.pid, signal.SIGKILL)
        return True

    with deadline(30), pytest.raises(WorkerDiedError, match=r"worker 1 .*died with exit code -9"):
        model.learn(10_000, callback=kill_on_step)
    with deadline(15):
        venv.close()
    assert venv.closed and not any(process.is_alive() for process in venv.processes)


def test_vec_env_cls_by_name():
    assert resolve_vec_env_cls("SubprocVecEnv") is GuardedSubprocVecEnv
    assert resolve_vec_env_cls("dummy").__name__ == "DummyVecEnv"
    with pytest.raises(ValueError, match="vec_env_cls"):
        resolve_vec_env_cls("ray")


def _probe_venv(n_envs=2, **kwargs):
    import functools

    from worker_envs import probe_env

    return GuardedSubprocVecEnv([functools.partial(probe_env)] * n_envs, **kwargs)


@pytest.mark.slow
def test_a_late_answer_is_never_taken_for_the_next_call():
    venv = _probe_venv(timeout=0.5)
    try:
        with deadline(30):
            with pytest.raises(WorkerDiedError, match="is alive but did not answer"):
                venv.env_method("slow", 1.5)
            time.sleep(2.0)  # the late answers are now in the pipes
            assert venv.get_attr("marker") == ["marker", "marker"]
            assert len(set(venv.env_method("pid"))) == 2
    finally:
        venv.close()


@pytest.mark.slow
def test_a_call_to_all_workers_has_one_deadline_and_close_one_grace_period():
    venv = _probe_venv(timeout=3.0, close_timeout=2.0)
    with deadline(40):
        start = time.monotonic()
        with pytest.raises(WorkerDiedError, match="did not answer"):
            venv.env_method("slow", 30.0)  # both workers hang: 3 s in all, not 3 s each
        assert time.monotonic() - start < 5.0
        for process in venv.processes:
            os.kill(process.pid, signal.SIGSTOP)  # frozen: they neither answer nor exit on SIGTERM
        start = time.monotonic()
        venv.close()
        # 2 s for all to exit, then at most 1 s after SIGTERM and 1 s after SIGKILL: not 4 s per worker in turn
        assert time.monotonic() - start < 5.5
    assert not any(process.is_alive() for process in venv.processes)


@pytest.mark.slow
def test_an_env_error_in_a_worker_is_raised_with_the_env_s_traceback():
    import functools

    import numpy as np
    from worker_envs import probe_env

    venv = GuardedSubprocVecEnv([functools.partial(probe_env, fail_at_step=2)] * 2, timeout=30.0)
    try:
        with deadline(30):
            venv.reset()
            venv.step(np.zeros((2, 1), np.float32))
            with pytest.raises(RuntimeError, match=r"(?s)SubprocVecEnv worker 0 .*failed: ValueError: ProbeEnv: failing on "
                                                   r"purpose at step 2.*Traceback.*worker_envs\.py"):  # fmt: skip
                venv.step(np.zeros((2, 1), np.float32))
    finally:
        venv.close()


@pytest.mark.slow
def test_a_closed_vec_env_says_so():
    venv = _probe_venv()
    venv.close()
    with pytest.raises(SamplerClosedError, match="closed"):
        venv.get_attr("marker")


@pytest.mark.slow
def test_sampler_kwargs_set_the_subproc_vec_env_s_waits():
    shape = dict(meta_batch_size=2, inner_episodes=1, outer_episodes=1, inner_lr=1e-3)
    model = MetaPolicyGradient("MlpPolicy", "sb3_metarl/Navigation2D-v0", vec_env_cls=SubprocVecEnv,
                               sampler_kwargs=dict(timeout=7.5), **shape)  # fmt: skip
    try:
        assert all(remote.timeout == 7.5 for remote in model.get_env().remotes)
    finally:
        model.get_env().close()
    takes = r"sampler_kwargs: sampler='vec_env' takes only \['batched_physics', 'num_threads', 'timeout', 'close_timeout'\]"
    with pytest.raises(ValueError, match=takes):
        MetaPolicyGradient("MlpPolicy", "sb3_metarl/Navigation2D-v0", vec_env_cls=SubprocVecEnv, meta_batch_size=2,
                           sampler_kwargs=dict(num_workers=2))  # fmt: skip


@pytest.mark.slow
def test_subproc_vec_env_cls_is_reproducible_for_a_seed():
    """Not bit-identical to the other backends (finished sub-envs keep stepping through SB3's API; README), but
    the same seed gives the same run."""
    import torch as th

    parameters = []
    for _ in range(2):
        model = MetaPolicyGradient("MlpPolicy", "sb3_metarl/TabularMDP-v0", vec_env_cls=SubprocVecEnv, meta_batch_size=2,
                                   inner_episodes=2, outer_episodes=2, inner_lr=0.5, seed=4)  # fmt: skip
        with deadline(120):
            for _ in range(2):
                model.learn(1, reset_num_timesteps=False)
            model.get_env().close()
        parameters.append(th.cat([p.detach().flatten() for p in model.policy.parameters()]))
    assert th.equal(*parameters)


@pytest.mark.slow
def test_a_monitoring_thread_calling_the_sampler_during_learn_neither_hangs_nor_changes_the_run():
    # before: worker_pids() from another thread sent a request down the pipes the sampler was waiting on, one side took
    # the other's answer, and learn never finished
    import threading

    import numpy as np

    kwargs = dict(meta_batch_size=2, inner_episodes=2, outer_episodes=2, inner_lr=0.01, seed=0, sampler="subproc",
                  sampler_kwargs=dict(num_workers=2), max_episode_steps=20)  # fmt: skip
    alone = MetaPolicyGradient("MlpPolicy", "sb3_metarl/HalfCheetahVel-v0", **kwargs)
    watched = MetaPolicyGradient("MlpPolicy", "sb3_metarl/HalfCheetahVel-v0", **kwargs)
    try:
        alone.learn(3 * 2 * 4 * 20)
        sampler, stop, seen = watched.get_env(), threading.Event(), []

        def monitor():
            while not stop.is_set():
                seen.append((sampler.worker_pids(), sampler.get_attr("task_is_set", indices=[0])))
                time.sleep(0.005)

        watcher = threading.Thread(target=monitor, daemon=True)
        watcher.start()
        with deadline(120):
            watched.learn(3 * 2 * 4 * 20)
        stop.set()
        watcher.join(10)
        assert len(seen) > 3 and all(pids == seen[0][0] and len(pids) == 2 for pids, _ in seen)
        assert all(pid != os.getpid() for pid in seen[0][0])
        for name, value in alone.policy.state_dict().items():
            assert np.array_equal(value.numpy(), watched.policy.state_dict()[name].numpy()), name
    finally:
        alone.get_env().close()
        watched.get_env().close()
