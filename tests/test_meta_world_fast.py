"""The accelerated Meta-World helpers: scipy's quaternions and Meta-World's steps, bit for bit."""

import pickle

import numpy as np
import pytest

metaworld = pytest.importorskip("metaworld", reason='Meta-World is an optional extra: pip install "sb3_metarl[metaworld]"')

from metaworld.env_dict import ML45_V3  # noqa: E402
from metaworld.policies import ENV_POLICY_MAP  # noqa: E402
from metaworld.sawyer_xyz_env import SawyerXYZEnv  # noqa: E402
from scipy.spatial.transform import Rotation  # noqa: E402

from sb3_metarl.meta_pg.metaworld import metaworld_evaluation  # noqa: E402
from sb3_metarl.tasks.meta_world import MetaWorldTaskEnv, make_benchmark  # noqa: E402
from sb3_metarl.tasks.meta_world_fast import ExactRotation, accelerate  # noqa: E402

#: the fast lane runs a parametrized test's first case (tests/conftest.py): an env whose object is grasped and carried
FIRST = "pick-place-v3"


#: ML45's 45 training and 5 test env classes (they hold ML10's 15), read without building the benchmark
ML45_ENV_NAMES = [*ML45_V3["train"], *ML45_V3["test"]]


def test_exact_rotation_gives_scipy_s_quaternion_bit_for_bit_on_every_branch():
    matrices = list(Rotation.random(4000, random_state=0).as_matrix())
    # each branch of Markley's method: the largest of the three diagonal entries and the trace
    matrices += [Rotation.from_rotvec(np.pi * axis).as_matrix() for axis in np.eye(3)] + [np.eye(3)]
    branches = set()
    for matrix in matrices:
        fast = ExactRotation.from_matrix(matrix)
        assert not isinstance(fast, Rotation)  # the fast path ran
        assert np.array_equal(fast.as_quat(), Rotation.from_matrix(matrix).as_quat())
        branches.add(int(np.argmax([*np.diag(matrix), np.trace(matrix)])))
    assert branches == {0, 1, 2, 3}


def test_exact_rotation_leaves_every_other_matrix_to_scipy():
    rng = np.random.default_rng(0)
    rotation = Rotation.random(random_state=1).as_matrix()
    # outside the bounds of the fast path: scipy orthogonalizes (SVD), here as there
    for skewed in (rotation + 1e-9 * rng.standard_normal((3, 3)), 1.001 * rotation, rotation.astype(np.float32)):
        result = ExactRotation.from_matrix(skewed)
        assert isinstance(result, Rotation)
        assert np.array_equal(result.as_quat(), Rotation.from_matrix(skewed).as_quat())
    with pytest.raises(ValueError, match="Non-positive determinant"):
        ExactRotation.from_matrix(-rotation)


def test_a_scipy_that_computes_otherwise_gets_every_conversion(monkeypatch):
    from sb3_metarl.tasks import meta_world_fast

    assert meta_world_fast.scipy_agrees()  # the installed scipy: the fast path is on
    exact = ExactRotation.quaternion
    one_ulp_off = staticmethod(lambda matrix: [np.nextafter(x, 2.0) for x in exact(matrix)])
    monkeypatch.setattr(ExactRotation, "quaternion", one_ulp_off)
    assert not meta_world_fast.scipy_agrees.__wrapped__()  # one ulp off in the check's matrices: detected
    monkeypatch.setattr(meta_world_fast, "scipy_agrees", lambda: False)
    matrix = Rotation.random(random_state=3).as_matrix()
    assert isinstance(ExactRotation.from_matrix(matrix), Rotation)


