"""
The seeds' MuJoCo tables at the papers' budgets, run in sittings: every run checkpoints every
``--checkpoint-every`` meta-iterations and continues bit for bit from its last checkpoint when the
command is run again (after a stop at any moment, on this machine or another one).

Suites (the papers' settings; what differs from them is listed in docs/results/reproduce_published.md):

* ``sgmrl-dir``: SG-MRL (Fallah et al. 2021) Table 2, HalfCheetah random direction, at its code's
  ``sgmrl_configs/sgmrl_mujoco.json``: 40 tasks x 20 episodes, horizon 200, one inner step (0.1 on the
  mean over steps), 100 x 100 tanh policy, GAE lambda 0.997, standardized advantages without the gamma^t
  step weights (``discount_from_start=False``), Adam at 1e-3 on the meta-gradient, 400 meta-iterations
  (1.28e8 env steps), ProMP's normalized env (``action_scale=10``) and rllab's control cost 0.05.
* ``sgmrl-vel``: the same on HalfCheetah random velocity, targets U[0, 3] (SG-MRL's range).
* ``sgmrl-swimmer``: the same on Swimmer random velocity, at maml_zoo's ``SwimmerRandVelEnv`` (the file in SG-MRL's
  repository): targets U[0.1, 0.2], control cost 1e-4, and its task term ``+|v_x - v*|`` (``deviation_sign=1``).
* ``sgmrl-nav``: SG-MRL Table 1, 2-D navigation at its code's ``sgmrl_configs/sgmrl_full.json`` and
  ``maml_zoo/envs/point_envs/point_env_2d_v2.py``: 20 tasks x 20 episodes, horizon 100, 500 iterations (4e7 env
  steps), reward minus the distance to the goal, position clipped to [-0.5, 0.5]^2 (``position_limit=0.5``),
  actions in [-10, 10] mapped onto +-0.1 (``action_scale=10``), the rest as ``sgmrl-dir``.
* ``maml-trpo-dir`` / ``maml-trpo-vel`` / ``maml-trpo-ant-dir``: pytorch-maml-rl's configs
  (halfcheetah-dir.yaml, halfcheetah-vel.yaml, ant-dir.yaml): 40 x 20 episodes, horizon 100, actions
  normalized with scale 10, 64 x 64 tanh, TRPO (max KL 0.01), 500 batches (8e7 env steps).

A run lives in ``<out>/runs/<name>/``: ``model.zip`` (the last checkpoint, a small SB3 zip with every
random stream), ``curve.jsonl`` (one line per meta-iteration: env steps, pre- and post-adaptation return
on the training tasks, wall seconds), ``evals.jsonl`` (held-out evaluations: 40 fixed tasks, mean return
after 0..3 inner steps, every ``--eval-every`` iterations and at the end), ``train.jsonl`` (every meta-update's
``train/`` logger keys: the meta-optimizer's KL, clip fraction and inner-KL weights, the inner gradient's norm; the
diagnostics of a run that goes wrong) and ``run.json`` (configuration,
iterations done, accumulated wall time, machines). A finished run is appended to
``<out>/reproduce_published_runs.jsonl``; the table ``reproduce_published_table.md`` and the curves
``reproduce_published.png`` are rewritten from the finished and partial runs at every invocation.

Example (one run of the Rand Dir row; run it again to continue)::

    python benchmarks/reproduce_published.py --suite sgmrl-dir --modes sf --seeds 0 --out docs/results
"""

import argparse
import json
import os
import platform
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from sb3_metarl.meta_pg.policies import ACTOR_INITS

#: SG-MRL Table 2 (mean meta-test reward over 4 seeds): (env, inner steps) -> {algorithm: (mean, std)}
SGMRL_TABLE2 = {
    ("dir", 1): {"SG-MRL": (580.143, 38.22), "MAML": (465.624, 54.07)},
    ("dir", 2): {"SG-MRL": (580.203, 33.63), "MAML": (441.247, 58.34)},
    ("dir", 3): {"SG-MRL": (504.747, 45.07), "MAML": (477.086, 64.71)},
    ("vel", 1): {"SG-MRL": (-91.73, 0.34), "MAML": (-92.92, 0.70)},
    ("vel", 2): {"SG-MRL": (-52.64, 6.86), "MAML": (-56.71, 6.73)},
    ("vel", 3): {"SG-MRL": (-33.39, 0.67), "MAML": (-32.48, 0.50)},
    ("swimmer", 1): {"SG-MRL": (118.77, 9.99), "MAML": (104.53, 24.18)},
    ("swimmer", 2): {"SG-MRL": (134.57, 1.67), "MAML": (108.47, 23.36)},
    ("swimmer", 3): {"SG-MRL": (110.91, 12.56), "MAML": (90.60, 14.99)},
}
#: the key of each MuJoCo suite's rows in SGMRL_TABLE2
TABLE2_ROWS = {"sgmrl-dir": "dir", "sgmrl-vel": "vel", "sgmrl-swimmer": "swimmer"}
#: SG-MRL Table 1 (2-D navigation, one inner step): mean meta-test reward and its spread
SGMRL_TABLE1 = {"SG-MRL": (-16.901, 0.699), "MAML": (-17.767, 0.106), "E-MAML": (-17.803, 0.115)}
#: What SG-MRL's code ran for both columns of its tables: VPG-MAML, second order. Its SG-MRL
#: (``maml_zoo/meta_algos/vpg_sgmrl.py:170``) adds ``stop_gradient(mean(adv)) * sum(log_likelihood_initial)``, and the
#: advantages are standardized per task (``samplers/base.py:119-120``, ``normalize_adv: true``), so the weight is zero
#: up to float32 rounding: both columns are runs of our ``maml``. Our ``sf`` (SG-MRL as the paper defines it) was never
#: run by its authors and has no published number.
MAML_COLUMNS = {"MAML": "MAML", "SG-MRL": "SG-MRL (its code: MAML)"}
#: pytorch-maml-rl's TRPO settings (configs/maml/*.yaml)
TRPO_KWARGS = dict(max_kl=0.01, cg_damping=1e-5, cg_max_steps=10, line_search_shrinking_factor=0.8, line_search_max_iter=15)
#: the held-out evaluation: tasks, inner steps, seed of the task stream (fixed for every run and checkpoint)
EVAL_TASKS, EVAL_STEPS, EVAL_SEED = 40, 3, 1000


