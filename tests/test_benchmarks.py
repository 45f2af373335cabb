"""The benchmark scripts run (their quick versions) and their helpers compute what they claim."""

import json
import os
import runpy
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch as th

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(path):
    return runpy.run_path(path, run_name="benchmark")


def test_log_log_slope():
    slope = _load("benchmarks/estimators.py")["log_log_slope"]
    rows = [{"mode": "sf", "inner_episodes": n, "variance": 3.0 * n} for n in (1, 4, 16)]
    rows += [{"mode": "lsf", "inner_episodes": n, "variance": 2.0 / n} for n in (1, 4, 16)]
    assert slope(rows, "sf") == pytest.approx(1.0) and slope(rows, "lsf") == pytest.approx(-1.0)
    assert slope(rows, "lsf", min_n=4) == pytest.approx(-1.0)


@pytest.mark.slow
def test_estimators_quick_run_writes_tables_and_figure(tmp_path, capsys):
    _load("benchmarks/estimators.py")["main"](["--quick", "--out", str(tmp_path)])
    for name in ["estimators_bandit.csv", "estimators_tabular_samples.csv", "estimators_tabular_steps.csv", "estimators.png"]:
        assert (tmp_path / name).stat().st_size > 0
    out = capsys.readouterr().out
    assert "log-log slope" in out and "loaded_dice" in out
    (tmp_path / "estimators.png").unlink()
    _load("benchmarks/estimators.py")["main"](["--replot", "--out", str(tmp_path)])
    assert (tmp_path / "estimators.png").stat().st_size > 0


def test_throughput_reports_both_rates(capsys, monkeypatch):
    hyperparams = json.dumps({"meta_batch_size": 2, "inner_episodes": 2, "outer_episodes": 2})
    monkeypatch.setattr(sys, "argv", ["throughput.py", "--iterations", "1", "--hyperparams", hyperparams])
    _load("benchmarks/throughput.py")["main"]()
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["bare_env_steps_per_s"] > 0 and result["meta_env_steps_per_s"] > 0
    expected = result["meta_env_steps_per_s"] / result["bare_env_steps_per_s"]
    assert result["ratio_meta_to_bare"] == pytest.approx(expected, abs=1e-3)  # rounded to 3 decimals


@pytest.mark.parametrize("suite", ["navigation", "halfcheetah"])
@pytest.mark.slow
def test_reproduce_quick_run_writes_table_csv_and_curves(suite, tmp_path, capsys):
    main = _load("benchmarks/reproduce.py")["main"]
    main(["--suite", suite, "--quick", "--seeds", "0", "1", "--out", str(tmp_path)])
    table = (tmp_path / f"reproduce_{suite}_table.md").read_text()
    modes = ["sf", "lsf", "lvc", "maml"] if suite == "navigation" else ["lsf", "lvc", "maml"]
    assert all(f"| {mode} |" in table for mode in modes)
    assert (tmp_path / f"reproduce_{suite}.png").stat().st_size > 0
    runs = [json.loads(line) for line in (tmp_path / f"reproduce_{suite}_runs.jsonl").read_text().splitlines()]
    envs, optimizers = (1, 1) if suite == "navigation" else (2, 2)
    trained = [run for run in runs if run["config"]["meta_optimizer"] != "untrained"]
    assert len(trained) == len(modes) * 2 * envs * optimizers
    assert len(runs) - len(trained) == len(modes) * envs  # one untrained reference per env and mode
    assert all(len(run["returns"]) == 4 for run in runs)
    assert all(run["iterations"] >= 2 for run in trained)
    assert all(run["iterations"] == 0 and run["timesteps"] == 0 for run in runs if run not in trained)
    assert "| untrained |" in table
    # a second invocation finds every run done and only rewrites the summaries
    capsys.readouterr()
    main(["--suite", suite, "--quick", "--seeds", "0", "1", "--out", str(tmp_path)])
    assert '"key"' not in capsys.readouterr().out
    summary = _load("benchmarks/reproduce.py")["summarize"](trained)
    assert all(row["seeds"] == 2 for row in summary)


