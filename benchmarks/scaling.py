"""
Throughput of a full meta-iteration against the number of sampler workers, for each backend, next to
bare stepping of the same sub-envs in the same run.

For each family and backend (``vec_env``: this process, its batched physics on each of ``--threads``;
``subproc`` and ``ray`` with k = 1, 2, ... workers, one physics thread each), each physics (``per_env``:
Gymnasium's step per sub-env; ``batched``: the family's batched twin, where it has one) and each meta-optimizer it
runs ``--iterations`` meta-iterations (after one warm-up iteration, which also calibrates ``inner_lr="auto"``)
and reports env steps per second of sampling alone and of the whole iteration (sampling and the meta-update),
and the same sub-envs stepped bare with the same physics (random actions, no policy, no learner) in the same
number of processes and threads. Written as CSV rows as they finish, then as a Markdown table.

    python benchmarks/scaling.py                         # B = 40, N = M = 20, horizon 200, lsf, trpo
    python benchmarks/scaling.py --envs sb3_metarl/HalfCheetahVel-v0 sb3_metarl/AntDir-v0 sb3_metarl/Walker2dVel-v0 \
        sb3_metarl/HopperRandParams-v0 --meta-optimizers adam trpo --threads 1 2     # the engine's rows here
    python benchmarks/scaling.py --workers 1 2 4 8 16 --threads 1 2 4 8 16           # on a 16-core machine
    python benchmarks/scaling.py --quick                 # a smoke run (tests)
"""

import argparse
import csv
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch as th

from sb3_metarl import MetaPolicyGradient
from sb3_metarl.samplers.factory import make_task_env
from sb3_metarl.tasks.twins import batched_stepper

FIELDS = [
    "env",
    "backend",
    "workers",
    "physics",
    "threads",
    "meta_optimizer",
    "sub_envs",
    "steps_per_iteration",
    "sampling_steps_per_s",
    "iteration_steps_per_s",
    "update_s",
    "bare_steps_per_s",
    "sampling_vs_bare",
    "iteration_vs_bare",
    "speedup_vs_1_worker",
    "bytes_per_iteration",
]


def _bare_worker(
    env_id: str, n_envs: int, horizon: int, steps: int, seed: int, physics: str, threads: int, queue: Any
) -> None:
    th.set_num_threads(1)
    envs = [make_task_env(env_id, None) for _ in range(n_envs)]
    rng = np.random.default_rng(seed)
    for i, env in enumerate(envs):
        env.unwrapped.set_task(env.unwrapped.sample_tasks(1, rng)[0])  # a task env refuses to step without one
        env.reset(seed=seed + i)
    actions = rng.uniform(-1, 1, (horizon, n_envs, *envs[0].action_space.shape)).astype(np.float32)
    twin = batched_stepper([env.unwrapped for env in envs], threads) if physics == "batched" else None
    taken, t = 0, np.zeros(n_envs, dtype=int)
    rows = np.arange(n_envs)
    start = time.perf_counter()
    while taken < steps:
        if twin is not None:
            _, _, terminated, _ = twin.step(rows, actions[t % horizon, rows])
            taken += n_envs
            t += 1
            for i in np.flatnonzero(terminated | (t >= horizon)):
                envs[i].reset()
                t[i] = 0
            continue
        for i, env in enumerate(envs):
            _, _, terminated, truncated, _ = env.step(actions[t[i] % horizon, i])
            taken += 1
            t[i] += 1
            if terminated or truncated or t[i] >= horizon:
                env.reset()
                t[i] = 0
    queue.put((taken, time.perf_counter() - start))