@dataclass
class PublishedRun:
    """One meta-training run at a paper's setting."""

    suite: str
    env_id: str
    gradient_mode: str
    meta_optimizer: str
    seed: int
    iterations: int
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def fixed_inner_kl(self) -> bool:
        """:return: whether this is ProMP with its inner-KL weight fixed (ProMP's MuJoCo run script), not adapted"""
        return self.kwargs.get("meta_optimizer_kwargs", {}).get("adaptive_inner_kl") is False

    @property
    def actor_init(self) -> str | None:
        """:return: the policy's actor initialization (``MlpPolicy``'s ``actor_init``; None: SB3's)"""
        return self.kwargs.get("policy_kwargs", {}).get("actor_init")

    @property
    def optimizer_label(self) -> str:
        """
        :return: the meta-optimizer as the tables name it, with what makes a configuration a row of its own: ProMP at a
            fixed inner-KL weight, the reference codes' Xavier initialization of the actor
        """
        label = f"{self.meta_optimizer}, fixed inner KL" if self.fixed_inner_kl else self.meta_optimizer
        return f"{label}, Xavier init" if self.actor_init == "xavier_uniform" else label

    @property
    def name(self) -> str:
        steps = self.kwargs.get("inner_steps", 1)
        suffix = "" if steps == 1 else f"_k{steps}"  # SG-MRL's 2- and 3-step rows are runs of their own
        suffix += "_fixedkl" if self.fixed_inner_kl else ""
        suffix += "_xavier" if self.actor_init == "xavier_uniform" else ""
        return f"{self.suite}_{self.gradient_mode}_{self.meta_optimizer}_s{self.seed}{suffix}"

    @property
    def steps_per_iteration(self) -> int:
        kwargs = self.kwargs
        episodes = kwargs["inner_steps"] * kwargs["inner_episodes"] + kwargs["outer_episodes"]
        return kwargs["meta_batch_size"] * episodes * kwargs.get("max_episode_steps", 200)


def paper_numbers(suite: str, mode: str, inner_steps: int) -> list[tuple[str, float, float | None]] | None:
    """
    :return: the published numbers a run of ``mode`` is compared with, as (label, mean, std or None): for ``maml`` on
        the SG-MRL suites both columns of SG-MRL's tables (both are MAML runs of its code); None for other modes
    """
    if mode != "maml" or not suite.startswith("sgmrl"):
        return None
    if suite == "sgmrl-nav":
        return [(label, *SGMRL_TABLE1[column]) for column, label in MAML_COLUMNS.items()] if inner_steps == 1 else None
    columns = SGMRL_TABLE2.get((TABLE2_ROWS.get(suite, ""), inner_steps))
    if columns is None:
        return None
    return [(label, *columns[column]) for column, label in MAML_COLUMNS.items()]


#: the episode length of each suite (SG-MRL's max_path_length; pytorch-maml-rl's max_episode_steps: 100)
SUITE_HORIZON = {"sgmrl-dir": 200, "sgmrl-vel": 200, "sgmrl-swimmer": 200, "sgmrl-nav": 100}


def _paper_kwargs(horizon: int, inner_steps: int) -> dict[str, Any]:
    """
    40 tasks x 20 episodes, inner lr 0.1 in the papers' per-step-mean convention (0.1 / H on our per-episode sum),
    standardized advantages weighted as the papers' code weighs them (no gamma^t factor).
    """
    return dict(
        meta_batch_size=40,
        inner_episodes=20,
        outer_episodes=20,
        inner_steps=inner_steps,
        inner_lr=0.1 / horizon,
        normalize_advantage=True,
        discount_from_start=False,
        max_episode_steps=horizon,
    )