@pytest.mark.slow
def test_scaling_quick_run_writes_the_table(tmp_path):
    import subprocess

    out = tmp_path / "scaling"
    command = [sys.executable, "benchmarks/scaling.py", "--quick", "--envs", "sb3_metarl/Navigation2D-v0"]
    command += ["--backends", "vec_env", "subproc", "--workers", "1", "2", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = (out.with_suffix(".csv")).read_text().splitlines()
    # vec_env, subproc x 1 and 2 workers, each with the per-env step and Navigation2D's batched twin
    assert rows[0].startswith("env,backend,workers") and len(rows) == 1 + 3 * 2
    assert sum(",batched," in row for row in rows) == 3
    table = (out.with_suffix(".md")).read_text()
    assert "| Navigation2D-v0 | subproc | 2 |" in table
    # the process backend counts what travels: more than the sampled arrays of an iteration (4 tasks' floats)
    subproc_bytes = [int(row.split(",")[-1]) for row in rows[1:] if ",subproc," in row]
    assert all(b > 2 * 2 * 10 * 4 * 4 for b in subproc_bytes)


@pytest.fixture
def restore_threads():
    import torch as th

    threads = th.get_num_threads()
    yield
    th.set_num_threads(threads)  # the benchmarks' runs set one thread each


def test_lola_ipd_quick_run_writes_table_csv_and_figure(tmp_path, restore_threads):
    out = tmp_path / "lola.md"
    configs = ["LOLA-Exact", "off-off (buffer 1024, batch 128)"]
    _load("benchmarks/lola_ipd.py")["main"](["--updates", "3", "--seeds", "1", "--processes", "1", "--configs", *configs,
                                             "--out", str(out)])  # fmt: skip
    text = out.read_text()
    assert all(f"| {config} |" in text for config in configs) and "--configs" in text
    rows = (tmp_path / "lola.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 3  # header, 2 configs x 1 seed x 3 updates
    assert (tmp_path / "lola.png").stat().st_size > 0


@pytest.mark.parametrize("env_id", ["CartPole-v1", "ALE/Pong-v5"])
@pytest.mark.slow
def test_mgrl_quick_run_writes_table_csv_and_figure(env_id, tmp_path, restore_threads):
    if env_id.startswith("ALE/"):
        pytest.importorskip("ale_py")
        pytest.importorskip("cv2")
    out = tmp_path / "mgrl.md"
    _load("benchmarks/mgrl.py")["main"](["--envs", env_id, "--timesteps", "80", "--seeds", "1", "--processes", "1",
                                         "--out", str(out)])  # fmt: skip
    text = out.read_text()
    assert all(f"| {env_id} | {algorithm} |" in text for algorithm in ("a2c", "mgrl", "mgrl_lvc"))
    assert (tmp_path / "mgrl.png").stat().st_size > 0 and (tmp_path / "mgrl.csv").read_text().count(env_id) == 3


def _tiny_published_run(module, mode="lsf"):
    kwargs = dict(meta_batch_size=2, inner_episodes=2, outer_episodes=2, inner_steps=1, inner_lr=1e-3,
                  max_episode_steps=10, learning_rate=3e-3, policy_kwargs=dict(net_arch=[8]),
                  env_kwargs=dict(ctrl_cost_weight=0.05, velocity_range=(0.0, 3.0)))  # fmt: skip
    return module["PublishedRun"]("test", "sb3_metarl/HalfCheetahVel-v0", mode, "adam", 0, 5, kwargs)


def test_published_run_stopped_anywhere_continues_bit_for_bit(tmp_path, monkeypatch, restore_threads):
    """A run stopped between checkpoints (and mid-iteration) and continued equals one that never stopped."""
    module = _load("benchmarks/reproduce_published.py")
    monkeypatch.setitem(module["run_sitting"].__globals__, "EVAL_TASKS", 2)
    run = _tiny_published_run(module)
    straight_out = str(tmp_path / "straight")
    straight = module["run_sitting"](run, straight_out, checkpoint_every=2, eval_every=2)
    assert straight["iterations"] == 5 and straight["env_steps"] == 5 * run.steps_per_iteration == 5 * 2 * 4 * 10

    # sitting 1 ends after 3 iterations; sitting 2 is killed mid-iteration 5 (after checkpoint 4, curve line 5
    # half-written); sitting 3 finishes
    stopped = str(tmp_path / "stopped")
    assert module["run_sitting"](run, stopped, checkpoint_every=2, eval_every=2, stop_after=3) is None
    from sb3_metarl import MetaPolicyGradient

    class Killed(Exception):
        pass

    learn = MetaPolicyGradient.learn

    def learn_then_die(self, *args, **kwargs):
        callback = kwargs["callback"]
        original = callback._on_rollout_end

        def on_rollout_end():
            original()
            if callback.iteration == 5:
                with open(f"{stopped}/runs/{run.name}/curve.jsonl", "a") as file:
                    file.write('{"iteration": 6, "env_st')
                raise Killed

        callback._on_rollout_end = on_rollout_end
        return learn(self, *args, **kwargs)

    monkeypatch.setattr(MetaPolicyGradient, "learn", learn_then_die)
    with pytest.raises(Killed):
        module["run_sitting"](run, stopped, checkpoint_every=2, eval_every=2)
    monkeypatch.setattr(MetaPolicyGradient, "learn", learn)
    resumed = module["run_sitting"](run, stopped, checkpoint_every=2, eval_every=2)

    def files(out, name):
        return module["read_jsonl"](f"{out}/runs/{run.name}/{name}")

    def untimed(out, name):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in files(out, name)]

    for name in ("curve.jsonl", "evals.jsonl", "train.jsonl"):
        assert untimed(stopped, name) == untimed(straight_out, name)
    assert [row["iteration"] for row in files(stopped, "evals.jsonl")] == [2, 4, 5]
    # each meta-update's diagnostics, once per iteration (the killed sitting's iteration 5 dropped and run again)
    diagnostics = files(stopped, "train.jsonl")
    assert [row["iteration"] for row in diagnostics] == [1, 2, 3, 4, 5]
    assert all(np.isfinite(row["train/inner_grad_norm"]) and row["train/n_updates"] == row["iteration"] for row in diagnostics)
    assert resumed["returns"] == straight["returns"] and resumed["best_returns"] == straight["best_returns"]
    import torch as th

    final = [MetaPolicyGradient.load(f"{out}/runs/{run.name}/model.zip").policy.state_dict() 
             for out in (stopped, straight_out)]  # fmt: skip
    assert all(th.equal(final[0][key], final[1][key]) for key in final[0])


def test_promp_at_a_fixed_inner_kl_weight_is_a_run_of_its_own():
    module = _load("benchmarks/reproduce_published.py")
    (adapted,) = module["suite_runs"]("sgmrl-dir", ["lvc"], [2], meta_optimizer="ppo")
    (fixed,) = module["suite_runs"]("sgmrl-dir", ["lvc"], [2], meta_optimizer="ppo", fixed_inner_kl=True)
    assert (adapted.name, fixed.name) == ("sgmrl-dir_lvc_ppo_s2", "sgmrl-dir_lvc_ppo_s2_fixedkl")
    assert (adapted.optimizer_label, fixed.optimizer_label) == ("ppo", "ppo, fixed inner KL")
    assert {k: v for k, v in fixed.kwargs.items() if k != "meta_optimizer_kwargs"} == adapted.kwargs  # nothing else
    promp = module["make_model"](fixed, "vec_env", None).meta_optimizer
    assert promp.adaptive_inner_kl is False and promp.inner_kl_coef == 5e-4  # ProMP's MuJoCo run script
    with pytest.raises(ValueError, match="fixed-inner-kl"):
        module["suite_runs"]("sgmrl-dir", ["maml"], [0], fixed_inner_kl=True)


def test_the_papers_actor_init_is_a_run_of_its_own_in_both_runners():
    published, metaworld = _load("benchmarks/reproduce_published.py"), _load("benchmarks/reproduce_metaworld.py")
    (sb3,) = published["suite_runs"]("sgmrl-swimmer", ["maml"], [1])
    (xavier,) = published["suite_runs"]("sgmrl-swimmer", ["maml"], [1], actor_init="xavier_uniform")
    assert (sb3.name, xavier.name) == ("sgmrl-swimmer_maml_adam_s1", "sgmrl-swimmer_maml_adam_s1_xavier")
    assert (sb3.optimizer_label, xavier.optimizer_label) == ("adam", "adam, Xavier init")
    assert xavier.kwargs["policy_kwargs"] == {**sb3.kwargs["policy_kwargs"], "actor_init": "xavier_uniform"}
    assert {**xavier.kwargs, "policy_kwargs": sb3.kwargs["policy_kwargs"]} == sb3.kwargs  # nothing else
    # the suites' shared policy settings are not changed for the next run
    assert "actor_init" not in published["suite_runs"]("sgmrl-dir", ["maml"], [0])[0].kwargs["policy_kwargs"]
    (ml10,) = metaworld["suite_runs"]("ml10", ["maml"], [0], "trpo", "xavier_uniform")
    assert ml10.name == "ml10_maml_trpo_s0_xavier"
    assert ml10.kwargs["policy_kwargs"] == dict(net_arch=[512, 512], actor_init="xavier_uniform")
    assert "actor_init" not in metaworld["suite_runs"]("ml10", ["maml"], [0])[0].kwargs["policy_kwargs"]
    finished = {"env_steps": 0, "wall_seconds": 0.0}
    assert metaworld["metaworld_record"](ml10, finished, [], None)["actor_init"] == "xavier_uniform"
    assert published["make_model"](xavier, "vec_env", None).policy.actor_init == "xavier_uniform"
    state, curve = {"iterations_done": 0, "wall_seconds": 0.0, "machines": []}, []
    assert published["record"](xavier, state, curve, [], None)["actor_init"] == "xavier_uniform"
    assert published["record"](sb3, state, curve, [], None)["actor_init"] is None


def test_the_actor_init_pilot_runs_the_suite_s_configuration_with_each_initialization(tmp_path, restore_threads):
    module = _load("benchmarks/actor_init.py")
    module["main"](["--suite", "sgmrl-nav", "--iterations", "2", "--meta-batch-size", "2", "--out", str(tmp_path)])
    results = json.load(open(tmp_path / "actor_init_sgmrl-nav.json"))
    assert list(results) == ["SB3 (orthogonal)", "Xavier uniform (papers' codes)"]
    sb3, xavier = (results[label]["0"] for label in results)
    assert [row["iteration"] for row in sb3] == [row["iteration"] for row in xavier] == [1, 2]
    # a seed's run is the same run again (the comparison is between initializations, not draws)
    assert module["returns_along"]("sgmrl-nav", "xavier_uniform", 0, 2, 2) == xavier and sb3 != xavier
    text = open(tmp_path / "actor_init_sgmrl-nav.md").read()
    assert f"| SB3 (orthogonal) | 0 | {(sb3[0]['after'] + sb3[1]['after']) / 2:.1f} |" in text


def test_swimmer_gait_gives_capsules_mujoco_s_old_cylinder_inertias_and_measures_the_episodes(tmp_path, restore_threads):
    module = _load("benchmarks/swimmer_gait.py")
    env = gym.make("sb3_metarl/SwimmerVel-v0")
    model = env.unwrapped.model
    exact_mass, exact_inertia, frames = model.body_mass.copy(), model.body_inertia.copy(), model.body_iquat.copy()
    # MuJoCo 3: a capsule of radius 0.1 and length 1 at density 1000, exactly (cylinder and two half-spheres)
    np.testing.assert_allclose(exact_mass[1:], 1000 * (np.pi * 0.01 * 1 + 4 / 3 * np.pi * 0.001))
    geom_size = model.geom_size.copy()
    assert module["use_cylinder_capsules"](model) == [1, 2, 3]
    # before 2.1.2: a cylinder of length 1 + r; the capsule's axis (least inertia) keeps its slot in body_iquat's frame
    mass = 1000 * np.pi * 0.01 * 1.1
    np.testing.assert_allclose(model.body_mass[1:], mass)
    for body in (1, 2, 3):
        axis = int(np.argmin(exact_inertia[body]))
        expected = np.full(3, mass * (3 * 0.01 + 1.1**2) / 12)
        expected[axis] = mass * 0.01 / 2
        np.testing.assert_allclose(model.body_inertia[body], expected)
    np.testing.assert_array_equal(model.body_iquat, frames)
    np.testing.assert_array_equal(model.geom_size, geom_size)
    assert model.body_mass[0] == exact_mass[0]
    env.close()

    (run,) = _load("benchmarks/reproduce_published.py")["suite_runs"]("sgmrl-swimmer", ["maml"], [0])
    from sb3_metarl import MetaPolicyGradient

    path = str(tmp_path / "untrained" / "model.zip")
    MetaPolicyGradient("MlpPolicy", run.env_id, meta_batch_size=2, inner_episodes=1, outer_episodes=1, seed=0,
                       env_kwargs=run.kwargs["env_kwargs"], policy_kwargs=dict(net_arch=[8])).save(path)  # fmt: skip
    module["main"](["--models", path, "--episodes", "2", "--out", str(tmp_path)])
    results = json.load(open(tmp_path / "swimmer_gait.json"))["untrained"]
    exact, cylinders = (results[physics] for physics in module["PHYSICS"])
    # the same tasks under both physics; different bodies, different episodes
    assert [row["task"] for row in exact] == [row["task"] for row in cylinders]
    assert all(0.1 <= row["task"] <= 0.2 and row["steps"] == 200 and row["seconds"] == 8.0 for row in exact)
    assert [row["return"] for row in exact] != [row["return"] for row in cylinders]
    for row in exact + cylinders:
        # displacement = mean velocity x time (v_x is the head's displacement per step / dt)
        assert row["displacement"] == pytest.approx(row["mean_velocity"] * row["seconds"], rel=1e-9, abs=1e-12)
        assert row["mean_abs_velocity"] >= abs(row["mean_velocity"])
        # the reward pays |v_x - v*| less a control cost: per step at most |v_x| + v*
        assert row["return"] <= row["steps"] * (row["mean_abs_velocity"] + row["task"])
    text = open(tmp_path / "swimmer_gait.md").read()
    difference = np.mean([b["return"] - a["return"] for a, b in zip(exact, cylinders)])
    assert f"| untrained | paired difference (cylinders - exact) | {difference:.2f} ± " in text


def test_published_suites_hold_the_papers_settings():
    module = _load("benchmarks/reproduce_published.py")
    (run,) = module["suite_runs"]("sgmrl-vel", ["sf"], [3])
    # SG-MRL's code (sgmrl_mujoco.json) on ProMP's normalized env: actions in [-10, 10], rllab's control cost
    assert run.kwargs["env_kwargs"] == dict(ctrl_cost_weight=0.05, velocity_range=(0.0, 3.0), action_scale=10.0)
    assert (run.kwargs["meta_batch_size"], run.kwargs["inner_episodes"], run.kwargs["max_episode_steps"]) == (40, 20, 200)
    assert run.kwargs["inner_lr"] * 200 == pytest.approx(0.1) and run.kwargs["gae_lambda"] == 0.997
    assert run.kwargs["policy_kwargs"]["net_arch"]["pi"] == [100, 100] and run.kwargs["learning_rate"] == 1e-3
    assert run.kwargs["discount_from_start"] is False and run.kwargs["normalize_advantage"] is True
    assert run.iterations * run.steps_per_iteration == 400 * 40 * 40 * 200 >= 1.2e8
    # pytorch-maml-rl's configs: horizon 100 (max_episode_steps), normalization_scale 10, 500 batches
    (trpo,) = module["suite_runs"]("maml-trpo-ant-dir", ["maml"], [0])
    assert trpo.meta_optimizer == "trpo" and trpo.iterations == 500 and trpo.kwargs["meta_optimizer_kwargs"]["max_kl"] == 0.01
    assert trpo.kwargs["max_episode_steps"] == 100 and trpo.kwargs["env_kwargs"]["action_scale"] == 10.0
    assert trpo.kwargs["inner_lr"] * 100 == pytest.approx(0.1) and trpo.kwargs["discount_from_start"] is False
    with pytest.raises(ValueError, match="--suite"):
        module["suite_runs"]("nope", ["sf"], [0])


def test_the_sgmrl_nav_suite_is_sg_mrl_s_table_1_setting_and_maml_is_compared_with_both_columns():
    module = _load("benchmarks/reproduce_published.py")
    (run,) = module["suite_runs"]("sgmrl-nav", ["maml"], [0])
    # sgmrl_full.json: 20 tasks x 20 rollouts, horizon 100, 500 iterations, 100 x 100, GAE 0.997, inner 0.1, Adam 1e-3
    assert run.env_id == "sb3_metarl/Navigation2D-v0" and run.iterations == 500
    assert (run.kwargs["meta_batch_size"], run.kwargs["inner_episodes"], run.kwargs["max_episode_steps"]) == (20, 20, 100)
    assert run.kwargs["env_kwargs"] == dict(position_limit=0.5, action_scale=10.0)
    assert run.kwargs["inner_lr"] * 100 == pytest.approx(0.1) and run.kwargs["gae_lambda"] == 0.997
    assert run.kwargs["learning_rate"] == 1e-3 and run.kwargs["normalize_advantage"] is True
    # both columns of SG-MRL's tables are its code's MAML runs (vpg_sgmrl.py:170 weighs its extra term by ~0)
    both = "SG-MRL (its code: MAML)"
    assert module["paper_numbers"]("sgmrl-nav", "maml", 1) == [("MAML", -17.767, 0.106), (both, -16.901, 0.699)]
    assert module["paper_numbers"]("sgmrl-dir", "maml", 1) == [("MAML", 465.624, 54.07), (both, 580.143, 38.22)]
    assert module["paper_numbers"]("sgmrl-dir", "sf", 1) is None
    assert "never run by its authors" in module["format_paper"](None, "sf")
    # the existing suites' configurations are unchanged (their checkpoints continue)
    (vel,) = module["suite_runs"]("sgmrl-vel", ["maml"], [0])
    assert vel.kwargs["max_episode_steps"] == 200 and vel.kwargs["meta_batch_size"] == 40


def test_another_meta_optimizer_on_a_suite_is_a_run_of_its_own_at_the_same_setting():
    module = _load("benchmarks/reproduce_published.py")
    (adam,) = module["suite_runs"]("sgmrl-dir", ["lvc"], [0])
    (promp,) = module["suite_runs"]("sgmrl-dir", ["lvc"], [0], meta_optimizer="ppo")
    (trpo,) = module["suite_runs"]("sgmrl-dir", ["maml"], [1], meta_optimizer="trpo")
    assert (adam.name, promp.name, trpo.name) == ("sgmrl-dir_lvc_adam_s0", "sgmrl-dir_lvc_ppo_s0", "sgmrl-dir_maml_trpo_s1")
    # the env, batch and budget are the suite's; only the meta-optimizer and its arguments differ
    assert promp.kwargs == adam.kwargs and promp.steps_per_iteration * promp.iterations == 1.28e8
    assert trpo.kwargs["meta_optimizer_kwargs"]["max_kl"] == 0.01 and "learning_rate" not in trpo.kwargs
    assert trpo.kwargs["env_kwargs"] == adam.kwargs["env_kwargs"]
    with pytest.raises(ValueError, match="--meta-optimizer"):
        module["suite_runs"]("sgmrl-dir", ["lvc"], [0], meta_optimizer="sgd2")


def test_the_sgmrl_swimmer_suite_is_maml_zoo_s_swimmer_rand_vel_beside_table_2():
    module = _load("benchmarks/reproduce_published.py")
    (run,) = module["suite_runs"]("sgmrl-swimmer", ["maml"], [0])
    # swimmer_rand_vel.py: goals U[0.1, 0.2], reward |v - v*| - 1e-4 |a|^2 (the deviation rewarded), frame skip 4
    assert run.env_id == "sb3_metarl/SwimmerVel-v0" and run.iterations == 400
    assert run.kwargs["env_kwargs"] == dict(velocity_range=(0.1, 0.2), deviation_sign=1, action_scale=10.0)
    assert (run.kwargs["meta_batch_size"], run.kwargs["inner_episodes"], run.kwargs["max_episode_steps"]) == (40, 20, 200)
    both = "SG-MRL (its code: MAML)"
    assert module["paper_numbers"]("sgmrl-swimmer", "maml", 1) == [("MAML", 104.53, 24.18), (both, 118.77, 9.99)]
    assert module["paper_numbers"]("sgmrl-swimmer", "maml", 2) == [("MAML", 108.47, 23.36), (both, 134.57, 1.67)]
    env = gym.make(run.env_id, **run.kwargs["env_kwargs"]).unwrapped
    assert env.frame_skip == 4 and env.dt == pytest.approx(0.04) and env._ctrl_cost_weight == 1e-4


def test_the_per_configuration_table_gives_mean_and_std_over_seeds_and_the_final_evaluation(tmp_path, restore_threads):
    module = _load("benchmarks/reproduce_published.py")
    module["run_sitting"].__globals__["EVAL_TASKS"] = 2
    base = _tiny_published_run(module)
    runs = [module["PublishedRun"]("sgmrl-dir", base.env_id, "maml", "adam", seed, 2, dict(base.kwargs)) for seed in (0, 1)]
    out = str(tmp_path)
    records = [module["run_sitting"](run, out, checkpoint_every=1, eval_every=1) for run in runs]
    evaluation = module["final_evaluation"](runs[0], out, n_tasks=3)
    assert evaluation["n_tasks"] == 3 and evaluation["episodes"] == 3 * 2 and len(evaluation["standard_errors"]) == 4
    table = module["aggregate"](out, runs)
    last = np.array([row["returns"][1] for row in records])
    best = np.array([max(e["returns"][1] for e in module["read_jsonl"](f"{out}/runs/{run.name}/evals.jsonl")) for run in runs])
    (row,) = [line for line in table.splitlines() if line.startswith("| sgmrl-dir | maml |")]
    cells = [cell.strip() for cell in row.split("|")[1:-1]]
    assert cells[4] == "0, 1" and cells[5] == f"{last.mean():.1f} ± {last.std(ddof=1):.1f}"
    assert cells[6] == f"{best.mean():.1f} ± {best.std(ddof=1):.1f}"
    assert cells[7] == f"{evaluation['returns'][1]:.1f} ± {evaluation['standard_errors'][1]:.1f}"
    assert cells[8].startswith("MAML 465.6 ± 54.1; SG-MRL (its code: MAML) 580.1 ± 38.2")
    # the records written when the runs finished gain the final evaluation's fields; the others stay as they were
    path = f"{out}/reproduce_published_runs.jsonl"
    module["write_jsonl"](path, [*records, {"name": "another_run", "seed": 7}])
    module["refresh_records"](path, out, runs)
    refreshed = module["read_jsonl"](path)
    assert refreshed[0]["final_eval_episodes"] == 6 and refreshed[0]["final_returns"] == evaluation["returns"]
    assert refreshed[1] == json.loads(json.dumps(records[1])) and refreshed[2] == {"name": "another_run", "seed": 7}
    assert {k: v for k, v in refreshed[0].items() if not k.startswith("final_")} == json.loads(
        json.dumps({k: v for k, v in records[0].items() if not k.startswith("final_")})
    )


@pytest.mark.slow
def test_a_quick_run_never_overwrites_the_committed_results(monkeypatch, tmp_path, capsys):
    """--quick without --out writes to a new temporary folder (it used to overwrite docs/results' estimators.png and CSVs)."""
    monkeypatch.chdir(tmp_path)  # a docs/results here would be the committed folder's stand-in
    os.makedirs("docs/results")
    _load(os.path.join(ROOT, "benchmarks/estimators.py"))["main"](["--quick"])
    out = capsys.readouterr().out.splitlines()[0].removeprefix("writing to ")
    assert os.listdir("docs/results") == [] and os.path.exists(os.path.join(out, "estimators.png"))


def test_published_runs_of_each_inner_step_count_have_folders_of_their_own():
    module = _load("benchmarks/reproduce_published.py")
    names = {run.name for steps in (1, 2, 3) for run in module["suite_runs"]("sgmrl-vel", ["sf"], [0], inner_steps=steps)}
    assert names == {"sgmrl-vel_sf_adam_s0", "sgmrl-vel_sf_adam_s0_k2", "sgmrl-vel_sf_adam_s0_k3"}
    (three,) = module["suite_runs"]("sgmrl-vel", ["sf"], [0], inner_steps=3)
    assert three.steps_per_iteration == 40 * (3 * 20 + 20) * 200


def test_the_published_page_gets_the_table_between_its_markers(tmp_path):
    module = _load("benchmarks/reproduce_published.py")
    page = tmp_path / "page.md"
    page.write_text(f"intro\n\n{module['TABLE_START']}\nold\n{module['TABLE_END']}\n\nafter\n")
    module["update_page"](str(page), "| new |")
    assert page.read_text() == f"intro\n\n{module['TABLE_START']}\n| new |\n{module['TABLE_END']}\n\nafter\n"


def test_batched_physics_quick_run_writes_its_table(tmp_path):
    _load("benchmarks/batched_physics.py")["main"](["--quick", "--out", str(tmp_path)])
    table = (tmp_path / "batched_physics.md").read_text()
    assert "| per_env_step | twin_1_thread | twin_2_threads | bare_mj_step |" in table and "(1.00)" in table
    rows = [json.loads(line) for line in (tmp_path / "batched_physics.jsonl").read_text().splitlines()]
    assert rows and all(value > 0 for value in rows[0]["stepping"].values())


def test_meta_gradient_signal_share_is_the_expected_gradient_s_share_of_the_mean(tmp_path, restore_threads):
    module = _load("benchmarks/meta_gradient_signal.py")
    same = module["signal"](th.ones(4, 3, dtype=th.float64))
    assert same["noise"] == 0.0 and same["signal_share"] == 1.0
    assert module["signal"](th.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=th.float64))["signal_share"] == 0.0
    # a known mean under known noise: E|g|^2 = |mu|^2 + d sigma^2 / B = 5 + 12.5, so the share is about 5 / 17.5
    rng = np.random.default_rng(0)
    n_tasks, dim, mu = 40, 500, np.full(500, 0.1)
    shares = [module["signal"](th.tensor(mu + rng.normal(size=(n_tasks, dim))))["signal_share"] for _ in range(50)]
    assert abs(np.mean(shares) - 5 / 17.5) < 0.03  # (0.006 standard error over the 50 draws)
    module["main"](["--quick", "--out", str(tmp_path)])
    table = (tmp_path / "meta_gradient_signal.md").read_text()
    assert all(f"| initial | 0 | {mode} |" in table for mode in ("sf", "maml", "lvc", "lsf"))
    assert "| between-batch cosine |" in table and "| initial | 0 | maml |" in table and "| 1.000 |" in table


