"""Meta-World benchmarks (optional extra): env checkers, task switching, sampler splits, training, evaluation."""

import pickle

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env
from stable_baselines3.common.vec_env import SubprocVecEnv

from sb3_metarl import MetaPolicyGradient
from sb3_metarl.common.buffers import TaskRolloutBuffer
from sb3_metarl.tasks import METAWORLD_TASK_ENVS

metaworld = pytest.importorskip("metaworld", reason='Meta-World is an optional extra: pip install "sb3_metarl[metaworld]"')

from metaworld.evaluation import Timestep  # noqa: E402

from sb3_metarl.meta_pg.metaworld import MetaWorldAgent, metaworld_evaluation  # noqa: E402
from sb3_metarl.tasks.meta_world import MetaWorldTaskEnv, MetaWorldTaskSampler, make_benchmark  # noqa: E402

SHORT = dict(max_episode_steps=20)


@pytest.mark.parametrize("env_id", list(METAWORLD_TASK_ENVS))
@pytest.mark.slow
def test_benchmark_envs_pass_checkers_for_several_tasks(env_id):
    env = gym.make(env_id)
    assert env.spec.max_episode_steps == 500
    tasks = env.unwrapped.sample_tasks(2, rng=np.random.default_rng(0))
    for task in tasks:
        env.unwrapped.set_task(pickle.loads(pickle.dumps(task)))
        assert env.unwrapped.get_task().env_name == task.env_name
        check_env(env.unwrapped, warn=False)
        gym_check_env(env.unwrapped, skip_render_check=True)


def test_set_task_switches_env_class_and_goal():
    env = MetaWorldTaskEnv("ML10", None, seed=0, max_cached_envs=2)
    reach = next(t for t in env.train_tasks if t.env_name == "reach-v3")
    push = next(t for t in env.train_tasks if t.env_name == "push-v3")
    env.set_task(reach)
    assert type(env._active).__name__ == "SawyerReachEnvV3"
    env.set_task(push)
    assert type(env._active).__name__ == "SawyerPushEnvV3"
    assert list(env._envs) == ["reach-v3", "push-v3"]  # at most two instances, least recently used dropped
    env.set_task(next(t for t in env.train_tasks if t.env_name == "door-open-v3"))
    assert list(env._envs) == ["push-v3", "door-open-v3"]
    # test tasks (held-out envs) are accepted too, for meta-testing
    test_task = make_benchmark("ML10", None, 0).test_tasks[0]
    env.set_task(test_task)
    assert env.get_task() is test_task
    # two goals of reach give different rewards for the same actions
    rewards = []
    for task in [t for t in env.train_tasks if t.env_name == "reach-v3"][:2]:
        env.set_task(task)
        env.reset(seed=0)
        rewards.append([env.step(np.full(4, 0.5, dtype=np.float32))[1] for _ in range(5)])
    assert not np.allclose(rewards[0], rewards[1])


def test_bad_arguments_and_foreign_tasks_raise():
    with pytest.raises(ValueError, match="env_name"):
        make_benchmark("ML1", "not-an-env-v3")
    with pytest.raises(ValueError, match="benchmark"):
        make_benchmark("ML7", None)
    with pytest.raises(ValueError, match="split"):
        MetaWorldTaskSampler("ML1", "reach-v3", split="validation")
    env = MetaWorldTaskEnv("ML1", "reach-v3")
    push = make_benchmark("ML1", "push-v3").train_tasks[0]
    with pytest.raises(ValueError, match="task"):
        env.set_task(push)
    with pytest.raises(ValueError, match="task"):
        env.set_task(0.5)
    with pytest.raises(ValueError, match="max_cached_envs"):
        MetaWorldTaskEnv("ML1", "reach-v3", max_cached_envs=0)


def test_sampler_draws_from_metaworld_train_and_test_tasks():
    benchmark = make_benchmark("ML10", None, seed=0)
    train = MetaWorldTaskSampler("ML10", None, split="train", seed=0)
    test = MetaWorldTaskSampler("ML10", None, split="test", seed=0)
    rng = np.random.default_rng(0)
    drawn_train, drawn_test = train.sample(50, rng), test.sample(50, rng)
    assert {t.env_name for t in drawn_train} <= set(benchmark.train_classes)
    assert {t.env_name for t in drawn_test} <= set(benchmark.test_classes)
    assert all(t in benchmark.train_tasks for t in drawn_train[:5])
    assert len({t.env_name for t in drawn_train}) > 5


