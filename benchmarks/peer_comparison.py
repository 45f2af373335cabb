"""
sb3_metarl against pytorch-maml-rl on the same cores, runs alternating in one time window.

The setting is issue 11's, pytorch-maml-rl's configs/maml/2d-navigation.yaml: Navigation2D, 20 tasks x 20
episodes, horizon 100, one inner step, [64, 64] tanh, TRPO with max_kl 0.01, 10 CG steps, damping 1e-5 (ours:
``maml`` mode, fast-lr 0.1 on the per-step mean = 0.1 / 100, standardized advantages, as
``../shared/bench/peer/ours_run.py``); ours also with ``ppo`` and ``adam``, and TRPO with ``sampler="subproc"`` on
as many worker processes as threads (the peer samples in one worker process too). Each run is a fresh process of
``--iterations`` meta-iterations; the first is dropped (start-up), the medians are over the rest of every
round. Seconds per iteration are split into sampling and update (the peer's split is its own
instrumentation in ``peer_run.py``: its update overlaps the end of its sampling), with each process's
peak resident memory (the peer's trainer process; its sampler worker apart).

Set-up of the peer (``../shared/bench/peer/README.md``)::

    python3 -m venv /work/pmr-venv
    /work/pmr-venv/bin/pip install torch==2.13.0 "gym==0.17.3" "numpy<2" pyyaml tqdm

Run::

    python benchmarks/peer_comparison.py --peer-python /work/pmr-venv/bin/python   # writes docs/results/peer_comparison.*
    python benchmarks/peer_comparison.py --rounds 1 --iterations 2 --systems ours-trpo --out /tmp/quick.md  # no peer
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from sb3_metarl.estimators.study import write_csv

SYSTEMS = ("peer-trpo", "ours-trpo", "ours-trpo-subproc", "ours-ppo", "ours-adam")
PEER_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "bench" / "peer"


def peak_rss_mb(pid: str = "self") -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_ours(variant: str, iterations: int, threads: int, seed: int, device: str = "cpu") -> None:
    """One process of ours: one JSON line per meta-iteration, then one with the peak memory (this process's)."""
    import torch as th
    from stable_baselines3.common.logger import KVWriter, Logger
    from torch import nn

    th.set_num_threads(threads)
    from sb3_metarl import MetaPolicyGradient

    class Rows(KVWriter):
        def write(self, key_values, key_excluded, step=0):
            print(
                json.dumps({"sampling": key_values["time/sample_seconds"], "update": key_values["time/train_seconds"]}),
                flush=True,
            )

    optimizer_kwargs = {
        "trpo": dict(max_kl=0.01, cg_damping=1e-5, cg_max_steps=10, line_search_shrinking_factor=0.8, line_search_max_iter=15),
        "ppo": {},
        "adam": {},
    }[variant.split("-")[0]]
    meta_optimizer = variant.split("-")[0]
    sampler = dict(sampler="subproc", sampler_kwargs=dict(num_workers=threads)) if variant.endswith("subproc") else {}
    model = MetaPolicyGradient(
        "MlpPolicy", "sb3_metarl/Navigation2D-v0", gradient_mode="maml", meta_optimizer=meta_optimizer,
        meta_optimizer_kwargs=optimizer_kwargs, meta_batch_size=20, inner_episodes=20, outer_episodes=20, inner_steps=1,
        inner_lr=0.1 / 100, normalize_advantage=True, gamma=0.99, gae_lambda=1.0, baseline="linear",
        policy_kwargs=dict(net_arch=[64, 64], activation_fn=nn.Tanh), seed=seed, device=device, **sampler,
    )  # fmt: skip
    model.set_logger(Logger(folder=None, output_formats=[Rows()]))
    model.learn(iterations * 20 * 20 * 100 * 2)
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}), flush=True)


