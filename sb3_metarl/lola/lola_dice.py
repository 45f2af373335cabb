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

import inspect
import io
import pathlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.save_util import load_from_zip_file, save_to_zip_file
from stable_baselines3.common.type_aliases import MaybeCallback
from stable_baselines3.common.utils import configure_logger

from sb3_metarl.common.baselines import Baseline
from sb3_metarl.common.buffers import EpisodeBatch
from sb3_metarl.common.functional import inner_update
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
    :param verbose: 0 no output, 1 the ``train/`` logs every ``log_interval`` updates
    :param tensorboard_log: the log location for tensorboard (if None, no logging)
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
        verbose: int = 0,
        tensorboard_log: str | None = None,
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
        #: rounds of the IPD counted so far (SB3's timesteps; ``timesteps_per_update`` per update)
        self.num_timesteps = 0
        self.outer_lr, self.value_lr, self.seed = outer_lr, value_lr, seed
        self.verbose, self.tensorboard_log = verbose, tensorboard_log
        #: SB3's logger, configured by ``learn``
        self.logger: Logger | None = None
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
                derivative = None
            else:
                gradient, derivative = self._off_policy_inner_gradient(other, pair, theta_other, objective)
            stepped = inner_update({"theta": theta_other}, {"theta": gradient}, self.inner_lr, derivative=derivative)
            theta_other = stepped["theta"]
        return theta_other

    def remember(self, games: Games) -> None:
        """Append ``games`` to the off-policy buffer, dropping the oldest beyond ``buffer_size``."""
        stored = games if self.replay_games is None else Games.concatenate([self.replay_games, games])
        self.replay_games = stored.last(self.buffer_size)

    def _off_policy_inner_gradient(
        self, other: int, pair: tuple[th.Tensor, th.Tensor], theta_other: th.Tensor, on_policy: th.Tensor
    ) -> tuple[th.Tensor, dict[str, th.Tensor] | None]:
        """
        :return: ``other``'s inner gradient with its value from the buffer or the fresh games (``off_policy_value``),
            and where its derivatives come from the other source (``off_policy_hessian``), the gradient that gives
            them (``inner_update``'s ``derivative``: ``stop(g_value) + g_hess - stop(g_hess)``), else None
        """
        assert self.replay_games is not None
        off_policy = self.surrogate(other, self.replay_games, *pair, off_policy=True)
        value_source = off_policy if self.off_policy_value else on_policy
        hessian_source = off_policy if self.off_policy_hessian else on_policy
        (hessian_gradient,) = th.autograd.grad(hessian_source, theta_other, create_graph=True)
        if value_source is hessian_source:
            return hessian_gradient, None
        (value_gradient,) = th.autograd.grad(value_source, theta_other, retain_graph=True)
        return value_gradient, {"theta": hessian_gradient}

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

    @property
    def timesteps_per_update(self) -> int:
        """
        Env steps (rounds of the IPD, SB3's timesteps) one update counts: both players' outer games and, with
        opponent shaping, the games of each virtual inner step. A piece computed exactly counts the games its
        sampled counterpart plays, so a budget is the same number of updates in every configuration.
        """
        games = self.batch_size + (self.lookahead_steps * self.inner_batch_size if self.opponent_shaping else 0)
        return 2 * games * self.rollout_length

    def get_env(self) -> None:
        """:return: None: the game is played in closed form (no VecEnv; SB3 callbacks read this)"""
        return None

    def learn(
        self,
        total_timesteps: int,
        callback: MaybeCallback | Callable[["LOLADiCE", dict[str, float]], Any] = None,
        log_interval: int = 100,
        tb_log_name: str = "LOLADiCE",
        reset_num_timesteps: bool = True,
    ) -> "LOLADiCE":
        """
        Update both players until ``total_timesteps`` rounds were counted (``timesteps_per_update`` per update).

        :param total_timesteps: rounds of the IPD to learn from; at least one update's
        :param callback: SB3 callback(s) (``on_step`` after each update, with ``record`` in ``locals``; e.g. a
            ``CheckpointCallback``), or a function of the learner and the update's record (returning False stops)
        :param log_interval: updates between log dumps (``train/`` keys: each player's average reward per round)
        :param tb_log_name: the name of the run for TensorBoard logging
        :param reset_num_timesteps: count from zero (False: continue a loaded learner's count)
        :return: self
        """
        if not isinstance(total_timesteps, (int, np.integer)) or total_timesteps < self.timesteps_per_update:
            raise ValueError(
                f"total_timesteps: counts rounds of the IPD (SB3's timesteps; since 0.2) and must cover at least one "
                f"update ({self.timesteps_per_update} rounds), got {total_timesteps!r}; for N updates pass "
                "N * learner.timesteps_per_update."
            )
        if reset_num_timesteps or self.logger is None:
            self.logger = configure_logger(self.verbose, self.tensorboard_log, tb_log_name, reset_num_timesteps)
        if reset_num_timesteps:
            self.num_timesteps = 0
        total_timesteps += 0 if reset_num_timesteps else self.num_timesteps
        if not isinstance(callback, BaseCallback) and callable(callback):
            callback = _RecordCallback(callback)
        callback = CallbackList(callback) if isinstance(callback, list) else callback or CallbackList([])
        callback.init_callback(self)  # type: ignore[arg-type]
        callback.on_training_start(locals(), globals())
        while self.num_timesteps < total_timesteps:
            record = self.step()
            self.num_timesteps += self.timesteps_per_update
            for key, value in record.items():
                if key != "update":
                    self.logger.record(f"train/{key}", value)
            self.logger.record("train/n_updates", self.n_updates, exclude="tensorboard")
            if log_interval and self.n_updates % log_interval == 0:
                self.logger.dump(step=self.num_timesteps)
            callback.update_locals(locals())
            if not callback.on_step():
                break
        callback.on_training_end()
        return self

    def save(self, path: str | pathlib.Path | io.BufferedIOBase) -> None:
        """
        Save the learner in SB3's zip format with everything a resumed run needs to continue exactly: both players'
        logits and baselines, their Adam states, the games' random stream, the off-policy buffer and the counters.

        :param path: where to save (".zip" is added to a path without it)
        """
        data = {name: getattr(self, name) for name in _arguments()}
        data |= {"n_updates": self.n_updates, "num_timesteps": self.num_timesteps, "history": self.history}
        data |= {"replay_games": self.replay_games}
        params = {f"theta_{i}": {"theta": theta.detach()} for i, theta in enumerate(self.thetas)}
        params |= {f"values_{i}": {"values": values.detach()} for i, values in enumerate(self.values)}
        params |= {f"theta_optimizer_{i}": opt.state_dict() for i, opt in enumerate(self.theta_optimizers)}
        params |= {f"value_optimizer_{i}": opt.state_dict() for i, opt in enumerate(self.value_optimizers)}
        params["generator"] = {"state": self.generator.get_state()}
        save_to_zip_file(path, data=data, params=params)

    @classmethod
    def load(cls, path: str | pathlib.Path | io.BufferedIOBase) -> "LOLADiCE":
        """
        :param path: a zip written by :meth:`save`
        :return: the learner as saved: ``learn(..., reset_num_timesteps=False)`` continues the saved run exactly
        """
        data, params, _ = load_from_zip_file(path, device="cpu")
        if data is None or "off_policy_hessian" not in data:
            raise ValueError(f"path: {path!r} does not hold a LOLADiCE learner.")
        learner = cls(**{name: data[name] for name in _arguments() if name in data})
        learner.n_updates, learner.num_timesteps, learner.history = data["n_updates"], data["num_timesteps"], data["history"]
        learner.replay_games = data["replay_games"]
        with th.no_grad():
            for i in range(2):
                learner.thetas[i].copy_(params[f"theta_{i}"]["theta"])
                learner.values[i].copy_(params[f"values_{i}"]["values"])
                learner.theta_optimizers[i].load_state_dict(params[f"theta_optimizer_{i}"])
                learner.value_optimizers[i].load_state_dict(params[f"value_optimizer_{i}"])
        learner.generator.set_state(params["generator"]["state"])
        return learner

    def cooperation_probabilities(self) -> np.ndarray:
        """:return: (2, 5) each player's probability to cooperate at the start and after CC, CD, DC, DD"""
        return th.sigmoid(th.stack([theta.detach() for theta in self.thetas])).numpy()


def _arguments() -> list[str]:
    """:return: the names of ``LOLADiCE``'s arguments (its attributes of the same names are saved; ``load`` passes them)"""
    return list(inspect.signature(LOLADiCE.__init__).parameters)[1:]


class _RecordCallback(BaseCallback):
    """A function of the learner and each update's record, as an SB3 callback (returning False stops)."""

    def __init__(self, function: Callable[[LOLADiCE, dict[str, float]], Any]):
        super().__init__()
        self.function = function

    def _on_step(self) -> bool:
        return self.function(self.model, self.locals["record"]) is not False
