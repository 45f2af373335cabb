"""The compiled physics loop: it works or it is not used (one warning saying why), and MuJoCo's errors are exceptions."""

import os
import subprocess
import sys
import textwrap
import threading
import time

import gymnasium as gym
import mujoco
import numpy as np
import pytest
from gymnasium.envs.mujoco import half_cheetah_v5

import sb3_metarl.common.threads as threads_module
from sb3_metarl import MetaPolicyGradient
from sb3_metarl.common.threads import DaemonThreads, settle
from sb3_metarl.tasks.mujoco.kernel import (
    MUJOCO_SYMBOLS,
    Gather,
    KernelUnavailable,
    addresses,
    load_compiled_physics,
    nogil_kernel,
)
from sb3_metarl.tasks.twins import batched_stepper

#: a child process: the twin of 4 HalfCheetahVel sub-envs against their own step (simulated time and observations),
#: and what the loader said; run under the environment a test gives it
TWIN_AGAINST_GYMNASIUM = textwrap.dedent(
    """
    import warnings
    warnings.simplefilter("always")
    import gymnasium as gym, numpy as np
    import sb3_metarl.tasks.mujoco.kernel as kernel
    from sb3_metarl.tasks.twins import batched_stepper
    with warnings.catch_warnings(record=True) as caught:
        own = [gym.make("sb3_metarl/HalfCheetahVel-v0") for _ in range(4)]
        twin_envs = [gym.make("sb3_metarl/HalfCheetahVel-v0").unwrapped for _ in range(4)]
        twin = batched_stepper(twin_envs, 2)
    for k, (a, b) in enumerate(zip(own, twin_envs)):
        a.unwrapped.set_task(0.5 * k); b.set_task(0.5 * k)
        a.reset(seed=k); b.reset(seed=k)
    rng = np.random.default_rng(0)
    for _ in range(30):
        actions = rng.uniform(-1, 1, size=(4, 6)).astype(np.float32)
        expected = np.array([env.step(action)[0] for env, action in zip(own, actions)])
        observations = twin.step(np.arange(4), actions)[0]
        assert np.array_equal(observations, expected)
    assert twin_envs[0].data.time == own[0].unwrapped.data.time > 1.4, twin_envs[0].data.time
    said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning) and "Python loop" in str(w.message)]
    print("KERNEL", twin.kernel is not None, "WARNINGS", len(said), "REASON", kernel.unavailable_reason)
    """
)


def _run_child(extra_env: dict[str, str], pythonpath: str | None = None) -> str:
    env = {**os.environ, **extra_env}
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", TWIN_AGAINST_GYMNASIUM], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def test_with_numba_s_jit_disabled_the_twin_falls_back_and_still_steps_as_gymnasium():
    # before: the compiled step did nothing under NUMBA_DISABLE_JIT=1 (simulated time stayed 0.0), silently
    line = _run_child({"NUMBA_DISABLE_JIT": "1"})
    assert line.startswith("KERNEL False WARNINGS 1 REASON NUMBA_DISABLE_JIT is set"), line


def test_without_numba_the_twin_falls_back_with_one_warning(tmp_path):
    (tmp_path / "numba").mkdir()
    (tmp_path / "numba" / "__init__.py").write_text("raise ImportError('no numba in this environment')\n")
    line = _run_child({}, str(tmp_path))
    assert line.startswith("KERNEL False WARNINGS 1 REASON numba cannot be imported (ImportError: no numba"), line


@pytest.mark.parametrize(
    "module, body, expected",
    [
        ("llvmlite", "raise OSError('libllvmlite.so: cannot open shared object file')", "OSError: libllvmlite.so"),
        (None, None, "ValueError: Number of threads specified must be > 0"),
    ],
)
def test_a_broken_numba_falls_back_instead_of_stopping_every_model(tmp_path, module, body, expected):
    # before: an OSError (broken llvmlite) or a ValueError (NUMBA_NUM_THREADS=0) escaped and no twin family could be built
    if module is not None:
        (tmp_path / module).mkdir()
        (tmp_path / module / "__init__.py").write_text(body + "\n")
        line = _run_child({}, str(tmp_path))
    else:
        line = _run_child({"NUMBA_NUM_THREADS": "0"})
    assert line.startswith("KERNEL False WARNINGS 1 REASON numba cannot be imported") and expected in line, line


def test_an_unresolvable_symbol_is_refused_before_anything_is_compiled():
    # before: a missing mj_step symbol was a call to address 0 in a physics thread (a segfault)
    symbols = ("mj_step_that_does_not_exist", *MUJOCO_SYMBOLS[1:])
    with pytest.raises(KernelUnavailable, match=r"symbols not found.*mj_step_that_does_not_exist"):
        load_compiled_physics(mujoco_symbols=symbols)


def test_a_compile_error_is_found_when_the_loop_is_loaded_not_at_the_first_learn(monkeypatch):
    import numba

    def failing_njit(*args, **kwargs):
        raise numba.core.errors.TypingError("no typing for this")

    monkeypatch.setattr(numba, "njit", failing_njit)
    with pytest.raises(KernelUnavailable, match=r"did not compile .*TypingError"):
        load_compiled_physics()


