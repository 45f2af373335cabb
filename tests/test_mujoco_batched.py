"""The batched twin of the MuJoCo task families: the per-env step's trajectories, bit for bit, on every backend."""

import pickle

import gymnasium as gym
import mujoco
import numpy as np
import pytest
import torch as th

from sb3_metarl import MetaPolicyGradient
from sb3_metarl.common.infos import RowInfos
from sb3_metarl.samplers.runner import GroupRunner, step_without_bookkeeping
from sb3_metarl.tasks.mujoco.batched import BatchedAnt, BatchedLocomotion
from sb3_metarl.tasks.twins import batched_stepper

FAMILIES = [
    ("sb3_metarl/HalfCheetahDir-v0", {}),
    ("sb3_metarl/HalfCheetahDir-v0", dict(action_scale=10.0, ctrl_cost_weight=0.05)),
    ("sb3_metarl/HalfCheetahVel-v0", dict(velocity_range=(0.0, 3.0), action_scale=10.0)),
    ("sb3_metarl/Walker2dVel-v0", {}),
    ("sb3_metarl/SwimmerVel-v0", dict(action_scale=10.0)),
    ("sb3_metarl/SwimmerVel-v0", dict(velocity_range=(0.1, 0.2), deviation_sign=1, action_scale=10.0)),  # SG-MRL's
    ("sb3_metarl/HopperRandParams-v0", {}),
    ("sb3_metarl/Walker2dRandParams-v0", dict(action_scale=10.0)),
    ("sb3_metarl/AntDir-v0", {}),
    ("sb3_metarl/AntVel-v0", dict(action_scale=10.0)),
    ("sb3_metarl/AntVel-v0", dict(deviation_sign=1)),
    ("sb3_metarl/AntDir2D-v0", dict(healthy_z_range=(0.3, 1.0))),
    ("sb3_metarl/AntGoal-v0", dict(contact_cost_weight=1e-3, include_cfrc_ext_in_observation=False)),
]


def _integration_state(env) -> np.ndarray:
    spec = mujoco.mjtState.mjSTATE_INTEGRATION
    state = np.empty(mujoco.mj_stateSize(env.model, spec))
    mujoco.mj_getState(env.model, env.data, state, spec)
    return state


#: (physics threads, compiled loop, each step started and finished apart): the Python loop on one and two threads,
#: the compiled loop on one pool thread, and with its physics running beside this thread (what the two lanes do)
WAYS = [(1, False, False), (2, False, False), (1, True, False), (2, True, True)]


@pytest.mark.parametrize("env_id, kwargs", FAMILIES)
@pytest.mark.parametrize("num_threads, compiled, started", WAYS)
def test_the_twin_steps_exactly_as_each_env_s_own_step(env_id, kwargs, num_threads, compiled, started):
    """
    1000 steps (5 waves of 200, each from a seeded reset) of 12 sub-envs, a random subset of the running ones stepped
    each time; a sub-env that terminates (a Walker or Hopper that falls) is not stepped again until its reset.
    """
    n = 12
    per_env = [gym.make(env_id, **kwargs) for _ in range(n)]
    batched = [gym.make(env_id, **kwargs) for _ in range(n)]
    rng = np.random.default_rng(0)
    tasks = per_env[0].unwrapped.sample_tasks(n, rng)
    for first, second, task in zip(per_env, batched, tasks):
        first.unwrapped.set_task(task)
        second.unwrapped.set_task(task)
    twin = batched_stepper([env.unwrapped for env in batched], num_threads, compiled)
    assert isinstance(twin, BatchedAnt if "Ant" in env_id else BatchedLocomotion)
    assert (twin.kernel is not None) == compiled and twin.overlaps == started
    assert (twin.gathers is not None) == compiled  # the compiled loop copies what every family reads of the state
    steps = [step_without_bookkeeping(env)[0] for env in per_env]
    high = per_env[0].action_space.high
    falls = 0
    for wave in range(5):
        for index in range(n):
            first_obs, _ = per_env[index].reset(seed=100 * wave + index)
            second_obs, _ = batched[index].reset(seed=100 * wave + index)
            assert np.array_equal(first_obs, second_obs)
        running = np.ones(n, dtype=bool)
        for _ in range(200):
            actions = np.clip(1.5 * rng.normal(size=(n, *high.shape)) * high, -high, high).astype(np.float32)
            rows = np.flatnonzero(running & (rng.uniform(size=n) < 0.8))
            if len(rows) == 0:
                continue
            if started:  # the physics runs on the pool while this thread steps the per-env twins
                pending = twin.start(rows, actions[rows])
                outcomes = [steps[index](actions[index]) for index in rows]
                observations, rewards, terminated, infos = twin.finish(pending)
            else:
                observations, rewards, terminated, infos = twin.step(rows, actions[rows])
                outcomes = [steps[index](actions[index]) for index in rows]
            for k, (obs, reward, done, truncated, info) in enumerate(outcomes):
                assert np.array_equal(obs, observations[k]) and obs.dtype == observations.dtype
                assert reward == rewards[k] and done == terminated[k] and not truncated
                assert list(info) == list(infos[k]) and info == infos[k]
            running[rows[terminated]] = False
            falls += int(terminated.sum())
        # the whole integration state (warm start included) is the per-env step's, not only what it returns
        for first, second in zip(per_env, batched):
            assert np.array_equal(_integration_state(first.unwrapped), _integration_state(second.unwrapped))
    if "Walker" in env_id or "Hopper" in env_id or "Ant" in env_id:
        assert falls > 0  # the comparison covered terminations
    twin.close()