@pytest.mark.slow
def test_meta_training_logs_success_rates_and_runs_in_subprocesses():
    model = MetaPolicyGradient(
        "MlpPolicy",
        "sb3_metarl/MetaWorldML1-v0",
        env_kwargs=dict(env_name="reach-v3", **SHORT),
        vec_env_cls=SubprocVecEnv,
        meta_batch_size=2,
        inner_episodes=2,
        outer_episodes=2,
        inner_lr=1e-4,
        seed=0,
    )
    model.learn(1, log_interval=None)  # never dumped: the recorded values stay readable
    recorded = model.logger.name_to_value
    assert 0.0 <= recorded["rollout/post_adaptation_success_rate"] <= 1.0
    assert "rollout/pre_adaptation_success_rate" in recorded
    table = model.evaluate_adaptation(
        tasks=MetaWorldTaskSampler("ML1", "reach-v3", split="test").sample(2, np.random.default_rng(0)), inner_steps=1
    )
    assert table["success_rate"].shape == (2,) and np.isfinite(table["mean"]).all()
    model.env.close()


def test_buffer_success_is_any_step_success():
    buffer = TaskRolloutBuffer(3, 1, 2, gym.spaces.Box(-1, 1, (1,)), gym.spaces.Box(-1, 1, (1,)), "cpu")
    buffer.add_successes(np.array([0, 1]), np.array([0.0, 1.0]))
    buffer.add_successes(np.array([0, 1]), np.array([0.0, 0.0]))
    buffer.add_successes(np.array([0]), np.array([1.0]))
    assert buffer.to_batch().successes.tolist() == [[1.0, 1.0]]


@pytest.mark.slow
def test_agent_adapts_like_the_model_and_metaworld_evaluation_runs():
    model = MetaPolicyGradient(
        "MlpPolicy",
        "sb3_metarl/MetaWorldML1-v0",
        env_kwargs=dict(env_name="reach-v3", **SHORT),
        meta_batch_size=2,
        inner_episodes=2,
        outer_episodes=2,
        inner_lr=1e-3,
        baseline=None,  # a linear baseline would fit one 3-step episode exactly: no advantage left
        seed=0,
    )
    agent = MetaWorldAgent(model, num_envs=2, adaptation_episodes=1)
    before = {n: p.clone() for n, p in agent.params.items()}
    rng = np.random.default_rng(0)
    for t in range(3):
        observations = rng.normal(size=(2, 39))
        actions, aux = agent.adapt_action(observations)
        assert actions.shape == (2, 4) and np.all(np.abs(actions) <= 1)
        done = np.array([t == 2, t == 2])
        agent.step(Timestep(observations, actions, rng.normal(size=2), done, done, aux))
    batch = agent._batch()
    assert batch.masks.shape == (2, 1, 3)
    expected = model.adaptation.adapt(before, batch, model.gradient_mode)
    agent.adapt()
    for name in expected:
        th.testing.assert_close(agent.params[name], expected[name])
    assert any(not th.equal(before[n], agent.params[n]) for n in before)
    assert agent._episodes == [[], []]

    result = metaworld_evaluation(
        model, "ML1", "reach-v3", meta_batch_size=2, num_evals=1, adaptation_episodes=1, evaluation_episodes=1, **SHORT
    )
    assert 0.0 <= result["success_rate"] <= 1.0 and np.isfinite(result["mean_return"])
    assert set(result["success_rate_per_task"]) == {"reach-v3"}


@pytest.mark.slow
def test_metaworld_example_runs_and_appends_its_record(capsys, tmp_path):
    import json
    import runpy

    main = runpy.run_path("examples/metaworld_ml1.py", run_name="example")["main"]
    args = "--iterations 1 --meta-batch-size 2 --episodes 2 --num-evals 1 --adaptation-episodes 1 --max-episode-steps 20"
    main([*args.split(), "--out", str(tmp_path / "runs.jsonl")])
    out = capsys.readouterr().out
    assert "| after meta-training |" in out and "| 1 |" in out
    assert "Meta-World's protocol evaluated 2 of the test split's 50 goals." in out  # one round of 2 sub-envs
    (record,) = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert record["env_steps"] == 2 * (2 + 2) * 20 and record["test_pairs_evaluated"] == 2
    assert (record["benchmark"], record["mode"], record["meta_optimizer"], record["seed"]) == ("ML1", "lvc", "ppo", 0)
    assert 0.0 <= record["test_success"] <= 1.0 and record["fixes"]["count_per_sub_env"] is True


