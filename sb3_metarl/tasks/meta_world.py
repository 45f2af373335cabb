"""
Meta-World's meta-learning benchmarks (ML1, ML10, ML45) as task families, and an adapter for
Meta-World's own meta-learning evaluation protocol.

Needs the optional extra: ``pip install "sb3_metarl[metaworld]"`` (metaworld 3.1.1, which pins
mujoco 3.3.0; the MuJoCo families run on it too).
"""

import collections
import functools
from typing import Any, ClassVar, Protocol

import gymnasium as gym
import numpy as np
import torch as th
from gymnasium import spaces

from sb3_metarl.common.buffers import EpisodeBatch, TaskRolloutBuffer
from sb3_metarl.common.functional import FunctionalPolicy, Params
from sb3_metarl.tasks.samplers import TaskSampler


class AdaptableModel(Protocol):
    """
    What Meta-World's protocol needs of a trained model: its public meta-test API (``MetaPolicyGradient``
    has it; typed loosely here because the task room sits below the adaptation and the algorithm).
    """

    functional_policy: FunctionalPolicy
    gradient_mode: Any
    observation_space: gym.Space
    action_space: gym.Space
    device: th.device

    @property
    def adaptation(self) -> Any:
        """``adaptation.adapt(params, batch, mode)``: one inner step on a batch, detached"""

    @property
    def weighting(self) -> Any:
        """``weighting(batch)``: the batch with its policy-gradient weights"""

BENCHMARKS = ("ML1", "ML10", "ML45")
#: Meta-World's episode length (``max_path_length`` of its envs)
METAWORLD_HORIZON = 500


def _import_metaworld() -> Any:
    try:
        import metaworld
    except ImportError as error:
        raise ImportError(
            'Meta-World is not installed: pip install "sb3_metarl[metaworld]" (metaworld==3.1.1, with mujoco==3.3.0).'
        ) from error
    return metaworld


def resolve_env_name(benchmark: str, env_name: str | None) -> str | None:
    """:return: ``env_name``, or None for ML10 / ML45 when it is only ML1's default ("reach-v3")"""
    return None if benchmark != "ML1" and env_name == "reach-v3" else env_name


def make_benchmark(benchmark: str = "ML1", env_name: str | None = "reach-v3", seed: int = 0) -> Any:
    """
    Meta-World's benchmark object, made once per process and arguments: making one instantiates
    every env class of the benchmark to draw its goals (seconds for ML10, most of a minute for ML45).

    :param benchmark: "ML1", "ML10" or "ML45"
    :param env_name: the Meta-World env of ML1 (e.g. "reach-v3", "push-v3", "pick-place-v3"); None for ML10 / ML45
    :param seed: the seed of Meta-World's task (goal) generation
    :return: the ``metaworld.Benchmark`` (shared: do not modify it)
    """
    return _make_benchmark(benchmark, env_name, seed)


@functools.lru_cache(maxsize=8)
def _make_benchmark(benchmark: str, env_name: str | None, seed: int) -> Any:
    """
    :param benchmark: "ML1", "ML10" or "ML45"
    :param env_name: the Meta-World env of ML1 (e.g. "reach-v3", "push-v3", "pick-place-v3"); None for ML10 / ML45
    :param seed: the seed of Meta-World's task (goal) generation
    :return: the ``metaworld.Benchmark``
    """
    metaworld = _import_metaworld()
    if benchmark not in BENCHMARKS:
        raise ValueError(f"benchmark: unknown Meta-World benchmark {benchmark!r}; use one of {list(BENCHMARKS)}.")
    if benchmark == "ML1":
        if env_name not in metaworld.ML1.ENV_NAMES:
            raise ValueError(f"env_name: {env_name!r} is not a Meta-World v3 env; ML1 takes one of {metaworld.ML1.ENV_NAMES}.")
        return metaworld.ML1(env_name, seed=seed)
    if env_name is not None:
        raise ValueError(f"env_name: {benchmark} has fixed train and test envs; pass env_name=None.")
    return getattr(metaworld, benchmark)(seed=seed)


def split_tasks(benchmark: Any, split: str) -> list[Any]:
    """:return: the benchmark's ``train_tasks`` or ``test_tasks``"""
    if split not in ("train", "test"):
        raise ValueError(f"split: must be 'train' or 'test', got {split!r}.")
    return list(benchmark.train_tasks if split == "train" else benchmark.test_tasks)


