"""
Liu et al. (2022) Fig. 1 (a, b) and Fig. 2 (a-c), in spirit, on random tabular MDPs (their Table 2: 20 states,
5 actions, horizon 20, gamma 0.8, inner lr 10, uniform initial policy): the meta-gradient assembled from the
inner policy gradient (I), the Hessian (II) and the outer policy gradient (III), each sampled (S) or exact (E)
(``sb3_metarl.estimators.decomposed_meta_gradient``).

- correlation (Pearson, per estimate, averaged) with the exact meta-gradient against the sample size N,
  for the eight S/E combinations, with ``lvc`` and with ``maml`` (plain autodiff) as the Hessian estimator;
- the compositional bias (I sampled, II and III exact) and the Hessian bias (II sampled with ``maml`` or
  ``lvc``, I and III exact), ``|mean estimate - exact| / |exact|``, against the inner step count, the inner
  learning rate and N.

    python benchmarks/decomposition.py              # writes docs/results/decomposition.{md,csv,png}
    python benchmarks/decomposition.py --mdps 1 --trials 4 --sizes 5 20 --out /tmp/decomposition.md  # quick
"""

import argparse
import itertools
import time
from pathlib import Path

import numpy as np
import torch as th

from sb3_metarl.estimators.decomposition import decomposed_meta_gradient
from sb3_metarl.estimators.exact import exact_meta_gradient
from sb3_metarl.estimators.setups import make_tabular_model
from sb3_metarl.estimators.study import write_csv

COMBINATIONS = ["".join(c) for c in itertools.product("SE", repeat=3)]  # (I, II, III)


def estimates_and_exact(
    mode: str, pieces: str, n_episodes: int, mdp: int, trials: int, **settings
) -> tuple[th.Tensor, th.Tensor]:
    """:return: ``trials`` estimates (trials, P) of one MDP's meta-gradient and the exact one (P,), actor parameters"""
    model, task = make_tabular_model(
        mode, inner_episodes=n_episodes, task_seed=mdp, meta_batch_size=trials, seed=mdp, **settings
    )
    exact = exact_meta_gradient(model, [task])
    names = [n for n in sorted(exact) if n in model.functional_policy.actor_names]
    inner, hessian, outer = ("sampled" if p == "S" else "exact" for p in pieces)
    grads = decomposed_meta_gradient(
        model, [task] * trials, inner, mode if hessian == "sampled" else "exact", outer, per_task=True
    )
    flat = th.cat([grads[n].flatten(1) for n in names], dim=1).double()
    return flat, th.cat([exact[n].flatten() for n in names]).double()


def correlation(estimates: th.Tensor, exact: th.Tensor) -> float:
    """:return: the mean over estimates of their Pearson correlation with the exact gradient"""
    centered = estimates - estimates.mean(1, keepdim=True)
    reference = exact - exact.mean()
    return (centered @ reference / (centered.norm(dim=1) * reference.norm()).clamp(min=1e-30)).mean().item()