def suite_runs(
    suite: str,
    modes: list[str],
    seeds: list[int],
    inner_steps: int = 1,
    iterations: int | None = None,
    meta_optimizer: str | None = None,
    fixed_inner_kl: bool = False,
    actor_init: str | None = None,
) -> list[PublishedRun]:
    """
    :param suite: one of ``SUITES``
    :param modes: gradient modes to run
    :param seeds: seeds to run
    :param inner_steps: inner steps during meta-training (SG-MRL's 1-, 2- and 3-step rows)
    :param iterations: meta-iterations (default: the suite's budget)
    :param meta_optimizer: "adam" (Adam at 1e-3, SG-MRL's), "trpo" (pytorch-maml-rl's TrustRegion: ``TRPO_KWARGS``) or
        "ppo" (ProMP at its paper's defaults, Adam at 1e-3); default: the suite's. Another optimizer on a suite is a
        run of its own (its name says the optimizer), at the same env setting and budget: issue 30's item 5
    :param fixed_inner_kl: ProMP ("ppo") with its inner-KL weight fixed at its initial 5e-4, as ProMP's MuJoCo run
        script (jonasrothfuss/ProMP ``run_scripts/pro-mp_run_mujoco.py:118-123``), instead of adapted
    :param actor_init: ``MlpPolicy``'s ``actor_init``: None (SB3's initialization, the suites' runs so far) or
        ``"xavier_uniform"``, the papers' codes' (Glorot-uniform weights, zero biases: maml_zoo
        ``maml_zoo/policies/networks/mlp.py:12-13`` in SG-MRL's repository); a run of its own (``_xavier``)
    :return: the runs, in the order to run them (all modes of a seed before the next seed)
    """
    if suite not in SUITES:
        raise ValueError(f"--suite: unknown suite {suite!r}; use one of {sorted(SUITES)}.")
    env_id, optimizer, default_iterations, extra = SUITES[suite]
    if meta_optimizer is not None:
        if meta_optimizer not in META_OPTIMIZERS:
            raise ValueError(f"--meta-optimizer: unknown {meta_optimizer!r}; use one of {list(META_OPTIMIZERS)}.")
        optimizer = meta_optimizer
    horizon = SUITE_HORIZON.get(suite, 100)
    kwargs = {**_paper_kwargs(horizon, inner_steps), **extra}
    if optimizer == "trpo":
        kwargs["meta_optimizer_kwargs"] = TRPO_KWARGS
    else:  # Adam's step size, also ProMP's (its configs: learning_rate 1e-3)
        kwargs["learning_rate"] = 1e-3
    if fixed_inner_kl:
        if optimizer != "ppo":
            raise ValueError(f"--fixed-inner-kl: ProMP's option (--meta-optimizer ppo); the optimizer here is {optimizer!r}.")
        kwargs["meta_optimizer_kwargs"] = {"adaptive_inner_kl": False}
    if actor_init is not None:
        kwargs["policy_kwargs"] = {**kwargs.get("policy_kwargs", {}), "actor_init": actor_init}
    return [
        PublishedRun(suite, env_id, mode, optimizer, seed, iterations or default_iterations, dict(kwargs))
        for seed in seeds
        for mode in modes
    ]


#: the meta-optimizers a suite can be run with (``--meta-optimizer``)
META_OPTIMIZERS = ("adam", "trpo", "ppo")
#: suite -> (env id, meta-optimizer, meta-iterations, extra MetaPolicyGradient arguments)
#: SG-MRL's code (sgmrl_configs/sgmrl_mujoco.json): 100 x 100 tanh policy, GAE lambda 0.997
SGMRL_POLICY = dict(policy_kwargs=dict(net_arch=dict(pi=[100, 100], vf=[100, 100])), gae_lambda=0.997)
SUITES: dict[str, tuple[str, str, int, dict[str, Any]]] = {
    "sgmrl-dir": (
        "sb3_metarl/HalfCheetahDir-v0",
        "adam",
        400,
        dict(env_kwargs=dict(ctrl_cost_weight=0.05, action_scale=10.0), **SGMRL_POLICY),
    ),
    "sgmrl-vel": (
        "sb3_metarl/HalfCheetahVel-v0",
        "adam",
        400,
        dict(env_kwargs=dict(ctrl_cost_weight=0.05, velocity_range=(0.0, 3.0), action_scale=10.0), **SGMRL_POLICY),
    ),
    # maml_zoo's SwimmerRandVelEnv (ProMP's file, kept in SG-MRL's repository; its released vpg_run.py registers only
    # the point env and cheetah_dir, so the Swimmer runs' script is not published): goals U[0.1, 0.2], frame skip 4,
    # control cost 1e-4 |a|^2 on the mapped action, reset noise U[-0.1, 0.1] on qpos and qvel (Swimmer-v5's), and the
    # task term +|v_x - v*| (swimmer_rand_vel.py:36: the deviation rewarded, whence Table 2's positive returns)
    "sgmrl-swimmer": (
        "sb3_metarl/SwimmerVel-v0",
        "adam",
        400,
        dict(env_kwargs=dict(velocity_range=(0.1, 0.2), deviation_sign=1, action_scale=10.0), **SGMRL_POLICY),
    ),
    # SG-MRL's point env: 20 tasks (sgmrl_full.json's meta_batch_size), position clipped, ProMP's normalized actions
    "sgmrl-nav": (
        "sb3_metarl/Navigation2D-v0",
        "adam",
        500,
        dict(meta_batch_size=20, env_kwargs=dict(position_limit=0.5, action_scale=10.0), **SGMRL_POLICY),
    ),
    # pytorch-maml-rl's envs: HalfCheetah's control cost 0.5 * 1e-1 |a|^2; Ant's 0.5 * 1e-2 |a|^2, contact cost
    # 0.5 * 1e-3 |clip(cfrc_ext, -1, 1)|^2, survive bonus 0.05, done outside z in [0.2, 1]; actions in [-10, 10]
    "maml-trpo-dir": (
        "sb3_metarl/HalfCheetahDir-v0",
        "trpo",
        500,
        dict(env_kwargs=dict(ctrl_cost_weight=0.05, action_scale=10.0)),
    ),
    "maml-trpo-vel": (
        "sb3_metarl/HalfCheetahVel-v0",
        "trpo",
        500,
        dict(env_kwargs=dict(ctrl_cost_weight=0.05, action_scale=10.0)),
    ),
    "maml-trpo-ant-dir": (
        "sb3_metarl/AntDir-v0",
        "trpo",
        500,
        dict(
            env_kwargs=dict(
                action_scale=10.0,
                ctrl_cost_weight=0.005,
                contact_cost_weight=5e-4,
                contact_force_range=(-1.0, 1.0),
                healthy_reward=0.05,
                healthy_z_range=(0.2, 1.0),
            )
        ),
    ),
}


