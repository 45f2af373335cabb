"""MetaPolicyGradient: gradient-based meta-RL (the MAML family) as a Stable-Baselines3 algorithm."""

import contextlib
import io
import pathlib
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable
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

from sb3_metarl.adaptation import Adaptation, MetaSample, Weighting
from sb3_metarl.common.baselines import Baseline, make_baseline
from sb3_metarl.common.buffers import EpisodeBatch
from sb3_metarl.common.callbacks import MetaProgressBarCallback, reject_unadapted_evaluation
from sb3_metarl.common.files import check_saved_model, replaced_atomically
from sb3_metarl.common.functional import FunctionalPolicy, Params
from sb3_metarl.common.rng import EnvRngState, preserved_global_rng
from sb3_metarl.common.vec_env import make_task_env, resolve_vec_env_cls
from sb3_metarl.gradient_modes import GradientMode, make_gradient_mode
from sb3_metarl.meta_optimizers import MetaOptimizer, make_meta_optimizer
from sb3_metarl.meta_pg import evaluation, inner_lr, reuse, sampling
from sb3_metarl.meta_pg.arguments import (
    AUTO,
    DICT_OBSERVATION_HINT,
    check_arguments,
    check_model_choices,
    check_sample_reuse,
    check_sampler,
    policy_kwargs_for,
)
from sb3_metarl.meta_pg.evaluation import format_adaptation_table
from sb3_metarl.meta_pg.inner_lr import AUTO_CALIBRATION_TASKS, AUTO_INNER_CLIP_FACTOR, AUTO_INNER_KL, AUTO_SIGNAL_POWER
from sb3_metarl.meta_pg.policies import CnnPolicy, MlpPolicy
from sb3_metarl.meta_pg.reuse import REUSE_TASKS_PER_META_BATCH, REUSE_WARNING_ITERATIONS, task_key
from sb3_metarl.meta_pg.streams import EnvStreams, run_streams, set_run_streams
from sb3_metarl.samplers import EpisodeSampler, StepCallback
from sb3_metarl.samplers.factory import make_episode_sampler, make_sub_envs
from sb3_metarl.tasks import EnvTaskSampler, TaskSampler

SelfMetaPolicyGradient = TypeVar("SelfMetaPolicyGradient", bound="MetaPolicyGradient")

