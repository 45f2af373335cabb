"""
Where Meta-World's sampling time goes, per env class of a benchmark (issue: Meta-World sampling speed).

For each env class of ML10 (its 10 train and 5 test classes), one env of Meta-World's own class is stepped with
random actions for ``--steps`` steps (resets at its 500-step episode end) and timed, with its physics
(``do_simulation``: ``mj_step`` x frame_skip and the controls) timed apart: env steps/s and the share of a step that is
the physics, the rest being the reward and observation code and Python; and the same class with the library's
bit-identical helpers bound (``sb3_metarl.tasks.meta_world_fast``, the default of ``MetaWorldTaskEnv``). Then, in the
same run, the library's sampler (``MetaPolicyGradient.sample_episodes``: the policy acting per task group, the per-env
path) samples ``--episodes`` episodes of each of ``--tasks`` training tasks, in this process with Meta-World's own
helpers (``accelerate=False``), with the accelerated ones, and (``--samplers ... subproc``) in 2 worker processes,
against Meta-World's own classes stepping as many env steps of the same tasks in one process with random actions.

    python benchmarks/metaworld_sampling.py --benchmark ML10 --steps 1000 --tasks 10 --episodes 2 --samplers vec_env subproc

Torch runs on one thread (``torch.set_num_threads(1)``), as the published-budget runs.
"""

import argparse
import json
import os
import platform
import time
from typing import Any

import numpy as np
import torch as th

from sb3_metarl import MetaPolicyGradient
from sb3_metarl.tasks.meta_world import make_benchmark
from sb3_metarl.tasks.meta_world_fast import accelerate


