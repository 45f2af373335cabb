"""Every code block of the README and of the docs' pages runs as written, with the budgets made small (training steps,
task counts), and every file they link exists."""

import os
import re
import shlex

import pytest

import sb3_metarl
import sb3_metarl.meta_pg.metaworld as meta_world
from sb3_metarl import MetaPolicyGradient, cli

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
README = os.path.join(ROOT, "README.md")
#: the pages a user reads: the README and the docs' Markdown pages (the result pages are generated reports)
PAGES = ["README.md", *sorted(f"docs/{name}" for name in os.listdir(os.path.join(ROOT, "docs")) if name.endswith(".md"))]


def _blocks(language, page="README.md"):
    with open(os.path.join(ROOT, page)) as handle:
        return re.findall(rf"```{language}\n(.*?)```", handle.read(), flags=re.S)


def _all_blocks(language):
    return [(page, index, block) for page in PAGES for index, block in enumerate(_blocks(language, page))]


class _SmallBudget(MetaPolicyGradient):
    """The README's calls with small batches, one meta-iteration and few evaluation tasks."""

    def __init__(self, policy, env, **kwargs):
        if env is not None:
            kwargs.update(meta_batch_size=2, inner_episodes=2, outer_episodes=2)
            kwargs["n_envs"] = 2 if "n_envs" in kwargs else None
            if "MetaWorld" in str(env):
                kwargs["env_kwargs"] = dict(kwargs.get("env_kwargs") or {}, max_episode_steps=20)
        super().__init__(policy, env, **kwargs)

    def learn(self, total_timesteps, *args, **kwargs):
        return super().learn(1, *args, **kwargs)

    def evaluate_adaptation(self, n_tasks=40, inner_steps=3, seed=0, tasks=None, env=None):
        tasks = None if tasks is None else tasks[:2]
        return super().evaluate_adaptation(min(n_tasks, 2), min(inner_steps, 1), seed, tasks, env)


def _small_metaworld_evaluation(model, benchmark="ML1", env_name="reach-v3", **kwargs):
    kwargs.update(num_evals=1, adaptation_episodes=1, evaluation_episodes=1, max_episode_steps=20)
    return _original_metaworld_evaluation(model, benchmark, env_name, **kwargs)


_original_metaworld_evaluation = meta_world.metaworld_evaluation


@pytest.mark.parametrize("page, index", [(page, index) for page, index, _ in _all_blocks("python")])
@pytest.mark.slow
def test_python_blocks_run_as_written(page, index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sb3_metarl, "MetaPolicyGradient", _SmallBudget)
    monkeypatch.setattr(meta_world, "metaworld_evaluation", _small_metaworld_evaluation)
    namespace = {}
    if index > 0:  # later blocks continue the first one's session (its imports), as a reader's would
        namespace["MetaPolicyGradient"] = _SmallBudget
    exec(compile(_blocks("python", page)[index], f"{page} python block {index}", "exec"), namespace)


def _commands(page):
    commands = []
    for block in _blocks("bash", page):
        for line in block.replace("\\\n", " ").splitlines():
            for command in line.split("#")[0].split("&&"):
                if command.strip().startswith("python -m sb3_metarl"):
                    commands.append(shlex.split(command)[3:])
    return commands


def test_command_line_blocks_run_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert [c[0] for c in _commands("README.md")] == ["train", "train", "evaluate"]  # the quick start's and the CLI's
    commands = [command for page in PAGES for command in _commands(page)]
    small = ["--hyperparams", "meta_batch_size=2", "inner_episodes=2", "outer_episodes=2", "n_envs=4"]
    for arguments in commands:
        if arguments[0] == "train":
            if "--hyperparams" in arguments:  # keep the block's own hyperparameters, add the small batch
                at = arguments.index("--hyperparams")
                arguments = arguments[:at] + small + arguments[at + 1 :]
            else:
                arguments = arguments + small
            arguments += ["--timesteps", "1", "--eval-tasks", "2", "--eval-inner-steps", "1", "--no-progress-bar"]
        else:
            arguments += ["--n-tasks", "2", "--inner-steps", "1"]
        assert cli.main(arguments) == 0


