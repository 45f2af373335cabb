"""
Meta-World's meta-learning evaluation protocol over a trained ``MetaPolicyGradient``: ``MetaWorldAgent`` (the
``metaworld.evaluation.MetaLearningAgent`` protocol) and ``metaworld_evaluation``. The benchmarks themselves are task
families of the ground (``sb3_metarl.tasks.meta_world``).
"""

from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch as th

from sb3_metarl.common.buffers import EpisodeBatch, TaskRolloutBuffer
from sb3_metarl.common.functional import FunctionalPolicy, Params
from sb3_metarl.tasks import meta_world_fast
from sb3_metarl.tasks.meta_world import import_metaworld, make_benchmark, resolve_env_name

if TYPE_CHECKING:  # (the model's type for the checker only)
    from sb3_metarl.meta_pg.meta_pg import MetaPolicyGradient


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

    def __init__(self, model: "MetaPolicyGradient", num_envs: int, adaptation_episodes: int, deterministic: bool = True):
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


class EvaluationLayout(NamedTuple):
    """How Meta-World's test vector env is laid out so that the protocol evaluates every task-goal pair once."""

    #: sub-envs of the vector env (a multiple of the number of test env classes)
    sub_envs: int
    #: tasks (goals) kept per test env class: all of them
    tasks_per_class: int
    #: rounds (``num_evals``) after which every sub-env has run each of its tasks once
    rounds: int


def evaluation_layout(benchmark: Any, meta_batch_size: int) -> EvaluationLayout:
    """
    Meta-World's test vector env deals each test env class's tasks to its ``sub_envs / n_classes`` sub-envs in
    strides (failing unless they divide evenly, "Invalid division of subtasks"), and each round of its protocol moves
    every sub-env on to its next task, reshuffling only after the last. So the sub-envs per class are taken as the
    smallest divisor of the class's number of tasks that is at least ``meta_batch_size / n_classes``: with
    ``tasks / per_class`` rounds, each task-goal pair of the test split is evaluated exactly once. (metaworld-algorithms'
    ``num_evals = 5 * 40 // meta_batch_size`` with a meta-batch of 45 covers 180 of ML45's 200 pairs in its count of 40
    goals per task; Meta-World 3.1.1 generates 50 per test task, 250 pairs for ML10 and ML45.)

    :return: the sub-envs, the tasks per class and the rounds that cover every pair once
    :raises ValueError: if ``meta_batch_size`` asks for more sub-envs per class than a class has tasks
    """
    n_classes = len(benchmark.test_classes)
    wanted = -(-meta_batch_size // n_classes)
    tasks_per_class = min(sum(task.env_name == name for task in benchmark.test_tasks) for name in benchmark.test_classes)
    if wanted > tasks_per_class:
        raise ValueError(
            f"meta_batch_size: {meta_batch_size} gives {wanted} sub-envs per test env class, more than its "
            f"{tasks_per_class} tasks; use meta_batch_size <= {tasks_per_class * n_classes}."
        )
    per_class = next(k for k in range(wanted, tasks_per_class + 1) if tasks_per_class % k == 0)
    return EvaluationLayout(per_class * n_classes, tasks_per_class, tasks_per_class // per_class)


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
    model: "MetaPolicyGradient",
    benchmark: str = "ML1",
    env_name: str | None = "reach-v3",
    seed: int = 0,
    meta_batch_size: int = 20,
    num_evals: int | None = None,
    adaptation_steps: int = 1,
    adaptation_episodes: int = 10,
    evaluation_episodes: int = 3,
    max_episode_steps: int | None = None,
    deterministic: bool = True,
    count_per_sub_env: bool = True,
    accelerate: bool = True,
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
    :param meta_batch_size: about this many sub-envs in the evaluation vector env: rounded up to a number per test env
        class that divides the class's tasks (``evaluation_layout``), so that every task-goal pair can be evaluated
    :param num_evals: evaluation rounds, each sub-env on its next task; None: as many as cover every task-goal pair of
        the test split exactly once
    :param adaptation_steps: inner steps before the evaluation episodes
    :param adaptation_episodes: episodes per sub-env and inner step
    :param evaluation_episodes: evaluation episodes per sub-env (ending on success, as Meta-World does)
    :param max_episode_steps: episode length (default: Meta-World's 500)
    :param deterministic: evaluate the adapted policies' mean actions
    :param count_per_sub_env: count each sub-env's first ``evaluation_episodes`` (False: Meta-World 3.1.1's
        counting per task name, for comparison)
    :param accelerate: bind the faster, bit-identical helpers of ``sb3_metarl.tasks.meta_world_fast`` to the
        evaluation's sub-envs (False: Meta-World's own code throughout; the numbers are the same)
    :return: ``success_rate``, ``mean_return``, ``success_rate_per_task``, ``pairs_evaluated`` (task-goal pairs
        the rounds evaluated, each once, or cycled through again when ``num_evals`` asks for more) and ``pairs_total``
    """
    metaworld = import_metaworld()
    from metaworld.evaluation import metalearning_evaluation

    env_name = resolve_env_name(benchmark, env_name)
    if isinstance(meta_batch_size, bool) or not isinstance(meta_batch_size, int) or meta_batch_size < 1:
        raise ValueError(f"meta_batch_size: must be a positive integer, got {meta_batch_size!r}.")
    name = env_name if benchmark == "ML1" else benchmark
    extra = {} if max_episode_steps is None else {"max_episode_steps": max_episode_steps}
    layout = evaluation_layout(make_benchmark(benchmark, env_name, seed), meta_batch_size)
    num_evals = layout.rounds if num_evals is None else num_evals
    if isinstance(num_evals, bool) or not isinstance(num_evals, int) or num_evals < 1:
        raise ValueError(f"num_evals: must be None or a positive integer, got {num_evals!r}.")
    envs = metaworld.make_ml_envs_test(
        name, seed=seed, meta_batch_size=layout.sub_envs, total_tasks_per_cls=layout.tasks_per_class, **extra
    )
    try:
        if accelerate:
            for sub_env in envs.envs:  # make_ml_envs_test's default vector env is synchronous: its envs are here
                meta_world_fast.accelerate(sub_env.unwrapped)
        agent = MetaWorldAgent(model, envs.num_envs, adaptation_episodes, deterministic)
        with th.random.fork_rng():
            th.manual_seed(seed)
            protocol = metalearning_evaluation_per_sub_env if count_per_sub_env else metalearning_evaluation
            success_rate, mean_return, per_task = protocol(
                agent, envs, num_evals, adaptation_steps, adaptation_episodes, evaluation_episodes
            )
    finally:
        for sub_env in envs.envs:
            meta_world_fast.release(sub_env.unwrapped)
        envs.close()
    return {
        "success_rate": float(success_rate),
        "mean_return": float(mean_return),
        "success_rate_per_task": {k: float(v) for k, v in per_task.items()},
        "pairs_evaluated": min(num_evals, layout.rounds) * layout.sub_envs,
        "pairs_total": layout.rounds * layout.sub_envs,
    }
