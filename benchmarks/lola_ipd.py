"""
LOLA-DiCE on the iterated prisoner's dilemma (Liu et al. 2022, Fig. 3 (a, d), in spirit): each player's average
reward per round over meta-updates, for sampled or exact inner (the opponent's virtual step) and outer
pieces, batch 128 against 1024, and off-policy DiCE inner steps on a buffer of 1024 games, with the settings of
their Table 3 (outer lr 0.1, inner lr 0.3, gamma 0.96, rollout 100, one lookahead step, 500 updates, 10 seeds).
The curves are the exact average reward (1 - gamma) V of the players' current policies (closed form), so no
evaluation noise is added.

    python benchmarks/lola_ipd.py                  # writes docs/results/lola_ipd.{md,csv,png}
    python benchmarks/lola_ipd.py --updates 20 --seeds 2 --out /tmp/lola.md   # a quick run
"""

import argparse
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np

from sb3_metarl.estimators.study import write_csv

CONFIGS = {
    "DiCE, batch 128": dict(batch_size=128),
    "DiCE, batch 1024": dict(batch_size=1024),
    "exact inner, DiCE outer (128)": dict(batch_size=128, inner="exact"),
    "DiCE inner (128), exact outer": dict(batch_size=128, outer="exact"),
    "LOLA-Exact": dict(inner="exact", outer="exact"),
    "naive learners, DiCE 128": dict(batch_size=128, opponent_shaping=False),
    # Fig. 3 (d): the inner step's value (compositional bias) and derivative (Hessian) from a buffer of the 1024 most
    # recent games by off-policy DiCE, or from the 128 fresh games ("DiCE, batch 128" above is on-on)
    "off-off (buffer 1024, batch 128)": dict(batch_size=128, buffer_size=1024, off_policy_value=True, off_policy_hessian=True),
    "off-on (value off-policy)": dict(batch_size=128, buffer_size=1024, off_policy_value=True),
    "on-off (Hessian off-policy)": dict(batch_size=128, buffer_size=1024, off_policy_hessian=True),
}


def run(job: tuple[str, int, int]) -> tuple[str, int, np.ndarray, float]:
    """:return: the config, the seed, the (updates, 2) average rewards and the seconds it took"""
    import torch as th

    th.set_num_threads(1)
    from sb3_metarl.lola import LOLADiCE

    name, seed, updates = job
    start = time.perf_counter()
    learner = LOLADiCE(seed=seed, **CONFIGS[name])
    learner.learn(updates * learner.timesteps_per_update)
    curve = np.array([[record["average_reward_1"], record["average_reward_2"]] for record in learner.history])
    return name, seed, curve, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=500)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--out", default="docs/results/lola_ipd.md")
    args = parser.parse_args(argv)
    jobs = [(name, seed, args.updates) for name in args.configs for seed in range(args.seeds)]
    if args.processes == 1:  # in this process (the runs are independent and seeded: the same results)
        results = list(map(run, jobs))
    else:
        with multiprocessing.get_context("spawn").Pool(args.processes) as pool:
            results = pool.map(run, jobs)
    curves: dict[str, list[np.ndarray]] = {}
    seconds: dict[str, float] = {}
    for name, _, curve, took in results:
        curves.setdefault(name, []).append(curve.mean(1))  # both players' mean
        seconds[name] = seconds.get(name, 0.0) + took
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        dict(config=name, seed=seed, update=update, average_reward=f"{value:.5f}")
        for name, seed, curve, _ in results
        for update, value in enumerate(curve.mean(1), start=1)
    ]
    write_csv(rows, str(out.with_suffix(".csv")))
    command = " ".join(["python benchmarks/lola_ipd.py", *(sys.argv[1:] if argv is None else argv)])
    lines = [
        "# LOLA-DiCE on the iterated prisoner's dilemma",
        "",
        f"`{command}` ({args.seeds} seeds, {args.updates} updates; outer lr 0.1, inner lr 0.3, gamma 0.96, rollout "
        "100, one lookahead step: Liu et al. 2022, Table 3). Average reward per round (1 - gamma) V of the current "
        "policies, both players' mean: -1 is mutual cooperation, -2 mutual defection.",
        "",
        "| config | final (mean ± std over seeds) | seeds above -1.5 at the end | mean, last 50 updates | CPU s / seed |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in args.configs:
        stacked = np.stack(curves[name])
        final = stacked[:, -1]
        lines.append(
            f"| {name} | {final.mean():.3f} ± {final.std():.3f} | {(final > -1.5).sum()}/{len(final)} | "
            f"{stacked[:, -50:].mean():.3f} | {seconds[name] / len(final):.1f} |"
        )
    plot(curves, out.with_suffix(".png"))
    lines += ["", f"![curves]({out.with_suffix('.png').name})", ""]
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


#: the figure's panels: Fig. 3 (a) estimators and batch sizes; Fig. 3 (d) off-policy DiCE (on-on is batch 128)
PANELS = {
    "estimators and batch size": [name for name in CONFIGS if "buffer_size" not in CONFIGS[name]],
    "off-policy inner step (value-Hessian)": ["DiCE, batch 128", *[n for n in CONFIGS if "buffer_size" in CONFIGS[n]]],
}


def plot(curves: dict[str, list[np.ndarray]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {title: [name for name in names if name in curves] for title, names in PANELS.items()}
    panels = {title: names for title, names in panels.items() if names}
    figure, all_axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    for axes, (title, names) in zip(all_axes[0], panels.items()):
        for name in names:
            stacked = np.stack(curves[name])
            mean, stderr = stacked.mean(0), stacked.std(0) / np.sqrt(len(stacked))
            updates = np.arange(1, len(mean) + 1)
            on_on = title.startswith("off-policy") and name == "DiCE, batch 128"
            axes.plot(updates, mean, label="on-on (DiCE, batch 128)" if on_on else name)
            axes.fill_between(updates, mean - stderr, mean + stderr, alpha=0.2)
        axes.set_title(title)
        axes.set_xlabel("update")
        axes.set_ylabel("average reward per round")
        axes.set_ylim(-2.2, -0.8)
        axes.legend(fontsize=8)
        axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
