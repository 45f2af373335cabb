"""The package's floors: every import runs downward (or stays in its room), and there is no cycle."""

import ast
import pathlib

import sb3_metarl

PACKAGE = pathlib.Path(sb3_metarl.__file__).parent

#: room (a top-level module or folder of the package) -> floor. The ground (common, gradient modes, tasks) knows no
#: algorithm; the engines (the differentiable adaptation, its layered twin ``mlp`` that imports what it twins, the
#: samplers, which act through the twin) are shared by systems; the meta-policy-gradient system's meta-optimizers sit
#: below it; the systems (meta_pg, mgrl, lola) do not import each other; the estimators
#: wing studies meta_pg's estimators, so it stands on it.
FLOORS = {
    "common": 0,
    "gradient_modes": 1,
    "tasks": 1,
    "adaptation": 2,
    "mlp": 3,
    "samplers": 4,
    "meta_optimizers": 4,
    "meta_pg": 5,
    "mgrl": 5,
    "lola": 5,
    "estimators": 6,
    "hyperparams": 6,
    "cli": 7,
    "__main__": 8,
    "__init__": 8,
}


#: old module paths inside a room that re-export what moved up (none: 0.1's shims were retired before 0.2's release)
SHIMS: dict[str, int] = {}


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _floor(module: str) -> int:
    return SHIMS.get(module, FLOORS[_room(module)])


def _imports() -> dict[str, set[tuple[str, int]]]:
    """:return: module -> the package modules it imports (anywhere in its body, lazily too), with the line"""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(("sb3_metarl", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            imported |= {(name, node.lineno) for name in names if name.split(".")[0] == "sb3_metarl"}
        found[module] = imported
    return found


def test_every_room_has_a_floor():
    rooms = {_room(module) for module in _imports()}
    assert rooms == set(FLOORS), f"rooms without a floor: {sorted(rooms - set(FLOORS))}; gone: {sorted(set(FLOORS) - rooms)}"


def test_imports_only_run_down_or_stay_in_their_room():
    upward = []
    for module, imported in _imports().items():
        room = _room(module)
        for name, line in imported:
            target = _room(name)
            if target != room and _floor(name) >= _floor(module):
                upward.append(f"{module}:{line} imports {name} ({room} on floor {_floor(module)}, {target} on {_floor(name)})")
    assert not upward, "\n".join(sorted(upward))


def test_no_import_cycle_between_modules():
    graph = {module: {name for name, _ in imported} for module, imported in _imports().items()}
    # a package import also runs its __init__: `import sb3_metarl.a.b` depends on sb3_metarl.a
    for module, targets in graph.items():
        graph[module] = {t for target in targets for t in _with_parents(target) if t in graph and t != module}
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if target.startswith(module + ".") or module.startswith(target + "."):
                continue  # a package and its own modules (its __init__ re-exports them)
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(target) :], target]))
            if target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def _with_parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(2, len(parts) + 1)]


def test_the_retired_import_paths_are_gone_and_only_the_stored_zips_pickle_paths_remain():
    import importlib

    import pytest

    for old in ("sb3_metarl.diagnostics", "sb3_metarl.exact", "sb3_metarl.opponent_shaping", "sb3_metarl.meta_gradient_rl",
                "sb3_metarl.common.vec_env", "sb3_metarl.meta_pg.deprecated"):  # fmt: skip
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(old)
    from sb3_metarl import MetaPolicyGradient

    assert not hasattr(MetaPolicyGradient, "resolved_inner_lr") and not hasattr(MetaPolicyGradient, "meta_updater")
    # the 0.1.0 zips of tests/data pickle their meta-optimizers by the old class names, in these modules
    from sb3_metarl.meta_optimizers import gradient_ascent, ppo, trpo

    assert ppo.PPO is ppo.ProMP and trpo.TRPO is trpo.TrustRegion and gradient_ascent.Adam is gradient_ascent.AdamAscent