"""
The meta-iteration loop of an SB3 algorithm (what ``OnPolicyAlgorithm`` is to PPO): the sub-envs and their
sampler, training's random streams and exact resume (save/load), the callbacks, the rollout statistics and
the logs. A subclass says how a meta-iteration's sample is collected and what update it makes.
"""

import io
import pathlib
import sys
import time
from abc import abstractmethod
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import gymnasium as gym
import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback, CallbackList, ConvertCallback
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, Schedule
from stable_baselines3.common.utils import safe_mean, set_random_seed
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv

from sb3_metarl.adaptation import MetaSample
from sb3_metarl.common.callbacks import MetaProgressBarCallback, reject_unadapted_evaluation
from sb3_metarl.common.files import check_saved_model, replaced_atomically
from sb3_metarl.common.rng import EnvRngState, preserved_global_rng
from sb3_metarl.meta_pg import sampling
from sb3_metarl.meta_pg.arguments import DICT_OBSERVATION_HINT
from sb3_metarl.meta_pg.streams import RunStreams
from sb3_metarl.samplers import EpisodeSampler, StepCallback
from sb3_metarl.samplers.factory import make_episode_sampler, make_sub_envs
from sb3_metarl.samplers.processes import resolve_vec_env_cls
from sb3_metarl.tasks import EnvTaskSampler, TaskSampler

SelfMetaAlgorithm = TypeVar("SelfMetaAlgorithm", bound="MetaAlgorithm")