def test_only_what_the_twin_steps_exactly_is_batched():
    cheetah = gym.make("sb3_metarl/HalfCheetahDir-v0").unwrapped
    assert BatchedLocomotion.supports(cheetah)
    assert not BatchedLocomotion.supports(gym.make("sb3_metarl/HalfCheetahDir-v0", render_mode="rgb_array").unwrapped)
    from sb3_metarl.tasks import TabularMDPEnv

    class SubclassedMDP(TabularMDPEnv):  # a user's subclass may step otherwise: it keeps its own step
        pass

    assert batched_stepper([SubclassedMDP()]) is None and batched_stepper([TabularMDPEnv()]) is not None
    assert isinstance(batched_stepper([gym.make("sb3_metarl/AntGoal-v0").unwrapped]), BatchedAnt)
    assert batched_stepper([cheetah, gym.make("sb3_metarl/HalfCheetahVel-v0").unwrapped]) is None  # one class per batch
    # a wrapper between the runner and the env would be bypassed: the runner keeps the per-env step there
    wrapped = [gym.wrappers.TransformReward(gym.make("sb3_metarl/HalfCheetahDir-v0"), lambda r: 2 * r) for _ in range(2)]
    plain = [gym.make("sb3_metarl/HalfCheetahDir-v0") for _ in range(2)]
    space = plain[0].observation_space, plain[0].action_space
    assert GroupRunner(wrapped, 1, 10, *space).batched is None
    assert GroupRunner(plain, 1, 10, *space).batched is not None
    assert GroupRunner(plain, 1, 10, *space, batched_physics=False).batched is None


def test_row_infos_build_each_row_once_when_read():
    built = []

    def build(k):
        built.append(k)
        return {"row": k}

    infos = RowInfos(4, build)
    assert len(infos) == 4 and built == []  # nothing is built until read
    first = infos[1]
    assert first == {"row": 1} and infos[1] is first and built == [1]  # kept: a callback's edits stay
    assert infos[-1] == {"row": 3} and infos[1:3] == [{"row": 1}, {"row": 2}] and built == [1, 3, 2]
    assert infos == [{"row": k} for k in range(4)] and [info["row"] for info in infos] == [0, 1, 2, 3]
    assert built == [1, 3, 2, 0]
    with pytest.raises(IndexError):
        infos[4]
    assert pickle.loads(pickle.dumps(infos)) == [{"row": k} for k in range(4)]  # as the list of its dicts


@pytest.mark.parametrize("env_id", ["sb3_metarl/HalfCheetahVel-v0", "sb3_metarl/AntGoal-v0"])
def test_a_step_callback_reads_the_per_env_step_s_infos_from_the_twin(env_id):
    """
    The twin builds its infos when read: a sampler's step callback (``EpisodeSampler.sample(..., step_callback=)``)
    reading them gets the per-env step's dicts. (SB3 callbacks of ``learn`` are called once per sampled batch, on every
    backend: the per-step infos reach only a step callback given to the sampler.)
    """
    recorded = {}
    for batched in (False, True):
        model = MetaPolicyGradient("MlpPolicy", env_id, meta_batch_size=2, inner_episodes=2, outer_episodes=2,
                                   inner_lr=1e-4, max_episode_steps=10, policy_kwargs=dict(net_arch=[8]), seed=3,
                                   sampler_kwargs=dict(batched_physics=batched))  # fmt: skip
        assert (model.episode_sampler.runner.batched is not None) == batched
        model.episode_sampler.attach_policy(model.policy)
        rows = []

        def record(n_transitions, step_vars, rows=rows):
            rows.extend(dict(info) for info in step_vars["infos"])
            return True

        tasks = model.sample_tasks(2, np.random.default_rng(0))
        model.episode_sampler.sample(tasks, model.initial_task_params(2), 2, noise_seeds=[1, 2], step_callback=record)
        recorded[batched] = rows
        model.get_env().close()
    assert len(recorded[True]) == 2 * 2 * 10 and "reward_task" in recorded[True][0]
    assert recorded[True] == recorded[False]