# ---------------------------------------------------------------------- files of a run


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """:return: the complete lines of a JSON-lines file (a line cut by a stop is dropped)"""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as file:
        for line in file:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # the last line of a run stopped while writing it
    return rows


def write_jsonl(path: str, rows: list[dict[str, Any]]) -> None:
    """Replace ``path`` by ``rows`` atomically (a stop leaves the old file or the new one)."""
    write_atomically(path, "".join(json.dumps(row) + "\n" for row in rows))


def write_atomically(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp_")
    with os.fdopen(handle, "w") as file:
        file.write(text)
    os.chmod(temporary, 0o644)
    os.replace(temporary, path)


def append_jsonl(path: str, row: dict[str, Any]) -> None:
    with open(path, "a") as file:
        file.write(json.dumps(row) + "\n")
        file.flush()


def cpu_model() -> str:
    """:return: the CPU's model name (CPUs round differently: a run continued on another kind is not the same bits)"""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            lines = cpuinfo.read().splitlines()
    except OSError:
        return platform.processor() or "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown CPU")
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return f"{name}{', AVX-512' if 'avx512f' in flags else ''}"


def machine() -> str:
    return f"{socket.gethostname()} ({platform.machine()}, {os.cpu_count()} cores, {cpu_model()})"


# ---------------------------------------------------------------------- running


def sampler_kwargs_for(sampler: str, num_workers: int | None, physics_threads: int) -> dict:
    """:return: the runs' sampler arguments: the workers, and the batched physics' threads (per process, stated)"""
    workers = {"num_workers": num_workers} if num_workers and sampler != "vec_env" else {}
    return {**workers, "num_threads": physics_threads}


def make_model(run: PublishedRun, sampler: str, num_workers: int | None, physics_threads: int = 1):
    from sb3_metarl import MetaPolicyGradient

    kwargs = dict(run.kwargs)
    kwargs["sampler_kwargs"] = sampler_kwargs_for(sampler, num_workers, physics_threads)
    kwargs["sampler"] = sampler
    return MetaPolicyGradient("MlpPolicy", run.env_id, gradient_mode=run.gradient_mode, meta_optimizer=run.meta_optimizer,
                              seed=run.seed, **kwargs)  # fmt: skip


def evaluate(model) -> list[float]:
    """:return: the mean return on the fixed held-out tasks after 0..EVAL_STEPS inner steps"""
    table = model.evaluate_adaptation(n_tasks=EVAL_TASKS, inner_steps=EVAL_STEPS, seed=EVAL_SEED)
    return [round(float(x), 4) for x in table["mean"]]


def open_run(run: PublishedRun, out: str, sampler: str, num_workers: int | None, physics_threads: int = 1) -> tuple:
    """:return: the run's file paths, its model (new, or loaded from the last checkpoint), state, curve and evaluations"""
    from sb3_metarl import MetaPolicyGradient

    folder = os.path.join(out, "runs", run.name)
    os.makedirs(folder, exist_ok=True)
    names = ("model.zip", "curve.jsonl", "evals.jsonl", "train.jsonl", "run.json")
    paths = {name: os.path.join(folder, name) for name in names}
    state = json.load(open(paths["run.json"])) if os.path.exists(paths["run.json"]) else None
    if state is None or not os.path.exists(paths["model.zip"]):
        state = {"config": asdict(run), "iterations_done": 0, "wall_seconds": 0.0, "machines": []}
        return paths, make_model(run, sampler, num_workers, physics_threads), state, [], []
    if state["config"] != json.loads(json.dumps(asdict(run))):
        raise ValueError(f"{paths['run.json']}: holds another configuration than {run.name}'s; move it away first.")
    sampler_kwargs = sampler_kwargs_for(sampler, num_workers, physics_threads)
    model = MetaPolicyGradient.load(paths["model.zip"], env=run.env_id, sampler=sampler, sampler_kwargs=sampler_kwargs)
    # what ran after the checkpoint is run again, bit for bit: its lines are dropped
    curve = [row for row in read_jsonl(paths["curve.jsonl"]) if row["iteration"] <= state["iterations_done"]]
    evals = [row for row in read_jsonl(paths["evals.jsonl"]) if row["iteration"] <= state["iterations_done"]]
    write_jsonl(paths["curve.jsonl"], curve)
    write_jsonl(paths["evals.jsonl"], evals)
    if os.path.exists(paths["train.jsonl"]):  # (runs started before it was written have none)
        diagnostics = read_jsonl(paths["train.jsonl"])
        write_jsonl(paths["train.jsonl"], [row for row in diagnostics if row["iteration"] <= state["iterations_done"]])
    return paths, model, state, curve, evals


