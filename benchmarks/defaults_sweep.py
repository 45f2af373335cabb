"""
Every built-in task family x gradient mode x meta-optimizer, trained from defaults.

Each run leaves every ``MetaPolicyGradient`` argument at its default (``inner_lr="auto"``, the
optimizers' own defaults) except the batch shape, which is small so that the 364 runs fit on a laptop
(``--meta-batch-size``, ``--episodes``, 2 inner steps, a short horizon for the MuJoCo families). A run
passes if ``--iterations`` meta-iterations and an ``evaluate_adaptation`` finish without an error and
every parameter is finite. Writes a Markdown table (one row per env and optimizer, one column per mode).

    python benchmarks/defaults_sweep.py --out docs/results/defaults_sweep.md
"""

import argparse
import json
import time

import numpy as np
import torch as th

from sb3_metarl import MetaPolicyGradient
from sb3_metarl.gradient_modes import GRADIENT_MODES
from sb3_metarl.meta_optimizers import META_OPTIMIZERS
from sb3_metarl.tasks import BUILTIN_TASK_ENVS, MUJOCO_TASK_ENVS


def run_one(env_id: str, mode: str, optimizer: str, args: argparse.Namespace) -> dict:
    env_kwargs = dict(max_episode_steps=args.mujoco_horizon) if env_id in MUJOCO_TASK_ENVS else None
    if args.navigation_horizon is not None and "Navigation" in env_id:
        env_kwargs = dict(max_episode_steps=args.navigation_horizon)
    start = time.time()
    record = dict(env=env_id, mode=mode, meta_optimizer=optimizer)
    try:
        model = MetaPolicyGradient(
            "MlpPolicy",
            env_id,
            gradient_mode=mode,
            meta_optimizer=optimizer,
            meta_batch_size=args.meta_batch_size,
            inner_episodes=args.episodes,
            outer_episodes=args.episodes,
            inner_steps=2,
            env_kwargs=env_kwargs,
            seed=args.seed,
        )
        model.learn(1)
        model.learn(args.iterations * model.num_timesteps, reset_num_timesteps=False)
        table = model.evaluate_adaptation(n_tasks=args.meta_batch_size, inner_steps=2)
        finite = all(th.isfinite(p).all().item() for p in model.policy.parameters()) and np.isfinite(table["mean"]).all()
        record.update(
            ok=bool(finite and model._n_updates >= args.iterations),
            updates=model._n_updates,
            inner_lr=float(model.inner_lr),
            returns=[round(float(x), 2) for x in table["mean"]],
        )
    except Exception as error:  # the sweep records failures instead of stopping
        record.update(ok=False, error=f"{type(error).__name__}: {str(error)[:160]}")
    record["seconds"] = round(time.time() - start, 1)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="*", default=list(BUILTIN_TASK_ENVS))
    parser.add_argument("--modes", nargs="*", default=list(GRADIENT_MODES))
    parser.add_argument("--meta-optimizers", nargs="*", default=list(META_OPTIMIZERS))
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--meta-batch-size", type=int, default=2)
    parser.add_argument("--episodes", type=int, default=2)
    parser.add_argument("--mujoco-horizon", type=int, default=50)
    parser.add_argument("--navigation-horizon", type=int, default=None, help="default: Navigation2D's own (100)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/results/defaults_sweep.md")
    args = parser.parse_args()
    records = []
    with open(args.out.replace(".md", ".jsonl"), "w") as log:
        for env_id in args.envs:
            for optimizer in args.meta_optimizers:
                for mode in args.modes:
                    record = run_one(env_id, mode, optimizer, args)
                    records.append(record)
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    print(json.dumps(record), flush=True)
    passed = sum(r["ok"] for r in records)
    lines = [
        "# Every task family x mode x meta-optimizer from defaults",
        "",
        f"Command: `python benchmarks/defaults_sweep.py --iterations {args.iterations} --meta-batch-size "
        f"{args.meta_batch_size} --episodes {args.episodes} --mujoco-horizon {args.mujoco_horizon}"
        + (f" --navigation-horizon {args.navigation_horizon}" if args.navigation_horizon else "")
        + f" --out {args.out}` "
        f"(2 inner steps, every other argument at its default, seed {args.seed}).",
        "",
        f"**{passed} of {len(records)} runs** trained {args.iterations} meta-iterations and evaluated with finite parameters.",
        "Cells: `ok` and the calibrated `inner_lr` (`inner_lr=\"auto\"`), or the error.",
        "",
        "| env | meta-optimizer | " + " | ".join(args.modes) + " |",
        "|---|---|" + "---|" * len(args.modes),
    ]
    for env_id in args.envs:
        for optimizer in args.meta_optimizers:
            cells = []
            for mode in args.modes:
                record = next(r for r in records if (r["env"], r["meta_optimizer"], r["mode"]) == (env_id, optimizer, mode))
                cells.append(f"ok ({record['inner_lr']:.2g})" if record["ok"] else f"**{record.get('error', 'failed')[:60]}**")
            lines.append(f"| {env_id.split('/')[-1]} | {optimizer} | " + " | ".join(cells) + " |")
    with open(args.out, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print(f"{passed}/{len(records)} passed; table in {args.out}")


if __name__ == "__main__":
    main()