def test_inner_gradient_signal_gives_the_modes_with_one_inner_step_one_row(tmp_path, restore_threads):
    """maml, lvc and sf take the same inner step (GAE advantages), lsf another (the trajectory's return)."""
    module = _load("benchmarks/meta_gradient_signal.py")
    module["main"](["--inner", "--quick", "--modes", "maml", "lvc", "sf", "lsf", "--out", str(tmp_path)])
    rows = {row["mode"]: row for row in map(json.loads, (tmp_path / "inner_gradient_signal.jsonl").read_text().splitlines())}
    same = [(rows[mode]["inner_signal_share"], rows[mode]["inner_norm"]) for mode in ("maml", "lvc", "sf")]
    assert same[0] == same[1] == same[2] and same[0][1] > 0
    assert rows["lsf"]["inner_norm"] != rows["maml"]["inner_norm"]
    assert "| initial | 0 | lsf |" in (tmp_path / "inner_gradient_signal.md").read_text()


def test_gil_overlap_runs_every_measurement_and_leaves_the_switch_interval_as_it_found_it(capsys, restore_threads):
    interval = sys.getswitchinterval()
    module = _load("benchmarks/gil_overlap.py")
    module["main"](["--sub-envs", "8", "--groups", "2", "--steps", "1", "--repeats", "1", "--switch-interval", "0.001"])
    assert sys.getswitchinterval() == interval
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| what")]
    assert [row.split("|")[1].strip() for row in rows][:4] == [
        "physics loop, this thread",
        "physics split over two threads",
        "physics thread + this thread sleeping 0.1 s",
        "physics thread + this thread running 0.1 s of Python",
    ]
    # the sleeping thread's row includes its 0.1 s (the physics thread was joined after it, not before), with the
    # Python loop and with the compiled one
    assert [float(cell) >= 0.1 for cell in rows[2].split("|")[2:4]] == [True, True] and len(rows) == 7