def bare_steps_per_second(
    env_id: str, n_envs: int, horizon: int, workers: int, steps: int, physics: str = "per_env", threads: int = 1
) -> float:
    """:return: env steps per second of ``n_envs`` sub-envs stepped with random actions in ``workers`` processes"""
    context = mp.get_context("forkserver")
    queue = context.Queue()
    blocks = np.array_split(np.arange(n_envs), workers)
    processes = [
        context.Process(
            target=_bare_worker, args=(env_id, len(b), horizon, steps // workers, i, physics, threads, queue)
        )
        for i, b in enumerate(blocks)
    ]
    for process in processes:
        process.start()
    results = [queue.get(timeout=600) for _ in processes]
    for process in processes:
        process.join(timeout=30)
    # the workers run at once: the slowest sets the pace
    return sum(taken for taken, _ in results) / max(seconds for _, seconds in results)


def has_twin(env_id: str) -> bool:
    """:return: whether the family has a batched physics twin (else its rows are per-env only)"""
    return batched_stepper([make_task_env(env_id, None).unwrapped]) is not None


def measure(
    env_id: str, backend: str, workers: int, physics: str, threads: int, meta_optimizer: str, args: argparse.Namespace
) -> dict[str, Any]:
    sampler_kwargs: dict[str, Any] = dict(batched_physics=physics == "batched", num_threads=threads)
    if backend != "vec_env":
        sampler_kwargs["num_workers"] = workers
    if backend == "ray":
        sampler_kwargs["ray_init_kwargs"] = dict(num_cpus=max(args.workers), include_dashboard=False, log_to_driver=False)
    model = MetaPolicyGradient(
        "MlpPolicy",
        env_id,
        gradient_mode="lsf",
        meta_optimizer=meta_optimizer,
        meta_batch_size=args.meta_batch_size,
        inner_episodes=args.episodes,
        outer_episodes=args.episodes,
        max_episode_steps=args.horizon,
        sampler=backend,
        sampler_kwargs=sampler_kwargs,
        seed=0,
    )
    update_seconds = []
    train = model.train

    def timed_train(sample: Any) -> None:
        start = time.perf_counter()
        train(sample)
        update_seconds.append(time.perf_counter() - start)

    model.train = timed_train  # type: ignore[method-assign]
    model.learn(1)  # warm-up iteration (and the inner_lr calibration)
    env = model.get_env()
    # the process backend counts its serialized messages; Ray serializes them itself
    traffic = env.traffic() if backend == "subproc" else None
    steps_before, start = model.num_timesteps, time.perf_counter()
    for _ in range(args.iterations):
        model.learn(1, reset_num_timesteps=False)
    elapsed = time.perf_counter() - start
    steps = model.num_timesteps - steps_before
    update = sum(update_seconds[1:])
    bytes_per_iteration = None
    if traffic is not None:
        after = env.traffic()
        bytes_per_iteration = (after["sent"] + after["received"] - traffic["sent"] - traffic["received"]) // args.iterations
    env.close()
    return {
        "env": env_id.split("/")[-1],
        "backend": backend,
        "workers": workers,
        "physics": physics,
        "threads": threads,
        "meta_optimizer": meta_optimizer,
        "sub_envs": model.n_envs,
        "steps_per_iteration": steps // args.iterations,
        "sampling_steps_per_s": round(steps / (elapsed - update)),
        "iteration_steps_per_s": round(steps / elapsed),
        "update_s": round(update / args.iterations, 2),
        "bytes_per_iteration": bytes_per_iteration,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=["sb3_metarl/HalfCheetahVel-v0", "sb3_metarl/AntDir-v0"])
    parser.add_argument("--backends", nargs="+", default=["vec_env", "subproc", "ray"])
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--physics", nargs="+", default=["per_env", "batched"], choices=["per_env", "batched"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1], help="physics threads of the vec_env backend")
    parser.add_argument("--meta-optimizers", nargs="+", default=["trpo"], choices=["adam", "sgd", "trpo", "ppo"])
    parser.add_argument("--meta-batch-size", type=int, default=40)
    parser.add_argument("--episodes", type=int, default=20, help="N = M")
    parser.add_argument("--horizon", type=int, default=200)
    parser.add_argument("--iterations", type=int, default=2, help="timed meta-iterations per setting")
    parser.add_argument(
        "--out",
        default=None,
        help="path prefix of the .csv/.md (default: docs/results/scaling; with --quick in a new temporary folder)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.meta_batch_size, args.episodes, args.horizon, args.iterations = 2, 2, 10, 1
    default_out = Path(tempfile.mkdtemp(prefix="scaling_quick_")) / "scaling" if args.quick else "docs/results/scaling"
    out = Path(args.out or default_out)
    print(f"writing to {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    with open(f"{out}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, FIELDS)
        writer.writeheader()
        for env_id in args.envs:
            n_envs = args.meta_batch_size * args.episodes
            per_iteration = 2 * n_envs * args.horizon
            physics_options = args.physics if has_twin(env_id) else ["per_env"]
            settings = [
                (backend, workers, physics, threads)
                for physics in physics_options
                for backend in args.backends
                for workers in ([1] if backend == "vec_env" else args.workers)
                for threads in (args.threads if backend == "vec_env" and physics == "batched" else [1])
            ]
            bare = {}
            for _, workers, physics, threads in settings:
                if (workers, physics, threads) not in bare:
                    bare[workers, physics, threads] = bare_steps_per_second(
                        env_id, n_envs, args.horizon, workers, per_iteration, physics, threads
                    )
            for backend, workers, physics, threads in settings:
                for meta_optimizer in args.meta_optimizers:
                    row = measure(env_id, backend, workers, physics, threads, meta_optimizer, args)
                    floor = bare[workers, physics, threads]
                    row["bare_steps_per_s"] = round(floor)
                    row["sampling_vs_bare"] = round(row["sampling_steps_per_s"] / floor, 2)
                    row["iteration_vs_bare"] = round(row["iteration_steps_per_s"] / floor, 2)
                    key = (row["env"], backend, 1, physics, meta_optimizer, 1)  # the same setting on 1 worker, 1 thread
                    same = [r for r in rows if tuple(r[f] for f in [*FIELDS[:4], "meta_optimizer", "threads"]) == key]
                    one = same[0] if same else row
                    row["speedup_vs_1_worker"] = round(row["sampling_steps_per_s"] / one["sampling_steps_per_s"], 2)
                    rows.append(row)
                    writer.writerow(row)
                    handle.flush()
                    print(row, flush=True)
    command = "python benchmarks/scaling.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# Scaling: a meta-iteration's env steps per second against the number of sampler workers",
        "",
        f"`{command.strip()}`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {th.__version__}, "
        f"{th.get_num_threads()} torch threads in the learner. B = {args.meta_batch_size}, N = M = {args.episodes}, "
        f"horizon {args.horizon}, lsf, {args.iterations} timed iterations after a warm-up. Physics: `per_env` "
        "(Gymnasium's step per sub-env) or `batched` (the family's twin, on `threads` threads per process); bare: the "
        "same sub-envs, physics, processes and threads with random actions.",
        "",
        "| env | backend | workers | physics | threads | meta-optimizer | sampling steps/s | iteration steps/s | update s "
        "| bare steps/s (same processes) | sampling / bare | iteration / bare | sampling speed-up vs 1 worker "
        "| bytes / iteration |",
        "|---|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['env']} | {r['backend']} | {r['workers']} | {r['physics']} | {r['threads']} | {r['meta_optimizer']} "
            f"| {r['sampling_steps_per_s']} | {r['iteration_steps_per_s']} "
            f"| {r['update_s']} | {r['bare_steps_per_s']} | {r['sampling_vs_bare']} | {r['iteration_vs_bare']} "
            f"| {r['speedup_vs_1_worker']} | {r['bytes_per_iteration'] if r['bytes_per_iteration'] is not None else '-'} |"
        )
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