def measure(system: str, iterations: int, threads: int, seed: int, args: argparse.Namespace) -> dict:
    """:return: per-iteration rows (seconds, sampling, update) and the peak memory of one fresh process"""
    if system == "peer-trpo":
        script = str(Path(args.peer_dir) / "peer_run.py")
        command = [args.peer_python, script, "--iters", str(iterations), "--threads", str(threads),
                   "--num-workers", "1", "--seed", str(seed)]  # fmt: skip
    else:
        command = [sys.executable, __file__, "--worker", system.split("-", 1)[1], "--iterations", str(iterations),
                   "--threads", str(threads), "--seed", str(seed), "--device", args.device]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=args.timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"}
    )
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{system} failed:\n{result.stderr[-3000:]}")
    rows, peak = [], float("nan")
    for line in result.stdout.splitlines():
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        if "sampling" in record:
            rows.append(dict(sampling=record["sampling"], update=record["update"], seconds=record.get("seconds",
                             record["sampling"] + record["update"])))  # fmt: skip
        if "peak_rss_mb" in record:
            peak = record["peak_rss_mb"]
        if "vmhwm_kb" in record:
            peak = record["vmhwm_kb"]["main"] / 1024
    return dict(rows=rows, peak_rss_mb=peak, process_seconds=wall)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=["trpo", "trpo-subproc", "ppo", "adam"], help=argparse.SUPPRESS)
    parser.add_argument("--iterations", type=int, default=5, help="meta-iterations per process (the first is dropped)")
    parser.add_argument("--rounds", type=int, default=3, help="alternation rounds (every system at every thread count)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="our policy's and update's device (the peer's stays on the CPU)")
    parser.add_argument("--peer-python", default=os.environ.get("PMR_PYTHON", "/work/pmr-venv/bin/python"))
    parser.add_argument("--peer-dir", default=str(PEER_DIR), help="the directory of peer_run.py")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per process")
    parser.add_argument("--out", default="docs/results/peer_comparison.md")
    args = parser.parse_args(argv)
    if args.worker:
        run_ours(args.worker, args.iterations, args.threads[0], args.seed, args.device)
        return
    measurements: dict[tuple[str, int], list[dict]] = {}
    for round_index in range(args.rounds):
        for threads in args.threads:
            for system in args.systems:
                measured = measure(system, args.iterations, threads, args.seed + round_index, args)
                measurements.setdefault((system, threads), []).append(measured)
                print(
                    f"round {round_index} {system} {threads} thread(s): "
                    f"{statistics.median(r['seconds'] for r in measured['rows'][1:]):.2f} s/iteration",
                    flush=True,
                )
    write_results(args, measurements)


def write_results(args: argparse.Namespace, measurements: dict[tuple[str, int], list[dict]]) -> None:
    table, medians = [], {}
    for (system, threads), runs in measurements.items():
        rows = [row for run in runs for row in run["rows"][1:]]
        medians[(system, threads)] = median = {
            key: statistics.median(r[key] for r in rows) for key in ("seconds", "sampling", "update")
        }
        table.append(dict(system=system, threads=threads, iterations=len(rows), **{k: round(v, 3) for k, v in median.items()},
                          peak_rss_mb=round(max(run["peak_rss_mb"] for run in runs)), process_seconds=round(statistics.median(
                              run["process_seconds"] for run in runs), 1)))  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(table, str(out.with_suffix(".csv")))
    command = "python benchmarks/peer_comparison.py" + (
        "" if args.out == "docs/results/peer_comparison.md" else f" --out {args.out}"
    )
    lines = [
        "# sb3_metarl against pytorch-maml-rl (MAML-TRPO, Navigation2D)",
        "",
        f"`{command} --rounds {args.rounds} --iterations {args.iterations}` on {platform.machine()}, "
        f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}; runs alternating (every system at every thread count per "
        "round), medians over the iterations after the first of each process.",
        "",
        "| threads | system | s / iteration | sampling | update | peer / this | peak memory (MB) |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in sorted(table, key=lambda r: (r["threads"], SYSTEMS.index(r["system"]))):
        peer = medians.get(("peer-trpo", row["threads"]))
        ratio = f"{peer['seconds'] / row['seconds']:.2f}" if peer else "—"
        lines.append(f"| {row['threads']} | {row['system']} | {row['seconds']:.2f} | {row['sampling']:.2f} | "
                     f"{row['update']:.2f} | {ratio} | {row['peak_rss_mb']} |")  # fmt: skip
    best_peer = min((v["seconds"] for (s, _), v in medians.items() if s == "peer-trpo"), default=None)
    best_ours = min((v["seconds"] for (s, _), v in medians.items() if s.startswith("ours-trpo")), default=None)
    if best_peer and best_ours:
        lines += [
            "",
            f"Each at its faster thread count: pytorch-maml-rl {best_peer:.2f} s, sb3_metarl (TRPO) {best_ours:.2f} s: "
            f"**{best_peer / best_ours:.2f}x**.",
        ]
    lines += [
        "",
        "Notes. The peer's sampling runs in a worker process while its trainer computes the inner steps, so its "
        "split is its own instrumentation (`peer_run.py`); ours is `time/sample_seconds` and `time/train_seconds` "
        "of the same iteration; `ours-trpo-subproc` samples on as many worker processes as threads (`sampler=\"subproc\"`), "
        "as the peer samples in a worker. Peak memory: the peer's trainer process (its sampler worker apart), our main "
        "process (workers apart). "
        "Our TRPO update multiplies by the KL's Hessian layer by layer from cached activations "
        "(`sb3_metarl/mlp/curvature.py`); `python benchmarks/profile_update.py` splits one update into "
        "phases (`docs/results/profile_update.md`; with `--double-backward` the same update with the products "
        "by double backward, as the peer computes them).",
    ]
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