def train_lines(path: str, iteration: Callable[[], int]) -> Any:
    """
    :return: an SB3 logger whose every dump appends the meta-update's ``train/`` keys (the meta-optimizer's own: KL,
        clip fraction, inner-KL weights, gradient norms) to ``path`` as one line with the meta-iteration
    """
    from stable_baselines3.common.logger import KVWriter, Logger

    class TrainLines(KVWriter):
        def write(self, key_values: dict[str, Any], key_excluded: dict[str, Any], step: int = 0) -> None:
            numbers = {
                key: float(value)
                for key, value in key_values.items()
                if key.startswith("train/") and isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
            }
            append_jsonl(path, {"iteration": iteration(), "env_steps": int(step), **numbers})

        def close(self) -> None:
            pass

    return Logger(folder=None, output_formats=[TrainLines()])


def run_sitting(
    run: PublishedRun,
    out: str,
    checkpoint_every: int,
    eval_every: int,
    sampler: str = "vec_env",
    num_workers: int | None = None,
    stop_after: int | None = None,
    physics_threads: int = 1,
    evaluation: Callable[[Any], dict[str, Any]] | None = None,
) -> dict[str, Any] | None:
    """
    Continue ``run`` from its last checkpoint (or start it) until its budget or ``stop_after`` iterations.

    :param checkpoint_every: meta-iterations between checkpoints
    :param eval_every: meta-iterations between held-out evaluations (a multiple of ``checkpoint_every``)
    :param sampler: "vec_env", "subproc" or "ray" (the samples are the same on every backend)
    :param stop_after: stop once this many iterations are done in total (a sitting's end; None: the budget)
    :param physics_threads: threads of the batched physics per sampling process (the samples do not depend on it)
    :param evaluation: the held-out evaluation, ``evaluation(model)`` -> the fields of its line in ``evals.jsonl``, with
        ``returns`` after 0..K inner steps among them (default: ``{"returns": evaluate(model)}``)
    :return: the finished run's record, or None if it stopped before its budget
    """
    from stable_baselines3.common.callbacks import BaseCallback

    if eval_every % checkpoint_every:
        raise ValueError(f"--eval-every ({eval_every}) must be a multiple of --checkpoint-every ({checkpoint_every}).")
    paths, model, state, curve, evals = open_run(run, out, sampler, num_workers, physics_threads)
    here = machine()
    if not any(entry.startswith(here) for entry in state["machines"]):
        state["machines"].append(f"{here} from iteration {state['iterations_done']}")
    budget = run.iterations * run.steps_per_iteration
    sitting_start, wall_at_start = time.time(), state["wall_seconds"]

    def checkpoint(iteration: int) -> None:
        if iteration % eval_every == 0 or iteration == run.iterations:
            fields = evaluation(model) if evaluation is not None else {"returns": evaluate(model)}
            evals.append({"iteration": iteration, "env_steps": model.num_timesteps, **fields})
            append_jsonl(paths["evals.jsonl"], evals[-1])
        model.save(paths["model.zip"])  # atomic (a temporary file renamed)
        state.update(iterations_done=iteration, wall_seconds=round(wall_at_start + time.time() - sitting_start, 1))
        write_atomically(paths["run.json"], json.dumps(state, indent=1))

    class Sitting(BaseCallback):
        """Records the curve, checkpoints between meta-iterations, and ends a sitting."""

        def __init__(self) -> None:
            super().__init__()
            self.iteration = state["iterations_done"]
            self.iteration_start = time.time()

        def _on_rollout_start(self) -> None:
            # between meta-iterations: the model holds the state after the last update
            finished = self.iteration >= run.iterations  # (where episodes end early, the env-step budget is not reached)
            stopping = finished or (stop_after is not None and self.iteration >= stop_after)
            if self.iteration > state["iterations_done"] and (self.iteration % checkpoint_every == 0 or stopping):
                checkpoint(self.iteration)
            if stopping:
                raise _RunFinished if finished else _SittingOver

        def _on_rollout_end(self) -> None:
            sample = self.locals["sample"]
            self.iteration += 1
            row = {
                "iteration": self.iteration,
                "env_steps": int(self.model.num_timesteps),
                "pre_return": round(sample.inner_batches[0].episode_returns.mean().item(), 4),
                "post_return": round(sample.outer_batch.episode_returns.mean().item(), 4),
                "seconds": round(time.time() - self.iteration_start, 2),
            }
            self.iteration_start = time.time()
            curve.append(row)
            append_jsonl(paths["curve.jsonl"], row)

        def _on_step(self) -> bool:
            return True

    sitting = Sitting()
    model.set_logger(train_lines(paths["train.jsonl"], lambda: sitting.iteration))
    try:
        # the budget is the paper's meta-iterations; env steps bound learn only from above (an iteration whose episodes
        # end early, Navigation2D's at the goal, takes fewer than the horizon's)
        if state["iterations_done"] < run.iterations and model.num_timesteps < budget:
            model.learn(budget - model.num_timesteps, callback=sitting, reset_num_timesteps=state["iterations_done"] == 0)
        if state["iterations_done"] < run.iterations:
            checkpoint(len(curve))
    except _RunFinished:
        pass
    except _SittingOver:
        return None
    finally:
        model.get_env().close()
    return record(run, state, curve, evals)