def test_a_published_run_ends_at_its_meta_iterations_where_episodes_end_early(tmp_path, restore_threads):
    # before: the run went on past its iterations until the env-step budget, which early ends (Navigation2D's at the
    # goal) leave unreached
    module = _load("benchmarks/reproduce_published.py")
    module["run_sitting"].__globals__["EVAL_TASKS"] = 2
    kwargs = dict(meta_batch_size=2, inner_episodes=2, outer_episodes=2, inner_steps=1, inner_lr=1e-3, max_episode_steps=20,
                  learning_rate=1e-3, policy_kwargs=dict(net_arch=[8]), env_kwargs=dict(success_radius=0.3))  # fmt: skip
    run = module["PublishedRun"]("test", "sb3_metarl/Navigation2D-v0", "maml", "adam", 0, 3, kwargs)
    finished = module["run_sitting"](run, str(tmp_path), checkpoint_every=1, eval_every=1)
    curve = module["read_jsonl"](f"{tmp_path}/runs/{run.name}/curve.jsonl")
    assert finished["iterations"] == len(curve) == 3 and finished["env_steps"] < 3 * run.steps_per_iteration
    from sb3_metarl import MetaPolicyGradient

    assert MetaPolicyGradient.load(f"{tmp_path}/runs/{run.name}/model.zip").n_updates == 3


