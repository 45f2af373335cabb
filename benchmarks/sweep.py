"""
Grid search of MetaPolicyGradient hyperparameters, one process per configuration.

Example (the search behind the Navigation2D defaults in sb3_metarl/hyperparams.py)::

    python benchmarks/sweep.py --env sb3_metarl/Navigation2D-v0 --timesteps 16000000 --workers 16 \\
        --grid inner_lr=1e-4,3e-4,1e-3 learning_rate=1e-3,3e-3 log_std_init=0,-1 --out sweep.csv

Each row reports the mean return on 40 held-out tasks before adaptation and after 1..3 inner steps,
before and after meta-training. ``log_std_init`` and ``net_arch`` go to ``policy_kwargs``.
"""

import argparse
import ast
import csv
import itertools
import multiprocessing
import time
from typing import Any

POLICY_KEYS = {"log_std_init", "net_arch", "ortho_init"}


def run_config(job: tuple[str, int, int, dict[str, Any]]) -> dict[str, Any]:
    import torch as th

    from sb3_metarl import MetaPolicyGradient

    env_id, timesteps, seed, config = job
    th.set_num_threads(1)
    kwargs = {k: v for k, v in config.items() if k not in POLICY_KEYS}
    policy_kwargs = {k: v for k, v in config.items() if k in POLICY_KEYS}
    model = MetaPolicyGradient("MlpPolicy", env_id, policy_kwargs=policy_kwargs, seed=seed, **kwargs)
    before = model.evaluate_adaptation(n_tasks=40, inner_steps=3, seed=1)
    start = time.time()
    try:
        model.learn(timesteps)
        status = "ok"
    except FloatingPointError as error:
        status = f"diverged: {str(error)[:80]}"
    after = model.evaluate_adaptation(n_tasks=40, inner_steps=3, seed=1)
    row = dict(config, seed=seed, status=status, timesteps=model.num_timesteps, train_seconds=round(time.time() - start))
    for k in range(4):
        row[f"before_{k}"] = round(float(before["mean"][k]), 2)
        row[f"after_{k}"] = round(float(after["mean"][k]), 2)
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="sb3_metarl/Navigation2D-v0")
    parser.add_argument("--timesteps", type=int, default=2_000_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--grid", nargs="+", default=[], metavar="KEY=V1,V2", help="values are Python literals")
    parser.add_argument("--out", default="sweep.csv")
    args = parser.parse_args()
    axes = []
    for item in args.grid:
        key, _, values = item.partition("=")
        axes.append([(key, ast.literal_eval(v)) for v in values.split(",")])
    jobs = [(args.env, args.timesteps, seed, dict(combo)) for combo in itertools.product(*axes) for seed in args.seeds]
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool, open(args.out, "w", newline="") as handle:
        writer = None
        for row in pool.imap_unordered(run_config, jobs):  # rows are written as they finish
            if writer is None:
                writer = csv.DictWriter(handle, fieldnames=list(row))
                writer.writeheader()
            writer.writerow(row)
            handle.flush()


if __name__ == "__main__":
    main()