class _SittingOver(Exception):
    """Raised between meta-iterations to end a sitting (the state is checkpointed first)."""


class _RunFinished(Exception):
    """Raised between meta-iterations when the run has done its meta-iterations (checkpointed first)."""


def record(
    run: PublishedRun, state: dict[str, Any], curve: list[dict], evals: list[dict], final: dict[str, Any] | None = None
) -> dict[str, Any]:
    """
    :param final: the run's final evaluation (``final_eval.json``), if it has one
    :return: the run's line of ``reproduce_published_runs.jsonl`` (fields named by the issue's schema)
    """
    trained_steps = run.kwargs["inner_steps"]
    best = max(evals, key=lambda row: row["returns"][trained_steps]) if evals else None
    paper = paper_numbers(run.suite, run.gradient_mode, trained_steps)
    return {
        "name": run.name,
        "suite": run.suite,
        "env": run.env_id,
        "env_kwargs": run.kwargs.get("env_kwargs", {}),
        "mode": run.gradient_mode,
        "meta_optimizer": run.meta_optimizer,
        "meta_optimizer_kwargs": run.kwargs.get("meta_optimizer_kwargs", {}),
        "actor_init": run.actor_init,  # None: SB3's initialization
        "seed": run.seed,
        "env_steps": curve[-1]["env_steps"] if curve else 0,
        "iterations": len(curve),
        "inner_steps": trained_steps,
        "returns": evals[-1]["returns"] if evals else None,
        "best_returns": best["returns"] if best else None,
        "best_iteration": best["iteration"] if best else None,
        "paper": [list(entry) for entry in paper] if paper else None,
        "final_returns": final["returns"] if final else None,
        "final_standard_errors": final["standard_errors"] if final else None,
        "final_eval_episodes": final["episodes"] if final else None,
        "wall_seconds": state["wall_seconds"],
        "machines": state["machines"],
    }


# ---------------------------------------------------------------------- results


def summarize(out: str, runs: list[PublishedRun]) -> str:
    """:return: the Markdown table of every run of ``runs`` with at least one checkpoint (finished or partial)"""
    lines = [
        "| env | setting | mode | optimizer | seed | iterations | env steps | wall h | held-out 0 / 1 / 2 / 3 steps (last) "
        "| best (iteration) | paper (same inner steps) |",
        "|---|---|---|---|---:|---:|---:|---:|---|---|---|",
    ]
    for run in runs:
        files = read_run(out, run)
        if files is None:
            continue
        state = files[0]
        row = record(run, *files)
        last = " / ".join(f"{x:.1f}" for x in row["returns"]) if row["returns"] else "—"
        best = f"{row['best_returns'][row['inner_steps']]:.1f} ({row['best_iteration']})" if row["best_returns"] else "—"
        paper = format_paper(row["paper"], run.gradient_mode)
        setting = ", ".join(f"{k}={v}" for k, v in row["env_kwargs"].items()) or "Gymnasium v5 defaults"
        status = "" if state["iterations_done"] >= run.iterations else f" of {run.iterations}"
        lines.append(
            f"| {run.env_id.split('/')[-1]} | {setting} | {run.gradient_mode} | {run.optimizer_label} | {run.seed} "
            f"| {state['iterations_done']}{status} | {row['env_steps'] / 1e6:.1f}M | {state['wall_seconds'] / 3600:.2f} "
            f"| {last} | {best} | {paper} |"
        )
    return "\n".join(lines)


def format_paper(paper: list | None, mode: str) -> str:
    """:return: the table's paper cell: each published number with its label (``sf``: why there is none)"""
    if mode == "sf":
        return "— (SG-MRL as the paper defines it: never run by its authors)"
    if not paper:
        return "—"
    return "; ".join(f"{label} {mean:.1f}" + ("" if std is None else f" ± {std:.1f}") for label, mean, std in paper)


def read_final_evaluation(folder: str) -> dict[str, Any] | None:
    """:return: the run's ``final_eval.json`` (written by ``--final-eval``), or None"""
    path = os.path.join(folder, "final_eval.json")
    return json.load(open(path)) if os.path.exists(path) else None


