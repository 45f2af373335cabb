"""Episode storage for B tasks x E episodes on top of SB3's ``RolloutBuffer``."""

from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.preprocessing import preprocess_obs

from sb3_metarl.common.baselines import Baseline
from sb3_metarl.common.returns import generalized_advantages, returns_to_go, step_discounts
from sb3_metarl.common.rows import RowPacking


class TaskRolloutBuffer(RolloutBuffer):
    """
    SB3's ``RolloutBuffer`` with one column per episode: ``buffer_size`` is the horizon H and
    ``n_envs`` is ``n_tasks * n_episodes`` (task-major), so each column holds one whole episode
    from its first step. Steps after an episode ends are masked out (``masks``).

    :param horizon: maximum episode length H
    :param n_tasks: number of tasks B
    :param n_episodes: episodes per task E
    :param observation_space: observation space
    :param action_space: action space
    :param device: device of the tensors returned by ``to_batch``
    """

    def __init__(
        self,
        horizon: int,
        n_tasks: int,
        n_episodes: int,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        device: th.device | str = "auto",
    ):
        self.n_tasks, self.n_episodes = n_tasks, n_episodes
        super().__init__(horizon, observation_space, action_space, device=device, n_envs=n_tasks * n_episodes)

    def reset(self) -> None:
        super().reset()
        self.masks = np.zeros((self.buffer_size, self.n_envs), dtype=np.float32)
        #: per episode, whether ``info["success"]`` was true at some step (None: the env reports no success)
        self.successes: np.ndarray | None = None

    def add_step(
        self,
        step: int,
        columns: np.ndarray,
        obs: np.ndarray,
        actions: np.ndarray,
        rewards: np.ndarray,
        log_probs: np.ndarray,
    ) -> None:
        """
        Store one lock-step transition for a subset of the episodes.

        :param step: time index t within the episodes
        :param columns: episode columns (task-major) receiving the transition
        :param obs: observations ``(len(columns), *obs_shape)``
        :param actions: actions as sampled (unclipped), (len(columns), ...)
        :param rewards: rewards (len(columns),)
        :param log_probs: sampling-time log-likelihoods (len(columns),)
        """
        n = len(columns)
        self.observations[step, columns] = np.asarray(obs).reshape((n, *self.obs_shape))
        self.actions[step, columns] = np.asarray(actions).reshape((n, self.action_dim))
        self.rewards[step, columns] = rewards
        self.log_probs[step, columns] = log_probs
        self.masks[step, columns] = 1.0

    def add_successes(self, columns: np.ndarray, successes: np.ndarray) -> None:
        """
        Record the ``info["success"]`` flags of one lock-step (Meta-World's success signal).

        :param columns: episode columns receiving the transition
        :param successes: their success flags (len(columns),)
        """
        if self.successes is None:
            self.successes = np.zeros(self.n_envs, dtype=np.float32)
        self.successes[columns] = np.maximum(self.successes[columns], np.asarray(successes, dtype=np.float32))

    def _episode_major(self, array: np.ndarray) -> th.Tensor:
        # (H, B*E, ...) -> (B, E, H, ...)
        moved = np.moveaxis(array, 0, 1)
        return self.to_torch(moved.reshape(self.n_tasks, self.n_episodes, *moved.shape[1:]))

    def to_batch(self) -> "EpisodeBatch":
        """:return: the stored episodes as tensors of shape (B, E, H, ...)"""
        actions = self._episode_major(self.actions)
        if isinstance(self.action_space, spaces.Discrete):
            actions = actions.squeeze(-1).long()
        return EpisodeBatch(
            observations=self._episode_major(self.observations),
            actions=actions,
            rewards=self._episode_major(self.rewards),
            masks=self._episode_major(self.masks),
            log_probs=self._episode_major(self.log_probs),
            successes=None
            if self.successes is None
            else th.as_tensor(self.successes.reshape(self.n_tasks, self.n_episodes), device=self.device),
        )


