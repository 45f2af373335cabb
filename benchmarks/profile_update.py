"""
Where a meta-update's time goes: one TrustRegion and one ProMP meta-update on the same meta-sample, split into
phases and timed, next to the sampling of that meta-sample; plus torch's profiler table of the busiest
operators of the TrustRegion update.

The setting is issue 11's, matched to pytorch-maml-rl's configs/maml/2d-navigation.yaml: Navigation2D,
20 tasks x 20 episodes, horizon 100, one inner step, hidden [64, 64], TrustRegion with max_kl 0.01, 10 CG steps,
damping 1e-5.

    python benchmarks/profile_update.py                 # writes docs/results/profile_update.md
    python benchmarks/profile_update.py --threads 1
    python benchmarks/profile_update.py --published --threads 1 --repeats 1 --out docs/results/profile_update_published.md

``--published``: SG-MRL's Rand Dir setting instead (``reproduce_published.py --suite sgmrl-dir``: HalfCheetahDir, 40 tasks
x (20 + 20) episodes x 200 steps, 100 x 100 tanh policy, one inner step), `maml` with pytorch-maml-rl's TrustRegion
(max_kl 0.01, 10 CG steps, damping 1e-5), the batched twin with one physics thread.
"""

import argparse
import os
import platform
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch as th

from sb3_metarl import MetaPolicyGradient
from sb3_metarl.adaptation import Adaptation, MetaSample
from sb3_metarl.meta_optimizers import ProMP, TrustRegion
from sb3_metarl.meta_optimizers.trpo import conjugate_gradient


