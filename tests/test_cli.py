"""The command-line interface and the examples, end to end on a tiny budget."""

import runpy
import sys

import pytest

from sb3_metarl.cli import CliError, main, parse_hyperparams

TINY = ["meta_batch_size=2", "inner_episodes=2", "outer_episodes=2"]


def test_parse_hyperparams():
    pairs = ["inner_lr=0.5", "baseline=None", "meta_optimizer=sgd", "policy_kwargs={'net_arch': [1, 2]}"]
    assert parse_hyperparams(pairs) == {
        "inner_lr": 0.5,
        "baseline": None,
        "meta_optimizer": "sgd",
        "policy_kwargs": {"net_arch": [1, 2]},
    }
    with pytest.raises(CliError):
        parse_hyperparams(["inner_lr"])


def test_train_then_evaluate(tmp_path, capsys):
    path = str(tmp_path / "nav.zip")
    args = ["train", "--gradient-mode", "sf", "--timesteps", "800", "--eval-tasks", "2", "--no-progress-bar"]
    assert main([*args, "--save-path", path, "--hyperparams", *TINY, "policy_kwargs={'net_arch': [8]}"]) == 0
    out = capsys.readouterr().out
    assert "| inner steps | before meta-training | after meta-training |" in out
    assert out.count("\n| ") == 4 + 1  # header row + inner steps 0..3
    assert main(["evaluate", path, "--inner-steps", "1", "--n-tasks", "2"]) == 0
    out = capsys.readouterr().out
    assert "| 1 |" in out and "| 2 |" not in out


def test_train_with_a_meta_optimizer(tmp_path, capsys):
    path = str(tmp_path / "nav_trpo.zip")
    args = ["train", "--meta-optimizer", "trpo", "--timesteps", "800", "--eval-tasks", "2", "--eval-inner-steps", "1"]
    assert main([*args, "--no-progress-bar", "--save-path", path, "--hyperparams", *TINY]) == 0
    from sb3_metarl import MetaPolicyGradient

    assert MetaPolicyGradient.load(path).meta_optimizer.name == "trpo"


def test_module_entry_point_help(capsys):
    sys_argv = sys.argv
    sys.argv = ["sb3_metarl", "--help"]
    try:
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_module("sb3_metarl", run_name="__main__")
    finally:
        sys.argv = sys_argv
    assert exit_info.value.code == 0
    assert "train" in capsys.readouterr().out


def test_navigation_example_runs(capsys, monkeypatch):
    argv = ["navigation_2d.py", "--timesteps", "400", "--meta-batch-size", "1", "--episodes", "2", "--eval-tasks", "1"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path("examples/navigation_2d.py", run_name="__main__")
    out = capsys.readouterr().out
    assert "| 3 |" in out and "after one inner step" in out


def test_help_has_no_raw_markup_and_train_and_evaluate_share_the_evaluation_seed(tmp_path, capsys):
    from sb3_metarl.cli import EVAL_SEED, build_parser, main

    assert "``" not in build_parser().format_help()
    small = ["--hyperparams", "meta_batch_size=2", "inner_episodes=2", "outer_episodes=2", "vec_env_cls=DummyVecEnv"]
    path = str(tmp_path / "m.zip")
    evaluation = ["--eval-tasks", "3", "--eval-inner-steps", "1", "--no-progress-bar"]
    main(["train", "--timesteps", "1", *evaluation, "--save-path", path, *small])
    trained = capsys.readouterr().out
    assert main(["evaluate", path, "--n-tasks", "3", "--inner-steps", "1"]) == 0
    evaluated = capsys.readouterr().out
    # the "after meta-training" column of train's table equals evaluate's mean column (same held-out tasks, seed 0)
    rows = ("| 0 ", "| 1 ")
    after = [line.split("|")[3].split()[0] for line in trained.splitlines() if line.startswith(rows)]
    means = [line.split("|")[2].strip() for line in evaluated.splitlines() if line.startswith(rows)]
    assert len(after) == 2
    assert after == means and EVAL_SEED == 0


@pytest.mark.slow
def test_train_on_worker_processes_from_the_command_line(capsys):
    from sb3_metarl.cli import main

    small = ["--hyperparams", "meta_batch_size=2", "inner_episodes=2", "outer_episodes=2"]
    evaluation = ["--eval-tasks", "2", "--eval-inner-steps", "1", "--no-progress-bar"]
    main(["train", "--timesteps", "1", "--sampler", "subproc", "--num-workers", "2", *evaluation, *small])
    assert "| 1 |" in capsys.readouterr().out
    assert main(["train", "--timesteps", "1", "--num-workers", "2", *evaluation, *small]) == 2
    assert "error: --num-workers: only with --sampler subproc or ray" in capsys.readouterr().err


def test_package_metadata_and_py_typed():
    import configparser
    import os

    import sb3_metarl

    root = os.path.dirname(os.path.dirname(os.path.abspath(sb3_metarl.__file__)))
    assert os.path.exists(os.path.join(root, "sb3_metarl", "py.typed"))
    config = configparser.ConfigParser()
    config.read(os.path.join(root, "setup.cfg"))
    assert config["metadata"]["url"] and config["metadata"]["author"]
    assert "py.typed" in config["options.package_data"]["sb3_metarl"]


def test_errors_are_one_line_messages_not_tracebacks(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "missing.zip")]) == 2
    err = capsys.readouterr().err
    assert "error: path: no saved model at" in err and "missing.zip.zip" not in err and "Traceback" not in err
    args = ["train", "--timesteps", "1", "--eval-tasks", "1", "--no-progress-bar", "--hyperparams", *TINY]
    assert main([*args, "inner_lrr=0.1"]) == 2
    assert "error: --hyperparams: 'inner_lrr' is not an argument of MetaPolicyGradient; did you mean 'inner_lr'?" in (
        capsys.readouterr().err
    )
    assert main([*args, "policy kwargs={}"]) == 2
    assert "error: --hyperparams: 'policy kwargs' is not an argument" in capsys.readouterr().err
    with pytest.raises(CliError):  # --traceback shows the real one
        main(["--traceback", *args, "inner_lrr=0.1"])


