"""
How much of one meta-batch's meta-gradient is signal, per gradient mode, at a published run's setting.

At given parameters (the initial policy of a suite, or a run's checkpoint), each mode estimates the meta-gradient
from one fresh meta-batch of the suite's size (40 tasks x 20 + 20 episodes for the SG-MRL suites), per task. With
``G`` the per-task estimates (B x d) and ``g`` their mean (the update's direction):

* ``noise = tr Cov(G) / B``: the expected squared distance of ``g`` from its expectation (task and episode sampling);
* ``signal share = max(0, |g|^2 - noise) / |g|^2``: the share of ``|g|^2`` that is the expected meta-gradient, an
  unbiased estimate of ``|E g|^2`` over ``|g|^2`` (near 0: the update is mostly noise, and Adam's normalised steps
  become a random walk; 1: noise-free);
* ``cosine to maml``: the cosine between the mode's ``g`` and ``maml``'s on the same tasks (other episodes).

    python benchmarks/meta_gradient_signal.py --suite sgmrl-dir --points initial sgmrl-dir_sf_adam_s0 \
        --out docs/results                                   # writes meta_gradient_signal.md / .jsonl
    python benchmarks/meta_gradient_signal.py --quick        # a smoke run (2 tasks, horizon 10), temporary folder

Every process runs one torch thread and one physics thread; a point's checkpoint is read from
``<out>/runs/<run>/model.zip`` (read only: a run in progress is not disturbed).
"""

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch as th

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reproduce_published import SUITES, make_model, suite_runs

from sb3_metarl import MetaPolicyGradient
from sb3_metarl.estimators.study import flat_per_task_gradient, mode_named

MODES = ["sf", "maml", "lvc", "lsf"]


def signal(per_task: th.Tensor) -> dict[str, float]:
    """:param per_task: (B, d) per-task estimates :return: ``|g|``, the noise, the signal share"""
    n_tasks = len(per_task)
    mean = per_task.mean(0)
    squared = float(mean.pow(2).sum())
    noise = float(per_task.var(0).sum()) / n_tasks
    return {"norm": squared**0.5, "noise": noise, "signal_share": max(0.0, squared - noise) / max(squared, 1e-300)}


def measure_point(model: MetaPolicyGradient, modes: list[str], seed: int) -> list[dict[str, Any]]:
    """:return: one row per mode at ``model``'s parameters (the same tasks for every mode, fresh episodes)"""
    tasks = model.sample_tasks(model.meta_batch_size, np.random.default_rng(seed))
    saved = model.gradient_mode
    rows, means = [], {}
    try:
        for mode in modes:
            model.gradient_mode = mode_named(saved, mode)
            start = time.perf_counter()
            per_task = flat_per_task_gradient(model.estimate_meta_gradient(tasks, per_task=True)).double().cpu()
            means[mode] = per_task.mean(0)
            rows.append({"mode": mode, **signal(per_task), "seconds": round(time.perf_counter() - start, 1)})
    finally:
        model.gradient_mode = saved
    for row in rows:
        if "maml" in means:
            row["cosine_to_maml"] = float(th.nn.functional.cosine_similarity(means[row["mode"]], means["maml"], dim=0))
    return rows


def load_point(point: str, suite: str, out: str, quick: bool) -> tuple[MetaPolicyGradient, int | None]:
    """:return: the model at ``point`` ("initial": the suite's initial policy, seed 0; else a run's checkpoint)"""
    run = suite_runs(suite, ["maml"], [0])[0]
    sampler_kwargs = dict(num_threads=1)
    if point == "initial":
        if quick:
            run.kwargs.update(meta_batch_size=2, inner_episodes=2, outer_episodes=2, max_episode_steps=10)
        return make_model(run, "vec_env", None), 0
    path = os.path.join(out, "runs", point, "model.zip")
    state = json.load(open(os.path.join(out, "runs", point, "run.json")))
    model = MetaPolicyGradient.load(path, env=state["config"]["env_id"], sampler_kwargs=sampler_kwargs)
    return model, state["iterations_done"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="sgmrl-dir", choices=sorted(SUITES))
    parser.add_argument("--points", nargs="+", default=["initial"], help='"initial" and/or run names under <out>/runs')
    parser.add_argument("--modes", nargs="+", default=MODES)
    parser.add_argument("--seed", type=int, default=0, help="seed of the tasks drawn at every point")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    out = args.out or (tempfile.mkdtemp() if args.quick else "docs/results")
    th.set_num_threads(1)
    rows = []
    for point in args.points:
        model, iteration = load_point(point, args.suite, out, args.quick)
        for row in measure_point(model, args.modes, args.seed):
            rows.append({"suite": args.suite, "point": point, "iteration": iteration, **row})
            print(json.dumps(rows[-1]), flush=True)
        model.get_env().close()
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "meta_gradient_signal.jsonl"), "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    lines = [
        "# How much of a meta-batch's meta-gradient is signal",
        "",
        f"`python benchmarks/meta_gradient_signal.py --suite {args.suite} --points {' '.join(args.points)} --modes "
        f"{' '.join(args.modes)} --seed {args.seed}` (one torch thread, one physics thread). Per point and mode, one "
        "meta-batch at the suite's setting, the same tasks for every mode: |g| (the mean of the per-task estimates), "
        "the noise tr Cov / B, the signal share max(0, |g|^2 - noise) / |g|^2 and the cosine to maml's g.",
        "",
        "| point | iteration | mode | abs g | noise | signal share | cosine to maml |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        cosine = f"{row['cosine_to_maml']:.3f}" if "cosine_to_maml" in row else "—"
        lines.append(
            f"| {row['point']} | {row['iteration']} | {row['mode']} | {row['norm']:.4g} | {row['noise']:.4g} | "
            f"{row['signal_share']:.3f} | {cosine} |"
        )
    with open(os.path.join(out, "meta_gradient_signal.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
