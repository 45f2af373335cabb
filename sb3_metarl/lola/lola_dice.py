"""
Opponent shaping: LOLA-DiCE (Foerster et al. 2018) on the iterated prisoner's dilemma, the second setting of
Liu et al. (2022, Sec. 5.2) where a meta-gradient is estimated.

Each player differentiates its return through a virtual inner step of the other player's parameters:
``theta_j' = theta_j + eta_in grad_j S_j(theta_i, theta_j)``, then
``theta_i += eta_out grad_i O_i(theta_i, theta_j'(theta_i))``.
The surrogates S and O come from the library's gradient modes (DiCE by default: its magic box over both
players' log-likelihoods makes the inner step's derivative in theta_i unbiased) on sampled games, or from the
exact value (``ipd_exact_value``, "LOLA-Exact") for either piece.

Off-policy DiCE (Liu et al. 2022, Sec. 5.2, Fig. 3 (d)): the virtual inner step may be estimated on a buffer of
recent games, each weighed by its importance weight (DiCE's magic box taken against the log-likelihoods of the
policies that played it), which enlarges the inner sample and so lowers the compositional bias. With the
stop-gradient decomposition the value of the inner step and its derivative (the Hessian term) each come from the
buffer (off) or from the fresh games alone (on).
"""

from collections.abc import Callable
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces

from sb3_metarl.common.baselines import Baseline
from sb3_metarl.common.buffers import EpisodeBatch
from sb3_metarl.gradient_modes import GradientMode, make_gradient_mode
from sb3_metarl.tasks.ipd import Games, ipd_exact_value, play

__all__ = ["LOLADiCE", "ipd_exact_value"]

ESTIMATES = ("sampled", "exact")


class StateValueTable(Baseline):
    """
    A baseline read from a table of state values (one per memory-one state), learned by its owner rather than
    fitted on the batch.

    :param values: the table (5,)
    """

    def __init__(self, values: th.Tensor):
        self.values = values

    def fit_predict(self, features: th.Tensor, returns: th.Tensor, masks: th.Tensor) -> th.Tensor:
        return (features @ self.values.detach().to(features.dtype)) * masks  # features: one-hot states