@pytest.mark.parametrize(
    "arguments, message",
    [
        # before: kept as the string "{'net_arch': [8]" and failed later with "dictionary update sequence element #0 ..."
        (["--hyperparams", "policy_kwargs={'net_arch': [8]"], "the value of policy_kwargs is not a Python literal"),
        # before: no hint
        (["--hyperparams", "inner_step=2"], "'inner_step' is not an argument of MetaPolicyGradient; did you mean 'inner_st"),
        # before: gymnasium's "Environment `Navigation2D` doesn't exist."
        (["--env", "Navigation2D-v0"], "did you mean 'sb3_metarl/Navigation2D-v0'?"),
        (["--env", "sb3_metarl/HalfCheetahVell-v0"], "did you mean 'sb3_metarl/HalfCheetahVel-v0'?"),
        # before: exit status 1 without "error:"
        (["--num-workers", "2"], "--num-workers: only with --sampler subproc or ray"),
    ],
)
def test_every_argument_error_is_error_colon_and_exit_status_2(capsys, arguments, message):
    assert main(["train", "--timesteps", "1", *arguments]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


@pytest.mark.slow
def test_the_module_colon_id_form_makes_an_env_without_importing_the_package_first():
    import subprocess

    # before: gym.make("sb3_metarl/HalfCheetahVel-v0") without the import says "Namespace sb3_metarl not found"
    code = (
        "import gymnasium as gym; env = gym.make('sb3_metarl:sb3_metarl/HalfCheetahVel-v0'); "
        "print(type(env.unwrapped).__name__)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "HalfCheetahVelEnv", done.stderr[-2000:]
    assert main(["train", "--env", "sb3_metarl:sb3_metarl/GaussianBandit-v0", "--timesteps", "1", "--eval-tasks", "1",
                 "--eval-inner-steps", "0", "--no-progress-bar", "--hyperparams", *TINY]) == 0  # fmt: skip


MUJOCO_FAMILIES = [
    "sb3_metarl/HalfCheetahVel-v0",
    "sb3_metarl/HalfCheetahDir-v0",
    "sb3_metarl/AntVel-v0",
    "sb3_metarl/AntDir-v0",
    "sb3_metarl/AntDir2D-v0",
    "sb3_metarl/AntGoal-v0",
    "sb3_metarl/Walker2dVel-v0",
    "sb3_metarl/SwimmerVel-v0",
    "sb3_metarl/HopperRandParams-v0",
    "sb3_metarl/Walker2dRandParams-v0",
]


@pytest.mark.parametrize("env_id", MUJOCO_FAMILIES)
def test_every_mujoco_family_s_command_line_default_acts_in_the_papers_normalized_range_and_trains(env_id, capsys):
    # before: only 3 envs had defaults, so a MuJoCo family trained with the actuators' own range (action_scale 1)
    from sb3_metarl.hyperparams import default_hyperparams

    timesteps, kwargs = default_hyperparams(env_id)
    assert kwargs["env_kwargs"]["action_scale"] == 10.0 and kwargs["gradient_mode"] == "maml"
    assert kwargs["meta_optimizer"] == "trpo" and timesteps == 8_000_000
    small = ["meta_batch_size=2", "inner_episodes=2", "outer_episodes=2", "max_episode_steps=10"]
    assert main(["train", "--env", env_id, "--timesteps", "1", "--eval-tasks", "2", "--eval-inner-steps", "1",
                 "--no-progress-bar", "--hyperparams", *small]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "'action_scale': 10.0" in out and "gradient mode maml" in out


def test_hyperparams_merge_into_the_env_s_defaults_and_are_printed(capsys):
    from sb3_metarl.cli import merge_hyperparams

    defaults = {"policy_kwargs": {"log_std_init": -1.0}, "inner_lr": 1e-3}
    merged = merge_hyperparams(defaults, {"policy_kwargs": {"net_arch": [8]}})
    assert merged == {"policy_kwargs": {"log_std_init": -1.0, "net_arch": [8]}, "inner_lr": 1e-3}
    args = ["train", "--timesteps", "1", "--eval-tasks", "1", "--eval-inner-steps", "0", "--no-progress-bar"]
    assert main([*args, "--hyperparams", *TINY, "policy_kwargs={'net_arch': [8]}"]) == 0
    out = capsys.readouterr().out
    assert "policy_kwargs={'log_std_init': -1.0, 'net_arch': [8]}" in out  # Navigation2D's default log-std kept
    assert out.index("Evaluating the initial policy on 1 held-out tasks") < out.index("| inner steps |")


def test_evaluate_uses_the_env_the_model_was_trained_on(tmp_path, capsys):
    path = str(tmp_path / "bandit.zip")
    args = ["train", "--env", "sb3_metarl/GaussianBandit-v0", "--timesteps", "1", "--eval-tasks", "2", "--no-progress-bar"]
    assert main([*args, "--eval-inner-steps", "1", "--save-path", path, "--hyperparams", *TINY]) == 0
    capsys.readouterr()
    assert main(["evaluate", path, "--inner-steps", "1", "--n-tasks", "2"]) == 0
    assert "on sb3_metarl/GaussianBandit-v0" in capsys.readouterr().out


def test_help_shows_defaults_and_examples():
    from sb3_metarl.cli import build_parser

    parser = build_parser()
    assert "examples:" in parser.format_help() and "python -m sb3_metarl evaluate" in parser.format_help()
    train_help = parser._subparsers._group_actions[0].choices["train"].format_help()
    assert "(default: the env's, or lsf)" in train_help and "(default: 40)" in train_help


def test_the_progress_bar_total_is_whole_iterations(monkeypatch):
    """learn(1) runs a whole iteration: the bar's total is that iteration, not 1 step exceeded by 1599."""
    from sb3_metarl import MetaPolicyGradient
    from sb3_metarl.common.callbacks import MetaProgressBarCallback

    totals = []
    on_end = MetaProgressBarCallback._on_training_end

    def record(self):
        totals.append((self.pbar.total, self.pbar.n))
        on_end(self)

    monkeypatch.setattr(MetaProgressBarCallback, "_on_training_end", record)
    start = MetaProgressBarCallback._on_training_start

    def record_start(self):
        start(self)
        totals.append(self.pbar.total)

    monkeypatch.setattr(MetaProgressBarCallback, "_on_training_start", record_start)
    model = MetaPolicyGradient("MlpPolicy", "sb3_metarl/TabularMDP-v0", meta_batch_size=2, inner_episodes=2,
                               outer_episodes=2, inner_lr=0.1, seed=0)  # fmt: skip
    model.learn(1, progress_bar=True)
    assert totals[0] == model.max_steps_per_iteration == 2 * 4 * 20
    assert totals[1] == (model.num_timesteps, model.num_timesteps)


def test_the_base_mujoco_range_is_inside_the_metaworld_extra_s():
    """pip install -e . then -e ".[metaworld]" must move MuJoCo within one distribution (4.x left 4's library behind)."""
    import configparser
    import os

    from packaging.requirements import Requirement

    import sb3_metarl

    root = os.path.dirname(os.path.dirname(os.path.abspath(sb3_metarl.__file__)))
    config = configparser.ConfigParser()
    config.read(os.path.join(root, "setup.cfg"))
    requirements = [Requirement(line) for line in config["options"]["install_requires"].split("\n") if line.strip()]
    (base,) = [r for r in requirements if r.name == "mujoco"]
    assert not base.specifier.contains("4.0.1") and base.specifier.contains("3.3.0")
    metaworld = pytest.importorskip("importlib.metadata").requires("metaworld")
    (pinned,) = [Requirement(r) for r in metaworld if r.startswith("mujoco")]
    assert all(base.specifier.contains(str(spec.version)) for spec in pinned.specifier)
    assert "tensorboard" in config["options.extras_require"]["tensorboard"]
