"""
Reproduction of the published meta-RL benchmarks: several seeds per configuration, the mean +- std
(over seeds) of the return on held-out tasks before adaptation and after 1, 2, 3 inner steps, as
a Markdown table, a CSV and learning-curve PNGs.

Suites (the literature's settings; ``--budget`` scales the number of meta-iterations):

* ``navigation``: Navigation2D, 20 tasks x 20 episodes, horizon 100, inner lr 0.1 in the convention
  of MAML / pytorch-maml-rl (per-step mean of the surrogate with standardized advantages, which is
  ``inner_lr = 0.1 / 100`` with ``normalize_advantage=True`` here), TRPO meta-updates; modes
  sf, lsf, lvc, maml.
* ``halfcheetah``: HalfCheetahVel and HalfCheetahDir, 40 tasks x 20 episodes, horizon 200, modes
  lsf, lvc, maml under TRPO and PPO (ProMP).

Runs are appended to ``<out>/reproduce_<suite>_runs.jsonl`` as they finish and skipped when found
there, so a suite can be run in several sittings (``--resume`` is the default) and split over
machines. ``--quick`` runs a tiny version of every configuration (CI).

Example::

    python benchmarks/reproduce.py --suite navigation --seeds 0 1 2 --iterations 100 --out docs/results
"""

import argparse
import csv
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

NAVIGATION = "sb3_metarl/Navigation2D-v0"
#: the meta_optimizer label of the reference runs without meta-training
UNTRAINED = "untrained"
CHEETAH_ENVS = ["sb3_metarl/HalfCheetahVel-v0", "sb3_metarl/HalfCheetahDir-v0"]
#: pytorch-maml-rl's TRPO (max KL 0.01, damping 1e-5, 10 CG iterations, line search 0.8 x 15) and
#: ProMP's PPO (5 epochs, clip 0.3, inner KL target 0.01, initial penalty 5e-4, Adam at 1e-3)
OPTIMIZER_KWARGS = {
    "trpo": dict(max_kl=0.01, cg_damping=1e-5, cg_max_steps=10, line_search_shrinking_factor=0.8, line_search_max_iter=15),
    "ppo": dict(n_epochs=5, clip_range=0.3, target_inner_kl=0.01, inner_kl_coef=5e-4),
}


@dataclass
class RunConfig:
    """One meta-training run."""

    env_id: str
    gradient_mode: str
    meta_optimizer: str
    seed: int
    iterations: int
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.env_id}|{self.gradient_mode}|{self.meta_optimizer}|{self.seed}|{self.iterations}"


def suite_configs(
    suite: str, seeds: list[int], iterations: int, quick: bool, overrides: dict[str, Any] | None = None
) -> list[RunConfig]:
    """
    :param overrides: MetaPolicyGradient arguments replacing the suite's (e.g. smaller batches)
    :return: the runs of a suite (``quick``: tiny batches for CI)
    """
    configs = _suite_configs(suite, seeds, iterations, quick)
    for config in configs:
        config.kwargs.update(overrides or {})
    return configs


def _literature_kwargs(tasks: int, episodes: int, horizon: int, quick: bool) -> dict[str, Any]:
    """
    B tasks x N = M episodes, and pytorch-maml-rl's inner lr 0.1 on the per-step mean of the
    surrogate with standardized advantages, which is 0.1 / horizon on our per-episode sum.
    """
    kwargs: dict[str, Any] = dict(
        meta_batch_size=tasks,
        inner_episodes=episodes,
        outer_episodes=episodes,
        inner_lr=0.1 / horizon,
        normalize_advantage=True,
    )
    if quick:
        kwargs.update(meta_batch_size=2, inner_episodes=2, outer_episodes=2, policy_kwargs=dict(net_arch=[8]))
    return kwargs


