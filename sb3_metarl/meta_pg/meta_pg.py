"""MetaPolicyGradient: gradient-based meta-RL (the MAML family) as a Stable-Baselines3 algorithm."""

import contextlib
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import gymnasium as gym
import numpy as np
import torch as th
from stable_baselines3.common.policies import ActorCriticPolicy, BasePolicy
from stable_baselines3.common.type_aliases import GymEnv, Schedule
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

from sb3_metarl.adaptation import Adaptation, MetaSample, Weighting
from sb3_metarl.common.baselines import Baseline, make_baseline
from sb3_metarl.common.buffers import EpisodeBatch
from sb3_metarl.common.functional import FunctionalPolicy, Params
from sb3_metarl.common.rng import preserved_global_rng
from sb3_metarl.gradient_modes import GradientMode
from sb3_metarl.meta_optimizers import MetaOptimizer
from sb3_metarl.meta_pg import evaluation, inner_lr, sampling
from sb3_metarl.meta_pg.arguments import (
    AUTO,
    COMBINED_ATTRIBUTES,
    check_each_argument,
    check_load_arguments,
    check_model_choices,
    policy_kwargs_for,
)
from sb3_metarl.meta_pg.evaluation_worker import EvaluationWorker
from sb3_metarl.meta_pg.meta_algorithm import MetaAlgorithm
from sb3_metarl.meta_pg.policies import CnnPolicy, MlpPolicy
from sb3_metarl.meta_pg.reuse import REUSE_TASKS_PER_META_BATCH, InnerSampleReuse
from sb3_metarl.mlp import make_adaptation
from sb3_metarl.samplers import EpisodeSampler, StepCallback
from sb3_metarl.tasks import TaskSampler

SelfMetaPolicyGradient = TypeVar("SelfMetaPolicyGradient", bound="MetaPolicyGradient")