@dataclass
class EpisodeBatch:
    """
    B tasks x E episodes x H steps. The weights (filled by ``compute_weights``) are constants that
    the gradient modes multiply log-likelihoods by; every one includes the step discount gamma^t so
    that the surrogates' gradients estimate the gradient of the discounted return from t = 0.
    """

    observations: th.Tensor
    actions: th.Tensor
    rewards: th.Tensor
    masks: th.Tensor
    #: log-likelihoods under the sampling parameters (B, E, H). The meta-sample replaces the values
    #: stored while acting by the same quantity recomputed on the meta-objective's code path (they
    #: differ by float rounding), so that magic boxes and LVC ratios are exactly 1 at the sampling
    #: parameters and are the samples' importance weights elsewhere (PPO epochs, TRPO line search)
    log_probs: th.Tensor
    #: per episode, 1 if the env reported ``info["success"]`` at some step (B, E); None if it reports none
    successes: th.Tensor | None = None
    #: Psi_t = gamma^t * A_t (A_t: GAE advantage, or return-to-go minus the baseline), (B, E, H)
    advantages: th.Tensor | None = None
    #: gamma^t r_t, (B, E, H)
    discounted_rewards: th.Tensor | None = None
    #: gamma^t b(s_t), the baseline's prediction, (B, E, H)
    discounted_baseline: th.Tensor | None = None
    #: R(tau) = sum_t gamma^t r_t, (B, E)
    discounted_returns: th.Tensor | None = None
    #: the per-task factor the advantages were multiplied by (1 / std with ``normalize_advantage``, else 1), (B,)
    advantage_scale: th.Tensor | None = None
    #: R(tau) minus a per-task constant (the batch mean when a baseline is used), (B, E)
    trajectory_advantages: th.Tensor | None = None
    #: True for episodes sampled in an earlier meta-iteration and reused (their ``log_probs`` are the behaviour
    #: policy's, kept when the batch is evaluated at the sampling parameters), (B, E); None: all fresh
    reused: th.Tensor | None = None

    #: the fields that hold the samples (the rest are weights, computed from them)
    SAMPLE_FIELDS: ClassVar[tuple[str, ...]] = (
        "observations", "actions", "rewards", "masks", "log_probs", "successes", "reused",
    )  # fmt: skip

    def samples(self) -> "EpisodeBatch":
        """:return: the batch without its weights (what a replay buffer keeps)"""
        return EpisodeBatch(**{name: getattr(self, name) for name in self.SAMPLE_FIELDS})

    def select_tasks(self, indices: list[int]) -> "EpisodeBatch":
        """:return: the samples of the tasks ``indices`` (no weights)"""
        fields = {name: getattr(self, name) for name in self.SAMPLE_FIELDS}
        return EpisodeBatch(**{name: None if value is None else value[indices] for name, value in fields.items()})

    def select_episodes(self, columns: th.Tensor) -> "EpisodeBatch":
        """:return: the samples of the episodes ``columns`` (a boolean mask over E) of every task (no weights)"""
        fields = {name: getattr(self, name) for name in self.SAMPLE_FIELDS}
        return EpisodeBatch(**{name: None if value is None else value[:, columns] for name, value in fields.items()})

    @staticmethod
    def stack_tasks(batches: list["EpisodeBatch"]) -> "EpisodeBatch":
        """:return: the samples of ``batches`` (same episode count and horizon) as the tasks of one batch (no weights)"""
        fields = {name: [getattr(batch, name) for batch in batches] for name in EpisodeBatch.SAMPLE_FIELDS}
        return EpisodeBatch(
            **{name: None if any(v is None for v in values) else th.cat(values, dim=0) for name, values in fields.items()}
        )

    @staticmethod
    def concatenate(batches: list["EpisodeBatch"]) -> "EpisodeBatch":
        """:return: the samples of ``batches`` (same tasks and horizon) side by side along the episodes (no weights)"""
        fields: dict[str, th.Tensor | None] = {}
        for name in EpisodeBatch.SAMPLE_FIELDS:
            values = [getattr(batch, name) for batch in batches]
            if name == "reused":
                values = [th.zeros(b.masks.shape[:2], dtype=th.bool, device=b.masks.device) if v is None else v
                          for v, b in zip(values, batches)]  # fmt: skip
            fields[name] = None if any(v is None for v in values) else th.cat(values, dim=1)
        return EpisodeBatch(**fields)

    @property
    def n_tasks(self) -> int:
        return self.masks.shape[0]

    @property
    def n_episodes(self) -> int:
        return self.masks.shape[1]

    @property
    def episode_returns(self) -> th.Tensor:
        """:return: undiscounted returns (B, E)"""
        return self.rewards.sum(-1)

    @property
    def sampling_log_probs(self) -> th.Tensor:
        """:return: the log-likelihoods stored at sampling time (B, E, H), zero where masked"""
        return self.log_probs * self.masks

    @property
    def n_steps(self) -> int:
        return int(self.masks.sum().item())

    def flat_observations(self) -> th.Tensor:
        """:return: observations ``(B, E*H, *obs_shape)``"""
        return self.observations.reshape(self.n_tasks, -1, *self.observations.shape[3:])

    def flat_actions(self) -> th.Tensor:
        """:return: actions (B, E*H, ...)"""
        return self.actions.reshape(self.n_tasks, -1, *self.actions.shape[3:])

    @cached_property
    def row_packing(self) -> RowPacking | None:
        """
        The valid steps of each task packed to the front of its rows (computed once per batch; the samples are never
        changed in place): where episodes end early, the learner's passes over (B, K) rows skip the padding of
        (B, E*H). None where some task has no padding (then every pass runs over the E*H rows as stored).
        """
        return RowPacking.of(self.masks.reshape(self.n_tasks, -1))

    def packed_observations(self) -> th.Tensor:
        """:return: the observations of the packed rows ``(B, K, *obs_shape)`` (see :attr:`row_packing`)"""
        return self.pack_rows(self.flat_observations())

    def packed_actions(self) -> th.Tensor:
        """:return: the actions of the packed rows (B, K, ...)"""
        return self.pack_rows(self.flat_actions())

    def packed_masks(self) -> th.Tensor:
        """:return: 1 for a valid step, 0 for padding, per packed row (B, K)"""
        return self.masks.reshape(self.n_tasks, -1) if self.row_packing is None else self.row_packing.masks

    def pack_rows(self, values: th.Tensor) -> th.Tensor:
        """:return: per-row values (B, E*H, ...) at the packed rows (B, K, ...)"""
        return values if self.row_packing is None else self.row_packing.pack(values)

    def unpack_rows(self, values: th.Tensor) -> th.Tensor:
        """:return: per-row values (B, K) of the packed rows as per-step values (B, E, H), zero at the padding"""
        flat = values * self.packed_masks() if self.row_packing is None else self.row_packing.unpack(values)
        return flat.reshape(self.masks.shape)

    def compute_weights(
        self,
        observation_space: spaces.Space,
        gamma: float,
        gae_lambda: float,
        baseline: Baseline | None,
        normalize_advantage: bool = False,
        discount_from_start: bool = True,
    ) -> "EpisodeBatch":
        """
        Fill the weight tensors. The baseline is fitted per task on this batch.

        :param observation_space: used to turn observations into baseline features
        :param gamma: discount factor
        :param gae_lambda: GAE's lambda (1: return-to-go minus baseline)
        :param baseline: the baseline, or None (then A_t is the return-to-go)
        :param normalize_advantage: standardize A_t and the trajectory advantages per task
        :param discount_from_start: weigh step t's advantage by gamma^t (Psi_t = gamma^t A_t: the gradient of the
            discounted return from t = 0); False: Psi_t = A_t (the papers' implementations' weights)
        :return: self
        """
        go = returns_to_go(self.rewards, self.masks, gamma)
        if baseline is None:
            values = th.zeros_like(go)
        else:
            features = preprocess_obs(self.observations.reshape(-1, *self.observations.shape[3:]), observation_space)
            features = features.float().reshape(*self.masks.shape, -1)
            values = baseline.fit_predict(features, go, self.masks)
        advantages = generalized_advantages(self.rewards, values, self.masks, gamma, gae_lambda)
        returns = go[..., 0]
        trajectory_advantages = returns - returns.mean(dim=1, keepdim=True) if baseline is not None else returns
        self.advantage_scale = th.ones(self.n_tasks, device=self.masks.device)
        if normalize_advantage:
            advantages, self.advantage_scale = _standardize(advantages, self.masks)
            trajectory_advantages, _ = _standardize(trajectory_advantages, th.ones_like(trajectory_advantages))
        discounts = step_discounts(self.masks.shape[-1], gamma, self.masks.device)
        self.advantages = (discounts * advantages if discount_from_start else advantages) * self.masks
        self.discounted_rewards = discounts * self.rewards
        self.discounted_baseline = discounts * values * self.masks
        self.discounted_returns = returns
        self.trajectory_advantages = trajectory_advantages
        return self


def _standardize(values: th.Tensor, masks: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
    """:return: ``values`` standardized per task (dim 0) over the valid entries, and the per-task factor 1 / std (B,)"""
    dims = tuple(range(1, values.dim()))
    count = masks.sum(dim=dims, keepdim=True).clamp(min=1)
    mean = (values * masks).sum(dim=dims, keepdim=True) / count
    var = (((values - mean) * masks) ** 2).sum(dim=dims, keepdim=True) / count
    scale = 1.0 / (var.sqrt() + 1e-8)
    return (values - mean) * scale * masks, scale.reshape(-1)