class MetaAlgorithm(BaseAlgorithm):
    """
    An SB3 algorithm whose iteration samples episodes of ``meta_batch_size`` tasks and applies one meta-update.
    The loop (``learn``), the sub-envs, the sampler, the random streams that make a run resume exactly and
    the logs live here; ``collect_meta_sample`` and ``train`` are the subclass's (``MetaPolicyGradient``).

    :param policy: the policy model
    :param env: a registered env id, an env factory (callable) or a VecEnv of task-aware envs
    :param learning_rate: the meta learning rate, constant or SB3 schedule
    :param meta_batch_size: tasks per meta-iteration (B)
    :param n_envs: sub-envs stepped together, a multiple of ``meta_batch_size``
    :param task_sampler: the task distribution; default: the env's own ``sample_tasks``
    :param vec_env_cls: the VecEnv class of the sub-envs for ``sampler="vec_env"``
    :param sampler: "vec_env", "subproc", "ray" or an ``EpisodeSampler``
    :param sampler_kwargs: arguments of the sampler's backend
    :param env_kwargs: keyword arguments for ``gym.make`` when ``env`` is an id
    :param max_episode_steps: the horizon H (default: the env's own)
    :param policy_kwargs: additional arguments passed to the policy on creation
    :param stats_window_size: window for the rollout logging averages
    :param tensorboard_log: the log location for tensorboard (if None, no logging)
    :param verbose: 0 no output, 1 info messages, 2 debug
    :param seed: seed for the pseudo random generators
    :param device: device (cpu, cuda, ...) on which the code should be run
    """

    def __init__(
        self,
        policy: str | type[ActorCriticPolicy],
        env: GymEnv | str | Callable[[], gym.Env] | None,
        learning_rate: float | Schedule,
        meta_batch_size: int,
        n_envs: int,
        task_sampler: TaskSampler | None = None,
        vec_env_cls: type[DummyVecEnv | SubprocVecEnv] | str | None = None,
        sampler: str | EpisodeSampler = "vec_env",
        sampler_kwargs: dict[str, Any] | None = None,
        env_kwargs: dict[str, Any] | None = None,
        max_episode_steps: int | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: th.device | str = "auto",
    ):
        self.meta_batch_size = int(meta_batch_size)
        self.task_sampler = task_sampler
        self.vec_env_cls = resolve_vec_env_cls(vec_env_cls)
        self.sampler = sampler
        self.sampler_kwargs = sampler_kwargs
        self.env_kwargs = env_kwargs
        self.max_episode_steps = max_episode_steps
        #: the sub-envs' random states read from a saved model, applied when its env is attached
        self._saved_env_rng_states: list[EnvRngState] | None = None
        #: training's random streams (made by ``_setup_model``: a loaded model keeps the saved ones)
        self.streams: RunStreams
        self.pre_adaptation_returns: deque | None = None
        #: the registered id of the env, when the model was given one (saved: ``evaluate`` on the command line uses it)
        self.env_id = env if isinstance(env, str) else None
        vec_env = self.make_sub_envs(env, n_envs)
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

    @abstractmethod
    def collect_meta_sample(self, tasks: list[Any], step_callback: StepCallback | None = None) -> MetaSample | None:
        """
        :return: the episodes of ``tasks`` (inner and outer) and the meta-objective's graph, or None if a callback
            stopped training
        """

    @abstractmethod
    def train(self, sample: MetaSample) -> None:
        """Apply one meta-update from ``sample``."""

    def _before_learning(self) -> None:
        """Called by ``learn`` once its arguments are checked, before SB3's set-up (e.g. a calibration)."""

    def _after_meta_update(self, tasks: list[Any], sample: MetaSample) -> None:
        """Called by ``learn`` after each meta-update (e.g. to keep the samples for later reuse)."""

    def _setup_streams(self) -> bool:
        """
        Training's random streams: seeded from ``seed``, or as loaded. ``_setup_model`` calls it first.

        :return: whether the model is being loaded (its streams came from the zip)
        """
        if "streams" in self.__dict__:
            return True
        if "torch_generator" in self.__dict__:  # a zip saved before the streams were one object
            self.streams = RunStreams.of(self.__dict__.pop("task_rng"), self.__dict__.pop("torch_generator"))
            return True
        self.streams = RunStreams(self.seed)
        return False

    def _setup_sampling(self) -> None:
        """The sampler and the task distribution on the model's env: ``_setup_model`` calls it once the policy exists."""
        self._episode_sampler: EpisodeSampler | None = None
        self._task_sampler: TaskSampler | None = None
        if self.env is not None:
            self._attach_env(self.env)

    # ------------------------------------------------------------------ the env and its sampler

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
            self.streams.env.seed(self.env, seed)

    def _attach_env(self, env: VecEnv) -> None:
        self._episode_sampler = make_episode_sampler(
            env, self.meta_batch_size, self.policy, self.sampler, self.max_episode_steps, self.sampler_kwargs
        )
        if self._saved_env_rng_states is not None and len(self._saved_env_rng_states) == env.num_envs:
            self.streams.env.put(env, self._saved_env_rng_states)
        elif self.seed is not None:
            self.streams.env.seed(env, self.seed)
        else:
            self.streams.env.read(env)  # the workers were just started: ask them once
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
        excluded = ["functional_policy", "_episode_sampler", "_task_sampler"]
        return [*super()._excluded_save_params(), *excluded]

    def _get_torch_save_params(self) -> tuple[list[str], list[str]]:
        # the policy's torch optimizer holds the meta-optimizer's moments (Adam), as in SB3's on-policy algorithms
        return ["policy", "policy.optimizer"], []

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
        # the streams pickle themselves as of the iteration's start; the counter and the sub-envs' states go beside them
        live_timesteps, saved = self.num_timesteps, self.streams.saved(self.num_timesteps)
        self.num_timesteps, self._saved_env_rng_states = saved.num_timesteps, saved.env if self.env is not None else None
        try:
            if isinstance(path, (str, pathlib.Path)):
                with replaced_atomically(path) as temporary:
                    super().save(temporary, exclude=exclude, include=include)
            else:
                super().save(path, exclude=exclude, include=include)
        finally:
            self.num_timesteps, self._saved_env_rng_states = live_timesteps, None

    @classmethod
    def load(  # type: ignore[override]
        cls: type[SelfMetaAlgorithm],
        path: str | pathlib.Path | io.BufferedIOBase,
        env: GymEnv | str | Callable[[], gym.Env] | None = None,
        device: th.device | str = "auto",
        custom_objects: dict[str, Any] | None = None,
        print_system_info: bool = False,
        force_reset: bool = True,
        **kwargs,
    ) -> SelfMetaAlgorithm:
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
        :param kwargs: constructor arguments to change on the loaded model (checked as the constructor checks them,
            with the same errors, before anything is loaded)
        :return: the loaded model
        :raises FileNotFoundError: if there is no file at ``path`` (nor at ``path`` + ".zip")
        :raises ValueError: if the file holds another algorithm's model

        .. warning::
            As SB3's ``load``, this unpickles the zip's ``data`` (cloudpickle), which can run any code the file's
            author put there: load only files you trust. :meth:`load_parameters` reads a zip's tensors only.
        """
        check_saved_model(path)
        kwargs = cls.checked_load_arguments(kwargs)
        with preserved_global_rng():
            model = super().load(path, None, device, custom_objects, print_system_info, force_reset, **kwargs)
        if kwargs:
            model.check_loaded_arguments()
        if env is not None:
            model.set_env(env, force_reset=force_reset)
        return model

    @classmethod
    def load_parameters(
        cls: type[SelfMetaAlgorithm],
        path: str | pathlib.Path,
        env: GymEnv | str | Callable[[], gym.Env] | None,
        policy: Any = "MlpPolicy",
        device: th.device | str = "auto",
        **kwargs: Any,
    ) -> SelfMetaAlgorithm:
        """
        A model built from arguments given here, with the parameters of a saved zip, reading nothing from the file but
        its tensors (through ``torch.load(weights_only=True)``, as SB3's ``set_parameters``): no code in the file runs,
        whoever made it. For evaluating or fine-tuning a file that is not trusted (a downloaded checkpoint); what the
        arguments do not say (the optimizer's state, the random streams, the counters) starts afresh, so training from
        it is not the saved run's continuation (:meth:`load` is, for a trusted file).

        :param path: the saved zip
        :param env: the env to run on (as the constructor's)
        :param policy: the policy (as the constructor's)
        :param device: the device
        :param kwargs: the constructor's arguments the model was saved with (``policy_kwargs`` for its architecture;
            a run of ``benchmarks/reproduce_published.py`` lists them in its ``run.json``)
        :return: the model
        :raises RuntimeError: (SB3's) if the file's tensors do not fit the architecture the arguments build
        """
        check_saved_model(path)
        model = cls(policy, env, device=device, **kwargs)
        model.set_parameters(str(path), exact_match=True, device=device)
        return model

    @classmethod
    def checked_load_arguments(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        """
        :param kwargs: the keyword arguments given to :meth:`load` (attributes to change on the loaded model)
        :return: them as the model holds them, after the constructor's checks of each (here: unchanged)
        :raises ValueError: on one the constructor would refuse
        """
        return kwargs

    def check_loaded_arguments(self) -> None:
        """After :meth:`load` changed arguments: raise the constructor's errors on those that do not go together."""

    # ------------------------------------------------------------------ sampling

    def sample_tasks(self, n_tasks: int, rng: np.random.Generator, task_sampler: TaskSampler | None = None) -> list[Any]:
        """:return: ``n_tasks`` tasks from ``task_sampler`` (default: the model's), checked (``sampling.sample_tasks``)"""
        return sampling.sample_tasks(task_sampler or self.task_sampler, n_tasks, rng)

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
        self.streams.begin_iteration(self.num_timesteps)
        tasks = self.sample_tasks(self.meta_batch_size, self.streams.task_rng)
        sampling_start = time.perf_counter()
        sample = self.collect_meta_sample(tasks, step_callback)
        if sample is not None:
            self.logger.record("time/sample_seconds", time.perf_counter() - sampling_start)
            callback.update_locals({"sample": sample, "tasks": tasks})
            callback.on_rollout_end()
        return tasks, sample

    def learn(
        self: SelfMetaAlgorithm,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 1,
        tb_log_name: str | None = None,
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfMetaAlgorithm:
        """
        Meta-train until ``total_timesteps`` environment steps (inner and outer episodes) were taken.

        :param total_timesteps: environment steps to take, counting every step of every collected episode
        :param callback: SB3 callback(s); ``on_step`` is called once per sampled batch (``inner_steps + 1`` per
            meta-iteration), on every sampler backend
        :param log_interval: meta-iterations between log dumps
        :param tb_log_name: the name of the run for TensorBoard logging (default: the class name, e.g. "MetaPolicyGradient")
        :param reset_num_timesteps: whether or not to reset the current timestep number (used in logging)
        :param progress_bar: display a progress bar using tqdm and rich
        :return: the trained model
        """
        self.episode_sampler  # noqa: B018  (a clear error when the model has no env)
        if not isinstance(total_timesteps, (int, np.integer)) or isinstance(total_timesteps, bool) or total_timesteps < 1:
            raise ValueError(f"total_timesteps: must be a positive integer, got {total_timesteps!r}.")
        reject_unadapted_evaluation(callback)
        self._before_learning()
        self._reset_episode_stats(reset_num_timesteps)
        # SB3 resets the env here; the sub-envs are reset at every wave anyway, and that reset must
        # not draw from their random streams (a resumed run would not replay it)
        with self.streams.env.kept(self.env):
            total_timesteps, callback = self._setup_learn(
                total_timesteps, callback, reset_num_timesteps, tb_log_name or type(self).__name__, progress_bar
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
            self._after_meta_update(tasks, sample)
            # the meta-sample holds the inner steps' graph, most of a large run's memory (an ML10 update's: gigabytes):
            # callbacks see it from on_rollout_end until its update is done, not while the next iteration samples,
            # checkpoints or evaluates
            callback.update_locals({"sample": None})
            del sample
            self.streams.end_iteration()
            if log_interval is not None and iteration % log_interval == 0:
                self.dump_logs(iteration)
        self.streams.end_iteration()
        callback.on_training_end()
        return self

    def _step_callback(self, callback: BaseCallback) -> StepCallback:
        def on_step(n_transitions: int, step_vars: dict[str, Any]) -> bool:
            self.num_timesteps += n_transitions
            callback.update_locals({**step_vars, "n_transitions": n_transitions})
            return callback.on_step()

        return on_step