@pytest.mark.parametrize("env_id", ["sb3_metarl/MetaWorldML10-v0", "sb3_metarl/MetaWorldML45-v0"])
def test_meta_training_smoke_on_the_multi_env_benchmarks(env_id):
    """One sub-env per task (episodes in waves), as the README recommends for ML10 / ML45."""
    model = MetaPolicyGradient(
        "MlpPolicy",
        env_id,
        env_kwargs=dict(max_episode_steps=10),
        n_envs=2,
        meta_batch_size=2,
        inner_episodes=2,
        outer_episodes=2,
        inner_lr=1e-4,
        seed=0,
    )
    before = th.cat([p.detach().flatten() for p in model.policy.parameters()])
    model.learn(80, log_interval=None)
    assert model.n_updates == 1 and model.num_timesteps == 80
    assert 0.0 <= model.logger.name_to_value["rollout/post_adaptation_success_rate"] <= 1.0
    assert not th.equal(before, th.cat([p.detach().flatten() for p in model.policy.parameters()]))


@pytest.mark.slow
def test_metaworld_evaluation_works_at_any_meta_batch_size():
    from types import SimpleNamespace

    from sb3_metarl.meta_pg.metaworld import evaluation_layout

    def benchmark(n_classes, tasks_per_class=50):
        names = [f"env{i}" for i in range(n_classes)]
        tasks = [SimpleNamespace(env_name=name) for name in names for _ in range(tasks_per_class)]
        return SimpleNamespace(test_classes=dict.fromkeys(names), test_tasks=tasks)

    # ML10 / ML45 have 5 test classes of 50 tasks: 20 asks for 4 per class, 5 divide 50: 10 rounds cover all 250 pairs
    assert evaluation_layout(benchmark(5), 20) == (25, 50, 10)
    assert evaluation_layout(benchmark(5), 45) == (50, 50, 5)  # metaworld-algorithms' ML45 batch: all pairs, not 180
    assert evaluation_layout(benchmark(5), 7) == (10, 50, 25)
    assert evaluation_layout(benchmark(1), 20) == (25, 50, 2)
    assert evaluation_layout(benchmark(5, 40), 45) == (50, 40, 4)  # (40 goals, as the paper counts them: 200 pairs)
    with pytest.raises(ValueError, match="meta_batch_size"):
        evaluation_layout(benchmark(1), 51)
    model = MetaPolicyGradient(
        "MlpPolicy", "sb3_metarl/MetaWorldML1-v0", meta_batch_size=2, inner_episodes=1, outer_episodes=1,
        env_kwargs=dict(max_episode_steps=10),
    )
    result = metaworld_evaluation(
        model, "ML1", "reach-v3", meta_batch_size=20, num_evals=1, adaptation_episodes=1, evaluation_episodes=1,
        max_episode_steps=10,
    )  # failed with "Invalid division of subtasks, expected 2 got 3" before
    assert 0.0 <= result["success_rate"] <= 1.0 and len(result["success_rate_per_task"]) == 1


def test_evaluation_counts_each_sub_env_s_first_episodes():
    """
    Two sub-envs of one env class (ML1): sub-env 0 succeeds at once, three times, before sub-env 1 fails once.
    Counted per sub-env the success rate is 0.5; Meta-World 3.1.1 keys the counts by task name, so the first
    three finished episodes (all of sub-env 0) made it 1.0 (Metaworld PR #577).
    """
    from sb3_metarl.meta_pg.metaworld import EvaluationTally

    tally = EvaluationTally(["reach-v3", "reach-v3"], episodes=3)
    for _ in range(5):
        tally.record(0, 10.0, True)
    assert not tally.complete
    for _ in range(3):
        tally.record(1, 1.0, False)
    assert tally.complete
    assert tally.success_rate_per_task() == {"reach-v3": 0.5}
    assert tally.mean_return() == pytest.approx((3 * 10.0 + 3 * 1.0) / 6)


@pytest.mark.slow
def test_both_counting_rules_run_the_same_protocol():
    model = MetaPolicyGradient("MlpPolicy", "sb3_metarl/MetaWorldML1-v0", meta_batch_size=2, inner_episodes=1,
                               outer_episodes=1, inner_lr=1e-4, env_kwargs=dict(max_episode_steps=10), seed=0)  # fmt: skip
    small = dict(meta_batch_size=4, num_evals=1, adaptation_episodes=1, evaluation_episodes=2, max_episode_steps=10)
    results = [
        metaworld_evaluation(model, "ML1", "reach-v3", count_per_sub_env=per_sub_env, **small) for per_sub_env in (True, False)
    ]
    for result in results:
        assert 0.0 <= result["success_rate"] <= 1.0 and np.isfinite(result["mean_return"])
        assert set(result["success_rate_per_task"]) == {"reach-v3"}