def test_the_loaded_loop_has_passed_its_check_against_mj_step():
    physics = nogil_kernel()
    assert physics is not None  # numba is a dependency: here the compiled loop is used
    model = mujoco.MjModel.from_xml_path(os.path.join(os.path.dirname(half_cheetah_v5.__file__), "assets", "half_cheetah.xml"))
    compiled, reference = mujoco.MjData(model), mujoco.MjData(model)
    controls = np.full((1, model.nu), 0.3)
    for _ in range(10):
        reference.ctrl[:] = controls[0]
        mujoco.mj_step(model, reference, nstep=5)
        physics(np.array([model._address], np.uint64), np.array([compiled._address], np.uint64),
                np.array([compiled.ctrl.ctypes.data], np.uint64), controls, np.array([5]), False)  # fmt: skip
    assert compiled.time == reference.time == pytest.approx(0.5) and np.array_equal(compiled.qpos, reference.qpos)


def _small_arena_cheetah(tmp_path) -> str:
    """HalfCheetah's XML with a 2 KB arena: ``mj_step`` fails with ``mj_stackAlloc: out of memory`` at once."""
    with open(os.path.join(os.path.dirname(half_cheetah_v5.__file__), "assets", "half_cheetah.xml")) as handle:
        xml = handle.read()
    assert 'nstack="300000"' in xml
    path = tmp_path / "small_arena_cheetah.xml"
    path.write_text(xml.replace('nstack="300000"', 'memory="2K"'))
    return str(path)