@pytest.mark.slow
def test_metaworld_sampling_times_every_ml10_class_and_the_sampler_against_meta_world(tmp_path, restore_threads):
    pytest.importorskip("metaworld")
    module = _load(os.path.join(ROOT, "benchmarks", "metaworld_sampling.py"))
    module["main"](["--steps", "20", "--tasks", "2", "--samplers", "vec_env", "subproc", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "metaworld_sampling.jsonl").read_text().splitlines()[-1])
    assert len(record["per_class"]) == 15  # ML10: 10 train and 5 test env classes
    assert all(0 < row["physics_share"] < 1 and row["steps_per_second"] > 0 for row in record["per_class"])
    assert all(row["accelerated_steps_per_second"] > 0 for row in record["per_class"])
    sampler = record["sampler"]
    assert sampler["env_steps"] == 2 * 500  # one whole episode per task
    rates = sampler["sampler_steps_per_second"] / sampler["meta_world_steps_per_second"]
    assert sampler["ratio"] == pytest.approx(rates, rel=0.01)
    assert set(sampler["samplers"]) == {"vec_env, Meta-World's own helpers", "vec_env", "subproc"}
    assert sampler["samplers"]["vec_env"]["ratio"] == sampler["ratio"]
    assert "| subproc (2 workers) |" in (tmp_path / "metaworld_sampling.md").read_text()


