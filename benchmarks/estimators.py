"""
Reproduce the estimator-quality figures of the seed papers with sb3_metarl's gradient modes.

    python benchmarks/estimators.py --out docs/results          # full study, a few minutes on 2 cores
    python benchmarks/estimators.py --quick --out /tmp/est      # smoke version (CI), well under a minute

1. Tang (2022)'s toy, the Gaussian bandit: variance and bias of each mode against the exact
   (path-wise) gradient of the N-sample objective L_N, for N = 1, 2, 4, ..., 256 with M outer
   samples fixed; log-log slopes of the variance against N are fitted and printed (theory: about +1
   for ``sf``, about -1 for ``lsf`` until the outer-sample floor).
2. Liu et al. (2022)'s tabular study: random MDP with 20 states, 5 actions, Dirichlet(0.001)
   transitions, horizon 20, gamma 0.8, inner lr 10, uniform initial policy: cosine similarity of the
   estimates with the exact MAML meta-gradient against the sample size and against the number of
   inner steps, for every mode.

Writes ``estimators_bandit.csv``, ``estimators_tabular_samples.csv``, ``estimators_tabular_steps.csv``
and ``estimators.png`` (matplotlib, the ``plots`` extra) into ``--out``.
"""

import argparse
import csv
import os
import tempfile
from typing import Any

import numpy as np

from sb3_metarl.estimators.setups import make_bandit_model, make_tabular_model
from sb3_metarl.estimators.study import measure_estimators, write_csv

ALL_MODES = ["sf", "lsf", "dice", "lvc", "loaded_dice", "maml", "fomaml"]
BANDIT_MODES = ["sf", "lsf", "dice", "lvc", "maml"]


def log_log_slope(rows: list[dict[str, Any]], mode: str, key: str = "variance", min_n: int = 1) -> float:
    """:return: least-squares slope of log(key) against log(N) for ``mode``"""
    points = [(row["inner_episodes"], row[key]) for row in rows if row["mode"] == mode and row["inner_episodes"] >= min_n]
    n, value = np.log([p[0] for p in points]), np.log([max(p[1], 1e-300) for p in points])
    return float(np.polyfit(n, value, 1)[0])


def bandit_study(sizes: list[int], outer: int, slots: int, repeats: int) -> list[dict[str, Any]]:
    model = make_bandit_model("sf", inner_episodes=sizes[0], outer_episodes=outer, meta_batch_size=slots, n_envs=slots * 16)
    return measure_estimators(model, BANDIT_MODES, sizes, repeats)


def tabular_study(sizes: list[int], steps: list[int], size_for_steps: int, slots: int, repeats: int) -> tuple[list, list]:
    def model_for(inner_steps: int):
        def factory(mode: str, n: int):
            return make_tabular_model(
                mode, n, inner_steps, meta_batch_size=slots, n_envs=slots * 50, env_kwargs=dict(dirichlet_alpha=0.001)
            )[0]

        return factory

    by_size = measure_estimators(model_for(1), ALL_MODES, sizes, repeats)
    by_steps = []
    for inner_steps in steps:
        for row in measure_estimators(model_for(inner_steps), ALL_MODES, [size_for_steps], repeats):
            by_steps.append({"inner_steps": inner_steps, **row})
    return by_size, by_steps


def report(bandit: list, by_size: list, by_steps: list) -> None:
    """Print the fitted slopes and the cosines. N = 1, 2 are left out of the fits: with one or two
    inner samples the inner step is heavy-tailed and a single draw can dominate the variance."""
    sizes = sorted({row["inner_episodes"] for row in bandit})
    cuts = [n for n in (4, 16) if n < sizes[-1]] or [sizes[0]]
    print("Bandit: log-log slope of the variance against N, " + ", ".join(f"N >= {n}" for n in cuts))
    for mode in BANDIT_MODES:
        print(f"  {mode:12s} " + "   ".join(f"{log_log_slope(bandit, mode, min_n=n):+.2f}" for n in cuts))
    print(
        "Tabular: cosine of single estimates with the exact MAML meta-gradient, N = " + str(_values(by_size, "inner_episodes"))
    )
    for mode in ALL_MODES:
        print(f"  {mode:12s} " + " ".join(f"{r['cosine_single']:+.3f}" for r in by_size if r["mode"] == mode))
    print("Tabular: cosine of single estimates, inner steps = " + str(_values(by_steps, "inner_steps")))
    for mode in ALL_MODES:
        print(f"  {mode:12s} " + " ".join(f"{r['cosine_single']:+.3f}" for r in by_steps if r["mode"] == mode))


