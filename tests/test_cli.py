"""The command-line interface and the examples, end to end on a tiny budget."""

import runpy
import sys

import pytest

from sb3_metarl.cli import main, parse_hyperparams

TINY = ["meta_batch_size=2", "inner_episodes=2", "outer_episodes=2"]


def test_parse_hyperparams():
    assert parse_hyperparams(["inner_lr=0.5", "baseline=None", "meta_optimizer=sgd", "net=[1, 2]"]) == {
        "inner_lr": 0.5,
        "baseline": None,
        "meta_optimizer": "sgd",
        "net": [1, 2],
    }
    with pytest.raises(SystemExit):
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

    assert MetaPolicyGradient.load(path).meta_optimizer == "trpo"


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
