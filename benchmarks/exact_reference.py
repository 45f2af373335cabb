"""
Every gradient mode against the exact references (the numbers the test suite asserts, printed in full).

    python benchmarks/exact_reference.py > docs/results/exact_reference.md

Gaussian bandit (target 0.5, policy N(0.2, exp(-0.5)^2), inner lr 0.1, one inner step, no baseline):
z-score of the mean of 500 estimates against the path-wise gradient of L_N (200,000 draws), and the
trace of the estimates' covariance, for N = 4, 16, 64 (M = 16). Tabular MDP (20 states, 5 actions,
horizon 20, gamma 0.8, inner lr 10, uniform initial policy): cosine similarity and relative error of
the mean of 40 estimates against the exact MAML meta-gradient computed by dynamic programming, split
into the mean's noise (its standard error) and the bias that remains once the noise is taken out.
"""

import numpy as np

from sb3_metarl.estimators.exact import bandit_maml_gradient, bandit_pathwise_gradient
from sb3_metarl.estimators.setups import (
    BANDIT_INNER_LR,
    BANDIT_LOG_STD,
    BANDIT_MEAN,
    BANDIT_TARGET,
    bandit_estimates,
    make_bandit_model,
    make_tabular_model,
)
from sb3_metarl.estimators.study import compare_with_exact

MODES = ["sf", "lsf", "dice", "lvc", "loaded_dice", "maml", "fomaml"]


def main() -> None:
    print("# Exact references\n")
    print("## Gaussian bandit: against the path-wise gradient of L_N\n")
    maml_gradient = bandit_maml_gradient(BANDIT_MEAN, BANDIT_LOG_STD, BANDIT_TARGET, BANDIT_INNER_LR)
    print(f"closed-form MAML gradient (N -> infinity): {np.round(maml_gradient, 4)}\n")
    print("| mode | N | mean estimate | reference grad L_N | z (mean, log_std) | trace of covariance |")
    print("|---|---:|---|---|---|---:|")
    for n in (4, 16, 64):
        reference, reference_se = bandit_pathwise_gradient(
            BANDIT_MEAN, BANDIT_LOG_STD, BANDIT_TARGET, BANDIT_INNER_LR, n, 1, n_samples=200_000
        )
        for mode in MODES:
            estimates = bandit_estimates(make_bandit_model(mode, n, outer_episodes=16))
            se = np.sqrt(estimates.var(0, ddof=1) / len(estimates) + reference_se**2)
            z = (estimates.mean(0) - reference) / se
            print(
                f"| {mode} | {n} | {np.round(estimates.mean(0), 3)} | {np.round(reference, 3)} | {np.round(z, 1)} "
                f"| {estimates.var(0).sum():.3f} |",
                flush=True,
            )
    print("\n## Tabular MDP: against the exact MAML meta-gradient (dynamic programming)\n")
    print("| mode | inner steps | N | cosine (mean of 40) | relative error | relative noise | relative bias |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for steps, n in ((1, 400), (2, 200)):
        for mode in MODES:
            result = compare_with_exact(*make_tabular_model(mode, n, steps), calls=4)
            metrics = " | ".join(f"{result[key]:.2f}" for key in ("relative_error", "relative_noise", "relative_bias"))
            print(f"| {mode} | {steps} | {n} | {result['cosine_mean']:.3f} | {metrics} |", flush=True)


if __name__ == "__main__":
    main()
