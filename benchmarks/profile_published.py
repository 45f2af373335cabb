"""
Where a published-budget meta-iteration's time goes: SG-MRL's Rand Dir setting (HalfCheetahDir, 40 tasks x 20 + 20
episodes x 200 steps = 320k env steps, 100 x 100 policy; ``reproduce_published.py --suite sgmrl-dir``) on the
batched MuJoCo twin, for several gradient modes and meta-optimizers, on 1 and 2 threads (torch's and the physics').

For each setting: one warm-up iteration, then ``--iterations`` timed iterations without a profiler (the wall time of
each, its sampling and its update as ``learn`` logs them: ``time/sample_seconds``, ``time/train_seconds``), then one
iteration under cProfile whose cumulative times split the iteration into phases (the profiler's own overhead lands
mostly on the Python-heavy phases, acting and the twin's Python, so the table gives them as shares of the profiled
iteration, beside the unprofiled wall time).

    OMP_NUM_THREADS=1 python benchmarks/profile_published.py                     # writes docs/results/profile_published.md
    OMP_NUM_THREADS=1 python benchmarks/profile_published.py --settings maml:adam --threads 1 --out /tmp/p.md
"""

import argparse
import cProfile
import json
import os
import platform
import pstats
import sys
import time
from pathlib import Path
from typing import Any

import torch as th
from stable_baselines3.common.logger import Logger

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reproduce_published import cpu_model, make_model, suite_runs

from sb3_metarl.common.threads import ACTING_THREADS

#: (phase, [(path suffix, function name), ...]) summed cumulative times; "physics" is the time this thread waits
#: for the physics (with the compiled loop on its threads) or runs it (the Python loop)
PHASE_FUNCTIONS = {
    "sampling, both phases (the collection loop)": [("samplers/collection.py", "collect_episodes")],
    "  waiting for / running the physics": [("common/threads.py", "settle"), ("tasks/mujoco/batched.py", "_advance")],
    "  the twin's Python (controls, gathering, rewards, observations)": [
        ("tasks/mujoco/batched.py", "_prepare"),
        ("tasks/mujoco/batched.py", "_outcome"),
    ],
    "  acting (the policy's forward per task group, noise)": [("samplers/acting.py", "act")],
    "weighting (baseline fits, returns, advantages)": [("adaptation.py", "__call__")],
    "meta-update (train)": [("meta_pg/meta_pg.py", "train")],
}
GRAPH = "inner step and the log-likelihoods with their graph (the meta-objective)"


