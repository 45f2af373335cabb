"""
The iterated prisoner's dilemma with memory-one players (Foerster et al. 2018, LOLA; Liu et al. 2022, Sec. 5.2),
and the closed-form discounted value of two memory-one policies.

States, as seen by a player (its own action first): 0 the start, 1 CC, 2 CD, 3 DC, 4 DD; action 0 cooperates,
1 defects. A memory-one policy is 5 logits of the probability to cooperate in each state.
"""

from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
import torch as th
from gymnasium import spaces
from torch.nn import functional as F

from sb3_metarl.common.infos import RowInfos
from sb3_metarl.tasks.task_env import SteppedAtOnce

#: (r1, r2) per (action of player 1, action of player 2): mutual cooperation (-1, -1), mutual defection (-2, -2)
PAYOFFS = np.array([[[-1.0, -1.0], [-3.0, 0.0]], [[0.0, -3.0], [-2.0, -2.0]]], dtype=np.float32)
#: a state index seen by the other player (CD and DC swap)
SWAPPED_STATE = np.array([0, 1, 3, 2, 4])


def next_state(own_action: Any, other_action: Any) -> Any:
    """:return: the state after an outcome, seen by the player whose action is ``own_action`` (arrays or ints)"""
    return 1 + 2 * own_action + other_action


def ipd_exact_value(
    theta1: th.Tensor, theta2: th.Tensor, gamma: float, horizon: int | None = None
) -> tuple[th.Tensor, th.Tensor]:
    """
    The discounted return ``sum_t gamma^t r_t`` (t from 0) of each player when two memory-one policies play:
    ``V = d0 (I - gamma P)^-1 r`` over the four outcomes (Foerster et al. 2018, LOLA's exact value),
    differentiable in both parameter vectors.

    :param theta1: player 1's 5 logits of cooperating at the start and after CC, CD, DC, DD (its action first);
        leading batch dimensions allowed
    :param theta2: player 2's, as seen by player 2 (its own action first)
    :param gamma: discount factor in [0, 1)
    :param horizon: number of rounds; None: infinitely many
    :return: (V1, V2)
    """
    p1 = th.sigmoid(theta1)
    p2 = th.sigmoid(theta2)[..., SWAPPED_STATE.tolist()]  # in player 1's state order

    def outcomes(p: th.Tensor, q: th.Tensor) -> th.Tensor:  # P(CC), P(CD), P(DC), P(DD)
        return th.stack([p * q, p * (1 - q), (1 - p) * q, (1 - p) * (1 - q)], dim=-1)

    start = outcomes(p1[..., 0], p2[..., 0])  # (..., 4)
    transition = outcomes(p1[..., 1:], p2[..., 1:])  # (..., 4 from, 4 to)
    rewards = th.as_tensor(PAYOFFS.reshape(4, 2), dtype=start.dtype, device=start.device)  # (4 outcomes, 2 players)
    eye = th.eye(4, dtype=start.dtype, device=start.device)
    discounted = gamma * transition
    values = th.linalg.solve(eye - discounted, rewards.expand(*transition.shape[:-2], 4, 2))  # sum_t (gamma P)^t r
    if horizon is not None:  # sum_{t < horizon} (gamma P)^t r = (I - (gamma P)^horizon) (I - gamma P)^-1 r
        values = values - th.linalg.matrix_power(discounted, horizon) @ values
    total = (start.unsqueeze(-2) @ values).squeeze(-2)
    return total[..., 0], total[..., 1]


class Games:
    """
    A batch of sampled games: player 1's view of the states and both players' actions, (E, T) each.

    :param states: the state before each round, seen by player 1
    :param actions: (E, T, 2) player 1's and player 2's actions
    """

    def __init__(self, states: th.Tensor, actions: th.Tensor, behaviour_log_probs: th.Tensor | None = None):
        self.states = states
        self.actions = actions
        payoffs = th.as_tensor(PAYOFFS)
        self.rewards = payoffs[actions[..., 0], actions[..., 1]]  # (E, T, 2)
        #: (E, T) the joint log-likelihood of both players' actions under the policies that played them (None: unknown)
        self.behaviour_log_probs = behaviour_log_probs

    def __len__(self) -> int:
        return self.states.shape[0]

    @staticmethod
    def concatenate(games: "list[Games]") -> "Games":
        """:return: the games of every batch in order (behaviour log-likelihoods kept if every batch has them)"""
        behaviour = [batch.behaviour_log_probs for batch in games]
        return Games(
            th.cat([batch.states for batch in games]),
            th.cat([batch.actions for batch in games]),
            None if any(log_probs is None for log_probs in behaviour) else th.cat(behaviour),
        )

    def last(self, n_games: int) -> "Games":
        """:return: the ``n_games`` most recent games (all if fewer)"""
        behaviour = self.behaviour_log_probs
        return Games(self.states[-n_games:], self.actions[-n_games:], None if behaviour is None else behaviour[-n_games:])

    def states_of(self, player: int) -> th.Tensor:
        """:return: the states seen by ``player`` (0 or 1)"""
        return self.states if player == 0 else th.as_tensor(SWAPPED_STATE)[self.states]

    def log_prob(self, player: int, theta: th.Tensor) -> th.Tensor:
        """:return: log-likelihoods (E, T) of ``player``'s actions under logits ``theta`` (graph-carrying)"""
        logits = theta[self.states_of(player)]
        return F.logsigmoid(th.where(self.actions[..., player] == 0, logits, -logits))


