"""Random tabular MDPs (Tang et al. 2021; Liu et al. 2022): exact values by dynamic programming."""

from typing import Any

import gymnasium as gym
import numpy as np

from sb3_metarl.tasks.task_env import TaskEnv, numeric_task


class TabularMDPEnv(TaskEnv):
    """
    A random MDP with ``n_states`` states and ``n_actions`` actions. The transition kernel is drawn
    once from independent Dirichlet distributions using ``transition_seed`` (so every copy of the
    env, in every process, has the same dynamics); the initial state is uniform. The horizon (20)
    comes from the registration's ``max_episode_steps``.

    Task: the reward matrix, a numpy array of shape ``(n_states, n_actions)`` with entries in
    ``[0, 1]``; the distribution draws each entry uniformly.

    :param n_states: number of states (observation space ``Discrete(n_states)``)
    :param n_actions: number of actions (action space ``Discrete(n_actions)``)
    :param dirichlet_alpha: concentration of the transition rows (small = near-deterministic)
    :param transition_seed: seed of the transition kernel
    """

    def __init__(self, n_states: int = 20, n_actions: int = 5, dirichlet_alpha: float = 1.0, transition_seed: int = 0):
        super().__init__()
        self.n_states, self.n_actions = n_states, n_actions
        self.observation_space = gym.spaces.Discrete(n_states)
        self.action_space = gym.spaces.Discrete(n_actions)
        self.transitions = random_transition_kernel(n_states, n_actions, dirichlet_alpha, transition_seed)
        self.initial_distribution = np.full(n_states, 1.0 / n_states)
        # inverse-CDF sampling: np.random.Generator.choice with p= is ~10x slower per call
        self._cumulative_transitions = np.cumsum(self.transitions, axis=-1)
        self._rewards = np.zeros((n_states, n_actions))
        self._state = 0

    def sample_tasks(self, n: int, rng: np.random.Generator | None = None) -> list[np.ndarray]:
        rng = self.np_random if rng is None else rng
        return [rng.uniform(0.0, 1.0, size=(self.n_states, self.n_actions)) for _ in range(n)]

    def _validate_and_set(self, task: Any) -> None:
        rewards = numeric_task(self, task, "a reward matrix with entries in [0, 1]", (self.n_states, self.n_actions))
        if not np.all((rewards >= 0) & (rewards <= 1)):
            raise ValueError(
                f"TabularMDP: task must be a reward matrix of shape ({self.n_states}, {self.n_actions}) "
                f"with entries in [0, 1], got shape {rewards.shape}."
            )
        self._rewards = rewards

    def get_task(self) -> np.ndarray:
        return self._rewards.copy()

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[int, dict]:
        super().reset(seed=seed)
        self._state = int(self.np_random.integers(self.n_states))
        return self._state, {}

    def step(self, action: int) -> tuple[int, float, bool, bool, dict]:
        if not self.task_is_set:
            self.require_task()
        action = int(action)
        reward = float(self._rewards[self._state, action])
        cumulative = self._cumulative_transitions[self._state, action]
        self._state = min(int(np.searchsorted(cumulative, self.np_random.random(), side="right")), self.n_states - 1)
        return self._state, reward, False, False, {}


def random_transition_kernel(n_states: int, n_actions: int, alpha: float, seed: int) -> np.ndarray:
    """
    :return: array (n_states, n_actions, n_states), each row a Dirichlet(alpha) draw. For very small
        ``alpha`` numpy's sampler can underflow to an all-zero row; such rows fall back to the
        one-hot of their largest log-gamma draw, which is the distribution's limit.
    """
    rng = np.random.default_rng(seed)
    kernel = rng.dirichlet(np.full(n_states, alpha), size=(n_states, n_actions))
    bad = ~np.isfinite(kernel).all(axis=-1) | (kernel.sum(axis=-1) <= 0)
    if bad.any():
        kernel[bad] = np.eye(n_states)[rng.integers(n_states, size=int(bad.sum()))]
    return kernel / kernel.sum(axis=-1, keepdims=True)