def cumulative(stats: pstats.Stats, suffix: str, function: str) -> tuple[float, float]:
    """:return: (cumulative, own) seconds of every profiled function named ``function`` in a file ending in ``suffix``"""
    total = own = 0.0
    for (filename, _line, name), (_cc, _nc, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        if name == function and filename.replace("\\", "/").endswith(suffix):
            total += cumtime
            own += tottime
    return total, own


def make_setting(mode: str, optimizer: str, seed: int, threads: int):
    (run,) = suite_runs("sgmrl-dir", [mode], [seed], meta_optimizer=optimizer)
    return run, make_model(run, "vec_env", None, physics_threads=threads)


class LoggedTimes(Logger):
    """A logger without outputs that keeps the last ``time/`` values ``learn`` recorded."""

    def __init__(self) -> None:
        super().__init__(folder=None, output_formats=[])
        self.values: dict[str, float] = {}

    def record(self, key: str, value: Any, exclude: Any = None) -> None:
        if key in ("time/sample_seconds", "time/train_seconds"):
            self.values[key] = float(value)
        super().record(key, value, exclude)


def profile_setting(mode: str, optimizer: str, threads: int, iterations: int, seed: int = 0) -> dict[str, Any]:
    th.set_num_threads(threads)
    run, model = make_setting(mode, optimizer, seed, threads)
    steps = run.steps_per_iteration
    model.learn(steps)  # warm-up: calibration, first allocations, the compiled loop
    logged = LoggedTimes()
    model.set_logger(logged)  # (a custom logger: learn keeps it)
    walls, samples, updates = [], [], []
    for _ in range(iterations):
        start = time.perf_counter()
        model.learn(steps, reset_num_timesteps=False)
        walls.append(time.perf_counter() - start)
        samples.append(logged.values["time/sample_seconds"])
        updates.append(logged.values["time/train_seconds"])
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    model.learn(steps, reset_num_timesteps=False)
    profiler.disable()
    profiled = time.perf_counter() - start
    stats = pstats.Stats(profiler)
    phases = {}
    for phase, functions in PHASE_FUNCTIONS.items():
        phases[phase] = sum(cumulative(stats, suffix, name)[0] for suffix, name in functions)
    # the meta-objective's graph: what collecting the meta-sample does besides sampling and weighting its batches
    collecting, _ = cumulative(stats, "meta_pg/sampling.py", "collect_meta_sample")
    sampling, _ = cumulative(stats, "meta_pg/sampling.py", "sample_episodes")
    phases[GRAPH] = collecting - sampling
    return {
        "mode": mode,
        "meta_optimizer": optimizer,
        "threads": threads,
        "acting_threads": ACTING_THREADS,
        "env_steps": steps,
        "wall_s": walls,
        "sample_s": samples,
        "train_s": updates,
        "profiled_s": profiled,
        "phases_s": phases,
    }


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else 0.5 * (ordered[middle - 1] + ordered[middle])


def table(rows: list[dict[str, Any]]) -> str:
    header = "| phase | " + " | ".join(f"{r['mode']}/{r['meta_optimizer']}, {r['threads']} thr" for r in rows) + " |"
    lines = [header, "|---|" + "---:|" * len(rows)]
    lines.append(
        "| **iteration, unprofiled (s, median)** | " + " | ".join(f"**{median(r['wall_s']):.2f}**" for r in rows) + " |"
    )
    sampling = " | ".join(f"{median(r['sample_s']):.2f}" for r in rows)
    lines.append(f"| sampling incl. inner step, unprofiled (s) | {sampling} |")
    lines.append("| meta-update, unprofiled (s) | " + " | ".join(f"{median(r['train_s']):.2f}" for r in rows) + " |")
    lines.append("| iteration, profiled (s) | " + " | ".join(f"{r['profiled_s']:.2f}" for r in rows) + " |")
    for phase in [*PHASE_FUNCTIONS, GRAPH]:
        shares = [f"{r['phases_s'][phase]:.2f} ({100 * r['phases_s'][phase] / r['profiled_s']:.0f} %)" for r in rows]
        lines.append(f"| {phase} (profiled s, share) | " + " | ".join(shares) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=["maml:adam", "fomaml:adam", "lvc:ppo", "maml:trpo"],
                        help="gradient_mode:meta_optimizer pairs")  # fmt: skip
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="torch and physics threads")
    parser.add_argument("--iterations", type=int, default=2, help="timed iterations per setting (after a warm-up)")
    parser.add_argument("--out", default="docs/results/profile_published.md")
    args = parser.parse_args(argv)
    rows = []
    for threads in args.threads:
        for setting in args.settings:
            mode, optimizer = setting.split(":")
            row = profile_setting(mode, optimizer, threads, args.iterations)
            print(json.dumps(row), flush=True)
            rows.append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(Path(args.out).with_suffix(".jsonl"), "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    command = "python benchmarks/profile_published.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = (
        "# Profile of a published-budget meta-iteration\n\n"
        f"`OMP_NUM_THREADS=1 {command.strip()}`\n\n"
        f"{cpu_model()}, {platform.machine()}, torch {th.__version__}; SG-MRL Rand Dir (HalfCheetahDir, 40 tasks x (20 + 20)"
        " episodes x 200 steps, 100 x 100 tanh policy), the batched twin on `vec_env`; threads: torch's in the learner and"
        f" the twin's physics threads (acting on {ACTING_THREADS} torch thread(s)).\n\n"
        f"{table(rows)}\n"
    )
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