def test_the_published_profile_attributes_each_function_s_cumulative_time_and_tabulates_medians():
    import cProfile
    import pstats
    import time

    module = _load("benchmarks/profile_published.py")

    def inner_work():
        time.sleep(0.05)

    def outer_work():
        inner_work()
        time.sleep(0.02)

    profiler = cProfile.Profile()
    profiler.runcall(outer_work)
    stats = pstats.Stats(profiler)
    total, own = module["cumulative"](stats, "test_benchmarks.py", "outer_work")
    inner_total, _ = module["cumulative"](stats, "test_benchmarks.py", "inner_work")
    assert total >= inner_total + 0.015 and inner_total >= 0.045 and own < 0.01  # the sleeps are builtins' own time
    assert module["cumulative"](stats, "other_file.py", "outer_work") == (0.0, 0.0)
    phases = {phase: 1.0 for phase in [*module["PHASE_FUNCTIONS"], module["GRAPH"]]}
    row = dict(mode="maml", meta_optimizer="adam", threads=1, wall_s=[9.0, 11.0, 30.0], sample_s=[8.0], train_s=[2.0],
               profiled_s=4.0, phases_s=phases)  # fmt: skip
    text = module["table"]([row])
    assert "| **iteration, unprofiled (s, median)** | **11.00** |" in text and "1.00 (25 %)" in text