def read_run(out: str, run: PublishedRun) -> tuple[dict[str, Any], list[dict], list[dict], dict[str, Any] | None] | None:
    """
    :return: a run's ``run.json``, its curve and evaluations up to its last checkpoint (what a stop cut after it is not
        the run's) and its final evaluation (or None); None if the run has no checkpoint in ``out``
    """
    folder = os.path.join(out, "runs", run.name)
    if not os.path.exists(os.path.join(folder, "run.json")):
        return None
    state = json.load(open(os.path.join(folder, "run.json")))
    done = state["iterations_done"]
    curve = [row for row in read_jsonl(os.path.join(folder, "curve.jsonl")) if row["iteration"] <= done]
    evals = [row for row in read_jsonl(os.path.join(folder, "evals.jsonl")) if row["iteration"] <= done]
    return state, curve, evals, read_final_evaluation(folder)


def refresh_records(path: str, out: str, runs: list[PublishedRun]) -> None:
    """
    Rewrite each line of the finished runs' file ``path`` from its run's files in ``out`` (a record is written when its
    run finishes; a final evaluation run later adds its fields), keeping a line whose run is not in ``runs`` as it is.
    """
    by_name = {run.name: run for run in runs}
    rows = read_jsonl(path)
    refreshed = []
    for row in rows:
        files = read_run(out, by_name[row["name"]]) if row["name"] in by_name else None
        refreshed.append(record(by_name[row["name"]], *files) if files is not None else row)
    if refreshed != rows:
        write_jsonl(path, refreshed)


def aggregate(out: str, runs: list[PublishedRun]) -> str:
    """
    :return: the Markdown table per configuration (suite, mode, optimizer, inner steps) over its finished seeds: the
        mean +- std over seeds of the held-out return after the trained inner steps at the last iteration, and of the
        best of the evaluations every ``--eval-every`` iterations (the papers report their best validation), with the
        final evaluation's standard error where ``--final-eval`` ran
    """
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        files = read_run(out, run)
        if files is None or files[0]["iterations_done"] < run.iterations:
            continue
        key = (run.suite, run.gradient_mode, run.optimizer_label, run.kwargs["inner_steps"])
        groups.setdefault(key, []).append(record(run, *files))
    lines = [
        "| suite | mode | optimizer | inner steps | seeds | last: mean ± std | best evaluation: mean ± std "
        "| final evaluation (± standard error) | paper |",
        "|---|---|---|---:|---|---|---|---|---|",
    ]
    for (suite, mode, optimizer, steps), rows in groups.items():
        last = np.array([row["returns"][steps] for row in rows])
        best = np.array([row["best_returns"][steps] for row in rows])
        finals = [
            f"{row['final_returns'][steps]:.1f} ± {row['final_standard_errors'][steps]:.1f}"
            for row in rows
            if row["final_returns"]
        ]
        seeds = ", ".join(str(row["seed"]) for row in rows)
        lines.append(
            f"| {suite} | {mode} | {optimizer} | {steps} | {seeds} | {spread(last)} | {spread(best)} "
            f"| {'; '.join(finals) or '—'} | {format_paper(rows[0]['paper'], mode)} |"
        )
    return "\n".join(lines)


def spread(values: np.ndarray) -> str:
    """:return: mean ± std over seeds (ddof 1), or the one value"""
    return f"{values.mean():.1f} ± {values.std(ddof=1):.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def final_evaluation(run: PublishedRun, out: str, n_tasks: int, physics_threads: int = 1) -> dict[str, Any] | None:
    """
    Evaluate a finished run's last checkpoint on ``n_tasks`` held-out tasks (a stream of its own, seed ``EVAL_SEED``,
    the model's 20 episodes per task and inner step): the mean after 0..``EVAL_STEPS`` inner steps and its standard
    error over tasks, written to the run's ``final_eval.json`` (the repository's own zip: loaded with ``load``).

    :return: the evaluation, or None if the run has not finished
    """
    from sb3_metarl import MetaPolicyGradient

    folder = os.path.join(out, "runs", run.name)
    if not os.path.exists(os.path.join(folder, "run.json")):
        return None
    state = json.load(open(os.path.join(folder, "run.json")))
    if state["iterations_done"] < run.iterations:
        return None
    model = MetaPolicyGradient.load(os.path.join(folder, "model.zip"), env=run.env_id,
                                    sampler_kwargs=sampler_kwargs_for("vec_env", None, physics_threads))  # fmt: skip
    try:
        table = model.evaluate_adaptation(n_tasks=n_tasks, inner_steps=EVAL_STEPS, seed=EVAL_SEED)
    finally:
        model.get_env().close()
    per_task = np.asarray(table["per_task"])
    result = {
        "n_tasks": n_tasks,
        "episodes": n_tasks * model.outer_episodes,
        "seed": EVAL_SEED,
        "returns": [round(float(value), 4) for value in per_task.mean(0)],
        "standard_errors": [round(float(value), 4) for value in per_task.std(0, ddof=1) / np.sqrt(n_tasks)],
    }
    write_atomically(os.path.join(folder, "final_eval.json"), json.dumps(result, indent=1))
    return result


TABLE_START, TABLE_END = "<!-- table: written by benchmarks/reproduce_published.py -->", "<!-- end of table -->"


def update_page(path: str, table: str, start: str = TABLE_START, end: str = TABLE_END) -> None:
    """Put ``table`` between the page's markers ``start`` and ``end`` (a page without them is left alone)."""
    if not os.path.exists(path):
        return
    text = open(path).read()
    if start not in text or end not in text:
        return
    before, rest = text.split(start, 1)
    after = rest.split(end, 1)[1]
    write_atomically(path, f"{before}{start}\n{table}\n{end}{after}")