__all__ = [
    "AUTO_CALIBRATION_TASKS",
    "AUTO_INNER_CLIP_FACTOR",
    "AUTO_INNER_KL",
    "AUTO_SIGNAL_POWER",
    "REUSE_TASKS_PER_META_BATCH",
    "REUSE_WARNING_ITERATIONS",
    "MetaPolicyGradient",
    "MetaSample",
    "format_adaptation_table",
    "make_task_env",
    "task_key",
]


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
    :param discount_from_start: weigh step t by gamma^t (Psi_t = gamma^t A_t): every surrogate then estimates the
        gradient of the discounted return from t = 0, the specification's objective, which the exact references
        check. False: Psi_t = A_t, the weights of rllab, ProMP, pytorch-maml-rl (and SB3's PPO), which weigh a late
        step's action as much as an early one's: the papers' MuJoCo settings. Not for "dice" (raw rewards)
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
        discount_from_start: bool = True,
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
            discount_from_start=discount_from_start,
            n_envs=n_envs,
            max_episode_steps=max_episode_steps,
            seed=seed,
            device=device,
        )
        check_sampler(sampler, sampler_kwargs, vec_env_cls)
        meta_updater = make_meta_optimizer(meta_optimizer, meta_optimizer_kwargs)
        self.gradient_mode = make_gradient_mode(gradient_mode, gradient_mode_kwargs)
        make_baseline(baseline)  # fail early on an unknown baseline
        check_sample_reuse(inner_sample_reuse, reuse_importance_clip, self.gradient_mode)
        check_model_choices(
            policy=policy,
            mode=self.gradient_mode,
            normalize_advantage=normalize_advantage,
            discount_from_start=discount_from_start,
            n_envs=n_envs,
            meta_batch_size=meta_batch_size,
            task_sampler=task_sampler,
            tensorboard_log=tensorboard_log,
        )
        policy_kwargs = policy_kwargs_for(policy_kwargs, meta_updater, meta_optimizer)

        self.meta_batch_size = int(meta_batch_size)
        self.inner_episodes = int(inner_episodes)
        self.outer_episodes = int(outer_episodes)
        self.inner_steps = int(inner_steps)
        #: the inner step size eta: "auto" until calibrated (see ``calibrate_inner_lr``), then a float
        self.inner_lr: float | str = inner_lr if inner_lr == AUTO else float(inner_lr)
        #: each task's inner gradient is clipped to this norm (set by ``inner_lr="auto"``; None: no clipping)
        self.inner_grad_clip: float | None = None
        #: ``inner_lr="auto"``: the measured fraction of the inner gradient's squared norm that is signal at N episodes
        self.inner_signal_fraction: float | None = None
        #: the meta-optimizer (the named one built from ``meta_optimizer_kwargs``, or the instance given)
        self.meta_optimizer: MetaOptimizer = meta_updater
        self.meta_optimizer_kwargs = meta_optimizer_kwargs
        self.gamma = float(gamma)
        self.gae_lambda = float(gae_lambda)
        self.baseline = baseline
        self.normalize_advantage = normalize_advantage
        self.discount_from_start = discount_from_start
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
        #: the learner's copy of the sub-envs' random streams (what ``save`` writes: it never asks a worker)
        self.env_streams = EnvStreams()
        #: the run's random streams at the start of the meta-iteration in progress (None between iterations)
        self._iteration_start: dict[str, Any] | None = None
        self.pre_adaptation_returns: deque | None = None
        #: the registered id of the env, when the model was given one (saved: ``evaluate`` on the command line uses it)
        self.env_id = env if isinstance(env, str) else None
        vec_env = self.make_sub_envs(env, n_envs or self.meta_batch_size * max(self.inner_episodes, self.outer_episodes))
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

    def make_sub_envs(
        self, env: GymEnv | str | Callable[[], gym.Env] | None, n_envs: int, sampler: str | EpisodeSampler | None = None
    ) -> VecEnv | None:
        """
        :param env: an env id, an env instance (copied), a factory or a VecEnv (None: none)
        :param n_envs: the number of sub-envs (a multiple of ``meta_batch_size``)
        :param sampler: the sampler the sub-envs are for (default: the model's)
        :return: the sub-envs, with this model's ``env_kwargs`` and ``max_episode_steps``
        """
        if env is None:
            return None
        sampler = self.sampler if sampler is None else sampler
        return make_sub_envs(
            env, n_envs, self.meta_batch_size, sampler, self.sampler_kwargs, self.vec_env_cls, self.env_kwargs,
            self.max_episode_steps,
        )  # fmt: skip

    def _setup_model(self) -> None:
        # a zip saved before 0.2 holds the object as ``meta_updater`` and the argument as ``meta_optimizer``
        if "meta_updater" in self.__dict__:
            self.meta_optimizer = self.__dict__.pop("meta_updater")
        self._setup_lr_schedule()
        # a model being loaded already holds its random streams (from the zip): keep them, and leave the
        # caller's global generators alone
        loading = getattr(self, "torch_generator", None) is not None
        if not hasattr(self, "env_streams"):  # (a loaded model: the learner's copy is not saved)
            self.env_streams = EnvStreams()
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
            self.env_streams.seed(self.env, seed)

    def _attach_env(self, env: VecEnv) -> None:
        self._episode_sampler = make_episode_sampler(
            env, self.meta_batch_size, self.policy, self.sampler, self.max_episode_steps, self.sampler_kwargs
        )
        if self._saved_env_rng_states is not None and len(self._saved_env_rng_states) == env.num_envs:
            self.env_streams.put(env, self._saved_env_rng_states)
        elif self.seed is not None:
            self.env_streams.seed(env, self.seed)
        else:
            self.env_streams.read(env)  # the workers were just started: ask them once
        self._saved_env_rng_states = None
        self._attach_task_sampler(env)

    @property
    def task_sampler(self) -> TaskSampler | None:
        """
        The task distribution training samples from: the ``task_sampler`` given, or the env's own
        ``sample_tasks`` (an ``EnvTaskSampler``) once the model has an env. Setting it changes the
        distribution of the next meta-iterations.
        """
        attached = self.__dict__.get("_task_sampler")
        return attached if attached is not None else self.__dict__.get("task_sampler")

    @task_sampler.setter
    def task_sampler(self, task_sampler: TaskSampler | None) -> None:
        # stored under the argument's name: SB3's save writes it, and zips saved before this accessor load as they are
        self.__dict__["task_sampler"] = task_sampler
        if self.__dict__.get("_task_sampler") is not None and self.env is not None:
            self._attach_task_sampler(self.env)

    def _attach_task_sampler(self, env: VecEnv) -> None:
        configured = self.__dict__["task_sampler"]
        if configured is None:
            self._task_sampler = EnvTaskSampler(env)
            return
        if isinstance(configured, EnvTaskSampler) and configured.env is None:
            configured.env = env  # envs are not saved: a loaded sampler gets the new one
        self._task_sampler = configured

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
        vec_env = self.make_sub_envs(env, self.n_envs)
        if isinstance(env, str):
            self.env_id = env
        super().set_env(vec_env, force_reset=force_reset)
        self._attach_env(vec_env)

    def _excluded_save_params(self) -> list[str]:
        excluded = ["functional_policy", "_episode_sampler", "_task_sampler", "_iteration_start", "env_streams"]
        return [*super()._excluded_save_params(), *excluded]

    def _get_torch_save_params(self) -> tuple[list[str], list[str]]:
        # the policy's torch optimizer holds the meta-optimizer's moments (Adam), as in SB3's on-policy algorithms
        return ["policy", "policy.optimizer"], []

    @property
    def max_steps_per_iteration(self) -> int:
        """Env steps of one meta-iteration when no episode ends early: B x (inner_steps x N + M) x horizon."""
        episodes = self.inner_steps * self.inner_episodes + self.outer_episodes
        return self.meta_batch_size * episodes * self.episode_sampler.horizon

    @property
    def meta_updater(self) -> MetaOptimizer:
        """Deprecated name of ``meta_optimizer`` (the object; kept for one release)."""
        warnings.warn("model.meta_updater is deprecated; use model.meta_optimizer.", DeprecationWarning, stacklevel=2)
        return self.meta_optimizer

    @property
    def n_updates(self) -> int:
        """The number of meta-updates applied so far (SB3's ``_n_updates``, logged as ``train/n_updates``)."""
        return self._n_updates

    # ------------------------------------------------------------------ save and load

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
        live = run_streams(self, include_env=self._iteration_start is None)
        saved = self._iteration_start if self._iteration_start is not None else live
        set_run_streams(self, saved, include_env=False)
        self._saved_env_rng_states = saved["env"]
        try:
            if isinstance(path, (str, pathlib.Path)):
                with replaced_atomically(path) as temporary:
                    super().save(temporary, exclude=exclude, include=include)
            else:
                super().save(path, exclude=exclude, include=include)
        finally:
            set_run_streams(self, live, include_env=False)
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

    def sample_tasks(self, n_tasks: int, rng: np.random.Generator, task_sampler: TaskSampler | None = None) -> list[Any]:
        """:return: ``n_tasks`` tasks from ``task_sampler`` (default: the model's), checked (``sampling.sample_tasks``)"""
        return sampling.sample_tasks(task_sampler or self.task_sampler, n_tasks, rng)

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
        :return: ``n_episodes`` weighted episodes per task sampled with ``task_params`` (None: the current policy),
            or None if a callback stopped training (``sampling.sample_episodes`` says more)
        """
        return sampling.sample_episodes(self, tasks, task_params, n_episodes, step_callback, generator, sampler)

    def initial_task_params(self, n_tasks: int) -> Params:
        """:return: the current parameters, detached, as per-task views (leading dim ``n_tasks``)"""
        return {n: p.detach() for n, p in FunctionalPolicy.expand(self.functional_policy.parameters(), n_tasks).items()}

    @property
    def weighting(self) -> Weighting:
        """How sampled batches get their policy-gradient weights (this model's discount, GAE lambda and baseline)."""
        # (zips saved before discount_from_start existed weigh as they did: with gamma^t)
        discount_from_start = getattr(self, "discount_from_start", True)
        return Weighting(
            self.observation_space, self.gamma, self.gae_lambda, self.baseline_model, self.normalize_advantage,
            discount_from_start,
        )  # fmt: skip

    @property
    def adaptation(self) -> Adaptation:
        """
        The differentiable adaptation of this model's policy (inner step, replay, meta-objective, KL):
        what the meta-optimizers get, and the public way to adapt parameters on a batch
        (``model.adaptation.adapt(params, batch, model.gradient_mode)``).

        :raises ValueError: with ``inner_lr="auto"`` before ``calibrate_inner_lr`` (``learn`` and the meta-test
            methods calibrate; reading a property never samples)
        """
        if self.inner_lr == AUTO:
            raise ValueError(
                "inner_lr: 'auto' is not calibrated yet; call model.calibrate_inner_lr() first (learn, "
                "evaluate_adaptation, adapt and estimate_meta_gradient do it themselves)."
            )
        return Adaptation(self.functional_policy, float(self.inner_lr), self.inner_grad_clip, self.weighting)

    def calibrate_inner_lr(self) -> float:
        """
        The inner step size eta. With ``inner_lr="auto"`` the first call calibrates it on episodes of the initial
        policy drawn from streams of their own (``inner_lr.calibrate_model`` gives the rule), then it is fixed:
        saved with the model and logged as ``train/inner_lr``. ``learn``, the meta-test methods and
        ``estimate_meta_gradient`` call it; reading ``adaptation`` does not.

        :return: eta
        """
        if self.inner_lr == AUTO:
            self.episode_sampler  # noqa: B018  (a clear error when the model has no env)
            inner_lr.calibrate_model(self)
        return float(self.inner_lr)

    def resolved_inner_lr(self) -> float:
        """Deprecated name of ``calibrate_inner_lr`` (kept for one release)."""
        warnings.warn("resolved_inner_lr() is deprecated; use calibrate_inner_lr().", DeprecationWarning, stacklevel=2)
        return self.calibrate_inner_lr()

    def collect_meta_sample(self, tasks: list[Any], step_callback: StepCallback | None = None) -> MetaSample | None:
        """
        :return: the inner and outer samples of ``tasks`` and the meta-objective's graph, or None if a callback
            stopped training (``sampling.collect_meta_sample``)
        """
        self.calibrate_inner_lr()
        return sampling.collect_meta_sample(self, tasks, step_callback)

    def meta_gradient_on_samples(self, sample: MetaSample, mode: GradientMode) -> Params:
        """
        Per-task meta-gradient of another gradient mode on the episodes of ``sample``, without new sampling: a
        diagnostic, not a training signal (``Adaptation.per_task_meta_gradient`` says where it is off-policy).

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
        self.calibrate_inner_lr()
        tasks = self.sample_tasks(self.meta_batch_size, self.task_rng) if tasks is None else list(tasks)
        sample = self.collect_meta_sample(tasks)
        assert sample is not None
        grads = self.adaptation.per_task_meta_gradient(sample)
        return grads if per_task else {n: g.mean(0) for n, g in grads.items()}

    # ------------------------------------------------------------------ training

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
        if self.meta_optimizer.uses_learning_rate:
            self._update_learning_rate(self.policy.optimizer)  # also logs train/learning_rate
        adaptation = self.adaptation
        try:
            stats = self.meta_optimizer.step(adaptation, sample, self.policy.optimizer)
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
        self.logger.record("train/inner_lr", float(self.inner_lr))
        self.logger.record("train/adapted_kl", adapted_kl.item())
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")

    def _reset_episode_stats(self, reset_num_timesteps: bool) -> None:
        # as SB3 keeps its episode-info buffers across learn calls unless the counters are reset
        if self.pre_adaptation_returns is None or reset_num_timesteps:
            self.pre_adaptation_returns = deque(maxlen=self._stats_window_size)
            self.post_adaptation_returns: deque = deque(maxlen=self._stats_window_size)
            self.pre_adaptation_successes: deque = deque(maxlen=self._stats_window_size)
            self.post_adaptation_successes: deque = deque(maxlen=self._stats_window_size)

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

    def collect_rollouts(self, callback: BaseCallback, step_callback: StepCallback) -> tuple[list[Any], MetaSample | None]:
        """
        One meta-iteration's sampling (SB3's ``collect_rollouts``): B tasks, their inner and outer episodes.

        :param callback: the callback, told when the sampling starts and ends
        :param step_callback: counts the transitions and calls the callback's ``on_step``
        :return: the tasks and their sample (None if a callback stopped training)
        """
        callback.on_rollout_start()
        # what a model saved during this iteration (a checkpoint callback) holds: the resumed run samples the
        # iteration again from the same streams; an error mid-iteration leaves it there for the same reason
        self._iteration_start = run_streams(self)
        tasks = self.sample_tasks(self.meta_batch_size, self.task_rng)
        sampling_start = time.perf_counter()
        sample = self.collect_meta_sample(tasks, step_callback)
        if sample is not None:
            self.logger.record("time/sample_seconds", time.perf_counter() - sampling_start)
            callback.update_locals({"sample": sample, "tasks": tasks})
            callback.on_rollout_end()
        return tasks, sample

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
        self.calibrate_inner_lr()
        self._reset_episode_stats(reset_num_timesteps)
        # SB3 resets the env here; the sub-envs are reset at every wave anyway, and that reset must
        # not draw from their random streams (a resumed run would not replay it)
        with self.env_streams.kept(self.env):
            total_timesteps, callback = self._setup_learn(
                total_timesteps, callback, reset_num_timesteps, tb_log_name, progress_bar
            )
        callback.on_training_start(locals(), globals())
        step_callback = self._step_callback(callback)
        iteration = 0
        while self.num_timesteps < total_timesteps:
            tasks, sample = self.collect_rollouts(callback, step_callback)
            if sample is None:
                break
            iteration += 1
            self._update_current_progress_remaining(self.num_timesteps, total_timesteps)
            self._record_rollout(sample)
            update_start = time.perf_counter()
            self.train(sample)
            self.logger.record("time/train_seconds", time.perf_counter() - update_start)
            if self.inner_sample_reuse:
                reuse.remember_inner_batch(self, tasks, sample)
            self._iteration_start = None
            if log_interval is not None and iteration % log_interval == 0:
                self.dump_logs(iteration)
        self._iteration_start = None
        callback.on_training_end()
        return self

    def _step_callback(self, callback: BaseCallback) -> StepCallback:
        def on_step(n_transitions: int, step_vars: dict[str, Any]) -> bool:
            self.num_timesteps += n_transitions
            callback.update_locals({**step_vars, "n_transitions": n_transitions})
            return callback.on_step()

        return on_step

    # ------------------------------------------------------------------ adaptation at meta-test time

    def adapt(self, task: Any, inner_steps: int = 1, seed: int | None = None) -> ActorCriticPolicy:
        """
        Adapt the policy to one task (``sb3_metarl.meta_pg.evaluation.adapt``).

        :param task: the task (passed to the env's ``set_task``)
        :param inner_steps: number of adaptation steps
        :param seed: seed of the adaptation episodes' noise (None: fresh entropy)
        :return: a new policy of the same class holding the adapted parameters
        """
        return evaluation.adapt(self, task, inner_steps, seed)

    def evaluate_adaptation(
        self,
        n_tasks: int = 40,
        inner_steps: int = 3,
        seed: int = 0,
        tasks: list[Any] | None = None,
        env: GymEnv | str | Callable[[], gym.Env] | None = None,
    ) -> dict[str, np.ndarray]:
        """
        Mean return on held-out tasks before adaptation and after 1..``inner_steps`` inner steps
        (``sb3_metarl.meta_pg.evaluation.evaluate_adaptation``: seeded, and training's streams are left as they were).

        :param n_tasks: number of held-out tasks (ignored when ``tasks`` is given)
        :param inner_steps: number of adaptation steps
        :param seed: seed of the task stream, the env and the action noise
        :param tasks: explicit tasks to evaluate on
        :param env: the env to evaluate on (its own task distribution); None: the model's env
        :return: ``inner_steps`` (0..K), ``mean`` and ``std`` over tasks of the per-task mean return, ``per_task``
            (n_tasks, K + 1), and ``success_rate`` (K + 1) when the env reports ``info["success"]``
        """
        return evaluation.evaluate_adaptation(self, n_tasks, inner_steps, seed, tasks, env)
