"""
Can a physics thread advance MuJoCo while the sampling thread runs Python (acting, bookkeeping)?

The batched twin's physics threads call ``mj_step`` once per sub-env, and MuJoCo releases the GIL inside it; but the
loop around it needs the GIL for a microsecond between two calls. This measures, on N HalfCheetahVel sub-envs and
K control steps, the physics loop alone, split over two threads, and on one thread while this thread sleeps, runs
pure Python, or acts for the sub-envs' groups with SB3's default MLP (per group, as ``GroupPolicies`` does):

    python benchmarks/gil_overlap.py                 # 400 sub-envs, 20 control steps, 3 repeats (best of)
    python benchmarks/gil_overlap.py --switch-interval 0.0001

If the physics overlapped the Python, "physics thread + X" would take max(physics, X); with the Python loop it takes
their sum. The second column runs the same physics with the compiled loop that holds no GIL
(``sb3_metarl.tasks.mujoco.kernel``, what the twin uses where numba is installed).
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
from sb3_metarl.tasks.mujoco.kernel import addresses, nogil_kernel


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


def physics_loops(envs: list, steps: int) -> tuple[Callable[[range], None], Callable[[range], None] | None]:
    """
    :return: ``steps`` control steps of the sub-envs ``rows`` (a range) with a Python loop calling ``mj_step``, and
        with the compiled loop (None where numba is not installed); each keeps the controls the sub-envs have
    """
    models, datas = [env.model for env in envs], [env.data for env in envs]

    def python_loop(rows: range) -> None:
        for _ in range(steps):
            for index in rows:
                mujoco.mj_step(models[index], datas[index], nstep=envs[index].frame_skip)

    kernel = nogil_kernel()
    if kernel is None:
        return python_loop, None
    model_addresses, data_addresses = addresses(models), addresses(datas)
    ctrl_addresses = np.array([data.ctrl.ctypes.data for data in datas], dtype=np.uint64)
    frame_skips = np.array([env.frame_skip for env in envs], dtype=np.int64)

    def compiled_loop(rows: range) -> None:
        chosen = slice(rows.start, rows.stop)
        arguments = (model_addresses[chosen], data_addresses[chosen], ctrl_addresses[chosen])
        controls = np.array([datas[index].ctrl for index in rows])
        for _ in range(steps):
            kernel(*arguments, controls, frame_skips[chosen], False)

    return python_loop, compiled_loop


def measure(args: argparse.Namespace) -> None:
    """Print the table of the measurements (see the module's docstring)."""
    rng = np.random.default_rng(0)
    envs = [make_task_env("sb3_metarl/HalfCheetahVel-v0", None).unwrapped for _ in range(args.sub_envs)]
    for index, env in enumerate(envs):
        env.set_task(env.sample_tasks(1, rng)[0])
        env.reset(seed=index)
    python_loop, compiled_loop = physics_loops(envs, args.steps)
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

    python_seconds = 0.1

    def pure_python() -> None:
        start = time.perf_counter()
        while time.perf_counter() - start < python_seconds:
            pass

    def measurements(physics: Callable[[range], None]) -> tuple[list[float], float]:
        """:return: the physics rows' seconds with this loop, and the physics alone"""

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

        alone = best_of(args.repeats, lambda: physics(every))
        return [
            alone,
            best_of(args.repeats, two_threads),
            best_of(args.repeats, alongside(lambda: time.sleep(0.1))),
            best_of(args.repeats, alongside(pure_python)),
            acting_alone,
            best_of(args.repeats, alongside(acting)),
        ], alone

    acting_alone = best_of(args.repeats, acting)
    columns = [measurements(python_loop)]
    if compiled_loop is not None:
        columns.append(measurements(compiled_loop))
    names = [
        "physics loop, this thread",
        "physics split over two threads",
        "physics thread + this thread sleeping 0.1 s",
        f"physics thread + this thread running {python_seconds} s of Python",
        f"acting for {args.groups} groups, this thread",
        "physics thread + this thread acting",
    ]
    print(
        f"{args.sub_envs} HalfCheetahVel sub-envs x {args.steps} control steps, switch interval "
        f"{sys.getswitchinterval() * 1e3:.3g} ms, best of {args.repeats}"
    )
    header = "| what | Python loop |" + (" compiled loop (no GIL) |" if compiled_loop is not None else "")
    print(header + "\n|---|" + "---:|" * len(columns))
    for row, name in enumerate(names):
        print(f"| {name} | " + " | ".join(f"{seconds[row]:.3f}" for seconds, _ in columns) + " |")
    sums = [f"{alone + python_seconds:.3f}; {alone + acting_alone:.3f}" for _, alone in columns]
    print(f"| (the sums: physics + {python_seconds} s of Python; physics + acting) | " + " | ".join(sums) + " |")


if __name__ == "__main__":
    main()
