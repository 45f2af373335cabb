"""
``inner_lr="auto"`` against a hand-tuned inner step on Navigation2D, at several batch sizes N.

Two protocols:

* ``tuned`` (default): the tuned table's settings of ``sb3_metarl/hyperparams.py`` (B = 20, horizon 100,
  learning rate 3e-3, initial log-std -1, Adam), ``--iterations`` meta-iterations; 40 held-out goals.
* ``defaults``: a newcomer's small first run, ``MetaPolicyGradient``'s own defaults with B = 4 tasks
  and ``--iterations 3``; 20 held-out goals. The tuned step is 1e-3.

Each row: the eta "auto" calibrated (and the measured signal fraction of the inner gradient at that N),
and the mean return on the held-out goals (seed 0) before adaptation and after 1 and 2 inner steps,
averaged over ``--seeds``; "auto" should adapt the right way (1 step >= 0 steps) at every N.

    python benchmarks/auto_inner_lr.py --protocol defaults --episodes 4 10 20 40 --seeds 0 1 2 \\
        --iterations 3 --out docs/results/auto_inner_lr_defaults.md
    python benchmarks/auto_inner_lr.py --iterations 15 --out docs/results/auto_inner_lr.md
"""

import argparse
import tempfile
import time

import numpy as np
import torch as th

from sb3_metarl import MetaPolicyGradient
from sb3_metarl.hyperparams import default_hyperparams

ENV = "sb3_metarl/Navigation2D-v0"
TUNED_INNER_LR = 1e-3


def run(protocol: str, mode: str, episodes: int, inner_lr: str | float, seed: int, iterations: int) -> dict:
    """:return: the calibrated eta, its signal fraction, the held-out returns after 0..2 steps and the wall time"""
    if protocol == "tuned":
        _, kwargs = default_hyperparams(ENV)
        kwargs.update(inner_episodes=episodes, outer_episodes=episodes)
        n_tasks = 40
    else:
        kwargs = dict(meta_batch_size=4, inner_episodes=episodes, outer_episodes=episodes)
        n_tasks = 20
    model = MetaPolicyGradient("MlpPolicy", ENV, gradient_mode=mode, seed=seed, **{**kwargs, "inner_lr": inner_lr})
    start = time.time()
    for _ in range(iterations):
        model.learn(1, reset_num_timesteps=False)
    table = model.evaluate_adaptation(n_tasks=n_tasks, inner_steps=2, seed=0)
    fraction = model.inner_signal_fraction if inner_lr == "auto" else None
    return {"eta": model.inner_lr, "fraction": fraction, "means": table["mean"], "seconds": time.time() - start}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", choices=["tuned", "defaults"], default="tuned")
    parser.add_argument("--iterations", type=int, default=15)
    parser.add_argument("--episodes", type=int, nargs="+", default=[20], help="N = M per task")
    parser.add_argument("--modes", nargs="*", default=["lsf", "maml"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", default=None, help="Markdown table (default: a temporary file)")
    args = parser.parse_args(argv)
    th.set_num_threads(args.threads)
    out = args.out or tempfile.mkstemp(prefix="auto_inner_lr_", suffix=".md")[1]
    rows = []
    for mode in args.modes:
        for episodes in args.episodes:
            for inner_lr in ["auto", TUNED_INNER_LR]:
                results = [run(args.protocol, mode, episodes, inner_lr, seed, args.iterations) for seed in args.seeds]
                means = np.mean([r["means"] for r in results], axis=0)
                etas = [r["eta"] for r in results]
                fractions = [r["fraction"] for r in results if r["fraction"] is not None]
                rows.append((mode, episodes, inner_lr, etas, fractions, means, sum(r["seconds"] for r in results)))
                print(rows[-1], flush=True)
    per_run = "B = 20, horizon 100, Adam at 3e-3, log-std init -1" if args.protocol == "tuned" else "B = 4, the class defaults"
    lines = [
        f"# `inner_lr=\"auto\"` against the tuned inner step (Navigation2D, protocol `{args.protocol}`)",
        "",
        f"Command: `python benchmarks/auto_inner_lr.py --protocol {args.protocol} --episodes "
        f"{' '.join(map(str, args.episodes))} --seeds {' '.join(map(str, args.seeds))} --iterations {args.iterations} "
        f"--modes {' '.join(args.modes)}` ({args.iterations} meta-iterations per run, {per_run}; {args.threads} torch "
        f"thread(s); mean return on {40 if args.protocol == 'tuned' else 20} held-out goals (seed 0), averaged over "
        f"{len(args.seeds)} seed(s)).",
        "",
        "| mode | N | inner_lr | eta used (per seed) | signal fraction | before adaptation | 1 step | 2 steps | minutes |",
        "|---|---:|---|---|---|---:|---:|---:|---:|",
    ]
    for mode, episodes, setting, etas, fractions, means, seconds in rows:
        eta_cells = ", ".join(f"{eta:.3g}" for eta in etas)
        fraction_cells = ", ".join(f"{f:.2f}" for f in fractions) or "—"
        lines.append(
            f"| {mode} | {episodes} | {setting} | {eta_cells} | {fraction_cells} | {means[0]:.1f} | {means[1]:.1f} "
            f"| {means[2]:.1f} | {seconds / 60:.1f} |"
        )
    with open(out, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
