"""MetaPolicyGradient: gradient-based meta-RL (the MAML family) as a Stable-Baselines3 algorithm."""

import contextlib
import copy
import hashlib
import importlib.util
import io
import math
import pathlib
import pickle
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar, TypeVar

import gymnasium as gym
import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback, CallbackList, ConvertCallback
from stable_baselines3.common.policies import ActorCriticPolicy, BasePolicy
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, Schedule
from stable_baselines3.common.utils import safe_mean, set_random_seed
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv

from sb3_metarl.adaptation import Adaptation, MetaSample, Weighting, masked_log_prob
from sb3_metarl.common.baselines import Baseline, make_baseline
from sb3_metarl.common.buffers import EpisodeBatch
from sb3_metarl.common.callbacks import MetaProgressBarCallback, reject_unadapted_evaluation
from sb3_metarl.common.files import check_saved_model, replaced_atomically
from sb3_metarl.common.functional import FunctionalPolicy, Params
from sb3_metarl.common.rng import (
    EnvRngState,
    generator_state,
    get_env_rng_states,
    preserved_global_rng,
    restore_generator,
    seed_env_rngs,
    set_env_rng_states,
)
from sb3_metarl.common.threads import ACTING_THREADS, torch_threads
from sb3_metarl.common.vec_env import make_task_env, resolve_vec_env_cls
from sb3_metarl.gradient_modes import GradientMode, make_gradient_mode
from sb3_metarl.meta_optimizers import MetaOptimizer, make_meta_optimizer
from sb3_metarl.meta_pg.arguments import AUTO, check_arguments, check_sample_reuse, check_sampler
from sb3_metarl.meta_pg.evaluation import format_adaptation_table
from sb3_metarl.meta_pg.inner_lr import calibrate_inner_lr
from sb3_metarl.meta_pg.policies import CnnPolicy, MlpPolicy
from sb3_metarl.samplers import EpisodeSampler, StepCallback, VecEnvSampler, draw_noise_seeds, sampler_options
from sb3_metarl.samplers.factory import make_episode_sampler, make_sub_envs
from sb3_metarl.tasks import EnvTaskSampler, TaskSampler

SelfMetaPolicyGradient = TypeVar("SelfMetaPolicyGradient", bound="MetaPolicyGradient")

DICT_OBSERVATION_HINT = (
    "flatten them into a Box with gymnasium.wrappers.FlattenObservation (e.g. env=lambda: "
    "FlattenObservation(gym.make(env_id))) and use 'MlpPolicy'."
)

__all__ = ["MetaPolicyGradient", "MetaSample", "format_adaptation_table", "make_task_env"]

#: the mean KL(pi_theta || pi_theta') of a step along a task's plain policy gradient that ``inner_lr="auto"`` aims at
#: (median over tasks); the modes' own, baselined inner steps move less
AUTO_INNER_KL = 0.5
#: ``inner_lr="auto"`` calibrates on at least this many (task, batch) pairs
AUTO_CALIBRATION_TASKS = 16
#: ``inner_lr="auto"`` clips each task's inner gradient at this multiple of the calibration's median norm
AUTO_INNER_CLIP_FACTOR = 4.0
#: ``inner_lr="auto"`` multiplies the KL-calibrated step by the inner gradient's signal fraction to this power
#: (measured, docs/results/auto_inner_lr_defaults.md: with power 1 a step at N = 10 still made adaptation worse)
AUTO_SIGNAL_POWER = 2.0
#: ``inner_sample_reuse``: batches are kept for the ``REUSE_TASKS_PER_META_BATCH * meta_batch_size`` most recently
#: sampled tasks (a fixed task set of up to that size is kept whole; tasks that never recur cannot fill memory)
REUSE_TASKS_PER_META_BATCH = 10
#: ``inner_sample_reuse``: warn when no meta-batch could reuse anything in this many meta-iterations
REUSE_WARNING_ITERATIONS = 10


def task_key(task: Any) -> str:
    """:return: a key identifying a task by value (the digest of its pickle), for the per-task reuse buffers"""
    return hashlib.sha256(pickle.dumps(task)).hexdigest()