class LOLADiCE:
    """
    Two memory-one players on the iterated prisoner's dilemma, each shaping the other's learning step
    (LOLA) with meta-gradients estimated by a gradient mode (DiCE by default) or computed exactly.

    :param batch_size: games per sampled outer objective (128 in the paper; 1024 cooperates)
    :param inner_batch_size: games per sampled virtual inner step (default ``batch_size``)
    :param rollout_length: rounds per game
    :param gamma: discount factor
    :param inner_lr: the virtual inner step's size
    :param outer_lr: Adam's learning rate on each player's logits
    :param value_lr: Adam's learning rate on each player's state-value baseline
    :param lookahead_steps: virtual inner steps of the opponent
    :param inner: "sampled" (the gradient mode on sampled games) or "exact" (the gradient of the exact value of the
        ``rollout_length``-round game: the sampled surrogate's expectation)
    :param outer: "sampled" or "exact", the same for the outer objective
    :param opponent_shaping: False: naive learners (no lookahead; each ascends its own return)
    :param gradient_mode: the surrogate of sampled pieces (a name of ``GRADIENT_MODES`` or an instance)
    :param buffer_size: games kept for off-policy inner steps (the most recent, the fresh ones included; 1024 in the
        paper); 0: none
    :param off_policy_value: the value of the inner step (its gradient, whose error is the compositional bias) is
        estimated on the buffer by off-policy DiCE; else on the fresh games
    :param off_policy_hessian: the inner step's derivative in the shaping player's parameters (the Hessian term)
        is estimated on the buffer; else on the fresh games
    :param seed: seed of the games' random stream
    """

    def __init__(
        self,
        batch_size: int = 128,
        inner_batch_size: int | None = None,
        rollout_length: int = 100,
        gamma: float = 0.96,
        inner_lr: float = 0.3,
        outer_lr: float = 0.1,
        value_lr: float = 0.1,
        lookahead_steps: int = 1,
        inner: str = "sampled",
        outer: str = "sampled",
        opponent_shaping: bool = True,
        gradient_mode: str | GradientMode = "dice",
        buffer_size: int = 0,
        off_policy_value: bool = False,
        off_policy_hessian: bool = False,
        seed: int = 0,
    ):
        for name, value in (("inner", inner), ("outer", outer)):
            if value not in ESTIMATES:
                raise ValueError(f"{name}: must be one of {ESTIMATES}, got {value!r}.")
        for name, value in (("batch_size", batch_size), ("rollout_length", rollout_length)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name}: must be an integer >= 1, got {value!r}.")
        if not 0 <= gamma < 1:
            raise ValueError(f"gamma: must be in [0, 1), got {gamma!r}.")
        if not (isinstance(buffer_size, int) and buffer_size >= 0):
            raise ValueError(f"buffer_size: must be an integer >= 0, got {buffer_size!r}.")
        if (off_policy_value or off_policy_hessian) and (inner == "exact" or buffer_size < (inner_batch_size or batch_size)):
            raise ValueError(
                "off_policy_value / off_policy_hessian: need a sampled inner step (inner='sampled') and a buffer of at "
                f"least inner_batch_size games (buffer_size={buffer_size!r}); e.g. buffer_size=1024 as in the paper."
            )
        self.batch_size = batch_size
        self.inner_batch_size = inner_batch_size or batch_size
        self.rollout_length = rollout_length
        self.gamma = gamma
        self.inner_lr = inner_lr
        self.lookahead_steps = lookahead_steps
        self.inner, self.outer = inner, outer
        self.opponent_shaping = opponent_shaping
        self.gradient_mode = make_gradient_mode(gradient_mode)
        self.buffer_size = buffer_size
        self.off_policy_value, self.off_policy_hessian = bool(off_policy_value), bool(off_policy_hessian)
        #: the most recent games played for virtual inner steps, with the log-likelihoods of the policies that played them
        self.replay_games: Games | None = None
        self.generator = th.Generator().manual_seed(seed)
        #: each player's logits of cooperating at the start and after CC, CD, DC, DD (own action first)
        self.thetas = [th.zeros(5, requires_grad=True) for _ in range(2)]
        #: each player's state-value baseline
        self.values = [th.zeros(5, requires_grad=True) for _ in range(2)]
        self.theta_optimizers = [th.optim.Adam([theta], lr=outer_lr) for theta in self.thetas]
        self.value_optimizers = [th.optim.Adam([values], lr=value_lr) for values in self.values]
        self.n_updates = 0
        #: one record per update: the exact average reward per round of each player ((1 - gamma) V), sampled means
        self.history: list[dict[str, float]] = []

    # ------------------------------------------------------------------ objectives

    def surrogate(
        self, player: int, games: Games, theta1: th.Tensor, theta2: th.Tensor, off_policy: bool = False
    ) -> th.Tensor:
        """
        The gradient mode's surrogate of ``player``'s discounted return on ``games``, with the magic box over both
        players' log-likelihoods.

        :param off_policy: the games were played by other policies (``games.behaviour_log_probs``): the boxes are
            taken against those log-likelihoods, so each term is weighed by its importance weight (off-policy DiCE);
            else the games were played with the parameters' current values
        :return: a scalar whose gradient (and, for DiCE, higher derivatives) in both logits estimates the return's
        """
        joint = games.log_prob(0, theta1) + games.log_prob(1, theta2)
        behaviour = games.behaviour_log_probs if off_policy else joint.detach()
        if behaviour is None:
            raise ValueError("off_policy: the games carry no behaviour log-likelihoods (play them with tasks.ipd.play).")
        batch = EpisodeBatch(
            observations=games.states_of(player).unsqueeze(0).unsqueeze(-1),
            actions=games.actions.unsqueeze(0),
            rewards=games.rewards[..., player].unsqueeze(0),
            masks=th.ones(1, *games.states.shape),
            log_probs=behaviour.unsqueeze(0),
        ).compute_weights(spaces.Discrete(5), self.gamma, 1.0, StateValueTable(self.values[player]))
        return self.gradient_mode.inner_surrogate(joint.unsqueeze(0), batch)[0]

    def objective(
        self, player: int, theta1: th.Tensor, theta2: th.Tensor, estimate: str, n_games: int
    ) -> tuple[th.Tensor, Games | None]:
        """:return: ``player``'s return, exact or estimated on fresh games, and the games (None if exact)"""
        if estimate == "exact":
            return ipd_exact_value(theta1, theta2, self.gamma, self.rollout_length)[player], None
        games = play(theta1, theta2, n_games, self.rollout_length, self.generator)
        return self.surrogate(player, games, theta1, theta2), games

    def lookahead(self, player: int) -> th.Tensor:
        """
        :return: the opponent's parameters after its virtual inner steps, differentiable in ``player``'s
            (the opponent's current parameters if ``opponent_shaping`` is off)
        """
        other = 1 - player
        own, theta_other = self.thetas[player], self.thetas[other].detach().clone().requires_grad_(True)
        if not self.opponent_shaping:
            return theta_other
        for _ in range(self.lookahead_steps):
            pair = (own, theta_other) if player == 0 else (theta_other, own)
            objective, games = self.objective(other, *pair, self.inner, self.inner_batch_size)
            if games is not None and self.buffer_size > 0:
                self.remember(games)
            if not (self.off_policy_value or self.off_policy_hessian):
                (gradient,) = th.autograd.grad(objective, theta_other, create_graph=True)
            else:
                gradient = self._off_policy_inner_gradient(other, pair, theta_other, objective)
            theta_other = theta_other + self.inner_lr * gradient
        return theta_other

    def remember(self, games: Games) -> None:
        """Append ``games`` to the off-policy buffer, dropping the oldest beyond ``buffer_size``."""
        stored = games if self.replay_games is None else Games.concatenate([self.replay_games, games])
        self.replay_games = stored.last(self.buffer_size)

    def _off_policy_inner_gradient(
        self, other: int, pair: tuple[th.Tensor, th.Tensor], theta_other: th.Tensor, on_policy: th.Tensor
    ) -> th.Tensor:
        """
        :return: ``other``'s inner gradient with its value from the buffer or the fresh games (``off_policy_value``)
            and its derivatives from one or the other (``off_policy_hessian``): ``stop(g_value) + g_hess - stop(g_hess)``
        """
        assert self.replay_games is not None
        off_policy = self.surrogate(other, self.replay_games, *pair, off_policy=True)
        value_source = off_policy if self.off_policy_value else on_policy
        hessian_source = off_policy if self.off_policy_hessian else on_policy
        (hessian_gradient,) = th.autograd.grad(hessian_source, theta_other, create_graph=True)
        if value_source is hessian_source:
            return hessian_gradient
        (value_gradient,) = th.autograd.grad(value_source, theta_other, retain_graph=True)
        return value_gradient + hessian_gradient - hessian_gradient.detach()

    # ------------------------------------------------------------------ training

    def step(self) -> dict[str, float]:
        """One simultaneous update of both players (each against the other's current parameters); :return: its record"""
        losses, sampled = [], []
        for player in range(2):
            other_theta = self.lookahead(player)
            pair = (self.thetas[0], other_theta) if player == 0 else (other_theta, self.thetas[1])
            objective, games = self.objective(player, *pair, self.outer, self.batch_size)
            losses.append(-objective)
            sampled.append(games)
        grads = [th.autograd.grad(loss, self.thetas[player])[0] for player, loss in enumerate(losses)]
        for player, (grad, games) in enumerate(zip(grads, sampled)):
            self.theta_optimizers[player].zero_grad()
            self.thetas[player].grad = grad
            self.theta_optimizers[player].step()
            if games is not None:
                self._fit_values(player, games)
        self.n_updates += 1
        record = {"update": float(self.n_updates)}
        with th.no_grad():
            exact = ipd_exact_value(self.thetas[0], self.thetas[1], self.gamma)
        for player in range(2):
            record[f"average_reward_{player + 1}"] = (1 - self.gamma) * exact[player].item()
            if sampled[player] is not None:
                record[f"sampled_reward_{player + 1}"] = sampled[player].rewards[..., player].mean().item()
        self.history.append(record)
        return record

    def _fit_values(self, player: int, games: Games) -> None:
        # the baseline regresses the discounted return-to-go of each state (any state function keeps DiCE unbiased)
        rewards = games.rewards[..., player]
        discounts = self.gamma ** th.arange(rewards.shape[1], dtype=rewards.dtype)
        to_go = (rewards * discounts).flip(1).cumsum(1).flip(1) / discounts
        loss = (self.values[player][games.states_of(player)] - to_go).pow(2).mean()
        self.value_optimizers[player].zero_grad()
        loss.backward()
        self.value_optimizers[player].step()

    def learn(self, n_updates: int, callback: Callable[["LOLADiCE", dict[str, float]], Any] | None = None) -> "LOLADiCE":
        """
        :param n_updates: simultaneous updates of both players
        :param callback: called after each update with the learner and its record; returning False stops
        :return: self
        """
        for _ in range(n_updates):
            record = self.step()
            if callback is not None and callback(self, record) is False:
                break
        return self

    def cooperation_probabilities(self) -> np.ndarray:
        """:return: (2, 5) each player's probability to cooperate at the start and after CC, CD, DC, DD"""
        return th.sigmoid(th.stack([theta.detach() for theta in self.thetas])).numpy()