class MetaPolicyGradient(MetaAlgorithm):
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
        meta_updater, self.gradient_mode = check_each_argument(
            dict(
                gradient_mode=gradient_mode,
                gradient_mode_kwargs=gradient_mode_kwargs,
                meta_batch_size=meta_batch_size,
                inner_episodes=inner_episodes,
                outer_episodes=outer_episodes,
                inner_steps=inner_steps,
                inner_lr=inner_lr,
                learning_rate=learning_rate,
                meta_optimizer=meta_optimizer,
                meta_optimizer_kwargs=meta_optimizer_kwargs,
                gamma=gamma,
                gae_lambda=gae_lambda,
                baseline=baseline,
                normalize_advantage=normalize_advantage,
                discount_from_start=discount_from_start,
                n_envs=n_envs,
                vec_env_cls=vec_env_cls,
                sampler=sampler,
                sampler_kwargs=sampler_kwargs,
                inner_sample_reuse=inner_sample_reuse,
                reuse_importance_clip=reuse_importance_clip,
                max_episode_steps=max_episode_steps,
                seed=seed,
                device=device,
            )
        )
        check_model_choices(
            policy=policy,
            mode=self.gradient_mode,
            normalize_advantage=normalize_advantage,
            discount_from_start=discount_from_start,
            n_envs=n_envs,
            meta_batch_size=meta_batch_size,
            task_sampler=task_sampler,
            tensorboard_log=tensorboard_log,
            inner_sample_reuse=inner_sample_reuse,
            reuse_importance_clip=reuse_importance_clip,
        )
        policy_kwargs = policy_kwargs_for(policy_kwargs, meta_updater, meta_optimizer)

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
        self.inner_sample_reuse = inner_sample_reuse
        self.reuse_importance_clip = float(reuse_importance_clip)
        #: the stored first inner batches of ``inner_sample_reuse`` (made by ``_setup_model``; a loaded model keeps them)
        self.inner_reuse: InnerSampleReuse
        super().__init__(
            policy=policy,
            env=env,
            learning_rate=learning_rate,
            meta_batch_size=meta_batch_size,
            n_envs=n_envs or int(meta_batch_size) * max(self.inner_episodes, self.outer_episodes),
            task_sampler=task_sampler,
            vec_env_cls=vec_env_cls,
            sampler=sampler,
            sampler_kwargs=sampler_kwargs,
            env_kwargs=env_kwargs,
            max_episode_steps=max_episode_steps,
            policy_kwargs=policy_kwargs,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            verbose=verbose,
            seed=seed,
            device=device,
        )
        if _init_setup_model:
            self._setup_model()

    @classmethod
    def checked_load_arguments(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        """:return: ``load``'s keyword arguments, each checked as the constructor checks it (``check_load_arguments``)"""
        constructors = [klass.__init__ for klass in cls.__mro__ if issubclass(klass, MetaPolicyGradient)]
        return check_load_arguments(constructors, kwargs)

    def check_loaded_arguments(self) -> None:
        """After ``load`` changed arguments: the constructor's checks of the ones that must go together."""
        together = {name: getattr(self, name) for name in COMBINED_ATTRIBUTES}
        check_model_choices(policy=self.policy_class, mode=self.gradient_mode, **together)

    # ------------------------------------------------------------------ set-up

    def _setup_model(self) -> None:
        # a zip saved before 0.2 holds the object as ``meta_updater`` and the argument as ``meta_optimizer``
        if "meta_updater" in self.__dict__:
            self.meta_optimizer = self.__dict__.pop("meta_updater")
        self._setup_lr_schedule()
        # a model being loaded already holds its random streams (from the zip): keep them, and leave the
        # caller's global generators alone
        loading = self._setup_streams()
        if not loading:
            self.set_random_seed(self.seed)
        with preserved_global_rng() if loading else contextlib.nullcontext():
            self.policy = self.policy_class(self.observation_space, self.action_space, self.lr_schedule, **self.policy_kwargs)
        self.policy = self.policy.to(self.device)
        self.functional_policy = FunctionalPolicy(self.policy)
        self.baseline_model = make_baseline(self.baseline)
        bounds = self.inner_sample_reuse, self.reuse_importance_clip, REUSE_TASKS_PER_META_BATCH * self.meta_batch_size
        self.inner_reuse = InnerSampleReuse.built_over(self.__dict__, *bounds)
        self._setup_sampling()

    @property
    def max_steps_per_iteration(self) -> int:
        """Env steps of one meta-iteration when no episode ends early: B x (inner_steps x N + M) x horizon."""
        episodes = self.inner_steps * self.inner_episodes + self.outer_episodes
        return self.meta_batch_size * episodes * self.episode_sampler.horizon

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
        return make_adaptation(self.functional_policy, float(self.inner_lr), self.inner_grad_clip, self.weighting)

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
            step_size = inner_lr.calibrate_model(self)
            self.inner_lr, self.inner_grad_clip = step_size.lr, step_size.grad_clip
            self.inner_signal_fraction = step_size.signal_fraction
        return float(self.inner_lr)

    def collect_meta_sample(self, tasks: list[Any], step_callback: StepCallback | None = None) -> MetaSample | None:
        """
        :return: the inner and outer samples of ``tasks`` and the meta-objective's graph, or None if a callback
            stopped training (``sampling.collect_meta_sample``)
        """
        self.calibrate_inner_lr()
        return sampling.collect_meta_sample(self, tasks, self.gradient_mode, self.inner_episodes, step_callback)

    def meta_gradient_on_samples(self, sample: MetaSample, mode: GradientMode) -> Params:
        """
        Per-task meta-gradient of another gradient mode on the episodes of ``sample``, without new sampling: a
        diagnostic, not a training signal (``Adaptation.per_task_meta_gradient`` says where it is off-policy).

        :param sample: a meta-iteration's samples (``learn`` passes it to callbacks as ``locals["sample"]``)
        :param mode: the gradient mode to evaluate
        :return: parameter name -> (B, ...) per-task ascent directions
        """
        return self.adaptation.per_task_meta_gradient(sample, mode)

    def estimate_meta_gradient(
        self,
        tasks: list[Any] | None = None,
        per_task: bool = False,
        gradient_mode: GradientMode | None = None,
        inner_episodes: int | None = None,
    ) -> dict[str, th.Tensor]:
        """
        Estimate the meta-gradient at the current parameters from fresh samples, without updating.

        :param tasks: the tasks to use (at most ``meta_batch_size``); default: ``meta_batch_size`` from the sampler
        :param per_task: return one estimate per task (leading task dim) instead of their mean
        :param gradient_mode: the mode to estimate with (default: the model's; the inner step size stays the model's)
        :param inner_episodes: episodes per task and inner step (default: the model's)
        :return: policy parameter name -> ascent direction of the meta-objective
        """
        self.calibrate_inner_lr()
        tasks = self.sample_tasks(self.meta_batch_size, self.streams.task_rng) if tasks is None else list(tasks)
        mode = self.gradient_mode if gradient_mode is None else gradient_mode
        episodes = self.inner_episodes if inner_episodes is None else int(inner_episodes)
        sample = sampling.collect_meta_sample(self, tasks, mode, episodes)
        assert sample is not None
        grads = self.adaptation.per_task_meta_gradient(sample)
        return grads if per_task else {n: g.mean(0) for n, g in grads.items()}

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

    def _before_learning(self) -> None:
        self.calibrate_inner_lr()

    def _after_meta_update(self, tasks: list[Any], sample: MetaSample) -> None:
        if self.inner_sample_reuse:
            self.inner_reuse.remember(tasks, sample)

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

    def evaluation_worker(self, env: GymEnv | str | Callable[[], gym.Env], timeout: float | None = None) -> EvaluationWorker:
        """
        A worker process that evaluates copies of this model (``save``'s bytes) on sub-envs of ``env`` of its own while
        training goes on, with ``evaluate_adaptation``'s numbers (``MetaEvalCallback(in_background=True)`` uses it).

        :param env: the env to evaluate on (an id, a factory or an instance)
        :param timeout: seconds an evaluation may take before the worker is taken for frozen (None: no limit)
        """
        return EvaluationWorker(type(self), env, self.device, timeout)
