"""Task envs for fault tests, importable by worker processes (tests/ is on their sys.path too)."""

import os
import signal
import time
from typing import ClassVar

import gymnasium as gym
import numpy as np

from sb3_metarl.tasks import TaskEnv


class ProbeEnv(TaskEnv):
    """A one-dimensional task env with methods that misbehave on request (sleep, raise, ignore SIGTERM)."""

    metadata: ClassVar[dict] = {}

    def __init__(self, ignore_sigterm: bool = False, fail_at_step: int | None = None):
        if ignore_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.task, self.t, self.fail_at_step, self.marker = 0.0, 0, fail_at_step, "marker"
        self.steps = 0

    def sample_tasks(self, n, rng=None):
        return [float(x) for x in (rng or np.random.default_rng()).uniform(-1, 1, n)]

    def set_task(self, task):
        self.task = task

    def get_task(self):
        return self.task

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(1, np.float32), {}

    def step(self, action):
        self.t += 1
        self.steps += 1
        if self.fail_at_step is not None and self.steps >= self.fail_at_step:
            raise ValueError(f"ProbeEnv: failing on purpose at step {self.steps}")
        reward = -abs(float(np.asarray(action).reshape(-1)[0]) - self.task)
        return np.zeros(1, np.float32), reward, False, self.t >= 5, {}

    def slow(self, seconds: float) -> str:
        time.sleep(seconds)
        return "late answer"

    def pid(self) -> int:
        return os.getpid()


def probe_env(**kwargs) -> ProbeEnv:
    return gym.wrappers.TimeLimit(ProbeEnv(**kwargs), max_episode_steps=5)
