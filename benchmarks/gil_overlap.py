"""
Can a physics thread advance MuJoCo while the sampling thread runs Python (acting, bookkeeping)?

The batched twin's physics threads call ``mj_step`` once per sub-env, and MuJoCo releases the GIL inside it; but the
loop around it needs the GIL for a microsecond between two calls. This measures, on N HalfCheetahVel sub-envs and
K control steps, the physics loop alone, split over two threads, and on one thread while this thread sleeps, runs
pure Python, or acts for the sub-envs' groups with SB3's default MLP (per group, as ``GroupPolicies`` does):

    python benchmarks/gil_overlap.py                 # 400 sub-envs, 20 control steps, 3 repeats (best of)
    python benchmarks/gil_overlap.py --switch-interval 0.0001

If the physics overlapped the Python, "physics thread + X" would take max(physics, X); it takes their sum.
"""

import argparse
import sys
import threading
import time
from collections.abc import Callable

import mujoco
import numpy as np
import torch as th

from sb3_metarl.samplers.factory import make_task_env


def best_of(repeats: int, run: Callable[[], None]) -> float:
    """:return: the shortest wall time of ``repeats`` calls of ``run``"""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sub-envs", type=int, default=400)
    parser.add_argument("--steps", type=int, default=20, help="control steps per measurement")
    parser.add_argument("--groups", type=int, default=20, help="policy copies the acting loop calls per control step")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--switch-interval", type=float, default=None, help="sys.setswitchinterval (default: Python's)")
    args = parser.parse_args(argv)
    th.set_num_threads(1)
    interval = sys.getswitchinterval()
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    try:
        measure(args)
    finally:
        sys.setswitchinterval(interval)


def measure(args: argparse.Namespace) -> None:
    """Print the table of the measurements (see the module's docstring)."""
    rng = np.random.default_rng(0)
    envs = [make_task_env("sb3_metarl/HalfCheetahVel-v0", None).unwrapped for _ in range(args.sub_envs)]
    for index, env in enumerate(envs):
        env.set_task(env.sample_tasks(1, rng)[0])
        env.reset(seed=index)
    models, datas = [env.model for env in envs], [env.data for env in envs]

    def physics(rows: range) -> None:
        for _ in range(args.steps):
            for index in rows:
                mujoco.mj_step(models[index], datas[index], nstep=envs[index].frame_skip)

    every = range(len(envs))
    policies = [
        th.nn.Sequential(th.nn.Linear(17, 64), th.nn.Tanh(), th.nn.Linear(64, 64), th.nn.Tanh(), th.nn.Linear(64, 6))
        for _ in range(args.groups)
    ]
    per_group = args.sub_envs // args.groups
    obs = rng.normal(size=(args.sub_envs, 17)).astype(np.float32)
    generator = th.Generator().manual_seed(0)

    def acting() -> None:
        with th.no_grad():
            for _ in range(args.steps):
                for group, policy in enumerate(policies):
                    rows = slice(group * per_group, (group + 1) * per_group)
                    mean = policy(th.as_tensor(obs[rows]))
                    np.clip((mean + th.randn(mean.shape, generator=generator)).numpy(), -1, 1)

    def alongside(work: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            thread = threading.Thread(target=physics, args=(every,))
            thread.start()
            work()
            thread.join()

        return run

    def two_threads() -> None:
        half = len(envs) // 2
        thread = threading.Thread(target=physics, args=(range(half),))
        thread.start()
        physics(range(half, len(envs)))
        thread.join()

    python_seconds = 0.1

    def pure_python() -> None:
        start = time.perf_counter()
        while time.perf_counter() - start < python_seconds:
            pass

    alone = best_of(args.repeats, lambda: physics(every))
    acting_alone = best_of(args.repeats, acting)
    rows = [
        ("physics loop, this thread", alone),
        ("physics split over two threads", best_of(args.repeats, two_threads)),
        ("physics thread + this thread sleeping 0.1 s", best_of(args.repeats, alongside(lambda: time.sleep(0.1)))),
        (f"physics thread + this thread running {python_seconds} s of Python", best_of(args.repeats, alongside(pure_python))),
        (f"acting for {args.groups} groups, this thread", acting_alone),
        ("physics thread + this thread acting", best_of(args.repeats, alongside(acting))),
    ]
    print(
        f"{args.sub_envs} HalfCheetahVel sub-envs x {args.steps} control steps, switch interval "
        f"{sys.getswitchinterval() * 1e3:.3g} ms, best of {args.repeats}"
    )
    print("| what | seconds |\n|---|---:|")
    for what, seconds in rows:
        print(f"| {what} | {seconds:.3f} |")
    sums = f"{alone + python_seconds:.3f}; {alone + acting_alone:.3f}"
    print(f"| (the sums: physics + {python_seconds} s of Python; physics + acting) | {sums} |")


if __name__ == "__main__":
    main()