@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.slow
def test_a_mujoco_error_in_the_compiled_loop_is_a_python_exception_and_the_model_saves(tmp_path, num_threads):
    # before: MuJoCo's default handler ended the process (exit code 1) from inside the compiled loop
    xml_file = _small_arena_cheetah(tmp_path)
    script = textwrap.dedent(
        f"""
        import mujoco
        from sb3_metarl import MetaPolicyGradient
        model = MetaPolicyGradient("MlpPolicy", "sb3_metarl/HalfCheetahVel-v0", meta_batch_size=2, inner_episodes=2,
                                   outer_episodes=2, inner_lr=0.1, env_kwargs=dict(xml_file={xml_file!r}),
                                   sampler_kwargs=dict(num_threads={num_threads}))
        assert model.episode_sampler.runner.batched.kernel is not None
        try:
            model.learn(2000)
        except mujoco.FatalError as error:
            print("RAISED", str(error).splitlines()[0])
            model.save({str(tmp_path / "after.zip")!r})
        try:
            model.learn(2000)
        except mujoco.FatalError as error:
            print("AGAIN", "earlier MuJoCo error" in str(error))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]  # and the process ended: the parked thread is a daemon
    assert "RAISED mj_stackAlloc: out of memory" in done.stdout and "AGAIN True" in done.stdout, done.stdout
    assert MetaPolicyGradient.load(tmp_path / "after.zip").num_timesteps == 0


def test_the_per_env_path_raises_the_same_error(tmp_path):
    env = gym.make("sb3_metarl/HalfCheetahVel-v0", xml_file=_small_arena_cheetah(tmp_path))
    env.unwrapped.set_task(1.0)
    env.reset(seed=0)
    with pytest.raises(mujoco.FatalError, match="mj_stackAlloc: out of memory"):
        for _ in range(100):  # (the first contacts come within a few steps)
            env.step(np.ones(6, np.float32))


def test_fewer_action_rows_than_sub_envs_are_refused_before_the_compiled_copy():
    # before: the loop read past the controls and stepped the other sub-envs with whatever memory followed
    envs = [gym.make("sb3_metarl/HalfCheetahVel-v0").unwrapped for _ in range(4)]
    for env in envs:
        env.set_task(1.0)
        env.reset(seed=0)
    twin = batched_stepper(envs, 1)
    assert twin.kernel is not None
    times = [env.data.time for env in envs]
    for actions in (np.zeros((2, 6), np.float32), np.zeros(6, np.float32), np.zeros((5, 6), np.float32)):
        with pytest.raises(ValueError, match=r"actions: expected one row per stepped sub-env, shape \(4, action size\)"):
            twin.step(np.arange(4), actions)
        with pytest.raises(ValueError, match="actions: expected one row"):
            twin.start(np.arange(4), actions)
    assert [env.data.time for env in envs] == times  # nothing was stepped


def test_ctrl_c_while_waiting_for_the_physics_waits_for_it_before_raising(monkeypatch):
    # before: a KeyboardInterrupt during the wait returned at once, the lane's physics still running on the sub-envs
    envs = [gym.make("sb3_metarl/HalfCheetahVel-v0").unwrapped for _ in range(4)]
    for env in envs:
        env.set_task(1.0)
        env.reset(seed=0)
    twin = batched_stepper(envs, 2)
    assert twin.overlaps
    finished = []
    advance = twin._advance

    def slow_advance(rows, controls, gathered=None):
        time.sleep(0.3)
        advance(rows, controls, gathered)
        finished.append(rows)

    monkeypatch.setattr(twin, "_advance", slow_advance)
    real_wait, calls = threads_module.wait_for_all, []

    def interrupted_wait(futures, timeout=None):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt  # Ctrl-C arriving while this thread waits
        return real_wait(futures, timeout=timeout)

    monkeypatch.setattr(threads_module, "wait_for_all", interrupted_wait)
    pending = twin.start(np.arange(4), np.zeros((4, 6), np.float32))
    with pytest.raises(KeyboardInterrupt):
        twin.finish(pending)
    assert sorted(row for rows in finished for row in rows) == [0, 1, 2, 3]  # every chunk had run when it was raised
    assert len(calls) > 1


def test_settle_raises_a_parked_call_s_error_once_the_others_finished():
    pool = DaemonThreads(2)
    release = threading.Event()
    parked_future = pool.submit(release.wait)  # never released: a thread parked for good
    quick = pool.submit(time.sleep, 0.1)
    started = time.perf_counter()
    with pytest.raises(RuntimeError, match="parked here"):
        settle([parked_future, quick], lambda future: RuntimeError("parked here") if future is parked_future else None)
    assert quick.done() and time.perf_counter() - started < 5
    release.set()
    pool.shutdown(wait=True)
    with pytest.raises(RuntimeError, match="shutdown"):
        pool.submit(int)


def test_the_twin_trains_as_the_per_env_path_whatever_loop_this_process_has():
    """
    Runs in CI also under NUMBA_DISABLE_JIT=1 and with numba made unimportable (.ci/run): whichever physics loop the
    twin ends up with, a meta-iteration on HalfCheetahVel is the per-env path's, bit for bit, and simulated time moves.
    """
    import torch as th

    kwargs = dict(meta_batch_size=2, inner_episodes=2, outer_episodes=2, inner_lr=1e-3, max_episode_steps=30, seed=0)
    models = {
        batched: MetaPolicyGradient(
            "MlpPolicy", "sb3_metarl/HalfCheetahVel-v0", sampler_kwargs=dict(batched_physics=batched), **kwargs
        )
        for batched in (True, False)
    }
    twin = models[True].episode_sampler.runner.batched
    assert twin is not None and models[False].episode_sampler.runner.batched is None
    for model in models.values():
        model.learn(1)
    assert twin.envs[0].data.time > 0.0  # frozen physics (a compiled step that does nothing) would stay at 0.0
    for name, value in models[False].policy.state_dict().items():
        assert th.equal(value, models[True].policy.state_dict()[name]), name
    print(f"the twin's loop here: {'compiled' if twin.kernel is not None else 'Python'}")


def test_a_gather_copies_each_row_s_segments_before_and_after_its_physics():
    kernel = nogil_kernel()
    if kernel is None:
        pytest.skip("the compiled loop is not available in this process")
    envs = [gym.make("sb3_metarl/HalfCheetahDir-v0").unwrapped for _ in range(3)]
    for index, env in enumerate(envs):
        env.set_task(1.0)
        env.reset(seed=index)
    datas = [env.data for env in envs]
    # a segment in the middle of an array too: the main body's x, y and z of xpos (body 1), then all of qvel
    segments = [[data.xpos[1], data.qvel] for data in datas]
    sources = np.array([[segment.ctypes.data for segment in row] for row in segments], dtype=np.uint64)
    sizes = np.array([segment.nbytes for segment in segments[0]], dtype=np.int64)
    width = 3 + envs[0].model.nv
    before, after = Gather(sources, sizes, np.full((3, width), np.nan)), Gather(sources, sizes, np.full((3, width), np.nan))
    expected_before = np.stack([np.concatenate([data.xpos[1], data.qvel]) for data in datas])
    controls = np.full((3, 6), 0.3)
    kernel(addresses([env.model for env in envs]), addresses(datas), np.array([d.ctrl.ctypes.data for d in datas], np.uint64),
           controls, np.array([env.frame_skip for env in envs], dtype=np.int64), False, before, after)  # fmt: skip
    assert np.array_equal(before.arguments[2], expected_before)
    assert np.array_equal(after.arguments[2], np.stack([np.concatenate([data.xpos[1], data.qvel]) for data in datas]))
    assert not np.array_equal(after.arguments[2], expected_before)  # the physics ran between the two copies


@pytest.mark.parametrize(
    "sources, sizes, out, message",
    [
        (np.zeros((2, 1)), np.array([16]), np.zeros((2, 2), order="F"), "C-contiguous float64"),
        (np.zeros((2, 1)), np.array([16]), np.zeros((2, 2), dtype=np.float32), "C-contiguous float64"),
        (np.zeros((2, 1)), np.array([24]), np.zeros((2, 2)), "do not agree"),
        (np.zeros((3, 1)), np.array([16]), np.zeros((2, 2)), "do not agree"),
    ],
)
def test_a_gather_whose_shapes_disagree_is_refused_before_any_copy(sources, sizes, out, message):
    # the compiled loop copies sizes' bytes into out's rows: a mismatch would write past the array
    with pytest.raises(ValueError, match=message):
        Gather(sources, sizes, out)
