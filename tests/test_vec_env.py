"""GuardedSubprocVecEnv: a dead worker is named within seconds, and close never hangs."""

import os
import signal

import pytest
from conftest import deadline  # the tests' directory is on sys.path (pytest's default import mode)
from stable_baselines3.common.vec_env import SubprocVecEnv

from sb3_metarl import MetaPolicyGradient
from sb3_metarl.common.vec_env import GuardedSubprocVecEnv, WorkerDiedError, resolve_vec_env_cls


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