def _timed_physics(env: Any) -> list[float]:
    """Wrap ``env.do_simulation`` so that its seconds add up in the returned one-element list."""
    spent = [0.0]
    simulate = env.do_simulation

    def do_simulation(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return simulate(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - start

    env.do_simulation = do_simulation
    return spent


def _steps_per_second(env: Any, actions: np.ndarray, seed: int) -> tuple[float, float]:
    """:return: env steps/s of ``env`` stepped with ``actions`` (resets at its episode end) and its physics' share"""
    env.reset(seed=seed)
    physics = _timed_physics(env)
    start = time.perf_counter()
    for action in actions:
        *_, truncated, _ = env.step(action)
        if truncated:
            env.reset()
    seconds = time.perf_counter() - start
    env.close()
    return len(actions) / seconds, physics[0] / seconds


def per_class_rows(benchmark_name: str, steps: int, seed: int) -> list[dict[str, Any]]:
    """
    :return: one row per env class: env steps/s of Meta-World's own step and the physics' share of it, and env steps/s
        of the same class with the library's bit-identical helpers bound (``sb3_metarl.tasks.meta_world_fast``)
    """
    benchmark = make_benchmark(benchmark_name, None, seed)
    rows = []
    for split, classes, tasks in (("train", benchmark.train_classes, benchmark.train_tasks),
                                  ("test", benchmark.test_classes, benchmark.test_tasks)):  # fmt: skip
        for name, env_class in classes.items():
            task = next(task for task in tasks if task.env_name == name)
            own, fast = env_class(), accelerate(env_class())
            for env in (own, fast):
                env.set_task(task)
            rng = np.random.default_rng(seed)
            actions = rng.uniform(-1, 1, size=(steps, *own.action_space.shape)).astype(own.action_space.dtype)
            rate, share = _steps_per_second(own, actions, seed)
            fast_rate, _ = _steps_per_second(fast, actions, seed)
            rows.append({"split": split, "env": name, "steps_per_second": round(rate), "physics_share": round(share, 3),
                         "accelerated_steps_per_second": round(fast_rate)})  # fmt: skip
    return rows


def sampler_against_meta_world(
    benchmark_name: str, n_tasks: int, seed: int, episodes: int = 1, samplers: tuple[str, ...] = ("vec_env",)
) -> dict[str, Any]:
    """
    :return: the library's sampling of ``episodes`` episodes per task (one sub-env each) with each of ``samplers``
        (``"subproc"`` on 2 workers) against Meta-World's own stepping of as many steps in one process (the in-process
        model's sub-envs, stepped bare one after another)
    """

    def make(sampler: str, accelerated: bool = True) -> MetaPolicyGradient:
        workers = {} if sampler == "vec_env" else dict(sampler_kwargs=dict(num_workers=2))
        return MetaPolicyGradient(
            "MlpPolicy", f"sb3_metarl/MetaWorld{benchmark_name}-v0", meta_batch_size=n_tasks, inner_episodes=episodes,
            outer_episodes=episodes, n_envs=n_tasks * episodes, inner_lr=1e-3, seed=seed, sampler=sampler,
            env_kwargs=dict(accelerate=accelerated), **workers,
        )  # fmt: skip

    model = make("vec_env")
    tasks = model.sample_tasks(n_tasks, np.random.default_rng(seed))
    rates: dict[str, float] = {}
    env_steps = 0
    # the in-process sampler on Meta-World's own helpers first: what the acceleration gains, in the same run
    for label, sampler, accelerated in [("vec_env, Meta-World's own helpers", "vec_env", False)] + [
        (sampler, sampler, True) for sampler in samplers
    ]:
        sampling = model if (sampler, accelerated) == ("vec_env", True) else make(sampler, accelerated)
        sampling.sample_episodes(tasks, None, episodes)  # (warm-up: the first reset of every sub-env)
        start = time.perf_counter()
        batch = sampling.sample_episodes(tasks, None, episodes)
        seconds = time.perf_counter() - start
        env_steps = int(batch.masks.sum().item())
        rates[label] = env_steps / seconds
        if sampling is not model:
            sampling.episode_sampler.close()
            sampling.get_env().close()
    model.get_env().close()
    # Meta-World's own classes on the same tasks, one env per episode, stepped bare one after another
    benchmark = make_benchmark(benchmark_name, None, seed)
    classes = {**benchmark.train_classes, **benchmark.test_classes}
    n_envs = n_tasks * episodes
    per_env = env_steps // n_envs
    rng = np.random.default_rng(seed)
    seconds = 0.0
    for task in tasks:
        for _ in range(episodes):
            env = classes[task.env_name]()
            env.set_task(task)
            env.reset(seed=seed)
            actions = rng.uniform(-1, 1, size=(per_env, *env.action_space.shape)).astype(env.action_space.dtype)
            start = time.perf_counter()
            for t in range(per_env):
                env.step(actions[t])
            seconds += time.perf_counter() - start
            env.close()
    bare_rate = per_env * n_envs / seconds
    first = samplers[0]
    return {
        "env_steps": env_steps,
        "episodes_per_task": episodes,
        "sampler": first,
        "sampler_steps_per_second": round(rates[first]),
        "meta_world_steps_per_second": round(bare_rate),
        "ratio": round(rates[first] / bare_rate, 3),
        "samplers": {
            name: {"steps_per_second": round(rate), "ratio": round(rate / bare_rate, 3)} for name, rate in rates.items()
        },
    }


def write(rows: list[dict[str, Any]], sampler: dict[str, Any], arguments: argparse.Namespace) -> None:
    os.makedirs(arguments.out, exist_ok=True)
    record = {"benchmark": arguments.benchmark, "steps": arguments.steps, "per_class": rows, "sampler": sampler,
              "load_average": os.getloadavg()[0], "cpu": platform.machine(), "torch_threads": 1}  # fmt: skip
    with open(os.path.join(arguments.out, "metaworld_sampling.jsonl"), "a") as handle:
        handle.write(json.dumps(record) + "\n")
    lines = [
        "# Meta-World sampling: where the time goes",
        "",
        f"`python benchmarks/metaworld_sampling.py --benchmark {arguments.benchmark} --steps {arguments.steps} "
        f"--tasks {arguments.tasks} --episodes {arguments.episodes} --samplers {' '.join(arguments.samplers)} "
        f"--out {arguments.out}` (one torch thread; load average "
        f"{record['load_average']:.1f} when it ran: absolute rates are this machine's at that load, the ratio is within "
        "one run).",
        "",
        "| split | env | env steps/s (Meta-World's own step, one env) | physics share of a step | env steps/s, "
        "accelerated (bit-identical) | speed-up |",
        "|---|---|---:|---:|---:|---:|",
        *(
            f"| {r['split']} | {r['env']} | {r['steps_per_second']} | {r['physics_share']:.2f} | "
            f"{r['accelerated_steps_per_second']} | {r['accelerated_steps_per_second'] / r['steps_per_second']:.2f}x |"
            for r in rows
        ),
        "",
        f"The library's sampler on {arguments.tasks} training tasks, {arguments.episodes} episode(s) each (one sub-env "
        f"per episode, {sampler['env_steps']} env steps, the policy acting per task group) against "
        f"{sampler['meta_world_steps_per_second']} env steps/s for Meta-World's own stepping of the same sub-envs in one "
        "process with random actions:",
        "",
        "| sampler | env steps/s | against Meta-World's own stepping |",
        "|---|---:|---:|",
        *(
            f"| {name}{' (2 workers)' if name == 'subproc' else ''} | {rate['steps_per_second']} | **{rate['ratio']:.2f}x** |"
            for name, rate in sampler["samplers"].items()
        ),
        "",
    ]
    with open(os.path.join(arguments.out, "metaworld_sampling.md"), "w") as handle:
        handle.write("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", default="ML10", choices=["ML10", "ML45"])
    parser.add_argument("--steps", type=int, default=1000, help="env steps per env class")
    parser.add_argument("--tasks", type=int, default=10, help="training tasks the sampler samples episodes of")
    parser.add_argument("--episodes", type=int, default=1, help="episodes per task (one sub-env each)")
    parser.add_argument("--samplers", nargs="+", default=["vec_env"], choices=["vec_env", "subproc"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/results")
    arguments = parser.parse_args(argv)
    th.set_num_threads(1)
    rows = per_class_rows(arguments.benchmark, arguments.steps, arguments.seed)
    sampler = sampler_against_meta_world(
        arguments.benchmark, arguments.tasks, arguments.seed, arguments.episodes, tuple(arguments.samplers)
    )
    write(rows, sampler, arguments)
    print(open(os.path.join(arguments.out, "metaworld_sampling.md")).read())


if __name__ == "__main__":
    main()
