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


def _type_checking_only(tree: ast.Module) -> set[int]:
    """:return: the ids of the nodes inside ``if TYPE_CHECKING:`` blocks (imports for the type checker, never run)"""
    nodes = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            nodes |= {id(child) for statement in node.body for child in ast.walk(statement)}
    return nodes


def _imports(at_run_time: bool = False) -> dict[str, set[tuple[str, int]]]:
    """
    :param at_run_time: leave out the imports of ``if TYPE_CHECKING:`` blocks
    :return: module -> the package modules it imports (anywhere in its body, lazily too), with the line
    """
    found = {}
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(("sb3_metarl", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
        imported = set()
        tree = ast.parse(path.read_text(), str(path))
        skipped = _type_checking_only(tree) if at_run_time else set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
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
    # (a type annotation's import under TYPE_CHECKING may point back: e.g. a room's helper typed by the class above it)
    graph = {module: {name for name, _ in imported} for module, imported in _imports(at_run_time=True).items()}
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

#: modules whose functions take a ``MetaPolicyGradient`` as ``model``: they read its state and call its methods
MODEL_HELPERS = ["meta_pg/sampling.py", "meta_pg/evaluation.py", "meta_pg/inner_lr.py", "meta_pg/reuse.py",
                 "meta_pg/streams.py", "meta_pg/metaworld.py", "estimators/study.py", "estimators/exact.py"]  # fmt: skip


def _written_roots(target: ast.expr) -> list[ast.Attribute]:
    """:return: the attribute assignments in an assignment target (tuples unpacked)"""
    if isinstance(target, (ast.Tuple, ast.List)):
        return [found for element in target.elts for found in _written_roots(element)]
    return [target] if isinstance(target, ast.Attribute) else []


def _root_name(node: ast.expr) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def test_no_helper_writes_the_model_s_state():
    # the model's state belongs to it and to its typed components (RunStreams, InnerSampleReuse, the calibrated
    # InnerStepSize it assigns itself): a helper given the model returns values, it does not set the model's attributes
    writes = []
    for relative in MODEL_HELPERS:
        path = PACKAGE / relative
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                targets = [node.target]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("setattr", "delattr"):
                if node.args and _root_name(node.args[0]) == "model":
                    writes.append(f"{relative}:{node.lineno} {node.func.id}(model, ...)")
            for target in targets:
                for attribute in _written_roots(target):
                    if _root_name(attribute) == "model":
                        writes.append(f"{relative}:{node.lineno} {ast.unparse(attribute)} = ...")
    assert not writes, "\n".join(writes)
