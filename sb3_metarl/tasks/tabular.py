"""Random tabular MDPs (Tang et al. 2021; Liu et al. 2022): exact values by dynamic programming."""

from typing import Any

import gymnasium as gym
import numpy as np

from sb3_metarl.tasks.task_env import SteppedAtOnce, TaskEnv, numeric_task


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
        #: the transition kernel's rows summed up: the next state by inverse-CDF sampling (``Generator.choice`` with
        #: ``p=`` is slower per call)
        self.cumulative_transitions = np.cumsum(self.transitions, axis=-1)
        # the reward matrix and the state are written in place: the batched twin may hold them as rows of its arrays
        self._rewards = np.zeros((n_states, n_actions))
        self._state = np.zeros(1, dtype=np.int64)

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
        self._rewards[:] = rewards

    def get_task(self) -> np.ndarray:
        return self._rewards.copy()

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[int, dict]:
        super().reset(seed=seed)
        self._state[0] = int(self.np_random.integers(self.n_states))
        return int(self._state[0]), {}

    def step(self, action: int) -> tuple[int, float, bool, bool, dict]:
        if not self.task_is_set:
            self.require_task()
        action, state = int(action), int(self._state[0])
        reward = float(self._rewards[state, action])
        cumulative = self.cumulative_transitions[state, action]
        state = min(int(np.searchsorted(cumulative, self.np_random.random(), side="right")), self.n_states - 1)
        self._state[0] = state
        return state, reward, False, False, {}


class BatchedTabularMDP(SteppedAtOnce):
    """
    Sub-envs of TabularMDP stepped as arrays: the rewards, the inverse-CDF draws and the next states of all stepped
    rows in a few numpy operations, each sub-env drawing its one uniform number per step from its own generator, so
    that the results are each env's own step bit for bit (a count of cumulative probabilities at most the draw is
    ``searchsorted(..., side="right")``). Each sub-env's state and reward matrix are rows of the twin's arrays (the env
    writes them in place), so its own ``step``, ``reset`` and ``set_task`` go on as before and see the twin's steps.

    :param envs: the unwrapped sub-envs (all ``TabularMDPEnv``; each keeps its own arguments and task)
    :param num_threads: (the MuJoCo twins' argument; unused)
    :param compiled: (the MuJoCo twins' argument; unused)
    """

    family = TabularMDPEnv

    def __init__(self, envs: list[Any], num_threads: int = 1, compiled: bool | None = None):
        super().__init__(envs)
        first = self.envs[0]
        self.states = np.array([env._state[0] for env in self.envs], dtype=np.int64)
        self.rewards = np.array([env._rewards for env in self.envs], dtype=np.float64)
        for row, env in enumerate(self.envs):
            env._state, env._rewards = self.states[row : row + 1], self.rewards[row]
        #: one kernel for every row when the sub-envs share it (the same arguments), else one per row
        shared = all(np.array_equal(env.cumulative_transitions, first.cumulative_transitions) for env in self.envs)
        self.cumulative = first.cumulative_transitions if shared else None
        self.per_row_cumulative = None if shared else np.array([env.cumulative_transitions for env in self.envs])
        self.last_states = np.array([env.n_states - 1 for env in self.envs])


    def step(self, indices: np.ndarray, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict]]:
        """
        Step the sub-envs ``indices`` with ``actions``, as ``env.step`` would one by one.

        :return: observations (n, 1), rewards (n,) float64, terminated (n,) bool (never), infos (empty dicts)
        """
        rows = np.asarray(indices, dtype=np.int64)
        chosen = np.asarray(actions).reshape(len(rows), -1)
        if chosen.shape[1] != 1:
            raise ValueError(f"actions: expected one action per stepped sub-env ({len(rows)}), got shape {np.shape(actions)}.")
        chosen = chosen[:, 0].astype(np.int64)  # (int(action) of the per-env step: the sampled actions are whole)
        envs = [self.envs[row] for row in rows.tolist()]
        if not all(env.task_is_set for env in envs):
            for env in envs:
                env.require_task()
        states = self.states[rows]
        rewards = self.rewards[rows, states, chosen]
        draws = np.array([env.np_random.random() for env in envs])
        if self.cumulative is not None:
            cumulative = self.cumulative[states, chosen]
        else:
            cumulative = self.per_row_cumulative[rows, states, chosen]
        next_states = np.minimum((cumulative <= draws[:, None]).sum(axis=1), self.last_states[rows])
        self.states[rows] = next_states
        return next_states[:, None], rewards, np.zeros(len(rows), dtype=bool), [{} for _ in range(len(rows))]


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