def test_overlap_evaluation_times_the_three_variants_and_writes_its_table(tmp_path, restore_threads):
    hyperparams = json.dumps({"meta_batch_size": 2, "inner_episodes": 2, "outer_episodes": 2})
    argv = ["--iterations", "2", "--rounds", "1", "--hyperparams", hyperparams, "--out", str(tmp_path)]
    row = _load("benchmarks/overlap_evaluation.py")["main"](argv)
    for variant in ["none", "foreground", "background"]:
        (between_starts,) = row["seconds_per_iteration"][variant]
        assert row["median"][variant] == between_starts > 0.0
    assert row["foreground_overhead"] == pytest.approx(row["median"]["foreground"] / row["median"]["none"] - 1.0)
    table = (tmp_path / "overlap_evaluation.md").read_text().splitlines()
    assert table[-1].startswith("| sb3_metarl/Navigation2D-v0 | 2 x 1 | 1 |")
    assert json.loads((tmp_path / "overlap_evaluation.jsonl").read_text())["rounds"] == 1


def test_metaworld_suites_hold_metaworld_algorithms_maml_trpo_setting():
    module = _load("benchmarks/reproduce_metaworld.py")
    (ml10,) = module["suite_runs"]("ml10", ["maml"], [0])
    kwargs = ml10.kwargs
    assert (ml10.env_id, ml10.meta_optimizer, ml10.iterations) == ("sb3_metarl/MetaWorldML10-v0", "trpo", 100)
    assert ml10.iterations * ml10.steps_per_iteration == 20_000_000  # maml_trpo_ml10.py: 2M x 10 tasks
    assert (kwargs["meta_batch_size"], kwargs["inner_episodes"], kwargs["outer_episodes"]) == (20, 10, 10)
    assert (kwargs["gamma"], kwargs["gae_lambda"], kwargs["inner_lr"] * 500) == (0.99, 1.0, pytest.approx(0.1))
    assert kwargs["policy_kwargs"] == dict(net_arch=[512, 512]) and kwargs["meta_optimizer_kwargs"]["max_kl"] == 0.01
    (ml45,) = module["suite_runs"]("ml45", ["maml"], [0])
    assert ml45.iterations * ml45.steps_per_iteration == 90_000_000
    (promp,) = module["suite_runs"]("ml1-push", ["lvc"], [1], meta_optimizer="ppo")
    assert promp.name == "ml1-push_lvc_ppo_s1" and promp.kwargs["env_kwargs"]["env_name"] == "push-v3"
    assert "meta_optimizer_kwargs" not in promp.kwargs and promp.kwargs["learning_rate"] == 1e-3