class Timer:
    """Accumulates wall-clock seconds per named phase."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - start
            self.calls[phase] += 1


def make_model(seed: int) -> MetaPolicyGradient:
    return MetaPolicyGradient(
        "MlpPolicy",
        "sb3_metarl/Navigation2D-v0",
        gradient_mode="lsf",
        meta_optimizer="trpo",
        meta_optimizer_kwargs=dict(max_kl=0.01, cg_max_steps=10, cg_damping=1e-5),
        meta_batch_size=20,
        inner_episodes=20,
        outer_episodes=20,
        inner_lr=1e-3,
        policy_kwargs=dict(net_arch=[64, 64], log_std_init=-1.0),
        seed=seed,
    )


def make_published_model(seed: int) -> MetaPolicyGradient:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from reproduce_published import make_model, suite_runs

    (run,) = suite_runs("sgmrl-dir", ["maml"], [seed], meta_optimizer="trpo")
    return make_model(run, "vec_env", None, physics_threads=1)


def timed_trpo_step(trpo: TrustRegion, adaptation: Adaptation, sample: MetaSample, timer: Timer) -> dict[str, float]:
    """TrustRegion.step, phase by phase (the same computations in the same order)."""
    adaptation = adaptation if trpo.layered_hessian else adaptation.autograd()
    all_params = adaptation.parameters()
    old_adapted = {n: p.detach() for n, p in sample.adapted.items()}
    with timer("surrogate (forward, on the sample's graph)"):
        objective = trpo.surrogate(adaptation, sample.replay, sample)
    with timer("meta-gradient (backward through the inner step)"):
        grads = th.autograd.grad(objective, list(all_params.values()), retain_graph=True, allow_unused=True)
    names = [n for n, g in zip(all_params, grads) if g is not None]
    params = [all_params[n] for n in names]
    policy_gradient = th.cat([g.reshape(-1) for g in grads if g is not None])
    with timer("KL Hessian set-up (activations and inner cotangents; double backward: the KL gradient's graph)"):
        kl_hessian_product = adaptation.kl_hessian_product(sample, names)

    def hessian_vector_product(vector: th.Tensor) -> th.Tensor:
        with timer("Hessian-vector product of the KL through the inner step (10, for CG)"):
            sizes = [p.numel() for p in params]
            product = kl_hessian_product({n: v.view_as(p) for n, v, p in zip(names, vector.split(sizes), params)})
            flat = th.cat([product[n].reshape(-1) for n in names])
        return flat + trpo.cg_damping * vector

    # the conjugate gradient's own arithmetic (on 5k-element vectors) is negligible: its time is its HVPs'
    direction, direction_product = conjugate_gradient(hessian_vector_product, policy_gradient.detach(), trpo.cg_max_steps)
    curvature = (direction @ direction_product).item()
    full_step = (2.0 * trpo.max_kl / curvature) ** 0.5 * direction.detach()
    old_values = [p.detach().clone() for p in params]
    with timer("line search: the reference distribution (once)"), th.no_grad():
        old_distribution = adaptation.batch_distribution(old_adapted, sample.outer_batch)
    coefficient, accepted = 1.0, False
    for _ in range(trpo.line_search_max_iter):
        trpo.set_parameters(params, old_values, coefficient * full_step)
        with timer("line search: replay without graph (each)"):
            replay = adaptation.evaluate(sample)
        with timer("line search: surrogate and KL (each)"), th.no_grad():
            new_objective = trpo.surrogate(adaptation, replay, sample).item()
            new_kl = adaptation.mean_kl(
                old_adapted, replay.adapted, sample.outer_batch, old_distribution, replay.outer_distribution
            ).item()
        if new_objective > objective.item() and new_kl <= trpo.max_kl:
            accepted = True
            break
        coefficient *= trpo.line_search_shrinking_factor
    if not accepted:
        trpo.set_parameters(params, old_values, th.zeros_like(full_step))
    return {"accepted": float(accepted), "coefficient": coefficient}


def timed_ppo_step(ppo: ProMP, adaptation: Adaptation, sample: MetaSample, optimizer: Any, timer: Timer) -> None:
    """ProMP.step, phase by phase."""
    old_inner_params = sample.inner_params
    ppo.inner_kl_coefs = ppo.inner_kl_coefs or [ppo.inner_kl_coef] * len(old_inner_params)
    for epoch in range(ppo.n_epochs):
        with timer("replay (epochs 2..)"):
            replay = sample.replay if epoch == 0 else adaptation.replay(sample)
        with timer("objective and inner KL (forward)"):
            objective, _, inner_kls = ppo.objective(adaptation, replay, sample, old_inner_params)
            loss = -objective + sum(c * kl for c, kl in zip(ppo.inner_kl_coefs, inner_kls))
        with timer("backward"):
            optimizer.zero_grad()
            loss.backward()
        with timer("optimizer step"):
            optimizer.step()


def fresh_sample(model: MetaPolicyGradient, timer: Timer) -> MetaSample:
    tasks = model.get_env().env_method("sample_tasks", model.meta_batch_size, np.random.default_rng(0), indices=[0])[0]
    with timer("sampling (inner and outer batches, inner step with its graph)"):
        sample = model.collect_meta_sample(tasks)
    assert sample is not None
    return sample


def table(title: str, timer: Timer) -> list[str]:
    total = sum(timer.seconds.values())  # the phases do not overlap
    lines = [f"## {title}", "", "| phase | calls | seconds | share |", "|---|---:|---:|---:|"]
    for phase, seconds in timer.seconds.items():
        lines.append(f"| {phase} | {timer.calls[phase]} | {seconds:.3f} | {seconds / total:.0%} |")
    lines.append(f"| total | | {total:.3f} | |")
    return [*lines, ""]


def profile(run: Callable[[], None], rows: int = 12) -> str:
    with th.profiler.profile(activities=[th.profiler.ProfilerActivity.CPU]) as profiler:
        run()
    return profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=3, help="meta-samples (and updates) per optimizer")
    parser.add_argument("--double-backward", action="store_true", help="the KL's Hessian by double backward (for comparison)")
    parser.add_argument("--published", action="store_true", help="SG-MRL's Rand Dir setting (see above)")
    parser.add_argument("--out", default="docs/results/profile_update.md")
    args = parser.parse_args(argv)
    if args.threads:
        th.set_num_threads(args.threads)
    model = make_published_model(seed=0) if args.published else make_model(seed=0)
    model.meta_optimizer.layered_hessian = not args.double_backward
    model.learn(1)  # warm-up
    trpo_timer, ppo_timer = Timer(), Timer()
    for _ in range(args.repeats):
        sample = fresh_sample(model, trpo_timer)
        timed_trpo_step(model.meta_optimizer, model.adaptation, sample, trpo_timer)
    ppo = ProMP(n_epochs=5, clip_range=0.3)
    for _ in range(args.repeats):
        sample = fresh_sample(model, ppo_timer)
        timed_ppo_step(ppo, model.adaptation, sample, model.policy.optimizer, ppo_timer)
    # the ProMP epochs moved the parameters; the TrustRegion profile below starts from them, which is fine for timing
    sample = fresh_sample(model, Timer())
    operators = profile(lambda: timed_trpo_step(model.meta_optimizer, model.adaptation, sample, Timer()))
    if args.published:
        setting_title = "SG-MRL's Rand Dir setting"
        setting = "HalfCheetahDir, 40 tasks x (20 + 20) episodes x 200 steps, one inner step, 100 x 100, maml"
    else:
        setting_title = "issue 11's setting"
        setting = "Navigation2D, 20 tasks x 20 episodes x 100 steps, one inner step, [64, 64], lsf"
    lines = [
        f"# Profile of one meta-update ({setting_title})",
        "",
        f"`python benchmarks/profile_update.py {' '.join(argv if argv is not None else sys.argv[1:])}`".replace(" `", "`"),
        "",
        f"{platform.machine()}, torch {th.__version__}, {th.get_num_threads()} threads; {setting}; {args.repeats} "
        "meta-samples per optimizer (sums).",
        "",
        *table("TrustRegion (max_kl 0.01, 10 CG steps, damping 1e-5)", trpo_timer),
        *table("ProMP (ProMP: 5 epochs, clip 0.3)", ppo_timer),
        "## Busiest operators of one TrustRegion update (torch profiler, self CPU time)",
        "",
        "```",
        operators,
        "```",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