@pytest.mark.all_cases
@pytest.mark.parametrize("page", PAGES)
def test_the_pages_link_only_files_of_the_repository_and_speak_of_the_library(page):
    with open(os.path.join(ROOT, page)) as handle:
        text = handle.read()
    linked = [path for path in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text) if not path.startswith("http")]
    named = re.findall(r"`((?:docs|examples|benchmarks|sb3_metarl)/[\w/.-]+\.(?:md|py|png|csv|jsonl))`", text)
    folder = os.path.dirname(os.path.join(ROOT, page))
    missing = [path for path in linked if not os.path.exists(os.path.join(folder, path))]
    missing += [path for path in named if not os.path.exists(os.path.join(ROOT, path))]
    assert missing == []
    assert "shared docs" not in text and not re.search(r"\bissues? \d+", text)
    if page == "README.md":
        assert linked and os.path.exists(os.path.join(ROOT, "docs", "meta-gradients.md"))


def _readme():
    with open(README) as handle:
        return handle.read()


def _user_docs():
    """:return: the README and the docs' pages, one text"""
    texts = []
    for page in PAGES:
        with open(os.path.join(ROOT, page)) as handle:
            texts.append(handle.read())
    return "\n".join(texts)


def test_the_install_text_says_how_to_get_the_cpu_build_and_tensorboard():
    """From the public index torch==2.13.0 is the CUDA build: the README must not promise a CPU build."""
    text = _readme()
    assert "puts in the CPU build" not in text
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in text
    (command_2,) = [line for line in _blocks("bash")[0].splitlines() if "pytest" in line]
    assert "tensorboard" in command_2 and "metaworld" in command_2


def test_the_metaworld_block_is_a_first_try_with_each_call_s_cost():
    (block,) = [block for _, _, block in _all_blocks("python") if "MetaWorldML10" in block]
    assert re.search(r"model\.learn\((\d[\d_]*)\)", block) and int(re.search(r"model\.learn\(([\d_]+)\)", block)[1]) <= 20_000
    assert "meta_batch_size=10" in block and "inner_episodes=2" in block and "num_evals=1" in block
    calls = ["MetaPolicyGradient(", "model.learn(", "evaluate_adaptation(", "metaworld_evaluation("]
    assert all(call in block for call in calls) and len(re.findall(r"\b\d+ s\b", block)) == 4  # a time per call


def test_the_readme_names_the_one_backend_that_is_not_bit_identical():
    text = " ".join(_user_docs().split())
    assert "The exception is `vec_env_cls=SubprocVecEnv`" in text and "not bit-identical" in text


@pytest.mark.slow
def test_the_custom_task_env_example_meta_learns_visibly_at_its_own_budget(tmp_path, monkeypatch, capsys):
    # before: the example's env clipped most actions and its 100k steps moved nothing (-9.76 / -7.37 before,
    # -9.57 / -6.81 after); it runs here as written, at its full budget, and prints what its comments say
    (block,) = [block for block in _blocks("python", "docs/tasks.md") if "class PointGoal1D" in block]
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "docs/tasks.md", "exec"), {"__name__": "__docs__"})
    printed = capsys.readouterr().out
    pairs = [re.findall(r"(-?\d+\.\d+) -> (-?\d+\.\d+)", line)[0] for line in printed.splitlines()]
    (_, before_1), (_, after_1) = [[float(value) for value in pair] for pair in pairs]
    commented = [[float(value) for value in pair] for pair in re.findall(r"# (-?\d+\.\d+) -> (-?\d+\.\d+)", block)]
    assert commented == [[-9.63, -6.15], [-9.45, -4.77]]
    assert abs(before_1 - commented[0][1]) < 0.1 and abs(after_1 - commented[1][1]) < 0.1  # (other CPUs round apart)
    assert after_1 > before_1 + 1.0  # meta-training made the one inner step count


def test_readme_and_getting_started_tell_a_new_user_the_same_things():
    # before: they drew a task in two ways, disagreed on evaluate's --env, and only resume.md had the __main__ guard
    with open(os.path.join(ROOT, "README.md")) as handle:
        readme = handle.read()
    with open(os.path.join(ROOT, "docs", "getting_started.md")) as handle:
        getting_started = handle.read()
    draw = "model.task_sampler.sample(1, np.random.default_rng(0))[0]"
    assert draw in readme and draw in getting_started and 'env_method("sample_tasks"' not in readme
    evaluate = "python -m sb3_metarl evaluate nav.zip --inner-steps 3    # on the env it was trained on (--env to change it)"
    assert evaluate in readme and evaluate in getting_started
    for page in (readme, getting_started):
        assert "sb3-metarl" in page and 'if __name__ == "__main__":' in page
    assert "2 idle CPU cores" in readme and "on a machine loaded with other jobs" in readme