def _compare_steps(env_name: str, env_class: type, task: object, steps: int = 500) -> int:
    """Step Meta-World's own env and an accelerated one with the same actions: :return: steps touching the object"""
    own, fast = env_class(), accelerate(env_class())
    for env in (own, fast):
        env.set_task(task)
    policy = ENV_POLICY_MAP[env_name]()
    rng = np.random.default_rng(0)
    observation, _ = own.reset(seed=0)
    fast_observation, _ = fast.reset(seed=0)
    assert np.array_equal(observation, fast_observation)
    try:
        main_object = own._get_id_main_object()
    except (AttributeError, KeyError):  # some 3.1.1 envs have no such object, or look it up with a removed MuJoCo call
        main_object = None
    touching = 0
    for step in range(steps):
        # the scripted policy grasps and carries the objects (contacts, moving quaternions); random actions bump them
        action = policy.get_action(observation) if (step // 100) % 2 == 0 else rng.uniform(-1, 1, 4)
        action = np.clip(action + 0.1 * rng.standard_normal(4), -1.0, 1.0)
        if main_object is not None:
            in_contact = SawyerXYZEnv.touching_object(own, main_object)
            assert in_contact == fast.touching_object(main_object)
            touching += bool(in_contact)
        observation, reward, terminated, truncated, info = own.step(action)
        fast_result = fast.step(action)
        assert np.array_equal(observation, fast_result[0]), (env_name, step)
        assert (reward, terminated, truncated) == fast_result[1:4], (env_name, step)
        assert info == fast_result[4] and [type(v) for v in info.values()] == [type(v) for v in fast_result[4].values()]
        if truncated or step == 250:
            observation, _ = own.reset()
            fast_observation, _ = fast.reset()
            assert np.array_equal(observation, fast_observation)
    return touching


@pytest.mark.filterwarnings("ignore:Constant")  # Meta-World's scripted policies warn of their own gains
@pytest.mark.parametrize(
    "env_name",
    sorted(ML45_ENV_NAMES, key=lambda name: name != FIRST),
)
def test_an_accelerated_env_steps_as_meta_world_s_own(env_name):
    """Every ML10 and ML45 env class: 500 steps with resets (ML1's benchmark of the class gives its class and a goal)."""
    benchmark = make_benchmark("ML1", env_name, 0)
    touching = _compare_steps(env_name, benchmark.train_classes[env_name], benchmark.train_tasks[0])
    if env_name in ("pick-place-v3", "stick-pull-v3"):
        assert touching > 50  # the contact test ran both ways


def _episodes(env, tasks) -> list:
    """:return: 150 steps of random actions after a seeded reset on each of ``tasks``"""
    steps = []
    for task in tasks:
        env.set_task(task)
        steps.append(env.reset(seed=0)[0])
        steps += [env.step(action) for action in np.random.default_rng(2).uniform(-1, 1, size=(150, 4))]
    return steps


def _same_steps(these: list, those: list) -> bool:
    return all(np.array_equal(a, b) if isinstance(a, np.ndarray) else (np.array_equal(a[0], b[0]) and a[1:] == b[1:])
               for a, b in zip(these, those, strict=True))  # fmt: skip


def test_the_task_env_samples_the_same_with_and_without_acceleration_and_pickles():
    envs = [MetaWorldTaskEnv("ML1", "push-v3", seed=0, accelerate=flag) for flag in (True, False)]
    tasks = envs[0].sample_tasks(3, rng=np.random.default_rng(1))
    assert _same_steps(*(_episodes(env, tasks) for env in envs))
    # an accelerated env pickles with its helpers (subprocess and Ray workers receive envs so) and steps as before
    copies = [pickle.loads(pickle.dumps(env)) for env in envs]
    assert _same_steps(*(_episodes(env, tasks) for env in copies))
    with pytest.raises(ValueError, match="accelerate"):
        MetaWorldTaskEnv("ML1", "reach-v3", accelerate="yes")


def test_an_evicted_accelerated_env_is_freed_by_reference_counting():
    """The helpers hold their env (a cycle): an evicted env was kept until the cyclic collector ran, 18 MB each."""
    import gc
    import weakref

    env = MetaWorldTaskEnv("ML10", None, seed=0, max_cached_envs=1)
    first_class = env.get_task().env_name
    first = weakref.ref(env._active)
    other = next(task for task in env.train_tasks if task.env_name != first_class)
    gc.disable()
    try:
        env.set_task(other)  # evicts the first class's env
        assert first() is None
    finally:
        gc.enable()
    assert _same_steps(_episodes(env, [other]), _episodes(MetaWorldTaskEnv("ML10", None, seed=0, accelerate=False), [other]))


@pytest.mark.slow
def test_the_protocol_gives_the_same_numbers_with_and_without_acceleration():
    from sb3_metarl import MetaPolicyGradient

    push = dict(env_name="push-v3", max_episode_steps=30)
    model = MetaPolicyGradient("MlpPolicy", "sb3_metarl/MetaWorldML1-v0", env_kwargs=push, meta_batch_size=2, inner_episodes=1,
                               outer_episodes=1, seed=0)  # fmt: skip
    small = dict(meta_batch_size=5, num_evals=1, adaptation_episodes=1, evaluation_episodes=1, max_episode_steps=30)
    results = [metaworld_evaluation(model, "ML1", "push-v3", accelerate=flag, **small) for flag in (True, False)]
    assert results[0] == results[1]