@pytest.mark.slow
def test_meta_training_never_sees_the_goals_the_evaluation_holds_out():
    """
    Metaworld PR #573: gym.make_vec("Meta-World/ML1-train") builds its sub-envs from the *test* goals in 3.1.1.
    We take the tasks from the benchmark's own train_tasks / test_tasks and evaluate on make_ml_envs_test:
    training's and the evaluation's goals must be disjoint, and the evaluation's all test goals.
    """
    import pickle

    import metaworld

    from sb3_metarl.tasks.meta_world import MetaWorldTaskSampler

    def key(task):
        return task.env_name, tuple(np.round(np.asarray(pickle.loads(task.data)["rand_vec"]), 8))

    train = {key(t) for t in MetaWorldTaskSampler("ML1", "reach-v3", split="train", seed=0).tasks}
    test = {key(t) for t in MetaWorldTaskSampler("ML1", "reach-v3", split="test", seed=0).tasks}
    envs = metaworld.make_ml_envs_test("reach-v3", seed=0, meta_batch_size=10, total_tasks_per_cls=50)
    try:
        evaluated = {key(t) for tasks in envs.get_attr("tasks") for t in tasks}
    finally:
        envs.close()
    assert len(train) == len(test) == 50 and not train & test
    assert evaluated == test


@pytest.mark.parametrize("env_name", ["stick-pull-v3", "stick-push-v3"])
def test_the_thermos_velocity_bug_of_3_1_1_leaves_no_trace_after_a_reset(env_name):
    """Metaworld PR #575: these envs zero qvel[16:18] instead of the thermos's qvel[15:17] when they place it; in 3.1.1
    reset runs reset_model again after mj_resetData, so a reset's state does not depend on what came before."""
    import metaworld

    ml1 = metaworld.ML1(env_name, seed=0)
    task = ml1.train_tasks[3]
    used, fresh = ml1.train_classes[env_name](), ml1.train_classes[env_name]()
    used.set_task(task)
    fresh.set_task(task)
    used.reset()
    rng = np.random.default_rng(0)
    for _ in range(20):
        used.step(rng.uniform(-1, 1, 4))
    thermos = slice(used.model.jnt_dofadr[used.model.joint("obj_slidex").id], None)
    assert thermos.start == 15 and used.model.nv == 17  # the velocities the upstream fix zeroes: [15:17]
    used.data.qvel[thermos] = [1.0, -2.0]
    used.data.qpos[16:18] += 0.05
    used_obs, _ = used.reset()
    fresh_obs, _ = fresh.reset()
    assert np.array_equal(used.data.qpos, fresh.data.qpos) and np.array_equal(used.data.qvel, fresh.data.qvel)
    assert np.array_equal(used_obs, fresh_obs) and not used.data.qvel[thermos].any()


def test_mujoco_is_the_version_meta_world_was_made_with():
    """Metaworld PR #578: MuJoCo 3.4 changed box-box collisions and broke peg-insert-side; the pin keeps 3.3.x."""
    import mujoco

    major, minor = (int(part) for part in mujoco.__version__.split(".")[:2])
    assert (major, minor) == (3, 3)


@pytest.mark.slow
@pytest.mark.parametrize("benchmark, meta_batch_size", [("ML10", 20), ("ML45", 45)])
def test_the_protocol_s_rounds_visit_every_test_task_goal_pair_once(benchmark, meta_batch_size):
    import metaworld

    from sb3_metarl.meta_pg.metaworld import evaluation_layout

    layout = evaluation_layout(make_benchmark(benchmark, None, 0), meta_batch_size)
    envs = metaworld.make_ml_envs_test(
        benchmark, seed=0, meta_batch_size=layout.sub_envs, total_tasks_per_cls=layout.tasks_per_class, max_episode_steps=5
    )
    try:
        seen = []
        for _ in range(layout.rounds):  # what metalearning_evaluation does at the start of each round
            envs.call("sample_tasks")
            for tasks, index in zip(envs.get_attr("tasks"), envs.get_attr("current_task_idx")):
                seen.append((tasks[index].env_name, tasks[index].data))
    finally:
        envs.close()
    assert len(seen) == len(set(seen)) == 5 * 50  # every pair of the test split, each once
