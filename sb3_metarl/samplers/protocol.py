"""
The episode-sampler contract: what a backend is given and returns (``EpisodeSampler``, with the noise seeds and the
step callback in ``sample``'s signature), and what the collection loop drives (a ``Stepper``, an ``OverlappingStepper``,
a ``GroupActor``).
"""

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.policies import ActorCriticPolicy

from sb3_metarl.common.buffers import EpisodeBatch
from sb3_metarl.common.functional import Params

#: a lock-step's outcome per stepped row: the rewards, whether the episode ended (terminated or truncated), the infos
StepResult = tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]


#: (number of valid transitions since the last call, the step's variables) -> continue? (every sampler calls it so)
StepCallback = Callable[[int, dict[str, Any]], bool]


class Stepper(Protocol):
    """How the loop's sub-envs (group-major, ``envs_per_group`` per task) are given tasks, reset and stepped."""

    num_envs: int
    envs_per_group: int
    horizon: int
    observation_space: spaces.Space
    action_space: spaces.Space
    #: the model-wide index of sub-env 0 here (errors name sub-envs by it)
    first_env_index: int

    def set_tasks(self, tasks: Sequence[Any]) -> None:
        """Give the first ``len(tasks) * envs_per_group`` sub-envs their group's task."""

    def reset(self, obs: np.ndarray, active: np.ndarray) -> None:
        """Reset (at least) the sub-envs where ``active`` is True, writing their first observations into ``obs``."""

    def step(self, obs: np.ndarray, rows: np.ndarray, env_actions: np.ndarray, step: int) -> StepResult:
        """
        Step (at least) the sub-envs ``rows`` with their rows of ``env_actions`` (the ``step``-th step of the wave),
        writing their next observations into ``obs[rows]``.

        :return: per row: the rewards, whether the episode ended (terminated or truncated), the infos
        """


class OverlappingStepper(Stepper, Protocol):
    """A stepper whose steps can be started and finished apart, their physics running beside the caller's Python."""

    overlaps_physics: bool

    def start_step(self, rows: np.ndarray, env_actions: np.ndarray) -> Any:
        """Start stepping the sub-envs ``rows`` with their rows of ``env_actions``; :return: the step in flight"""

    def finish_step(self, obs: np.ndarray, pending: Any, step: int) -> StepResult:
        """Finish a started step (the ``step``-th of the wave), writing its rows' next observations into ``obs``."""

    def abandon_step(self, pending: Any) -> None:
        """Wait for a started step whose outcome is not wanted."""


class GroupActor(Protocol):
    """Per-group copies of the policy (``samplers.acting.GroupPolicies``)."""

    policy: ActorCriticPolicy

    def load(self, task_params: Params) -> None:
        """:param task_params: per-group parameters (leading dim: the groups)"""

    def act(
        self, obs: np.ndarray, envs_per_group: int, groups: np.ndarray, generators: list[th.Generator], out: Any = None
    ) -> np.ndarray:
        """:return: one action per sub-env; the rows of ``groups`` sampled, each group with its generator"""


class EpisodeSampler(ABC):
    """
    Samples whole episodes for B tasks with given per-task parameters. A backend returns episodes
    only: the learner recomputes every log-likelihood it differentiates, so no backend is trusted
    for gradients.

    The sub-envs are split into ``n_groups`` groups of ``envs_per_group``, one task per group; E
    episodes per task take ``ceil(E / envs_per_group)`` waves.
    """

    n_groups: int
    envs_per_group: int
    horizon: int

    def attach_policy(self, policy: ActorCriticPolicy) -> None:
        """
        Give the sampler the policy's architecture (a remote backend ships a CPU copy once; the
        parameters come with every ``sample``). Called by the algorithm whenever its policy is (re)built.
        """
        return None

    @abstractmethod
    def sample(
        self,
        tasks: Sequence[Any],
        task_params: Params,
        n_episodes: int,
        noise_seeds: Sequence[int] | None = None,
        step_callback: StepCallback | None = None,
    ) -> EpisodeBatch | None:
        """
        :param tasks: at most ``n_groups`` tasks (spare groups stay idle)
        :param task_params: per-task policy parameters (detached), leading dim ``len(tasks)``
        :param n_episodes: episodes per task
        :param noise_seeds: one action-noise seed per task (see ``GroupPolicies``); None: fresh entropy. The
            algorithm passes seeds drawn from its own stream (and ``step_callback``) when the method accepts them
        :param step_callback: receives the transition counts; False stops sampling
        :return: the episodes (B, E, H, ...) without weights (the algorithm recomputes the log-likelihoods and
            weighs them), or None if ``step_callback`` stopped sampling
        """

    def env_rng_states(self) -> list[dict[str, Any]] | None:
        """
        :return: the sub-envs' random-generator states right after the last ``sample`` (``bit_generator.state``
            per sub-env), read without a further call to any worker; None when the sampler cannot tell (the
            algorithm then reads them from the VecEnv)
        """
        return None

    def close(self) -> None:
        """Release the backend's workers (idempotent)."""
        return None


class _WithoutSeeds(EpisodeSampler):
    """
    A sampler whose ``sample`` takes only ``(tasks, task_params, n_episodes)``, held to the contract: it samples with
    its own randomness (runs do not reproduce) and the caller counts its timesteps per batch.
    """

    def __init__(self, sampler: EpisodeSampler):
        self.sampler = sampler

    def __getattr__(self, name: str) -> Any:
        # n_groups, envs_per_group, horizon and whatever else the user's sampler holds
        return getattr(self.__dict__["sampler"], name)

    def attach_policy(self, policy: ActorCriticPolicy) -> None:
        self.sampler.attach_policy(policy)

    def sample(
        self,
        tasks: Sequence[Any],
        task_params: Params,
        n_episodes: int,
        noise_seeds: Sequence[int] | None = None,
        step_callback: StepCallback | None = None,
    ) -> EpisodeBatch | None:
        return self.sampler.sample(tasks, task_params, n_episodes)

    def env_rng_states(self) -> list[dict[str, Any]] | None:
        return self.sampler.env_rng_states()

    def close(self) -> None:
        self.sampler.close()


def conforming_sampler(sampler: EpisodeSampler) -> EpisodeSampler:
    """
    A user's sampler as the algorithm calls it: ``sample(tasks, task_params, n_episodes, noise_seeds=...,
    step_callback=...)``. Checked once, where the sampler is given, not at every call.

    :return: ``sampler`` when its ``sample`` takes ``noise_seeds`` and ``step_callback`` (or ``**kwargs``); a sampler
        whose ``sample`` takes only ``(tasks, task_params, n_episodes)`` (the minimal protocol: its own randomness, no
        reproducible runs) held to the contract
    :raises ValueError: if ``sample`` takes only one of the two
    """
    parameters = inspect.signature(sampler.sample).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return sampler
    missing = [name for name in ("noise_seeds", "step_callback") if name not in parameters]
    if not missing:
        return sampler
    if len(missing) == 2:
        return _WithoutSeeds(sampler)
    raise ValueError(
        f"sampler: {type(sampler).__name__}.sample does not take {missing[0]}; an EpisodeSampler's sample is "
        "sample(tasks, task_params, n_episodes, noise_seeds=None, step_callback=None) (or, with its own randomness, "
        "sample(tasks, task_params, n_episodes))."
    )
