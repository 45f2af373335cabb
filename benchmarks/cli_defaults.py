"""
What ``python -m sb3_metarl train --env X`` gives on each MuJoCo family: the command line's defaults
(``sb3_metarl/hyperparams.py``: pytorch-maml-rl's MAML-TRPO setting, actions in [-10, 10], 8e6 env steps),
trained from seed 0, with the held-out returns before and after one inner step, before and after meta-training.

Each family runs to its default budget and writes a line of ``<out>/cli_defaults.jsonl`` when it finishes (families
already there are skipped: run the command again to go on); ``<out>/cli_defaults.md`` is rewritten from the lines,
with HalfCheetahDir from the published-budget run of the same configuration (``maml-trpo-dir``, whose held-out
evaluation at 8e6 env steps is in its ``evals.jsonl``). One torch thread and one physics thread per run (``--threads``).

    python benchmarks/cli_defaults.py --out docs/results
    python benchmarks/cli_defaults.py --envs sb3_metarl/SwimmerVel-v0 --out docs/results
"""

import argparse
import json
import os
import platform
import time

import torch as th

from sb3_metarl import MetaPolicyGradient
from sb3_metarl.hyperparams import MUJOCO_ENV_KWARGS, default_hyperparams

#: held-out evaluation: tasks, seed of their stream (the command line's own final table uses 40 tasks and seed 0)
EVAL_TASKS, EVAL_SEED = 40, 0


def measure(env_id: str, seed: int, threads: int) -> dict:
    """:return: the family's line: held-out returns after 0 and 1 inner steps, before and after meta-training"""
    th.set_num_threads(threads)
    timesteps, kwargs = default_hyperparams(env_id)
    kwargs["sampler_kwargs"] = dict(num_threads=threads)
    model = MetaPolicyGradient("MlpPolicy", env_id, seed=seed, **kwargs)
    before = model.evaluate_adaptation(n_tasks=EVAL_TASKS, inner_steps=1, seed=EVAL_SEED)
    start = time.time()
    model.learn(timesteps)
    seconds = time.time() - start
    after = model.evaluate_adaptation(n_tasks=EVAL_TASKS, inner_steps=1, seed=EVAL_SEED)
    return {
        "env_id": env_id,
        "seed": seed,
        "env_steps": model.num_timesteps,
        "before": [round(float(value), 2) for value in before["mean"]],
        "after": [round(float(value), 2) for value in after["mean"]],
        "after_std": [round(float(value), 2) for value in after["std"]],
        "train_seconds": round(seconds),
        "threads": threads,
        "cpu": platform.processor() or platform.machine(),
        "source": "benchmarks/cli_defaults.py",
    }


def published_halfcheetah_dir(out: str) -> dict | None:
    """:return: HalfCheetahDir's line from the published-budget run of the same configuration, at 8e6 env steps"""
    path = os.path.join(out, "runs", "maml-trpo-dir_maml_trpo_s0", "evals.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    (at_budget,) = [row for row in rows if row["env_steps"] == 8_000_000]
    return {
        "env_id": "sb3_metarl/HalfCheetahDir-v0",
        "seed": 0,
        "env_steps": at_budget["env_steps"],
        "before": None,
        "after": at_budget["returns"][:2],
        "after_std": None,
        "train_seconds": None,
        "source": "benchmarks/reproduce_published.py --suite maml-trpo-dir (40 tasks seeded 1000, 20 episodes each)",
    }


def write_table(out: str, rows: list[dict]) -> None:
    lines = [
        "# The command line's defaults on the MuJoCo families",
        "",
        "What `python -m sb3_metarl train --env X` gives with no other argument: pytorch-maml-rl's MAML-TRPO setting",
        "(`maml`, TRPO with max KL 0.01, 40 tasks x 20 + 20 episodes, horizon 100, inner step 0.1 on the mean over steps,",
        "standardized advantages without gamma^t weights, actions in [-10, 10] mapped onto the actuators, the families'",
        "reward terms as pytorch-maml-rl weighs them for HalfCheetah and Ant), 8e6 env steps, seed 0. Held-out: the mean",
        f"return on {EVAL_TASKS} tasks (seed {EVAL_SEED}, as the command's final table) before adaptation and after one",
        "inner step, for the initial and the meta-trained policy. Made by `python benchmarks/cli_defaults.py --out",
        "docs/results` (one torch thread and one physics thread per run, beside other runs on a 2-core machine).",
        "",
        "| env | env steps | initial: 0 / 1 step | meta-trained: 0 / 1 step | train s | source |",
        "|---|---:|---|---|---:|---|",
    ]
    for row in rows:
        initial = "—" if row["before"] is None else f"{row['before'][0]:.1f} / {row['before'][1]:.1f}"
        trained = f"{row['after'][0]:.1f} / {row['after'][1]:.1f}"
        seconds = "—" if row["train_seconds"] is None else str(row["train_seconds"])
        name = row["env_id"].split("/")[-1]
        lines.append(f"| {name} | {row['env_steps'] / 1e6:.1f}M | {initial} | {trained} | {seconds} | {row['source']} |")
    measured = {row["env_id"] for row in rows}
    missing = [env_id.split("/")[-1] for env_id in MUJOCO_ENV_KWARGS if env_id not in measured]
    if missing:
        lines += ["", f"Not measured yet: {', '.join(missing)} (the command above goes on where it stopped)."]
    with open(os.path.join(out, "cli_defaults.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=[env for env in MUJOCO_ENV_KWARGS if "HalfCheetahDir" not in env])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads and physics threads of each run")
    parser.add_argument("--out", default="docs/results")
    args = parser.parse_args()
    path = os.path.join(args.out, "cli_defaults.jsonl")
    done = []
    if os.path.exists(path):
        with open(path) as handle:
            done = [json.loads(line) for line in handle if line.strip()]
    for env_id in args.envs:
        if any(row["env_id"] == env_id and row["seed"] == args.seed for row in done):
            continue
        row = measure(env_id, args.seed, args.threads)
        print(json.dumps(row), flush=True)
        with open(path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        done.append(row)
    published = published_halfcheetah_dir(args.out)
    write_table(args.out, ([published] if published else []) + done)


if __name__ == "__main__":
    main()