def plot(out: str, runs: list[PublishedRun], path: str) -> None:
    """Post-adaptation return on the training tasks against env steps, one panel per suite."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suites = list(dict.fromkeys(run.suite for run in runs))
    fig, axes = plt.subplots(1, len(suites), figsize=(6 * len(suites), 4), squeeze=False)
    for ax, suite in zip(axes[0], suites):
        for run in runs:
            folder = os.path.join(out, "runs", run.name)
            curve = read_jsonl(os.path.join(folder, "curve.jsonl"))
            if run.suite != suite or not curve:
                continue
            label = f"{run.gradient_mode} s{run.seed}"
            line = ax.plot([r["env_steps"] for r in curve], [r["post_return"] for r in curve], lw=0.8, label=label)[0]
            # the held-out evaluations after the trained number of inner steps, on the same axes
            evals = read_jsonl(os.path.join(folder, "evals.jsonl"))
            steps = run.kwargs["inner_steps"]
            ax.plot([e["env_steps"] for e in evals], [e["returns"][steps] for e in evals], "o", color=line.get_color())
        ax.set(title=f"{suite} (line: training tasks, dots: held-out)", xlabel="env steps", ylabel="return after adaptation")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", required=True, choices=sorted(SUITES))
    parser.add_argument("--modes", nargs="+", default=["sf", "maml", "lvc", "lsf"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--inner-steps", type=int, default=1)
    parser.add_argument("--meta-optimizer", default=None, choices=META_OPTIMIZERS, help="default: the suite's")
    parser.add_argument("--fixed-inner-kl", action="store_true", help="ProMP (ppo): its inner-KL weight fixed, not adapted")
    parser.add_argument("--actor-init", default=None, choices=ACTOR_INITS[1:],
                        help="the actor's initialization (default: SB3's); xavier_uniform: the papers' codes'")  # fmt: skip
    parser.add_argument("--iterations", type=int, default=None, help="meta-iterations (default: the suite's budget)")
    parser.add_argument("--checkpoint-every", type=int, default=5)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--sampler", default="vec_env", choices=["vec_env", "subproc", "ray"])
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the learner")
    parser.add_argument("--physics-threads", type=int, default=1, help="threads of the batched physics per process")
    parser.add_argument("--stop-after", type=int, default=None, help="end this sitting after this many iterations in all")
    parser.add_argument("--summarize-only", action="store_true", help="only rewrite the table and curves")
    parser.add_argument(
        "--final-eval",
        type=int,
        default=None,
        metavar="N_TASKS",
        help="evaluate the finished runs of --suite/--modes/--seeds on N_TASKS held-out tasks (mean and standard error)",
    )
    parser.add_argument("--out", default="docs/results")
    args = parser.parse_args(argv)

    import torch as th

    th.set_num_threads(args.threads)
    configuration = (args.inner_steps, args.iterations, args.meta_optimizer, args.fixed_inner_kl, args.actor_init)
    runs = suite_runs(args.suite, args.modes, args.seeds, *configuration)
    finished_path = os.path.join(args.out, "reproduce_published_runs.jsonl")
    os.makedirs(args.out, exist_ok=True)
    if args.final_eval is not None:
        for run in runs:
            result = final_evaluation(run, args.out, args.final_eval, args.physics_threads)
            if result is not None:
                print(run.name, json.dumps(result), flush=True)
    elif not args.summarize_only:
        for run in runs:
            if any(row["name"] == run.name for row in read_jsonl(finished_path)):
                continue
            finished = run_sitting(run, args.out, args.checkpoint_every, args.eval_every, args.sampler, args.num_workers,
                                   args.stop_after, args.physics_threads)  # fmt: skip
            if finished is None:
                break
            append_jsonl(finished_path, finished)
            print(json.dumps(finished), flush=True)
    every = [
        run
        for suite in SUITES
        for optimizer in META_OPTIMIZERS
        for steps in (1, 2, 3)
        for fixed in ((False, True) if optimizer == "ppo" else (False,))
        for init in ACTOR_INITS
        for run in suite_runs(suite, ["sf", "maml", "lvc", "lsf", "dice"], [0, 1, 2, 3], steps, None, optimizer, fixed, init)
        # (another optimizer than the suite's or another initialization: only the runs that exist)
        if (optimizer == SUITES[suite][1] and init is None) or os.path.exists(os.path.join(args.out, "runs", run.name))
    ]
    refresh_records(finished_path, args.out, every)
    table = summarize(args.out, every) + "\n\nPer configuration, over its finished seeds:\n\n" + aggregate(args.out, every)
    write_atomically(os.path.join(args.out, "reproduce_published_table.md"), table + "\n")
    update_page(os.path.join(args.out, "reproduce_published.md"), table)
    plot(args.out, [run for run in every if os.path.exists(os.path.join(args.out, "runs", run.name, "curve.jsonl"))],
         os.path.join(args.out, "reproduce_published.png"))  # fmt: skip
    print(table)


if __name__ == "__main__":
    main()