class MetaPolicyGradient(BaseAlgorithm):
    """
    Gradient-based meta-RL (MAML family) for any SB3 actor-critic policy.

    Each meta-iteration samples B tasks, adapts the policy to each task with ``inner_steps``
    policy-gradient steps on N fresh episodes, samples M episodes with the adapted policy, and
    ascends the gradient of the post-adaptation return, differentiated through the adaptation by
    the chosen gradient mode (see ``docs/meta-gradients.md``).

    :param policy: the policy model ("MlpPolicy", "CnnPolicy" or an ``ActorCriticPolicy`` subclass)
    :param env: a registered env id, an env factory (callable) or a VecEnv of task-aware envs
        (``set_task`` on ``env.unwrapped``, episodes with a finite ``max_episode_steps``)
    :param gradient_mode: "sf", "lsf", "lvc", "dice", "loaded_dice", "maml", "fomaml" or a GradientMode
    :param gradient_mode_kwargs: arguments of the named gradient mode (e.g. ``dice_lambda`` for "loaded_dice")
    :param meta_batch_size: tasks per meta-iteration (B)
    :param inner_episodes: episodes per task and inner step (N)
    :param outer_episodes: episodes per task after adaptation (M)
    :param inner_steps: number of inner adaptation steps (zeta)
    :param inner_lr: inner step size (eta)
    :param learning_rate: outer (meta) learning rate, constant or SB3 schedule
    :param meta_optimizer: how the meta-objective updates the policy: "adam" or "sgd" (meta-gradient
        ascent at ``learning_rate``), "trpo" (trust region on the adapted policies' KL; no learning
        rate), "ppo" (ProMP: clipped epochs with Adam at ``learning_rate``), or a MetaOptimizer
    :param meta_optimizer_kwargs: arguments of the named meta-optimizer (e.g. ``max_kl`` for "trpo",
        ``n_epochs``, ``clip_range`` for "ppo")
    :param gamma: discount factor
    :param gae_lambda: GAE lambda of the advantages (1: return-to-go minus baseline)
    :param baseline: None or "linear" (a linear feature baseline fitted per task on each batch), or a Baseline
    :param normalize_advantage: standardize advantages per task (changes the objective; off by default)
    :param task_sampler: the task distribution; default: the env's own ``sample_tasks``
    :param n_envs: sub-envs stepped together, a multiple of ``meta_batch_size``; default B * max(N, M)
    :param vec_env_cls: ``DummyVecEnv`` (default) or ``SubprocVecEnv``, used when ``env`` is an id or a factory
        and ``sampler="vec_env"``
    :param sampler: how episodes are sampled: "vec_env" (default: the sub-envs in this process, callbacks after
        every step), "subproc" (``num_workers`` processes on this machine, each owning many sub-envs), "ray" (Ray
        actors, local or on a cluster), or an ``EpisodeSampler``; "subproc" and "ray" give the same samples as
        "vec_env" for the same seed and call back once per sampled batch
    :param inner_sample_reuse: the first inner step also uses up to this many earlier first inner batches of the
        same task (tasks that recur: fixed task sets), weighted by their importance ratios through the mode's boxes
        (Liu et al. 2022, Sec. 4.4: off-policy samples against the compositional bias); needs a mode that weighs
        samples by likelihood ratios (lsf, lvc, dice, loaded_dice). 0: off
        Batches are kept for the ``10 * meta_batch_size`` most recently sampled tasks (older ones are dropped), and a
        warning says so when no task has recurred in 10 meta-iterations (a continuous task distribution)
    :param reuse_importance_clip: each reused step's likelihood ratio at the current parameters is truncated at
        this value (the level of off-policyness the reuse admits)
    :param sampler_kwargs: arguments of "subproc" / "ray": ``num_workers`` (default: the cores, or the Ray
        cluster's CPUs), ``timeout`` (seconds a living worker may take to answer), ``address`` and
        ``ray_init_kwargs`` (for ``ray.init`` when Ray is not yet initialized)
    :param env_kwargs: keyword arguments for ``gym.make`` when ``env`` is an id
    :param stats_window_size: window for the rollout logging averages
    :param tensorboard_log: the log location for tensorboard (if None, no logging)
    :param policy_kwargs: additional arguments passed to the policy on creation
    :param verbose: 0 no output, 1 info messages (such as training returns), 2 debug
    :param seed: seed for the pseudo random generators
    :param device: device (cpu, cuda, ...) on which the code should be run
    :param _init_setup_model: whether or not to build the network at the creation of the instance
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {"MlpPolicy": MlpPolicy, "CnnPolicy": CnnPolicy}
    policy: ActorCriticPolicy

    def __init__(
        self,
        policy: str | type[ActorCriticPolicy],
        env: GymEnv | str | Callable[[], gym.Env] | None,
        gradient_mode: str | GradientMode = "lsf",
        gradient_mode_kwargs: dict[str, Any] | None = None,
        meta_batch_size: int = 20,
        inner_episodes: int = 20,
        outer_episodes: int = 20,
        inner_steps: int = 1,
        inner_lr: float | str = "auto",
        learning_rate: float | Schedule = 1e-3,
        meta_optimizer: str | MetaOptimizer = "adam",
        meta_optimizer_kwargs: dict[str, Any] | None = None,
        gamma: float = 0.99,
        gae_lambda: float = 1.0,
        baseline: str | Baseline | None = "linear",
        normalize_advantage: bool = False,
        task_sampler: TaskSampler | None = None,
        n_envs: int | None = None,
        vec_env_cls: type[DummyVecEnv | SubprocVecEnv] | str | None = None,
        sampler: str | EpisodeSampler = "vec_env",
        sampler_kwargs: dict[str, Any] | None = None,
        inner_sample_reuse: int = 0,
        reuse_importance_clip: float = 2.0,
        env_kwargs: dict[str, Any] | None = None,
        max_episode_steps: int | None = None,
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: th.device | str = "auto",
        _init_setup_model: bool = True,
    ):
        check_arguments(
            meta_batch_size=meta_batch_size,
            inner_episodes=inner_episodes,
            outer_episodes=outer_episodes,
            inner_steps=inner_steps,
            inner_lr=inner_lr,
            learning_rate=learning_rate,
            gamma=gamma,
            gae_lambda=gae_lambda,
            normalize_advantage=normalize_advantage,
            n_envs=n_envs,
            max_episode_steps=max_episode_steps,
            seed=seed,
            device=device,
        )
        check_sampler(sampler, sampler_kwargs, vec_env_cls)
        self.meta_updater = make_meta_optimizer(meta_optimizer, meta_optimizer_kwargs)
        self.gradient_mode = make_gradient_mode(gradient_mode, gradient_mode_kwargs)
        make_baseline(baseline)  # fail early on an unknown baseline
        if normalize_advantage and not self.gradient_mode.supports_normalized_advantage:
            raise ValueError(
                f"normalize_advantage: mode {self.gradient_mode.name!r} uses raw rewards and cannot standardize them; "
                "use normalize_advantage=False, or 'loaded_dice' with gradient_mode_kwargs=dict(dice_lambda=1) "
                "(DiCE with a baseline)."
            )
        check_sample_reuse(inner_sample_reuse, reuse_importance_clip, self.gradient_mode)
        if n_envs is not None and n_envs % meta_batch_size != 0:
            raise ValueError(f"n_envs: must be a positive multiple of meta_batch_size={meta_batch_size}, got {n_envs}.")

        self.meta_batch_size = int(meta_batch_size)
        self.inner_episodes = int(inner_episodes)
        self.outer_episodes = int(outer_episodes)
        self.inner_steps = int(inner_steps)
        #: the inner step size eta: "auto" until calibrated (see ``resolved_inner_lr``), then a float
        self.inner_lr: float | str = inner_lr if inner_lr == AUTO else float(inner_lr)
        #: each task's inner gradient is clipped to this norm (set by ``inner_lr="auto"``; None: no clipping)
        self.inner_grad_clip: float | None = None
        #: ``inner_lr="auto"``: the measured fraction of the inner gradient's squared norm that is signal at N episodes
        self.inner_signal_fraction: float | None = None
        self.meta_optimizer = meta_optimizer
        self.meta_optimizer_kwargs = meta_optimizer_kwargs
        self.gamma = float(gamma)
        self.gae_lambda = float(gae_lambda)
        self.baseline = baseline
        self.normalize_advantage = normalize_advantage
        self.task_sampler = task_sampler
        self.vec_env_cls = resolve_vec_env_cls(vec_env_cls)
        self.sampler = sampler
        self.sampler_kwargs = sampler_kwargs
        self.inner_sample_reuse = inner_sample_reuse
        self.reuse_importance_clip = float(reuse_importance_clip)
        #: per task (keyed by its pickled value): the first inner batches of earlier meta-iterations, newest last
        self.reusable_inner_batches: dict[str, deque] = {}
        #: meta-iterations in a row whose meta-batch could reuse nothing (see ``REUSE_WARNING_ITERATIONS``)
        self.iterations_without_reuse = 0
        self.env_kwargs = env_kwargs
        self.max_episode_steps = max_episode_steps
        #: the sub-envs' random states read from a saved model, applied when its env is attached
        self._saved_env_rng_states: list[EnvRngState] | None = None
        #: the learner's copy of the sub-envs' random states, as of the last completed sampling phase (or seeding):
        #: what ``save`` writes, so that saving never asks a worker (it may be dead, frozen or closed)
        self._env_rng_states: list[EnvRngState] | None = None
        #: True when the sub-envs' streams could not be put back after an interrupted block: re-applied before sampling
        self._env_streams_stale = False
        #: the run's random streams at the start of the meta-iteration in progress (None between iterations)
        self._iteration_start: dict[str, Any] | None = None
        self.pre_adaptation_returns: deque | None = None
        n_envs = n_envs or self.meta_batch_size * max(self.inner_episodes, self.outer_episodes)

        policy_kwargs = dict(policy_kwargs or {})
        optimizer_class = self.meta_updater.torch_optimizer_class
        if policy_kwargs.setdefault("optimizer_class", optimizer_class) is not optimizer_class:
            raise ValueError(
                f"policy_kwargs: optimizer_class={policy_kwargs['optimizer_class'].__name__} conflicts with "
                f"meta_optimizer={meta_optimizer!r}; set only one of them."
            )
        if optimizer_class is th.optim.Adam:
            policy_kwargs.setdefault("optimizer_kwargs", {"eps": 1e-5})
        if policy_kwargs.get("use_sde", False):
            raise ValueError("policy_kwargs: use_sde=True is not supported (the inner step needs plain Gaussian actions).")
        if task_sampler is not None and not callable(getattr(task_sampler, "sample", None)):
            raise ValueError(
                f"task_sampler: must be a TaskSampler (with sample(n, rng)), got {type(task_sampler).__name__}; for a "
                "fixed list of tasks use sb3_metarl.FixedTaskSampler(tasks)."
            )
        if tensorboard_log is not None and importlib.util.find_spec("tensorboard") is None:
            raise ImportError(
                'tensorboard_log: TensorBoard is not installed; pip install "sb3_metarl[tensorboard]" (or pip install '
                "tensorboard), or leave tensorboard_log=None."
            )
        if policy == "MultiInputPolicy":
            raise ValueError(f"policy: 'MultiInputPolicy' (Dict observations) is not supported; {DICT_OBSERVATION_HINT}")
        #: the registered id of the env, when the model was given one (saved: ``evaluate`` on the command line uses it)
        self.env_id = env if isinstance(env, str) else None
        vec_env = self._make_vec_env(env, n_envs) if env is not None else None
        if vec_env is not None and isinstance(vec_env.observation_space, spaces.Dict):
            vec_env.close()
            raise ValueError(f"env: Dict observation spaces are not supported; {DICT_OBSERVATION_HINT}")

        super().__init__(
            policy=policy,
            env=vec_env,
            learning_rate=learning_rate,
            policy_kwargs=policy_kwargs,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            verbose=verbose,
            device=device,
            seed=seed,
            support_multi_env=True,
            supported_action_spaces=(spaces.Box, spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary),
        )
        if _init_setup_model:
            self._setup_model()

    # ------------------------------------------------------------------ set-up

    def _make_vec_env(
        self, env: GymEnv | str | Callable[[], gym.Env], n_envs: int, sampler: str | EpisodeSampler | None = None
    ) -> VecEnv:
        """:param sampler: the sampler the sub-envs are for (default: the model's)"""
        return make_sub_envs(
            env,
            n_envs,
            self.meta_batch_size,
            self.sampler if sampler is None else sampler,
            self.sampler_kwargs,
            self.vec_env_cls,
            self.env_kwargs,
            self.max_episode_steps,
        )

    def _setup_model(self) -> None:
        self._setup_lr_schedule()
        # a model being loaded already holds its random streams (from the zip): keep them, and leave the
        # caller's global generators alone
        loading = getattr(self, "torch_generator", None) is not None
        if not loading:
            self.set_random_seed(self.seed)
        with preserved_global_rng() if loading else contextlib.nullcontext():
            self.policy = self.policy_class(self.observation_space, self.action_space, self.lr_schedule, **self.policy_kwargs)
        self.policy = self.policy.to(self.device)
        self.functional_policy = FunctionalPolicy(self.policy)
        self.baseline_model = make_baseline(self.baseline)
        if not loading:
            self.task_rng = np.random.default_rng(self.seed)
            #: training's torch random stream: the action noise of its sampling (on the CPU, so the same on every
            #: device) and whatever a meta-optimizer draws (TRPO's conjugate-gradient start)
            self.torch_generator = th.Generator()
            self.torch_generator.manual_seed(int(np.random.SeedSequence(self.seed).generate_state(1, np.uint64)[0] >> 1))
        self._episode_sampler: EpisodeSampler | None = None
        self._task_sampler: TaskSampler | None = None
        if self.env is not None:
            self._attach_env(self.env)

    def set_random_seed(self, seed: int | None = None) -> None:
        """
        SB3's seeding of Python, numpy and torch (for the policy's initialization) and of the action
        space; every sub-env gets its own generator seeded from ``(seed, index)`` right away (SB3's
        ``env.seed`` would reseed them at whatever reset comes next).

        :param seed: the seed; None leaves the generators as they are
        """
        if seed is None:
            return
        set_random_seed(seed, using_cuda=self.device.type == th.device("cuda").type)
        self.action_space.seed(seed)
        if self.env is not None:
            self._env_rng_states = seed_env_rngs(self.env, seed)

    def _attach_env(self, env: VecEnv) -> None:
        self._episode_sampler = make_episode_sampler(
            env, self.meta_batch_size, self.policy, self.sampler, self.max_episode_steps
        )
        if self._saved_env_rng_states is not None and len(self._saved_env_rng_states) == env.num_envs:
            set_env_rng_states(env, self._saved_env_rng_states)
            self._env_rng_states = self._saved_env_rng_states
        elif self.seed is not None:
            self._env_rng_states = seed_env_rngs(env, self.seed)
        else:
            self._env_rng_states = get_env_rng_states(env)  # the workers were just started: ask them once
        self._env_streams_stale = False
        self._saved_env_rng_states = None
        if self.task_sampler is None:
            self._task_sampler = EnvTaskSampler(env)
        else:
            if isinstance(self.task_sampler, EnvTaskSampler) and self.task_sampler.env is None:
                self.task_sampler.env = env  # envs are not saved: a loaded sampler gets the new one
            self._task_sampler = self.task_sampler

    @property
    def episode_sampler(self) -> EpisodeSampler:
        """The episode sampler on the model's env (see ``sampler``); a clear error when the model has no env."""
        if self._episode_sampler is None:
            raise ValueError("env: this model has no environment; pass `env=` to `load` or call `set_env(env)` first.")
        return self._episode_sampler

    def set_env(self, env: GymEnv | str | Callable[[], gym.Env], force_reset: bool = True) -> None:
        """
        :param env: an env id, an env instance (copied), a factory or a VecEnv (with ``n_envs`` sub-envs,
            a multiple of ``meta_batch_size``)
        :param force_reset: reset the env before the next ``learn``
        """
        vec_env = self._make_vec_env(env, self.n_envs)
        if isinstance(env, str):
            self.env_id = env
        super().set_env(vec_env, force_reset=force_reset)
        self._attach_env(vec_env)

    def _excluded_save_params(self) -> list[str]:
        return [
            *super()._excluded_save_params(),
            "functional_policy",
            "_episode_sampler",
            "_task_sampler",
            "_iteration_start",
            "_env_rng_states",
            "_env_streams_stale",
        ]

    @property
    def max_steps_per_iteration(self) -> int:
        """Env steps of one meta-iteration when no episode ends early: B x (inner_steps x N + M) x horizon."""
        episodes = self.inner_steps * self.inner_episodes + self.outer_episodes
        return self.meta_batch_size * episodes * self.episode_sampler.horizon

    @property
    def n_updates(self) -> int:
        """The number of meta-updates applied so far (SB3's ``_n_updates``, logged as ``train/n_updates``)."""
        return self._n_updates

    def _get_torch_save_params(self) -> tuple[list[str], list[str]]:
        # the policy's torch optimizer holds the meta-optimizer's moments (Adam), as in SB3's on-policy algorithms
        return ["policy", "policy.optimizer"], []

    # ------------------------------------------------------------------ random streams, save and load

    def _stream_state(self, include_env: bool = True) -> dict[str, Any]:
        """:return: copies of the run's random streams (the sub-envs' if ``include_env``) and the timestep counter"""
        return {
            "num_timesteps": self.num_timesteps,
            "task_rng": generator_state(self.task_rng),
            "torch_generator": self.torch_generator.get_state(),
            # the learner's copy: never a question to the workers (saving must work whatever they did)
            "env": self._env_rng_states if include_env and self.env is not None else None,
        }

    def _set_stream_state(self, state: dict[str, Any], include_env: bool = True) -> None:
        """:param state: as returned by ``_stream_state``"""
        self.num_timesteps = state["num_timesteps"]
        restore_generator(self.task_rng, state["task_rng"])
        self.torch_generator.set_state(state["torch_generator"])
        if include_env and state["env"] is not None and self.env is not None:
            self._put_env_streams(state["env"])

    def _put_env_streams(self, states: list[EnvRngState]) -> None:
        """Give the sub-envs these random states and keep the learner's copy."""
        set_env_rng_states(self.env, states)
        self._env_rng_states, self._env_streams_stale = states, False

    def _record_env_streams(self, sampler: EpisodeSampler) -> None:
        """After a completed sampling phase on the model's sub-envs: the learner's copy of their random states."""
        if sampler is not self._episode_sampler or self.env is None:
            return
        states = sampler.env_rng_states()
        self._env_rng_states = states if states is not None else get_env_rng_states(self.env)

    @contextlib.contextmanager
    def _env_streams_kept(self) -> Iterator[None]:
        """The sub-envs' random streams are as they were before the block (e.g. across SB3's reset in ``_setup_learn``)."""
        states = self._env_rng_states if self.env is not None else None
        if states is None:
            yield
            return
        try:
            yield
        except BaseException:
            # interrupted (Ctrl-C, a dead worker): the learner's copy is the streams before the block, which is what a
            # save holds; the sub-envs get them back before they sample again
            self._env_rng_states, self._env_streams_stale = states, True
            with contextlib.suppress(Exception):
                self._put_env_streams(states)
            raise
        self._put_env_streams(states)

    def save(
        self,
        path: str | pathlib.Path | io.BufferedIOBase,
        exclude: Iterable[str] | None = None,
        include: Iterable[str] | None = None,
    ) -> None:
        """
        Save the model in SB3's zip format, with everything a resumed run needs to continue exactly:
        the parameters, the policy optimizer's state, the meta-optimizer's state, the counters and every
        random stream (task sampler, action noise, each sub-env's generator). Called during a
        meta-iteration (a ``CheckpointCallback``), it saves the state at the iteration's start: the
        samples in progress are not saved, so the resumed run samples that iteration again, exactly.
        A path is written atomically: a temporary file in the same folder, renamed over ``path`` once
        complete, so a save that fails part-way (a full disk) leaves the previous file as it was. Saving
        never asks the sampler's workers (the sub-envs' streams are the learner's copy).

        :param path: where to save (a path or a file-like object)
        :param exclude: names of attributes not to save, in addition to the default ones
        :param include: names of attributes to save that would otherwise be excluded
        """
        live = self._stream_state(include_env=self._iteration_start is None)
        saved = self._iteration_start if self._iteration_start is not None else live
        self._set_stream_state(saved, include_env=False)
        self._saved_env_rng_states = saved["env"]
        try:
            if isinstance(path, (str, pathlib.Path)):
                with replaced_atomically(path) as temporary:
                    super().save(temporary, exclude=exclude, include=include)
            else:
                super().save(path, exclude=exclude, include=include)
        finally:
            self._set_stream_state(live, include_env=False)
            self._saved_env_rng_states = None

    @classmethod
    def load(  # type: ignore[override]
        cls: type[SelfMetaPolicyGradient],
        path: str | pathlib.Path | io.BufferedIOBase,
        env: GymEnv | str | Callable[[], gym.Env] | None = None,
        device: th.device | str = "auto",
        custom_objects: dict[str, Any] | None = None,
        print_system_info: bool = False,
        force_reset: bool = True,
        **kwargs,
    ) -> SelfMetaPolicyGradient:
        """
        Load a model from a zip file (SB3's format) with its random streams: ``learn(...,
        reset_num_timesteps=False)`` on the loaded model continues the saved run exactly. The caller's
        global random generators are left untouched.

        :param path: path of the saved model
        :param env: the env to run on: an id, an env instance, a factory or a VecEnv (None for prediction only);
            with the saved number of sub-envs, each gets its saved random state
        :param device: device on which the model is loaded
        :param custom_objects: objects replacing saved ones, as in SB3
        :param print_system_info: print the saving and loading systems' info
        :param force_reset: reset the env before the next ``learn``
        :param kwargs: attributes to change on the loaded model
        :return: the loaded model
        :raises FileNotFoundError: if there is no file at ``path`` (nor at ``path`` + ".zip")
        :raises ValueError: if the file holds another algorithm's model
        """
        check_saved_model(path)
        with preserved_global_rng():
            model = super().load(path, None, device, custom_objects, print_system_info, force_reset, **kwargs)
        if env is not None:
            model.set_env(env, force_reset=force_reset)
        return model

    # ------------------------------------------------------------------ sampling

    def _sample_tasks(self, n_tasks: int, rng: np.random.Generator, sampler: TaskSampler | None = None) -> list[Any]:
        """:return: ``n_tasks`` tasks from the sampler, checked (a short or empty list is an error, not a smaller batch)"""
        sampler = sampler or self._task_sampler
        tasks = sampler.sample(n_tasks, rng)
        if tasks is None or len(tasks) != n_tasks:
            got = "None" if tasks is None else f"{len(tasks)}"
            raise ValueError(
                f"task_sampler: {type(sampler).__name__}.sample({n_tasks}, rng) returned {got} tasks; "
                f"it must return a list of exactly {n_tasks} tasks."
            )
        return list(tasks)

    @contextlib.contextmanager
    def _isolated_streams(self, seed: int | None) -> Iterator[th.Generator]:
        """
        Sample outside training's random streams: yields an action-noise generator seeded by ``seed``
        (fresh entropy when None) and puts the sub-envs' generators back afterwards, so that a later
        ``learn`` is exactly what it would have been without this block.
        """
        generator = th.Generator()
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        with self._env_streams_kept():
            if seed is not None and self.env is not None:
                self._env_rng_states = seed_env_rngs(self.env, seed)
            yield generator

    def sample_episodes(
        self,
        tasks: list[Any],
        task_params: Params | None,
        n_episodes: int,
        step_callback: StepCallback | None = None,
        generator: th.Generator | None = None,
        sampler: EpisodeSampler | None = None,
    ) -> EpisodeBatch | None:
        """
        Sample ``n_episodes`` episodes per task with the given per-task parameters, and weigh them.

        :param tasks: at most ``meta_batch_size`` tasks
        :param task_params: per-task parameters (leading dim ``len(tasks)``; detached here); None: the current policy
        :param step_callback: receives the transition counts (after every step or once, as the sampler can)
        :param generator: the action noise's stream (default: training's); one seed per task is drawn from it
        :param sampler: the episode sampler (default: the model's)
        :return: the episodes with their policy-gradient weights, or None if a callback stopped training
        """
        sampler = sampler or self.episode_sampler
        if self._env_streams_stale and sampler is self._episode_sampler and self._env_rng_states is not None:
            self._put_env_streams(self._env_rng_states)
        if task_params is None:
            task_params = self.initial_task_params(len(tasks))
        noise_seeds = draw_noise_seeds(generator or self.torch_generator, len(tasks))
        self.policy.set_training_mode(False)
        params = {n: p.detach() for n, p in task_params.items()}
        options = sampler_options(sampler, noise_seeds, step_callback)
        with torch_threads(ACTING_THREADS):
            batch = sampler.sample(tasks, params, n_episodes, **options)
        if batch is None:
            return None
        self._record_env_streams(sampler)
        if step_callback is not None and "step_callback" not in options:  # a sampler that does not count: per batch
            if not step_callback(int(batch.masks.sum().item()), {}):
                return None
        # the learner's own log-likelihoods, not the backend's: no sampler is trusted for gradients
        with th.no_grad():
            batch.log_probs = masked_log_prob(self.functional_policy, params, batch)
        return self.weighting(batch)

    def initial_task_params(self, n_tasks: int) -> Params:
        """:return: the current parameters, detached, as per-task views (leading dim ``n_tasks``)"""
        return {n: p.detach() for n, p in FunctionalPolicy.expand(self.functional_policy.parameters(), n_tasks).items()}

    @property
    def weighting(self) -> Weighting:
        """How sampled batches get their policy-gradient weights (this model's discount, GAE lambda and baseline)."""
        return Weighting(self.observation_space, self.gamma, self.gae_lambda, self.baseline_model, self.normalize_advantage)

    @property
    def adaptation(self) -> Adaptation:
        """
        The differentiable adaptation of this model's policy (inner step, replay, meta-objective, KL):
        what the meta-optimizers get, and the public way to adapt parameters on a batch
        (``model.adaptation.adapt(params, batch, model.gradient_mode)``). With ``inner_lr="auto"`` the
        first access calibrates the step size (see ``resolved_inner_lr``).
        """
        return Adaptation(self.functional_policy, self.resolved_inner_lr(), self.inner_grad_clip, self.weighting)

    # ------------------------------------------------------------------ the inner step size

    def resolved_inner_lr(self) -> float:
        """
        The inner step size eta. With ``inner_lr="auto"`` it is calibrated once, on the first call (the
        first ``learn``, evaluation or estimate), and then fixed (saved with the model, logged as
        ``train/inner_lr``). On at least ``AUTO_CALIBRATION_TASKS`` (16) tasks, ``inner_episodes``
        episodes each of the initial policy (drawn from streams of their own, so training's samples
        are not changed), it finds per task the eta at which a step along the task's policy gradient
        (returns-to-go minus their mean over the task's episodes, ``reference_direction``: the same
        for every mode, and never degenerate as a fitted baseline on a small batch can be) moves the
        policy by a mean KL(pi_theta || pi_theta') of ``AUTO_INNER_KL`` (0.5; the mode's own inner step,
        with its fitted baseline, moves less) on the batch's states, and takes the median, times the
        square (``AUTO_SIGNAL_POWER``) of the inner gradient's signal fraction at N episodes, measured on a
        second, independent batch of N episodes per task (``inner_lr.signal_fraction``; saved as
        ``inner_signal_fraction``): a noisy small-N gradient takes a shorter step. Because sampled
        inner gradients are heavy-tailed (an Ant batch's norm varies 100x between iterations), every
        inner step then clips each task's gradient (the mode's own) at ``AUTO_INNER_CLIP_FACTOR`` (4)
        times its median norm on the calibration batches (``inner_grad_clip``; the clip factor is a
        constant in the meta-gradient, i.e. a smaller eta for that task). The rule depends neither on
        the horizon nor on the reward scale, both of which the sum-over-time gradient grows with.

        :return: eta
        """
        if self.inner_lr != AUTO:
            return float(self.inner_lr)
        sampler = self.episode_sampler
        seed = None if self.seed is None else int(np.random.SeedSequence([2, self.seed]).generate_state(1)[0])
        batches = []
        with self._isolated_streams(seed) as generator:
            task_rng = np.random.default_rng(seed)
            for _ in range(math.ceil(AUTO_CALIBRATION_TASKS / self.meta_batch_size)):
                tasks = self._sample_tasks(self.meta_batch_size, task_rng)
                params = self.initial_task_params(len(tasks))
                # two independent batches of N episodes per task: the noise of an N-episode inner gradient
                pair = [
                    self.sample_episodes(tasks, params, self.inner_episodes, generator=generator, sampler=sampler)
                    for _ in range(2)
                ]
                assert pair[0] is not None and pair[1] is not None
                batches.append((params, *pair))
        self.inner_lr, self.inner_grad_clip, self.inner_signal_fraction = calibrate_inner_lr(
            self.functional_policy,
            self.gradient_mode,
            self.gamma,
            batches,
            AUTO_INNER_KL,
            AUTO_INNER_CLIP_FACTOR,
            signal_power=AUTO_SIGNAL_POWER,
        )
        if self.verbose >= 1:
            print(
                f"inner_lr='auto': calibrated to {self.inner_lr:.4g} (median first-step KL {AUTO_INNER_KL}, times the "
                f"inner gradient's signal fraction {self.inner_signal_fraction:.3g} at N={self.inner_episodes}), "
                f"inner gradient norm clipped at {self.inner_grad_clip}"
            )
        return self.inner_lr

    def collect_meta_sample(self, tasks: list[Any], step_callback: StepCallback | None = None) -> MetaSample | None:
        """
        Sample the inner and outer episodes of ``tasks`` (adapting between them) and build the
        meta-objective's graph.

        :param tasks: at most ``meta_batch_size`` tasks
        :param step_callback: receives the transition counts
        :return: the samples and objective, or None if a callback stopped training
        """
        adaptation, mode = self.adaptation, self.gradient_mode

        def inner_batch(step: int, params: Params) -> EpisodeBatch | None:
            batch = self.sample_episodes(tasks, params, self.inner_episodes, step_callback)
            if step == 0 and batch is not None and self.inner_sample_reuse:
                batch = self._with_reused_episodes(tasks, params, batch)
            return batch

        unrolled = adaptation.unroll(
            adaptation.task_parameters(len(tasks)), self.inner_steps, inner_batch, mode, create_graph=True, at_sampling=True
        )
        if unrolled is None:
            return None
        replay, inner_batches, inner_norms = unrolled
        outer_batch = self.sample_episodes(tasks, replay.adapted, self.outer_episodes, step_callback)
        if outer_batch is None:
            return None
        replay.outer_log_prob = adaptation.log_prob(replay.adapted, outer_batch)
        outer_batch.log_probs = replay.outer_log_prob.detach()
        objective = adaptation.objective(replay, inner_batches, outer_batch, mode)
        return MetaSample(mode, replay, objective, inner_batches, outer_batch, float(np.mean(inner_norms)))

    def _with_reused_episodes(self, tasks: list[Any], params: Params, fresh: EpisodeBatch) -> EpisodeBatch:
        """
        The first inner batch with the ``inner_sample_reuse`` most recent stored batches of each task appended
        (as many as every task of the meta-batch has), marked as reused: their stored log-likelihoods are the
        behaviour policy's, so the mode's boxes and ratios weigh them by their importance ratio, each step's
        ratio at the current parameters truncated at ``reuse_importance_clip`` (the behaviour log-likelihood is
        raised where the ratio would exceed it).
        """
        stored = [self.reusable_inner_batches.get(task_key(task), ()) for task in tasks]
        n_reused = min(self.inner_sample_reuse, *(len(batches) for batches in stored))
        # (zips saved before the counter existed load without it)
        self.iterations_without_reuse = 0 if n_reused else getattr(self, "iterations_without_reuse", 0) + 1
        if self.iterations_without_reuse == REUSE_WARNING_ITERATIONS:
            warnings.warn(
                f"inner_sample_reuse={self.inner_sample_reuse}: no meta-batch could reuse earlier episodes in "
                f"{REUSE_WARNING_ITERATIONS} meta-iterations; reuse needs tasks that recur (a fixed task set, e.g. "
                "task_sampler=FixedTaskSampler(tasks)), which a continuous task distribution never gives. Only the "
                f"{REUSE_TASKS_PER_META_BATCH * self.meta_batch_size} most recent tasks' batches are kept.",
                stacklevel=2,
            )
        if n_reused == 0:
            return fresh
        reused = EpisodeBatch.stack_tasks([EpisodeBatch.concatenate(list(batches)[-n_reused:]) for batches in stored])
        with th.no_grad():
            current = masked_log_prob(self.functional_policy, {n: p.detach() for n, p in params.items()}, reused)
        reused.log_probs = th.maximum(reused.log_probs, current - math.log(self.reuse_importance_clip)) * reused.masks
        reused.reused = th.ones(reused.masks.shape[:2], dtype=th.bool, device=reused.masks.device)
        return self.weighting(EpisodeBatch.concatenate([fresh.samples(), reused]))

    def _remember_inner_batch(self, tasks: list[Any], sample: MetaSample) -> None:
        """Store each task's fresh first inner batch for reuse by later meta-iterations."""
        batch = sample.inner_batches[0]
        fresh = batch.samples() if batch.reused is None else batch.select_episodes(~batch.reused[0])
        store = self.reusable_inner_batches
        for index, task in enumerate(tasks):
            key = task_key(task)
            # most recently sampled last (a dict keeps insertion order, and is saved with it)
            stored = store.pop(key, None) or deque(maxlen=self.inner_sample_reuse)
            stored.append(fresh.select_tasks([index]))
            store[key] = stored
        while len(store) > REUSE_TASKS_PER_META_BATCH * self.meta_batch_size:
            del store[next(iter(store))]

    def meta_gradient_on_samples(self, sample: MetaSample, mode: GradientMode) -> Params:
        """
        Per-task meta-gradient of another gradient mode on the episodes of ``sample``, without new
        sampling. The inner batches were drawn with the parameters adapted by ``sample``'s own mode;
        where ``mode``'s inner step has a different value (``lsf`` against the advantage-weighted
        modes, ``loaded_dice`` with lambda < 1), the samples of later inner steps and the outer
        samples are slightly off-policy for it. Its magic boxes and LVC ratios then weigh the later
        inner samples by their importance weights (they are taken against the stored sampling
        log-likelihoods); the policy-gradient terms get no correction: a diagnostic, not a training
        signal. With one inner step the inner samples are on-policy for every mode.

        :param sample: a meta-iteration's samples (``learn`` passes it to callbacks as ``locals["sample"]``)
        :param mode: the gradient mode to evaluate
        :return: parameter name -> (B, ...) per-task ascent directions
        """
        return self.adaptation.per_task_meta_gradient(sample, mode)

    def estimate_meta_gradient(self, tasks: list[Any] | None = None, per_task: bool = False) -> dict[str, th.Tensor]:
        """
        Estimate the meta-gradient at the current parameters from fresh samples, without updating.

        :param tasks: the tasks to use (at most ``meta_batch_size``); default: ``meta_batch_size`` from the sampler
        :param per_task: return one estimate per task (leading task dim) instead of their mean
        :return: policy parameter name -> ascent direction of the meta-objective
        """
        self.resolved_inner_lr()
        tasks = self._sample_tasks(self.meta_batch_size, self.task_rng) if tasks is None else list(tasks)
        sample = self.collect_meta_sample(tasks)
        assert sample is not None
        grads = self.adaptation.per_task_meta_gradient(sample)
        return grads if per_task else {n: g.mean(0) for n, g in grads.items()}

    # ------------------------------------------------------------------ training

    def _step_callback(self, callback: BaseCallback) -> StepCallback:
        def on_step(n_transitions: int, step_vars: dict[str, Any]) -> bool:
            self.num_timesteps += n_transitions
            callback.update_locals({**step_vars, "n_transitions": n_transitions})
            return callback.on_step()

        return on_step

    def _init_callback(self, callback: MaybeCallback, progress_bar: bool = False) -> BaseCallback:
        """SB3's, with a progress bar that counts real transitions (not every sub-env of every lock-step)."""
        if isinstance(callback, list):
            callback = CallbackList(callback)
        if not isinstance(callback, BaseCallback):
            callback = ConvertCallback(callback)
        if progress_bar:
            callback = CallbackList([callback, MetaProgressBarCallback()])
        callback.init_callback(self)
        return callback

    def _update_current_progress_remaining(self, num_timesteps: int, total_timesteps: int) -> None:
        # learn finishes the meta-iteration it starts, which may pass the budget: an SB3 schedule must never see a
        # progress below 0 (``lambda p: lr0 * p`` would turn the last update into a descent step)
        self._current_progress_remaining = min(1.0, max(0.0, 1.0 - float(num_timesteps) / float(total_timesteps)))

    def train(self, sample: MetaSample) -> None:
        """
        Apply one meta-update from ``sample`` with the meta-optimizer.

        :param sample: the meta-iteration's samples and objective graph
        :raises FloatingPointError: if the meta-gradient or the update is not finite (the parameters
            and optimizer state are left as they were)
        """
        self.policy.set_training_mode(True)
        if self.meta_updater.uses_learning_rate:
            self._update_learning_rate(self.policy.optimizer)  # also logs train/learning_rate
        adaptation = self.adaptation
        try:
            stats = self.meta_updater.step(adaptation, sample, self.policy.optimizer)
        except FloatingPointError as error:
            where = f"meta-update {self._n_updates + 1}, after {self.num_timesteps} timesteps"
            raise FloatingPointError(f"{error} ({where})") from None
        self._n_updates += 1

        with th.no_grad():
            theta = adaptation.task_parameters(sample.outer_batch.n_tasks, detach=True)
            adapted_kl = adaptation.mean_kl(sample.adapted, theta, sample.outer_batch)
        for key, value in stats.items():
            self.logger.record(f"train/{key}", value)
        self.logger.record("train/inner_grad_norm", sample.inner_grad_norm)
        self.logger.record("train/inner_lr", self.resolved_inner_lr())
        self.logger.record("train/adapted_kl", adapted_kl.item())
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")

    def _record_rollout(self, sample: MetaSample) -> None:
        pre_returns = sample.inner_batches[0].episode_returns.mean().item()
        post_returns = sample.outer_batch.episode_returns.mean().item()
        self.pre_adaptation_returns.append(pre_returns)
        self.post_adaptation_returns.append(post_returns)
        self.logger.record("rollout/pre_adaptation_return", safe_mean(self.pre_adaptation_returns))
        self.logger.record("rollout/post_adaptation_return", safe_mean(self.post_adaptation_returns))
        self.logger.record("rollout/ep_len_mean", sample.outer_batch.masks.sum(-1).mean().item())
        if sample.outer_batch.successes is not None:
            self.pre_adaptation_successes.append(sample.inner_batches[0].successes.mean().item())
            self.post_adaptation_successes.append(sample.outer_batch.successes.mean().item())
            self.logger.record("rollout/pre_adaptation_success_rate", safe_mean(self.pre_adaptation_successes))
            self.logger.record("rollout/post_adaptation_success_rate", safe_mean(self.post_adaptation_successes))

    def dump_logs(self, iteration: int = 0) -> None:
        """
        Write the ``time/`` keys and dump the logger.

        :param iteration: the number of meta-iterations so far
        """
        time_elapsed = max((time.time_ns() - self.start_time) / 1e9, sys.float_info.epsilon)
        fps = int((self.num_timesteps - self._num_timesteps_at_start) / time_elapsed)
        self.logger.record("time/iterations", iteration, exclude="tensorboard")
        self.logger.record("time/fps", fps)
        self.logger.record("time/time_elapsed", int(time_elapsed), exclude="tensorboard")
        self.logger.record("time/total_timesteps", self.num_timesteps, exclude="tensorboard")
        self.logger.dump(step=self.num_timesteps)

    def learn(
        self: SelfMetaPolicyGradient,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 1,
        tb_log_name: str = "MetaPolicyGradient",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfMetaPolicyGradient:
        """
        Meta-train until ``total_timesteps`` environment steps (inner and outer episodes) were taken.

        :param total_timesteps: environment steps to take, counting every step of every collected episode
        :param callback: SB3 callback(s) called after every lock-step of the sub-envs
        :param log_interval: meta-iterations between log dumps
        :param tb_log_name: the name of the run for TensorBoard logging
        :param reset_num_timesteps: whether or not to reset the current timestep number (used in logging)
        :param progress_bar: display a progress bar using tqdm and rich
        :return: the trained model
        """
        self.episode_sampler  # noqa: B018  (a clear error when the model has no env)
        if not isinstance(total_timesteps, (int, np.integer)) or isinstance(total_timesteps, bool) or total_timesteps < 1:
            raise ValueError(f"total_timesteps: must be a positive integer, got {total_timesteps!r}.")
        reject_unadapted_evaluation(callback)
        self.resolved_inner_lr()
        if self.pre_adaptation_returns is None or reset_num_timesteps:
            # as SB3 keeps its episode-info buffers across learn calls unless the counters are reset
            self.pre_adaptation_returns = deque(maxlen=self._stats_window_size)
            self.post_adaptation_returns: deque = deque(maxlen=self._stats_window_size)
            self.pre_adaptation_successes: deque = deque(maxlen=self._stats_window_size)
            self.post_adaptation_successes: deque = deque(maxlen=self._stats_window_size)
        # SB3 resets the env here; the sub-envs are reset at every wave anyway, and that reset must
        # not draw from their random streams (a resumed run would not replay it)
        with self._env_streams_kept():
            total_timesteps, callback = self._setup_learn(
                total_timesteps, callback, reset_num_timesteps, tb_log_name, progress_bar
            )
        callback.on_training_start(locals(), globals())
        step_callback = self._step_callback(callback)
        iteration = 0
        try:
            while self.num_timesteps < total_timesteps:
                callback.on_rollout_start()
                # what a model saved during this iteration (a checkpoint callback) holds: the resumed run
                # samples the iteration again from the same streams
                self._iteration_start = self._stream_state()
                tasks = self._sample_tasks(self.meta_batch_size, self.task_rng)
                sampling_start = time.perf_counter()
                sample = self.collect_meta_sample(tasks, step_callback)
                if sample is None:
                    break
                self.logger.record("time/sample_seconds", time.perf_counter() - sampling_start)
                callback.update_locals(locals())
                callback.on_rollout_end()
                iteration += 1
                self._update_current_progress_remaining(self.num_timesteps, total_timesteps)
                self._record_rollout(sample)
                update_start = time.perf_counter()
                self.train(sample)
                self.logger.record("time/train_seconds", time.perf_counter() - update_start)
                if self.inner_sample_reuse:
                    self._remember_inner_batch(tasks, sample)
                self._iteration_start = None
                if log_interval is not None and iteration % log_interval == 0:
                    self.dump_logs(iteration)
        except BaseException:
            # an error mid-iteration (a dead sampler worker, a non-finite update): the iteration's start stays
            # what `save` writes, so the model can be saved without asking the sub-envs (their workers may be
            # gone) and a resumed run samples the failed iteration again
            raise
        else:
            self._iteration_start = None
        callback.on_training_end()
        return self

    # ------------------------------------------------------------------ adaptation at meta-test time

    def _adapt_and_measure(
        self,
        tasks: list[Any],
        inner_steps: int,
        final_episodes: int | None,
        generator: th.Generator | None = None,
        sampler: EpisodeSampler | None = None,
    ) -> tuple[Params, np.ndarray, np.ndarray | None]:
        """
        Adapt to each task with ``inner_steps`` steps (no meta-graph).

        :param final_episodes: episodes to sample with the adapted parameters (None: none)
        :param generator: the action noise's stream (default: training's)
        :param sampler: the episode sampler (default: the model's)
        :return: the adapted per-task parameters (detached), the mean undiscounted return per task
            of the episodes sampled before each step (and after the last one when ``final_episodes``),
            and the same for the success rate (None if the env reports no ``info["success"]``)
        """

        def inner_batch(_: int, params: Params) -> EpisodeBatch | None:
            return self.sample_episodes(tasks, params, self.inner_episodes, generator=generator, sampler=sampler)

        leaves = {n: p.clone().requires_grad_(True) for n, p in self.initial_task_params(len(tasks)).items()}
        unrolled = self.adaptation.unroll(leaves, inner_steps, inner_batch, self.gradient_mode, False, at_sampling=True)
        assert unrolled is not None  # no callback: never stopped
        replay, batches, _ = unrolled
        params = {n: p.detach() for n, p in replay.adapted.items()}
        if final_episodes is not None:
            batches.append(self.sample_episodes(tasks, params, final_episodes, generator=generator, sampler=sampler))
        if not batches:
            return params, np.zeros((len(tasks), 0)), None
        returns = th.stack([batch.episode_returns.mean(1) for batch in batches], dim=1).cpu().numpy()
        if batches[0].successes is None:
            return params, returns, None
        return params, returns, th.stack([batch.successes.mean(1) for batch in batches], dim=1).cpu().numpy()

    def adapt(self, task: Any, inner_steps: int = 1, seed: int | None = None) -> ActorCriticPolicy:
        """
        Adapt the policy to one task by ``inner_steps`` inner steps on fresh episodes (sampled outside
        training's random streams: a later ``learn`` is not changed by it).

        :param task: the task (passed to the env's ``set_task``)
        :param inner_steps: number of adaptation steps
        :param seed: seed of the adaptation episodes' noise (None: fresh entropy)
        :return: a new policy of the same class holding the adapted parameters
        """
        if isinstance(inner_steps, bool) or not isinstance(inner_steps, (int, np.integer)) or inner_steps < 0:
            raise ValueError(f"inner_steps: must be an integer >= 0, got {inner_steps!r}.")
        self.resolved_inner_lr()
        with self._isolated_streams(seed) as generator:
            params, _, _ = self._adapt_and_measure([task], inner_steps, final_episodes=None, generator=generator)
        adapted = copy.deepcopy(self.policy)
        with th.no_grad():
            for name, param in adapted.named_parameters():
                if name in params:
                    param.copy_(params[name][0])
        return adapted

    def _evaluation_env(self, env: GymEnv | str | Callable[[], gym.Env] | None) -> tuple[EpisodeSampler, TaskSampler]:
        """:return: the episode sampler and task distribution to evaluate on: the model's own, or ``env``'s"""
        if env is None:
            return self.episode_sampler, self._task_sampler
        venv = self._make_vec_env(env, self.meta_batch_size, sampler="vec_env")
        # one task per group of sub-envs: as many groups as the meta-batch, or fewer if the sub-envs do not divide
        groups = math.gcd(venv.num_envs, self.meta_batch_size)
        sampler = VecEnvSampler(venv, groups, self.max_episode_steps)
        sampler.attach_policy(self.policy)
        return sampler, EnvTaskSampler(venv)

    def evaluate_adaptation(
        self,
        n_tasks: int = 40,
        inner_steps: int = 3,
        seed: int = 0,
        tasks: list[Any] | None = None,
        env: GymEnv | str | Callable[[], gym.Env] | None = None,
    ) -> dict[str, np.ndarray]:
        """
        Mean return on held-out tasks before adaptation and after 1..``inner_steps`` inner steps.
        The tasks come from a stream seeded by ``seed``, separate from training's, and the sampling
        noise and the sub-envs' generators are seeded too, so the result depends only on the
        parameters and ``seed``; training's random streams are left as they were (calling it during
        training does not change the run).

        :param n_tasks: number of held-out tasks (ignored when ``tasks`` is given)
        :param inner_steps: number of adaptation steps
        :param seed: seed of the task stream, the env and the action noise
        :param tasks: explicit tasks to evaluate on
        :param env: the env to evaluate on (an id, an instance, a factory or a VecEnv; its own task
            distribution); None: the model's env
        :return: ``inner_steps`` (0..K), ``mean`` and ``std`` over tasks of the per-task mean
            undiscounted return, ``per_task`` (n_tasks, K + 1), and ``success_rate`` (K + 1) when the
            env reports ``info["success"]`` (Meta-World)
        """
        for name, value in [("n_tasks", n_tasks), ("inner_steps", inner_steps)]:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < (1 if name == "n_tasks" else 0):
                raise ValueError(f"{name}: must be an integer >= {1 if name == 'n_tasks' else 0}, got {value!r}.")
        episode_sampler, sampler = self._evaluation_env(env)
        self.resolved_inner_lr()
        if tasks is None:
            tasks = self._sample_tasks(n_tasks, np.random.default_rng([1, seed]), sampler)
        returns, successes = [], []
        try:
            with self._isolated_streams(seed) as generator:
                if env is not None:
                    seed_env_rngs(episode_sampler.venv, seed)
                for start in range(0, len(tasks), episode_sampler.n_groups):
                    chunk = list(tasks[start : start + episode_sampler.n_groups])
                    _, chunk_returns, chunk_successes = self._adapt_and_measure(
                        chunk, inner_steps, self.outer_episodes, generator=generator, sampler=episode_sampler
                    )
                    returns.append(chunk_returns)
                    successes.append(chunk_successes)
        finally:
            if env is not None and not isinstance(env, VecEnv):
                episode_sampler.venv.close()
        per_task = np.concatenate(returns, axis=0)
        table = {
            "inner_steps": np.arange(inner_steps + 1),
            "mean": per_task.mean(axis=0),
            "std": per_task.std(axis=0),
            "per_task": per_task,
        }
        if successes[0] is not None:
            table["success_rate"] = np.concatenate(successes, axis=0).mean(axis=0)
        return table
