"""
Off-policy reuse of inner samples against the compositional bias (Liu et al. 2022, Sec. 4.4), on the tabular
MDP's exact reference: the meta-gradient's relative bias and its estimates' correlation with the exact one,
at equal fresh samples per inner step, with ``inner_sample_reuse`` = 0, 1, 3, 7 earlier batches of the task.

Two regimes: parameters held (almost) still (learning rate 1e-12: the reused episodes are on-policy, reuse is
more samples), and training (Adam 0.05: reused episodes come from earlier parameters and are importance-weighted,
each step's ratio truncated at ``reuse_importance_clip`` 2).

    python benchmarks/sample_reuse.py          # writes docs/results/sample_reuse.{md,csv}
    python benchmarks/sample_reuse.py --iterations 10 --mdps 1 --out /tmp/reuse.md   # a quick run
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch as th
from stable_baselines3.common.callbacks import BaseCallback

from sb3_metarl.estimators.exact import exact_meta_gradient
from sb3_metarl.estimators.setups import make_tabular_model
from sb3_metarl.estimators.study import flat_per_task_gradient, write_csv

REUSE = (0, 1, 3, 7)


class CompareWithExact(BaseCallback):
    """At each meta-iteration: the per-task estimates of the sample and the exact meta-gradient at the same parameters."""

    def __init__(self, task: np.ndarray):
        super().__init__()
        self.task = task
        self.pairs: list[tuple[th.Tensor, th.Tensor]] = []

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        estimates = flat_per_task_gradient(
            self.model.meta_gradient_on_samples(self.locals["sample"], self.model.gradient_mode)
        )
        exact = exact_meta_gradient(self.model, [self.task])
        self.pairs.append((estimates.double(), th.cat([exact[n].flatten() for n in sorted(exact)]).double()))


def measure(reuse: int, mdp: int, mode: str, episodes: int, iterations: int, learning_rate: float) -> dict[str, float]:
    model, task = make_tabular_model(mode, inner_episodes=episodes, task_seed=mdp, seed=mdp, meta_batch_size=10,
                                     inner_sample_reuse=reuse, learning_rate=learning_rate)  # fmt: skip
    recorder = CompareWithExact(task)
    model.learn(iterations * 10 * 2 * episodes * 20, callback=recorder)
    pairs = recorder.pairs[max(reuse, 1) :]  # once the buffers are full
    correlations, biases, spreads = [], [], []
    for estimates, exact in pairs:
        centered, reference = estimates - estimates.mean(1, keepdim=True), exact - exact.mean()
        correlations.append((centered @ reference / (centered.norm(dim=1) * reference.norm())).mean().item())
        spreads.append((estimates.var(0).sum().sqrt() / exact.norm()).item())
    if learning_rate < 1e-6:  # one parameter point: pool every iteration's estimates for the bias
        stacked, exact = th.cat([e for e, _ in pairs]), pairs[0][1]
        squared = (stacked.mean(0) - exact).pow(2).sum() - (stacked.var(0) / len(stacked)).sum()
        biases.append((squared.clamp(min=0).sqrt() / exact.norm()).item())
    else:  # each iteration's own parameters: its 10 estimates against its exact gradient
        for estimates, exact in pairs:
            squared = (estimates.mean(0) - exact).pow(2).sum() - (estimates.var(0) / len(estimates)).sum()
            biases.append((squared.clamp(min=0).sqrt() / exact.norm()).item())
    return dict(correlation=float(np.mean(correlations)), bias=float(np.mean(biases)), spread=float(np.mean(spreads)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="lvc")
    parser.add_argument("--episodes", type=int, default=5, help="fresh inner (and outer) episodes per task and iteration")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--mdps", type=int, default=3)
    parser.add_argument("--out", default="docs/results/sample_reuse.md")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = []
    for regime, learning_rate in (("fixed parameters", 1e-12), ("training (Adam 0.05)", 0.05)):
        for reuse in REUSE:
            results = [
                measure(reuse, mdp, args.mode, args.episodes, args.iterations, learning_rate) for mdp in range(args.mdps)
            ]
            rows.append(dict(regime=regime, reuse=reuse, **{k: float(np.mean([r[k] for r in results])) for k in results[0]}))
            print(rows[-1], flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(rows, str(out.with_suffix(".csv")))
    command = " ".join(["python benchmarks/sample_reuse.py", *(sys.argv[1:] if argv is None else argv)])
    lines = [
        "# Reusing inner samples against the compositional bias",
        "",
        f"`{command}` ({(time.perf_counter() - start) / 60:.0f} min): TabularMDP (Liu et al.'s Table 2 setting), "
        f"`{args.mode}`, {args.episodes} fresh inner and outer episodes per task and iteration, 10 estimates per "
        f"iteration, {args.iterations} iterations, {args.mdps} MDPs. Bias: |E[estimate] - exact| / |exact| with the "
        "estimates' noise removed (pooled over iterations with the parameters fixed; per iteration while training); "
        "spread: the estimates' standard deviation (norm) / |exact|; correlation: Pearson, per estimate.",
        "",
        "| regime | reused batches | bias | correlation | spread |",
        "|---|---:|---:|---:|---:|",
        *(f"| {r['regime']} | {r['reuse']} | {r['bias']:.3f} | {r['correlation']:.3f} | {r['spread']:.3f} |" for r in rows),
        "",
    ]
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