def _trained_parameters(env_id, **kwargs):
    model = MetaPolicyGradient(
        "MlpPolicy",
        env_id,
        meta_batch_size=2,
        inner_episodes=2,
        outer_episodes=2,
        inner_lr=1e-4,
        max_episode_steps=30,
        env_kwargs=dict(action_scale=10.0),
        policy_kwargs=dict(net_arch=[16]),
        seed=5,
        **kwargs,
    )
    model.learn(2 * model.max_steps_per_iteration)
    parameters = th.nn.utils.parameters_to_vector(model.policy.parameters()).detach().clone()
    model.get_env().close()
    return parameters


TRAINED = [f"sb3_metarl/{family}-v0" for family in ("HalfCheetahDir", "Walker2dVel", "HopperRandParams", "AntDir")]


@pytest.mark.parametrize("env_id", TRAINED)
def test_training_with_the_twin_gives_the_per_env_step_s_parameters_on_every_backend(env_id):
    reference = _trained_parameters(env_id, sampler_kwargs=dict(batched_physics=False))
    assert th.equal(_trained_parameters(env_id), reference)
    assert th.equal(_trained_parameters(env_id, sampler_kwargs=dict(num_threads=2)), reference)
    assert th.equal(_trained_parameters(env_id, sampler="subproc", sampler_kwargs=dict(num_workers=2)), reference)


@pytest.mark.parametrize("bad", [dict(batched_physics=1), dict(num_threads=0), dict(num_threads=1.5)])
def test_bad_runner_arguments_are_refused_by_name(bad):
    with pytest.raises(ValueError, match=r"batched_physics|num_threads"):
        MetaPolicyGradient("MlpPolicy", "sb3_metarl/HalfCheetahDir-v0", meta_batch_size=2, sampler_kwargs=bad)


def test_the_physics_threads_default_to_the_cores_available_divided_among_workers(monkeypatch):
    import sb3_metarl.samplers.runner as runner

    monkeypatch.setattr(runner, "available_cores", lambda: 6)
    assert runner.physics_threads(None) == 6 and runner.physics_threads(None, 4) == 1 and runner.physics_threads(3, 4) == 3
    model = MetaPolicyGradient("MlpPolicy", "sb3_metarl/HalfCheetahDir-v0", meta_batch_size=2, inner_episodes=2,
                               outer_episodes=2, inner_lr=0.1)  # fmt: skip
    assert model.episode_sampler.runner.batched.num_threads == 6


@pytest.mark.slow
def test_the_twin_trains_the_same_on_ray_actors():
    """The Ray backend's actors step their blocks with the twin too: the per-env step's parameters, bit for bit."""
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        env_id = "sb3_metarl/HalfCheetahDir-v0"
        reference = _trained_parameters(env_id, sampler_kwargs=dict(batched_physics=False))
        assert th.equal(_trained_parameters(env_id, sampler="ray", sampler_kwargs=dict(num_workers=2)), reference)
    finally:
        if started:
            ray.shutdown()


def test_without_numba_the_twin_keeps_its_python_loop_and_the_lock_step_loop(monkeypatch):
    import sb3_metarl.tasks.mujoco.batched as mujoco_batched

    envs = [gym.make("sb3_metarl/HalfCheetahDir-v0").unwrapped for _ in range(4)]
    compiled = batched_stepper(envs, 2)
    assert compiled.overlaps  # numba is installed here (a dependency)
    for env in envs:
        env.set_task(1.0)
        env.reset(seed=0)
    with pytest.raises(ValueError, match="actions: expected 6 values"):  # checked before the loop copies them
        compiled.start(np.arange(4), np.zeros((4, 5), dtype=np.float32))
    monkeypatch.setattr(mujoco_batched, "nogil_kernel", lambda: None)
    twin = batched_stepper(envs, 2)
    assert twin.kernel is None and not twin.overlaps  # the sampler then runs the lock-step loop
    with pytest.raises(ValueError, match="compiled"):
        batched_stepper(envs, 2, compiled=True)


def test_closing_the_sampler_stops_the_twin_s_physics_threads():
    model = MetaPolicyGradient("MlpPolicy", "sb3_metarl/HalfCheetahDir-v0", meta_batch_size=2, inner_episodes=2,
                               outer_episodes=2, inner_lr=0.1, sampler_kwargs=dict(num_threads=2))  # fmt: skip
    twin = model.episode_sampler.runner.batched
    assert twin.pool.submit(int, 3).result() == 3
    model.episode_sampler.close()
    with pytest.raises(RuntimeError, match="shutdown"):
        twin.pool.submit(int, 3)