@pytest.mark.slow
def test_the_metaworld_page_s_evaluations_are_every_run_s_checkpointed_evaluations(tmp_path):
    module = _load("benchmarks/reproduce_metaworld.py")
    (maml,) = module["suite_runs"]("ml10", ["maml"], [0])
    (promp,) = module["suite_runs"]("ml10", ["lvc"], [1], "ppo")
    (reach,) = module["suite_runs"]("ml1-reach", ["maml"], [0])

    def write(run, iterations_done, evals):
        folder = tmp_path / "runs" / run.name
        folder.mkdir(parents=True)
        (folder / "run.json").write_text(json.dumps({"iterations_done": iterations_done}))
        (folder / "curve.jsonl").write_text("")
        (folder / "evals.jsonl").write_text("".join(json.dumps(row) + "\n" for row in evals))

    def row(iteration, test, train):
        return {"iteration": iteration, "env_steps": iteration * 200_000, "returns": [0.0, 0.0], "success_rates": test,
                "train_success_rates": train}  # fmt: skip

    # iteration 15 was evaluated after the last checkpoint (a stop cut the sitting): not the run's
    write(maml, 10, [row(5, [0.215, 0.29], [0.065, 0.115]), row(10, [0.15, 0.235], [0.11, 0.11]), row(15, [1, 1], [1, 1])])
    write(promp, 5, [row(5, [0.1, 0.2], [0.3, 0.4])])
    write(reach, 20, [row(20, [0.64, 1.0], [0.52, 1.0])])
    assert [run.name for run in module["existing_runs"](str(tmp_path))] == [maml.name, promp.name, reach.name]
    page = tmp_path / "metaworld.md"
    page.write_text(f"intro\n{module['EVALS_START']}\nstale\n{module['EVALS_END']}\nrest\n")
    block = module["write_summaries"](str(tmp_path))
    text = page.read_text()
    assert "stale" not in text and block in text and text.startswith("intro\n") and text.endswith("rest\n")
    ml10, ml1 = block.split("**ml1-reach**")
    assert f"| iteration | env steps | `{maml.name}` | `{promp.name}` |" in ml10
    assert "| 5 | 1e+06 | 0.215 → 0.290 / 0.065 → 0.115 | 0.100 → 0.200 / 0.300 → 0.400 |" in ml10
    assert "| 10 | 2e+06 | 0.150 → 0.235 / 0.110 → 0.110 |  |" in ml10 and "| 15 |" not in block
    assert f"`{reach.name}`" in ml1 and "| 20 | 4e+06 | 0.640 → 1.000 / 0.520 → 1.000 |" in ml1 and maml.name not in ml1
    assert (tmp_path / "metaworld_success.png").stat().st_size > 10_000


def test_a_metaworld_run_evaluates_success_on_test_and_training_tasks_resumes_and_records(tmp_path, restore_threads):
    pytest.importorskip("metaworld")
    module = _load("benchmarks/reproduce_metaworld.py")
    module["success_evaluation"].__globals__["EVAL_TASKS"] = 2
    (run,) = module["suite_runs"]("ml1-reach", ["maml"], [0])
    small = dict(meta_batch_size=2, inner_episodes=2, outer_episodes=2, n_envs=4, max_episode_steps=20,
                 policy_kwargs=dict(net_arch=[8]))  # fmt: skip
    run = module["PublishedRun"](run.suite, run.env_id, "maml", "trpo", 0, 3, {**run.kwargs, **small})
    run_sitting, evaluation = module["run_sitting"], module["success_evaluation"](run)
    assert run_sitting(run, str(tmp_path), 1, 1, stop_after=2, evaluation=evaluation) is None  # a sitting ends at 2
    finished = run_sitting(run, str(tmp_path), 1, 1, evaluation=evaluation)
    straight = run_sitting(run, str(tmp_path / "straight"), 1, 1, evaluation=evaluation)
    evals = module["read_jsonl"](f"{tmp_path}/runs/{run.name}/evals.jsonl")
    assert [row["iteration"] for row in evals] == [1, 2, 3]
    assert evals == module["read_jsonl"](f"{tmp_path}/straight/runs/{run.name}/evals.jsonl")  # resumed: the same
    assert finished["returns"] == straight["returns"] and len(evals[-1]["success_rates"]) == 2  # 0 and 1 inner step
    record = module["metaworld_record"](run, finished, evals, None)
    assert (record["benchmark"], record["env_name"], record["env_steps"]) == ("ML1", "reach-v3", 3 * 2 * 4 * 20)
    assert record["test_success"] == evals[-1]["success_rates"][1] and not record["test_success_protocol"]
    assert record["best_test_success"] == max(row["success_rates"][1] for row in evals)
    assert record["train_success"] == evals[-1]["train_success_rates"][1]
    final = module["final_evaluation"](run, str(tmp_path))  # Meta-World's protocol: every test goal once
    assert final["pairs_evaluated"] == final["pairs_total"] == 50
    with_protocol = module["metaworld_record"](run, finished, evals, final)
    assert with_protocol["test_success"] == final["success_rate"] and with_protocol["test_success_protocol"]
    records = str(tmp_path / "metaworld_runs.jsonl")  # the line written when the run finished, before its final evaluation
    module["append_jsonl"](records, {"name": "another"})
    module["append_jsonl"](records, record)
    module["refresh_record"](records, str(tmp_path), run)
    assert module["read_jsonl"](records) == [{"name": "another"}, with_protocol]
    table = module["summarize"](str(tmp_path), [run])
    assert f"| {run.name} | 3 of 3 | 480 |" in table and table.endswith(f"| {final['success_rate']:.3f} |")