def _values(rows: list, key: str) -> list:
    return sorted({row[key] for row in rows})


def read_csv(path: str) -> list[dict[str, Any]]:
    """:return: the rows of a CSV written by ``write_csv``, numbers parsed"""

    def parse(value: str) -> Any:
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
        return value

    with open(path, newline="") as handle:
        return [{key: parse(value) for key, value in row.items()} for row in csv.DictReader(handle)]


def plot(bandit: list, by_size: list, by_steps: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    for mode in BANDIT_MODES:
        rows = [r for r in bandit if r["mode"] == mode]
        n = [r["inner_episodes"] for r in rows]
        axes[0].plot(n, [r["variance"] for r in rows], "o-", label=mode)
        axes[1].plot(n, [r["distance_se"] for r in rows], "o-", label=mode)
    axes[0].set_yscale("log")
    axes[0].set(title="Bandit: variance vs N (M fixed)", xlabel="N inner samples", ylabel="trace of covariance")
    axes[1].axhline(4, color="gray", ls="--", lw=0.8)
    axes[1].set(title="Bandit: |mean - grad L_N| in standard errors", xlabel="N inner samples", ylabel="distance / SE")
    for mode in ALL_MODES:
        rows = [r for r in by_size if r["mode"] == mode]
        axes[2].plot([r["inner_episodes"] for r in rows], [r["cosine_single"] for r in rows], "o-", label=mode)
        rows = [r for r in by_steps if r["mode"] == mode]
        axes[3].plot([r["inner_steps"] for r in rows], [r["cosine_single"] for r in rows], "o-", label=mode)
    axes[2].set(title="Tabular: cosine with exact MAML gradient", xlabel="N samples (1 inner step)", ylabel="cosine (single)")
    axes[3].set(title="Tabular: cosine vs inner steps", xlabel="inner steps", ylabel="cosine (single)")
    from matplotlib.ticker import FuncFormatter, NullFormatter

    for axis in axes[:3]:
        axis.set_xscale("log", base=2)
        axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axis.xaxis.set_minor_formatter(NullFormatter())
    axes[3].set_xticks(sorted({r["inner_steps"] for r in by_steps}))
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run for CI")
    parser.add_argument(
        "--out",
        default=None,
        help="results folder (default: docs/results; with --quick a new temporary folder, never the committed results)",
    )
    parser.add_argument("--replot", action="store_true", help="only redraw the figure from the CSVs in --out")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix="estimators_quick_") if args.quick else "docs/results"
        print(f"writing to {args.out}")
    os.makedirs(args.out, exist_ok=True)
    names = ["estimators_bandit.csv", "estimators_tabular_samples.csv", "estimators_tabular_steps.csv"]
    if args.replot:
        tables = [read_csv(os.path.join(args.out, name)) for name in names]
        report(*tables)
        plot(*tables, os.path.join(args.out, "estimators.png"))
        return
    if args.quick:
        bandit = bandit_study([2, 8, 32], outer=32, slots=50, repeats=1)
        by_size, by_steps = tabular_study([10, 40], [1, 2], size_for_steps=10, slots=4, repeats=1)
    else:
        bandit = bandit_study([2**k for k in range(9)], outer=256, slots=200, repeats=2)
        by_size, by_steps = tabular_study([10, 30, 100, 300, 1000], [1, 2, 3, 4, 5], size_for_steps=100, slots=10, repeats=2)
    for rows, name in zip((bandit, by_size, by_steps), names):
        write_csv(rows, os.path.join(args.out, name))
    report(bandit, by_size, by_steps)
    plot(bandit, by_size, by_steps, os.path.join(args.out, "estimators.png"))


if __name__ == "__main__":
    main()
