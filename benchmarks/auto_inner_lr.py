"""
``inner_lr="auto"`` against the hand-tuned inner step of ``sb3_metarl/hyperparams.py`` on Navigation2D.

Both runs use the tuned table's other settings (B = N = M = 20, horizon 100, learning rate 3e-3,
initial log-std -1, Adam), the same seed and budget; the table reports the calibrated eta and the mean
return on 40 held-out goals (seed 0) before adaptation and after 1 and 2 inner steps.

    python benchmarks/auto_inner_lr.py --iterations 30 --out docs/results/auto_inner_lr.md
"""

import argparse
import time

from sb3_metarl import MetaPolicyGradient
from sb3_metarl.hyperparams import default_hyperparams

ENV = "sb3_metarl/Navigation2D-v0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--modes", nargs="*", default=["lsf", "maml"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/results/auto_inner_lr.md")
    args = parser.parse_args()
    _, tuned = default_hyperparams(ENV)
    rows = []
    for mode in args.modes:
        for inner_lr in ["auto", tuned["inner_lr"]]:
            kwargs = {**tuned, "inner_lr": inner_lr}
            model = MetaPolicyGradient("MlpPolicy", ENV, gradient_mode=mode, seed=args.seed, **kwargs)
            per_iteration = 20 * 40 * 100
            start = time.time()
            model.learn(args.iterations * per_iteration)
            table = model.evaluate_adaptation(n_tasks=40, inner_steps=2, seed=0)
            rows.append((mode, inner_lr, model.inner_lr, table["mean"], time.time() - start))
            print(rows[-1], flush=True)
    lines = [
        "# `inner_lr=\"auto\"` against the tuned inner step (Navigation2D)",
        "",
        f"Command: `python benchmarks/auto_inner_lr.py --iterations {args.iterations}` ({args.iterations} meta-iterations = "
        f"{args.iterations * 80_000 / 1e6:.1f}M env steps per run, B = N = M = 20, Adam at 3e-3, log-std init -1, seed "
        f"{args.seed}; mean return on 40 held-out goals, seed 0).",
        "",
        "| mode | inner_lr | eta used | before adaptation | 1 step | 2 steps | minutes |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for mode, setting, eta, means, seconds in rows:
        lines.append(
            f"| {mode} | {setting} | {eta:.3g} | {means[0]:.1f} | {means[1]:.1f} | {means[2]:.1f} | {seconds / 60:.1f} |"
        )
    with open(args.out, "w") as handle:
        handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