def _suite_configs(suite: str, seeds: list[int], iterations: int, quick: bool) -> list[RunConfig]:
    if suite == "navigation":
        grid = [(NAVIGATION, mode, "trpo") for mode in ["sf", "lsf", "lvc", "maml"]]
        kwargs = _literature_kwargs(20, 20, 100, quick)
    elif suite == "halfcheetah":
        grid = [(env_id, mode, opt) for env_id in CHEETAH_ENVS for opt in ["trpo", "ppo"] for mode in ["lsf", "lvc", "maml"]]
        kwargs = _literature_kwargs(40, 20, 200, quick)
        if quick:
            kwargs["env_kwargs"] = dict(max_episode_steps=10)
    else:
        raise ValueError(f"--suite: unknown suite {suite!r}; use navigation or halfcheetah.")
    trained = [
        RunConfig(env_id, mode, opt, seed, iterations, {**kwargs, "meta_optimizer_kwargs": OPTIMIZER_KWARGS[opt]})
        for env_id, mode, opt in grid
        for seed in seeds
    ]
    # the reference rows: the initial policy adapted with each mode's inner step (no meta-training)
    untrained = [
        RunConfig(env_id, mode, UNTRAINED, seeds[0], 0, dict(kwargs))
        for env_id, mode in dict.fromkeys((e, m) for e, m, _ in grid)
    ]
    return untrained + trained


def run(config: RunConfig, eval_tasks: int, eval_seed: int) -> dict[str, Any]:
    """Meta-train one configuration; :return: its learning curve, final table row, budget and wall time."""
    from stable_baselines3.common.callbacks import BaseCallback

    from sb3_metarl import MetaPolicyGradient

    curve: list[tuple[int, float, float]] = []

    class RecordCurve(BaseCallback):
        def _on_rollout_end(self) -> None:
            sample = self.locals["sample"]
            curve.append(
                (
                    self.num_timesteps,
                    sample.inner_batches[0].episode_returns.mean().item(),
                    sample.outer_batch.episode_returns.mean().item(),
                )
            )

        def _on_step(self) -> bool:
            return True

    model = MetaPolicyGradient(
        "MlpPolicy",
        config.env_id,
        gradient_mode=config.gradient_mode,
        meta_optimizer="adam" if config.meta_optimizer == UNTRAINED else config.meta_optimizer,
        seed=config.seed,
        **config.kwargs,
    )
    per_iteration = model.meta_batch_size * (model.inner_steps * model.inner_episodes + model.outer_episodes)
    timesteps = config.iterations * per_iteration * model.episode_sampler.horizon
    start = time.time()
    status = "ok"
    try:
        if timesteps > 0:
            model.learn(timesteps, callback=RecordCurve())
    except FloatingPointError as error:
        status = f"diverged: {error}"
    train_seconds = time.time() - start
    table = model.evaluate_adaptation(n_tasks=eval_tasks, inner_steps=3, seed=eval_seed)
    return {
        "key": config.key,
        "config": asdict(config),
        "status": status,
        "timesteps": model.num_timesteps,
        "iterations": len(curve),
        "train_seconds": round(train_seconds, 1),
        "eval_tasks": eval_tasks,
        "returns": [float(x) for x in table["mean"]],
        "curve": curve,
    }


def load_runs(path: str) -> dict[str, dict[str, Any]]:
    if not os.path.exists(path):
        return {}
    with open(path) as file:
        return {row["key"]: row for row in map(json.loads, file) if row}


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """:return: one row per (env, mode, optimizer): mean and std over seeds of the returns after 0..3 steps"""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in runs:
        config = row["config"]
        groups.setdefault((config["env_id"], config["gradient_mode"], config["meta_optimizer"]), []).append(row)
    table = []
    for (env_id, mode, optimizer), rows in groups.items():
        returns = np.array([row["returns"] for row in rows])
        table.append(
            {
                "env": env_id.split("/")[-1],
                "mode": mode,
                "meta_optimizer": optimizer,
                "seeds": len(rows),
                "iterations": rows[0]["iterations"],
                "timesteps": rows[0]["timesteps"],
                "train_minutes": round(float(np.mean([row["train_seconds"] for row in rows])) / 60, 1),
                "diverged": sum(row["status"] != "ok" for row in rows),
                **{f"mean_{k}": round(float(returns[:, k].mean()), 2) for k in range(returns.shape[1])},
                **{f"std_{k}": round(float(returns[:, k].std()), 2) for k in range(returns.shape[1])},
            }
        )
    return table


