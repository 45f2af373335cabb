"""
Meta-World's meta-learning benchmarks (ML1, ML10, ML45) as task families (the evaluation protocol over a trained
model is the algorithm's: ``sb3_metarl.meta_pg.metaworld``).

Needs the optional extra: ``pip install "sb3_metarl[metaworld]"`` (metaworld 3.1.1, which pins
mujoco 3.3.0; the MuJoCo families run on it too).
"""

import collections
import functools
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from sb3_metarl.tasks import meta_world_fast
from sb3_metarl.tasks.distributions import TaskSampler

BENCHMARKS = ("ML1", "ML10", "ML45")
#: Meta-World's episode length (``max_path_length`` of its envs)
METAWORLD_HORIZON = 500


def import_metaworld() -> Any:
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
    metaworld = import_metaworld()
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
    :param accelerate: bind faster replacements of three helpers of Meta-World's step (contacts, the objects'
        quaternions, the observation's assembly) to each env instance; steps stay Meta-World's bit for bit
        (``sb3_metarl.tasks.meta_world_fast``). False runs Meta-World's own code throughout.
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": []}

    def __init__(
        self, benchmark: str = "ML1", env_name: str | None = "reach-v3", seed: int = 0, max_cached_envs: int = 2,
        accelerate: bool = True,
    ):
        if max_cached_envs < 1:
            raise ValueError(f"max_cached_envs: must be >= 1, got {max_cached_envs}.")
        if not isinstance(accelerate, bool):
            raise ValueError(f"accelerate: must be True or False, got {accelerate!r}.")
        self.max_cached_envs, self.accelerate = max_cached_envs, accelerate
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
            self._drop(self._envs.popitem(last=False)[1])
        env = self.classes[env_name]()
        if self.accelerate:
            meta_world_fast.accelerate(env)
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

    @staticmethod
    def _drop(env: gym.Env) -> None:
        env.close()
        meta_world_fast.release(env)  # (its helpers' reference cycle would keep it, and its MuJoCo data, alive)

    def close(self) -> None:
        for env in self._envs.values():
            self._drop(env)


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
