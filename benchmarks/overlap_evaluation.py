"""
What a callback's evaluation costs training, in the foreground and in a worker process (``MetaEvalCallback(...,
in_background=True)``), measured in one run.

    python benchmarks/overlap_evaluation.py --env sb3_metarl/Navigation2D-v0 --iterations 8 --rounds 3 --out docs/results

Each round trains three fresh models of the same seed for ``--iterations`` meta-iterations with the env's default
hyperparameters (``sb3_metarl.hyperparams``): without an evaluation, with ``MetaEvalCallback(eval_freq=1)`` evaluating in
the foreground, and the same in the background; the evaluation adapts on as many held-out tasks as the meta-batch
(one inner step). The three trainings end with the same parameters, and the two evaluations log the same numbers
(``tests/test_callbacks.py``); only the time differs. Torch's threads are ``--threads`` (the learner's; the evaluation
worker takes the same number).
"""

import argparse
import json
import os
import platform
import time

import numpy as np
import torch as th
from stable_baselines3.common.callbacks import BaseCallback

from sb3_metarl import MetaEvalCallback, MetaPolicyGradient
from sb3_metarl.hyperparams import default_hyperparams

VARIANTS = ("none", "foreground", "background")


class IterationClock(BaseCallback):
    """The time at the start of every meta-iteration's sampling (after the callbacks before it in the list acted)."""

    def __init__(self) -> None:
        super().__init__()
        self.starts: list[float] = []

    def _on_rollout_start(self) -> None:
        self.starts.append(time.perf_counter())

    def _on_step(self) -> bool:
        return True


def seconds_per_iteration(env: str, variant: str, iterations: int, hyperparams: dict) -> tuple[float, float]:
    """
    :return: the median wall seconds between the starts of consecutive meta-iterations (the evaluation's share
        included: it acts first at an iteration's start), and the seconds per iteration of the whole ``learn`` (which
        also holds the worker's start and the wait for the last background evaluation)
    """
    model = MetaPolicyGradient("MlpPolicy", env, seed=0, **hyperparams)
    model.learn(1)  # the first iteration allocates, traces and calibrates: not timed, in every variant alike
    clock, callbacks = IterationClock(), []
    if variant != "none":
        in_background = variant == "background"
        callbacks.append(MetaEvalCallback(eval_env=env, n_tasks=model.meta_batch_size, in_background=in_background))
    start = time.perf_counter()
    model.learn(iterations * model.max_steps_per_iteration, callback=[*callbacks, clock], reset_num_timesteps=False)
    whole = (time.perf_counter() - start) / iterations
    model.episode_sampler.close()
    model.env.close()
    return float(np.median(np.diff(clock.starts))), whole


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="sb3_metarl/Navigation2D-v0")
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch's threads (the learner's)")
    parser.add_argument("--hyperparams", type=json.loads, default={}, help="JSON overriding the env's defaults")
    parser.add_argument("--out", default=None, help="folder for overlap_evaluation.jsonl (appended) and .md")
    args = parser.parse_args(argv)
    th.set_num_threads(args.threads)
    hyperparams = {**default_hyperparams(args.env)[1], **args.hyperparams}
    times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    whole: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for _ in range(args.rounds):  # the variants interleaved, so that a change in the machine's load meets all three
        for variant in VARIANTS:
            between_starts, per_iteration = seconds_per_iteration(args.env, variant, args.iterations, hyperparams)
            times[variant].append(between_starts)
            whole[variant].append(per_iteration)
    median = {variant: float(np.median(values)) for variant, values in times.items()}
    row = {
        "env": args.env,
        "threads": args.threads,
        "iterations": args.iterations,
        "rounds": args.rounds,
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "seconds_per_iteration": times,
        "whole_learn_seconds_per_iteration": whole,
        "median": median,
        "median_whole": {variant: float(np.median(values)) for variant, values in whole.items()},
        "foreground_overhead": median["foreground"] / median["none"] - 1.0,
        "background_overhead": median["background"] / median["none"] - 1.0,
    }
    print(json.dumps(row))
    if args.out is not None:
        write_results(args.out, row)
    return row


def write_results(out: str, row: dict) -> None:
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "overlap_evaluation.jsonl")
    with open(path, "a") as handle:
        handle.write(json.dumps(row) + "\n")
    write_table(out)


def write_table(out: str) -> None:
    """overlap_evaluation.md from every row of overlap_evaluation.jsonl in ``out``."""
    with open(os.path.join(out, "overlap_evaluation.jsonl")) as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    lines = [
        "# A callback's evaluation in the foreground and in the background",
        "",
        "`python benchmarks/overlap_evaluation.py --env ENV --iterations I --rounds R --threads T --out docs/results`: "
        "seconds per meta-iteration without an evaluation, with `MetaEvalCallback(eval_freq=1)` (as many held-out tasks "
        "as the meta-batch, one inner step) in the foreground, and with `in_background=True` (a worker process); the "
        "median of the intervals between consecutive iterations' starts (the evaluation's share included), median over "
        "rounds, the variants interleaved in one run; in parentheses the whole `learn` per iteration, which also holds "
        "the worker's start and the wait for the last evaluation. The trainings end with the same parameters and the "
        "two evaluations log the same numbers (`tests/test_callbacks.py`). Cost: the time per iteration over the one "
        "without an evaluation (the last two columns).",
        "",
        "| env | I x R | threads | cores | none (s/it) | foreground (s/it) | background (s/it) | foreground | background |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for item in rows:
        m, w = item["median"], item["median_whole"]
        costs = (100 * item["foreground_overhead"], 100 * item["background_overhead"])
        lines.append(
            f"| {item['env']} | {item['iterations']} x {item['rounds']} | {item['threads']} | {item['cpu_count']} | "
            f"{m['none']:.2f} ({w['none']:.2f}) | "
            f"{m['foreground']:.2f} ({w['foreground']:.2f}) | {m['background']:.2f} ({w['background']:.2f}) | "
            f"{costs[0]:+.0f} % | {costs[1]:+.0f} % |"
        )
    with open(os.path.join(out, "overlap_evaluation.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