def relative_bias(estimates: th.Tensor, exact: th.Tensor) -> float:
    """:return: |E[estimate] - exact| / |exact|, the mean's squared error less its variance (its noise) estimated"""
    squared_error = (estimates.mean(0) - exact).pow(2).sum() - (estimates.var(0) / len(estimates)).sum()
    return (squared_error.clamp(min=0).sqrt() / exact.norm()).item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mdps", type=int, default=5, help="random MDPs (the paper: 10)")
    parser.add_argument("--trials", type=int, default=20, help="estimates per MDP and setting (the paper: 20)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[5, 20, 80, 320], help="episodes N per sampled piece")
    parser.add_argument("--out", default="docs/results/decomposition.md")
    args = parser.parse_args(argv)
    th.manual_seed(0)
    rows = []
    start = time.perf_counter()
    for mode, pieces, size in itertools.product(("lvc", "maml"), COMBINATIONS, args.sizes):
        if pieces == "EEE" and size != args.sizes[0]:
            continue  # no sample: the same value at every N
        values = [estimates_and_exact(mode, pieces, size, mdp, args.trials) for mdp in range(args.mdps)]
        rows.append(dict(study="correlation", mode=mode, pieces=pieces, variable="N", value=size,
                         correlation=np.mean([correlation(*v) for v in values]),
                         bias=np.mean([relative_bias(*v) for v in values])))  # fmt: skip
    studies = [("inner_steps", [1, 2, 3], {}), ("inner_lr", [1.0, 3.0, 10.0, 30.0], {}), ("N", args.sizes, {})]
    for (variable, grid, _), (bias_name, mode, pieces) in itertools.product(
        studies, [("compositional", "lvc", "SEE"), ("Hessian (maml)", "maml", "ESE"), ("Hessian (lvc)", "lvc", "ESE")]
    ):
        for value in grid:
            settings = (
                {"inner_steps": value} if variable == "inner_steps" else {"inner_lr": value} if variable == "inner_lr" else {}
            )
            size = value if variable == "N" else 20
            values = [estimates_and_exact(mode, pieces, size, mdp, args.trials, **settings) for mdp in range(args.mdps)]
            rows.append(dict(study=f"{bias_name} bias", mode=mode, pieces=pieces, variable=variable, value=value,
                             correlation=np.mean([correlation(*v) for v in values]),
                             bias=np.mean([relative_bias(*v) for v in values])))  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(rows, str(out.with_suffix(".csv")))
    write_report(args, rows, out, time.perf_counter() - start)


def write_report(args: argparse.Namespace, rows: list[dict], out: Path, seconds: float) -> None:
    command = "python benchmarks/decomposition.py" + (
        "" if args.out == "docs/results/decomposition.md" else f" --out {args.out}"
    )
    lines = [
        "# The meta-gradient decomposed: sampled and exact pieces on tabular MDPs",
        "",
        f"`{command} --mdps {args.mdps} --trials {args.trials} --sizes {' '.join(map(str, args.sizes))}` "
        f"({seconds / 60:.0f} min). Liu et al.'s Table 2 setting (20 states, 5 actions, horizon 20, gamma 0.8, inner lr "
        f"10, near-uniform initial policy), {args.mdps} random MDPs x {args.trials} estimates each (the paper: 10 x 20). "
        "Pieces (I inner policy gradient, II Hessian, III outer policy gradient): S sampled with N episodes, E exact. "
        "Correlation: Pearson, of each estimate with the exact meta-gradient, averaged; bias: |E[estimate] - exact| / "
        "|exact|, estimated as sqrt(|mean - exact|^2 - its variance) (the mean's noise removed; 0 where noise dominates).",
        "",
        "## Correlation with the exact meta-gradient against N (Fig. 1)",
        "",
    ]
    for mode in ("lvc", "maml"):
        lines += [f"### Hessian by `{mode}`", "", "| I II III | " + " | ".join(f"N={n}" for n in args.sizes) + " |",
                  "|---|" + "---:|" * len(args.sizes)]  # fmt: skip
        for pieces in COMBINATIONS:
            cells = []
            for size in args.sizes:
                match = [r for r in rows if r["study"] == "correlation" and r["mode"] == mode and r["pieces"] == pieces
                         and (r["value"] == size or pieces == "EEE")]  # fmt: skip
                cells.append(f"{match[0]['correlation']:.3f}" if match else "")
            lines.append(f"| {' '.join(pieces)} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Bias against the inner step count, the inner learning rate and N (Fig. 2)", ""]
    for variable in ("inner_steps", "inner_lr", "N"):
        grid = sorted({r["value"] for r in rows if r["variable"] == variable and r["study"].endswith("bias")})
        lines += [
            f"### against {variable}",
            "",
            "| bias | " + " | ".join(str(v) for v in grid) + " |",
            "|---|" + "---:|" * len(grid),
        ]
        for study in ("compositional bias", "Hessian (maml) bias", "Hessian (lvc) bias"):
            selected = [r for r in rows if r["study"] == study and r["variable"] == variable]
            cells = [next((f"{r['bias']:.3f}" for r in selected if r["value"] == v), "") for v in grid]
            lines.append(f"| {study} | " + " | ".join(cells) + " |")
        lines.append("")
    plot(rows, args, out.with_suffix(".png"))
    lines += [f"![decomposition]({out.with_suffix('.png').name})", ""]
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(rows: list[dict], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 5, figsize=(22, 4))
    for axis, mode in zip(axes[:2], ("lvc", "maml")):
        for pieces in COMBINATIONS:
            points = [
                (r["value"], r["correlation"])
                for r in rows
                if r["study"] == "correlation" and r["mode"] == mode and r["pieces"] == pieces
            ]
            if pieces == "EEE":
                points = [(n, points[0][1]) for n in args.sizes]
            axis.plot(*zip(*points), marker="o", label=" ".join(pieces))
        axis.set_xscale("log")
        axis.set_xlabel("N")
        axis.set_ylabel("correlation with the exact meta-gradient")
        axis.set_title(f"Hessian by {mode}")
        axis.legend(fontsize=7)
    for axis, variable in zip(axes[2:], ("inner_steps", "inner_lr", "N")):
        for study in ("compositional bias", "Hessian (maml) bias", "Hessian (lvc) bias"):
            points = [(r["value"], r["bias"]) for r in rows if r["study"] == study and r["variable"] == variable]
            axis.plot(*zip(*points), marker="o", label=study)
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel(variable)
        axis.set_ylabel("relative bias")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