def play(theta1: th.Tensor, theta2: th.Tensor, n_games: int, n_rounds: int, generator: th.Generator) -> Games:
    """
    :return: ``n_games`` games of ``n_rounds`` rounds of two memory-one policies (no graph), with the joint
        log-likelihood of their actions under these policies (for later off-policy use)
    """
    swapped = th.as_tensor(SWAPPED_STATE)
    with th.no_grad():
        cooperate1, cooperate2 = th.sigmoid(theta1.detach()), th.sigmoid(theta2.detach())
        state = th.zeros(n_games, dtype=th.long)
        states, actions = [], []
        for _ in range(n_rounds):
            draws = th.rand((n_games, 2), generator=generator)
            action = th.stack([draws[:, 0] >= cooperate1[state], draws[:, 1] >= cooperate2[swapped[state]]], dim=1).long()
            states.append(state)
            actions.append(action)
            state = next_state(action[:, 0], action[:, 1])
        games = Games(th.stack(states, dim=1), th.stack(actions, dim=1))
        games.behaviour_log_probs = games.log_prob(0, theta1.detach()) + games.log_prob(1, theta2.detach())
    return games


class IteratedPrisonersDilemmaEnv(gym.Env):
    """
    Both players' moves in one Gymnasium env (``sb3_metarl/IPD-v0``, 100 rounds): the action holds
    player 1's and player 2's (0 cooperate, 1 defect); the observation is the memory-one state seen by
    player 1 (``info["other_observation"]`` is player 2's); the reward is player 1's and
    ``info["rewards"]`` holds both.
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": []}

    def __init__(self) -> None:
        self.observation_space = spaces.Discrete(5)
        self.action_space = spaces.MultiDiscrete([2, 2])
        self.state = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[int, dict]:
        super().reset(seed=seed)
        self.state = 0
        return self.state, {"other_observation": 0}

    def step(self, action: np.ndarray) -> tuple[int, float, bool, bool, dict]:
        own, other = int(action[0]), int(action[1])
        rewards = PAYOFFS[own, other]
        self.state = int(next_state(own, other))
        info = {"rewards": rewards.copy(), "other_observation": int(SWAPPED_STATE[self.state])}
        return self.state, float(rewards[0]), False, False, info


class BatchedIPD(SteppedAtOnce):
    """
    Sub-envs of the iterated prisoner's dilemma stepped as arrays: the payoffs and next states of all stepped rows in
    a few numpy operations (a state depends only on the round's two actions), each env's ``state`` kept as its own step
    leaves it, and each row's info (both rewards, player 2's observation) built when it is read.

    :param envs: the unwrapped sub-envs (all ``IteratedPrisonersDilemmaEnv``)
    :param num_threads: (the MuJoCo twins' argument; unused)
    :param compiled: (the MuJoCo twins' argument; unused)
    """

    family = IteratedPrisonersDilemmaEnv



    def step(self, indices: np.ndarray, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, RowInfos]:
        """
        Step the sub-envs ``indices`` with ``actions`` (one row of both players' moves each), as ``env.step`` would.

        :return: observations (n, 1), player 1's rewards (n,) float64, terminated (n,) bool (never), infos
        """
        rows = np.asarray(indices).tolist()
        moves = np.asarray(actions).reshape(len(rows), -1)
        if moves.shape[1] != 2:
            raise ValueError(
                f"actions: expected both players' moves per stepped sub-env, shape ({len(rows)}, 2), got {np.shape(actions)}."
            )
        own, other = moves[:, 0].astype(np.int64), moves[:, 1].astype(np.int64)
        payoffs = PAYOFFS[own, other]  # (n, 2) float32
        states = next_state(own, other)
        for row, state in zip(rows, states.tolist()):
            self.envs[row].state = state

        def info(k: int) -> dict[str, Any]:
            return {"rewards": payoffs[k].copy(), "other_observation": int(SWAPPED_STATE[states[k]])}

        return states[:, None], payoffs[:, 0].astype(np.float64), np.zeros(len(rows), dtype=bool), RowInfos(len(rows), info)