def markdown_table(table: list[dict[str, Any]]) -> str:
    lines = [
        "| env | mode | meta-optimizer | seeds | iterations | env steps | minutes/run "
        "| 0 steps | 1 step | 2 steps | 3 steps |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in table:
        if row["seeds"] > 1:
            cells = " | ".join(f"{row[f'mean_{k}']:.1f} ± {row[f'std_{k}']:.1f}" for k in range(4))
        else:  # one run: no spread over seeds to show
            cells = " | ".join(f"{row[f'mean_{k}']:.1f}" for k in range(4))
        lines.append(
            f"| {row['env']} | {row['mode']} | {row['meta_optimizer']} | {row['seeds']} | {row['iterations']} "
            f"| {row['timesteps'] / 1e6:.1f}M | {row['train_minutes']} | {cells} |"
        )
    return "\n".join(lines)


def plot_curves(runs: list[dict[str, Any]], path: str) -> None:
    """One panel per env: post-adaptation return against env steps, mean over seeds per (mode, optimizer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    envs = sorted({row["config"]["env_id"] for row in runs})
    fig, axes = plt.subplots(1, len(envs), figsize=(6 * len(envs), 4), squeeze=False)
    for ax, env_id in zip(axes[0], envs):
        groups: dict[str, list[np.ndarray]] = {}
        for row in runs:
            config = row["config"]
            if config["env_id"] == env_id and row["curve"]:
                groups.setdefault(f"{config['gradient_mode']} / {config['meta_optimizer']}", []).append(np.array(row["curve"]))
        for label, curves in sorted(groups.items()):
            length = min(len(c) for c in curves)
            stacked = np.stack([c[:length] for c in curves])
            steps, post = stacked[0, :, 0], stacked[:, :, 2]
            ax.plot(steps, post.mean(0), label=label)
            if len(curves) > 1:
                ax.fill_between(steps, post.mean(0) - post.std(0), post.mean(0) + post.std(0), alpha=0.2)
        ax.set_title(env_id.split("/")[-1])
        ax.set_xlabel("env steps")
        ax.set_ylabel("return after adaptation (training tasks)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", required=True, choices=["navigation", "halfcheetah"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, default=100, help="meta-iterations per run")
    parser.add_argument("--eval-tasks", type=int, default=40)
    parser.add_argument("--only", nargs="*", default=None, metavar="MODE/OPTIMIZER", help="restrict to these")
    parser.add_argument("--envs", nargs="*", default=None, metavar="ENV_ID", help="restrict to these env ids")
    parser.add_argument("--meta-batch-size", type=int, default=None, help="tasks per iteration (default: the suite's)")
    parser.add_argument("--episodes", type=int, default=None, help="inner and outer episodes (default: the suite's)")
    parser.add_argument("--quick", action="store_true", help="tiny batches and 2 iterations (CI)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument(
        "--out",
        default=None,
        help="results folder (default: docs/results; with --quick a new temporary folder, never the committed results)",
    )
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix="reproduce_quick_") if args.quick else "docs/results"
        print(f"writing to {args.out}")

    import torch as th

    th.set_num_threads(args.threads)
    iterations = 2 if args.quick else args.iterations
    eval_tasks = 2 if args.quick else args.eval_tasks
    overrides: dict[str, Any] = {}
    if args.meta_batch_size:
        overrides["meta_batch_size"] = args.meta_batch_size
    if args.episodes:
        overrides.update(inner_episodes=args.episodes, outer_episodes=args.episodes)
    configs = suite_configs(args.suite, args.seeds, iterations, args.quick, overrides)
    if args.only:
        configs = [c for c in configs if f"{c.gradient_mode}/{c.meta_optimizer}" in args.only]
    if args.envs:
        configs = [c for c in configs if c.env_id in args.envs]
    os.makedirs(args.out, exist_ok=True)
    runs_path = os.path.join(args.out, f"reproduce_{args.suite}_runs.jsonl")
    done = load_runs(runs_path)
    for config in configs:
        if config.key in done:
            continue
        row = run(config, eval_tasks, eval_seed=1000)
        print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
        with open(runs_path, "a") as file:
            file.write(json.dumps(row) + "\n")
        done[config.key] = row

    runs = [done[c.key] for c in configs if c.key in done]
    table = summarize(runs)
    with open(os.path.join(args.out, f"reproduce_{args.suite}.csv"), "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    markdown = markdown_table(table)
    with open(os.path.join(args.out, f"reproduce_{args.suite}_table.md"), "w") as file:
        file.write(markdown + "\n")
    plot_curves(runs, os.path.join(args.out, f"reproduce_{args.suite}.png"))
    print(markdown)


if __name__ == "__main__":
    main()