class MetaWorldTaskEnv(gym.Env):
    """
    One env that runs any task of a Meta-World ML benchmark, train or test split: ``set_task``
    switches to the task's Meta-World env class (one instance per class, made when first needed)
    and calls Meta-World's own ``set_task``. ``sample_tasks`` draws from the training tasks.
    Observations are Meta-World's 39-dim vectors (goal hidden), actions are 4-dim in [-1, 1].
    Episodes last ``max_episode_steps`` (500, Meta-World's ``max_path_length``, by default).

    :param benchmark: "ML1", "ML10" or "ML45"
    :param env_name: the env of ML1; None for ML10 / ML45
    :param seed: seed of Meta-World's task generation (the same seed gives the same tasks everywhere)
    :param max_cached_envs: env instances kept per sub-env, least recently used dropped first: one
        costs about 18 MB and 0.15 s to build, so for ML10 / ML45 keep this small and meta-train
        with few sub-envs (``n_envs=meta_batch_size``: the episodes of a task then run in waves)
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": []}

    def __init__(self, benchmark: str = "ML1", env_name: str | None = "reach-v3", seed: int = 0, max_cached_envs: int = 2):
        if max_cached_envs < 1:
            raise ValueError(f"max_cached_envs: must be >= 1, got {max_cached_envs}.")
        self.max_cached_envs = max_cached_envs
        env_name = resolve_env_name(benchmark, env_name)
        self.benchmark_name, self.env_name, self.seed = benchmark, env_name, seed
        self.benchmark = make_benchmark(benchmark, env_name, seed)
        self.classes = {**self.benchmark.train_classes, **self.benchmark.test_classes}
        self.train_tasks = split_tasks(self.benchmark, "train")
        self._envs: collections.OrderedDict[str, gym.Env] = collections.OrderedDict()
        self.set_task(self.train_tasks[0])
        self.observation_space = spaces.Box(-np.inf, np.inf, self._active.observation_space.shape, np.float64)
        self.action_space = self._active.action_space

    def _env(self, env_name: str) -> gym.Env:
        if env_name in self._envs:
            self._envs.move_to_end(env_name)
            return self._envs[env_name]
        while len(self._envs) >= self.max_cached_envs:
            self._envs.popitem(last=False)[1].close()
        env = self.classes[env_name]()
        env.seed(self.seed)
        self._envs[env_name] = env
        return env

    def set_task(self, task: Any) -> None:
        """
        :param task: a ``metaworld.Task`` of this benchmark (train or test split)
        """
        env_name = getattr(task, "env_name", None)
        if env_name not in self.classes or not hasattr(task, "data"):
            raise ValueError(
                f"task: expected a metaworld.Task of {self.benchmark_name} (envs {sorted(self.classes)}), got {task!r:.80}; "
                "draw tasks with sample_tasks() or MetaWorldTaskSampler."
            )
        env = self._env(env_name)
        env.set_task(task)
        self._active, self._task = env, task

    def get_task(self) -> Any:
        return self._task

    def sample_tasks(self, n: int, rng: np.random.Generator | None = None) -> list[Any]:
        """:return: ``n`` tasks drawn uniformly (with replacement) from the training tasks"""
        rng = self.np_random if rng is None else rng
        return [self.train_tasks[i] for i in rng.integers(len(self.train_tasks), size=n)]

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        if seed is not None:
            for env in self._envs.values():
                env.seed(seed)
        return self._active.reset()

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        obs, reward, terminated, truncated, info = self._active.step(action)
        return obs, float(reward), terminated, truncated, info

    def close(self) -> None:
        for env in self._envs.values():
            env.close()


class MetaWorldTaskSampler(TaskSampler):
    """
    Meta-World's own task lists: ``train_tasks`` (meta-training) or ``test_tasks`` (held-out goals
    for ML1, held-out envs for ML10 / ML45), drawn uniformly with replacement.

    :param benchmark: "ML1", "ML10" or "ML45"
    :param env_name: the env of ML1; None for ML10 / ML45
    :param split: "train" or "test"
    :param seed: seed of Meta-World's task generation (use the env's)
    """

    def __init__(self, benchmark: str = "ML1", env_name: str | None = "reach-v3", split: str = "train", seed: int = 0):
        env_name = resolve_env_name(benchmark, env_name)
        self.benchmark, self.env_name, self.split, self.seed = benchmark, env_name, split, seed
        self.tasks = split_tasks(make_benchmark(benchmark, env_name, seed), split)

    def sample(self, n: int, rng: np.random.Generator) -> list[Any]:
        return [self.tasks[i] for i in rng.integers(len(self.tasks), size=n)]


class MetaWorldAgent:
    """
    The ``metaworld.evaluation.MetaLearningAgent`` protocol over a trained ``MetaPolicyGradient``:
    ``init`` starts every sub-env from the meta-learned parameters, ``adapt_action`` samples from the
    current per-env parameters, ``step`` stores the transitions, ``adapt`` takes one inner step per
    sub-env on its first ``adaptation_episodes`` complete episodes (the model's gradient mode,
    inner learning rate, baseline and discount), and ``eval_action`` returns the adapted policy's
    mean action (``deterministic=True``) or a sample.

    :param model: the meta-trained model
    :param num_envs: number of sub-envs of the evaluation vector env
    :param adaptation_episodes: episodes per sub-env that each inner step uses
    :param deterministic: act with the mean action at evaluation
    """

    def __init__(self, model: AdaptableModel, num_envs: int, adaptation_episodes: int, deterministic: bool = True):
        self.model, self.num_envs, self.adaptation_episodes = model, num_envs, adaptation_episodes
        self.deterministic = deterministic
        self.init()

    def init(self) -> None:
        theta = FunctionalPolicy.expand(self.model.functional_policy.parameters(), self.num_envs)
        self.params: Params = {n: p.detach() for n, p in theta.items()}
        self._clear()

    def _clear(self) -> None:
        self._current: list[list[tuple]] = [[] for _ in range(self.num_envs)]
        self._episodes: list[list[list[tuple]]] = [[] for _ in range(self.num_envs)]

    def _distribution(self, observations: np.ndarray) -> Any:
        obs = th.as_tensor(np.asarray(observations), dtype=th.float32, device=self.model.device)
        with th.no_grad():
            return self.model.functional_policy.distribution(self.params, obs.reshape(self.num_envs, 1, -1))

    def adapt_action(self, observations: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        dist = self._distribution(observations)
        with th.no_grad():
            actions = dist.get_actions()
            log_probs = dist.log_prob(actions)
        raw = actions.cpu().numpy()
        aux = {"raw_actions": raw, "log_probs": log_probs.cpu().numpy()}
        return np.clip(raw, self.model.action_space.low, self.model.action_space.high), aux

    def eval_action(self, observations: np.ndarray) -> np.ndarray:
        dist = self._distribution(observations)
        with th.no_grad():
            actions = dist.get_actions(deterministic=self.deterministic).cpu().numpy()
        return np.clip(actions, self.model.action_space.low, self.model.action_space.high)

    def step(self, timestep: Any) -> None:
        done = np.logical_or(timestep.terminated, timestep.truncated)
        aux = timestep.aux_policy_outputs
        for i in range(self.num_envs):
            self._current[i].append(
                (timestep.observation[i], aux["raw_actions"][i], float(timestep.reward[i]), aux["log_probs"][i])
            )
            if done[i]:
                self._episodes[i].append(self._current[i])
                self._current[i] = []

    def _batch(self) -> EpisodeBatch:
        episodes = [env_episodes[: self.adaptation_episodes] for env_episodes in self._episodes]
        if min(len(e) for e in episodes) < self.adaptation_episodes:
            raise ValueError(f"adapt: every sub-env needs {self.adaptation_episodes} complete episodes before adapting.")
        horizon = max(len(episode) for env_episodes in episodes for episode in env_episodes)
        model = self.model
        buffer = TaskRolloutBuffer(
            horizon, self.num_envs, self.adaptation_episodes, model.observation_space, model.action_space, model.device
        )
        for task, env_episodes in enumerate(episodes):
            for e, episode in enumerate(env_episodes):
                column = np.array([task * self.adaptation_episodes + e])
                for t, (obs, action, reward, log_prob) in enumerate(episode):
                    buffer.add_step(t, column, obs[None], action[None], np.array([reward]), np.array([log_prob]))
        return self.model.weighting(buffer.to_batch())

    def adapt(self) -> None:
        self.model.calibrate_inner_lr()
        self.params = self.model.adaptation.adapt(self.params, self._batch(), self.model.gradient_mode)
        self._clear()

    def reset(self, env_mask: np.ndarray) -> None:
        """The policy is memoryless: nothing to reset."""


def evaluation_layout(benchmark: Any, meta_batch_size: int) -> tuple[int, int]:
    """
    Meta-World's test vector env gives each test env class ``meta_batch_size / n_classes`` sub-envs and
    deals each class's tasks to them evenly, failing otherwise ("Invalid division of subtasks").

    :return: the number of sub-envs (``meta_batch_size`` rounded up to a multiple of the number of test
        classes) and the tasks to keep per class (the largest multiple of the sub-envs per class)
    """
    n_classes = len(benchmark.test_classes)
    per_class = -(-meta_batch_size // n_classes)
    tasks_per_class = min(sum(task.env_name == name for task in benchmark.test_tasks) for name in benchmark.test_classes)
    if per_class > tasks_per_class:
        raise ValueError(
            f"meta_batch_size: {meta_batch_size} gives {per_class} sub-envs per test env class, more than its "
            f"{tasks_per_class} tasks; use meta_batch_size <= {tasks_per_class * n_classes}."
        )
    return per_class * n_classes, tasks_per_class // per_class * per_class


class EvaluationTally:
    """
    The evaluation counts of Meta-World's meta-learning protocol, kept per sub-env: each sub-env's first
    ``episodes`` finished episodes count, a task's success rate is the mean over its sub-envs of their
    success fractions, and the evaluation is complete when every sub-env has finished ``episodes``.
    Meta-World 3.1.1's ``evaluation`` keys the counts by task *name* instead (fixed upstream by Metaworld
    PR #577): with several sub-envs of one env class (every sub-env of ML1) the first finished episodes of
    *any* of them fill the count, and since evaluation episodes end at the first success, successful
    episodes finish first and the success rate is biased upwards.

    :param task_names: the env name of each sub-env
    :param episodes: evaluation episodes counted per sub-env
    """

    def __init__(self, task_names: list[str], episodes: int):
        self.task_names, self.episodes = list(task_names), episodes
        self.returns: list[list[float]] = [[] for _ in task_names]
        self.successes: list[list[bool]] = [[] for _ in task_names]

    def record(self, sub_env: int, episode_return: float, success: bool) -> None:
        """A finished episode of ``sub_env`` (counted if it is among the sub-env's first ``episodes``)."""
        if len(self.returns[sub_env]) < self.episodes:
            self.returns[sub_env].append(float(episode_return))
            self.successes[sub_env].append(bool(success))

    @property
    def complete(self) -> bool:
        return all(len(returns) >= self.episodes for returns in self.returns)

    def success_rate_per_task(self) -> dict[str, float]:
        rates: dict[str, list[float]] = {}
        for name, successes in zip(self.task_names, self.successes):
            rates.setdefault(name, []).append(float(np.mean(successes)))
        return {name: float(np.mean(values)) for name, values in rates.items()}

    def mean_return(self) -> float:
        return float(np.mean([episode for returns in self.returns for episode in returns]))


def metalearning_evaluation_per_sub_env(
    agent: Any,
    envs: Any,
    num_evals: int,
    adaptation_steps: int,
    adaptation_episodes: int,
    evaluation_episodes: int,
) -> tuple[float, float, dict[str, float]]:
    """
    Meta-World's meta-learning evaluation protocol (``metaworld.evaluation.metalearning_evaluation``: per round,
    new test tasks, ``adaptation_steps`` x (``adaptation_episodes`` per sub-env, then ``agent.adapt()``), then
    ``evaluation_episodes`` per sub-env with ``agent.eval_action``, ending at the first success), with the
    evaluation counted per sub-env (``EvaluationTally``).

    :return: the mean success rate over rounds and tasks, the mean evaluation return, the success rate per task
    """
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS
    from metaworld.evaluation import Timestep

    class_to_name = {env_class.__name__: name for name, env_class in ALL_V3_ENVIRONMENTS.items()}
    task_names = [class_to_name[name] for name in envs.get_attr("task_name")]
    envs.call("toggle_sample_tasks_on_reset", False)
    success_rates, mean_returns, per_task = [], [], []
    for _ in range(num_evals):
        envs.call("sample_tasks")
        agent.init()
        envs.call("toggle_terminate_on_success", False)
        for _ in range(adaptation_steps):
            observations, _ = envs.reset()
            finished = np.zeros(envs.num_envs, dtype=int)
            while (finished < adaptation_episodes).any():
                actions, aux = agent.adapt_action(observations)
                next_observations, rewards, terminated, truncated, _ = envs.step(actions)
                agent.step(Timestep(observations, actions, rewards, terminated, truncated, aux))
                finished += np.logical_or(terminated, truncated)
                observations = next_observations
            agent.adapt()
        envs.call("toggle_terminate_on_success", True)
        observations, _ = envs.reset()
        agent.reset(np.ones(envs.num_envs, dtype=bool))
        tally = EvaluationTally(task_names, evaluation_episodes)
        while not tally.complete:
            observations, _, terminated, truncated, infos = envs.step(agent.eval_action(observations))
            done = np.logical_or(terminated, truncated)
            agent.reset(done)
            for index in np.flatnonzero(done):
                final = infos["final_info"]
                tally.record(int(index), final["episode"]["r"][index], final["success"][index])
        rates = tally.success_rate_per_task()
        success_rates.append(float(np.mean(list(rates.values()))))
        mean_returns.append(tally.mean_return())
        per_task.append(rates)
    envs.call("toggle_terminate_on_success", False)
    names = sorted(per_task[0])
    return (
        float(np.mean(success_rates)),
        float(np.mean(mean_returns)),
        {name: float(np.mean([rates[name] for rates in per_task])) for name in names},
    )


def metaworld_evaluation(
    model: AdaptableModel,
    benchmark: str = "ML1",
    env_name: str | None = "reach-v3",
    seed: int = 0,
    meta_batch_size: int = 20,
    num_evals: int = 10,
    adaptation_steps: int = 1,
    adaptation_episodes: int = 10,
    evaluation_episodes: int = 3,
    max_episode_steps: int | None = None,
    deterministic: bool = True,
    count_per_sub_env: bool = True,
) -> dict[str, Any]:
    """
    Meta-World's meta-learning evaluation protocol on the benchmark's test split, with ``MetaWorldAgent``
    adapting the model: by default with the evaluation episodes counted per sub-env
    (``metalearning_evaluation_per_sub_env``; Meta-World 3.1.1's own counting favours the sub-envs that
    succeed first, Metaworld PR #577), or Meta-World's own ``metaworld.evaluation.metalearning_evaluation``.

    :param model: the meta-trained model
    :param benchmark: "ML1", "ML10" or "ML45"
    :param env_name: the env of ML1; None for ML10 / ML45
    :param seed: seed of Meta-World's task generation and of its evaluation envs
    :param meta_batch_size: sub-envs of the evaluation vector env; any positive number: it is rounded up to a
        multiple of the number of test env classes, and each class's tasks are cut to a multiple of the
        sub-envs per class, so that Meta-World can divide them evenly
    :param num_evals: evaluation rounds, each on freshly drawn test tasks
    :param adaptation_steps: inner steps before the evaluation episodes
    :param adaptation_episodes: episodes per sub-env and inner step
    :param evaluation_episodes: evaluation episodes per sub-env (ending on success, as Meta-World does)
    :param max_episode_steps: episode length (default: Meta-World's 500)
    :param deterministic: evaluate the adapted policies' mean actions
    :param count_per_sub_env: count each sub-env's first ``evaluation_episodes`` (False: Meta-World 3.1.1's
        counting per task name, for comparison)
    :return: ``success_rate``, ``mean_return`` and ``success_rate_per_task``
    """
    metaworld = _import_metaworld()
    from metaworld.evaluation import metalearning_evaluation

    env_name = resolve_env_name(benchmark, env_name)
    if isinstance(meta_batch_size, bool) or not isinstance(meta_batch_size, int) or meta_batch_size < 1:
        raise ValueError(f"meta_batch_size: must be a positive integer, got {meta_batch_size!r}.")
    name = env_name if benchmark == "ML1" else benchmark
    extra = {} if max_episode_steps is None else {"max_episode_steps": max_episode_steps}
    sub_envs, tasks_per_class = evaluation_layout(make_benchmark(benchmark, env_name, seed), meta_batch_size)
    envs = metaworld.make_ml_envs_test(
        name, seed=seed, meta_batch_size=sub_envs, total_tasks_per_cls=tasks_per_class, **extra
    )
    try:
        agent = MetaWorldAgent(model, envs.num_envs, adaptation_episodes, deterministic)
        with th.random.fork_rng():
            th.manual_seed(seed)
            protocol = metalearning_evaluation_per_sub_env if count_per_sub_env else metalearning_evaluation
            success_rate, mean_return, per_task = protocol(
                agent, envs, num_evals, adaptation_steps, adaptation_episodes, evaluation_episodes
            )
    finally:
        envs.close()
    return {
        "success_rate": float(success_rate),
        "mean_return": float(mean_return),
        "success_rate_per_task": {k: float(v) for k, v in per_task.items()},
    }
