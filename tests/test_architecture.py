"""The house's rules, read from the code's own imports (nothing is run but the parser):

- data flows one way: `data_pipeline` and `models` never import `orchestrator`;
- Ray is imported only under `orchestrator/cluster/`;
- no import of `keras.src` or of Ray's `_internal` packages outside the one adapter module;
- no import cycle between the modules of `orchestrator/`;
- every imported third-party package is declared in pyproject.toml, and every declared one imported.
"""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("orchestrator", "models", "data_pipeline")
ADAPTER = "models/keras_adapter.py"


def sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def imports(path: Path) -> list[str]:
    """Every module `path` imports, at its top or inside a function, absolute names."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [
                f"{node.module}.{alias.name}" for alias in node.names
            ]  # `from pkg import module`
    return names


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_data_pipeline_and_models_never_import_the_orchestrator():
    found = [
        f"{relative(p)}: {name}"
        for p in sources("data_pipeline", "models")
        for name in imports(p)
        if name.split(".")[0] == "orchestrator"
    ]
    assert not found, found


def test_ray_is_imported_only_under_orchestrator_cluster():
    found = [
        f"{relative(p)}: {name}"
        for p in sources(*PACKAGES)
        for name in imports(p)
        if name.split(".")[0] == "ray" and not relative(p).startswith("orchestrator/cluster/")
    ]
    assert not found, found


def test_private_keras_and_ray_modules_only_in_the_adapter():
    private = re.compile(r"^(keras\.src(\.|$)|ray(\.\w+)*\._internal(\.|$))")
    found = [
        f"{relative(p)}: {name}"
        for p in sources(*PACKAGES, "bench", "tests")
        for name in imports(p)
        if private.match(name) and relative(p) != ADAPTER
    ]
    assert not found, found
    # and the private methods it wraps are called nowhere else
    methods = re.compile(r"\.(_symbolic_build|_flatten_layers|_create_default_callbacks)\b")
    calls = [
        relative(p)
        for p in sources(*PACKAGES, "bench")
        if relative(p) != ADAPTER and methods.search(p.read_text())
    ]
    assert not calls, calls


def test_orchestrator_is_in_rooms_of_the_data_flow():
    top = sorted(p.name for p in (ROOT / "orchestrator").glob("*.py"))
    assert top == ["__init__.py", "console.py", "lock.py", "paths.py"], top
    rooms = sorted(
        p.name for p in (ROOT / "orchestrator").iterdir() if (p / "__init__.py").is_file()
    )
    assert rooms == [
        "cli",
        "cluster",
        "config",
        "driver",
        "evaluation",
        "report",
        "serving",
        "tracking",
        "training",
    ], rooms


def import_graph() -> dict[str, set[str]]:
    """orchestrator's modules -> the orchestrator modules each imports (a package's import is its
    __init__; `from pkg import module` names the module)."""
    paths = sources("orchestrator")
    known = {module_name(p) for p in paths}
    graph = {}
    for p in paths:
        targets = set()
        for name in imports(p):
            if name in known and name != module_name(p):
                targets.add(name)
        # `from orchestrator.x import name` also yields "orchestrator.x.name": keep modules only
        graph[module_name(p)] = {
            t for t in targets if not (t.rsplit(".", 1)[0] in targets and t not in known)
        }
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of `graph`, each once (Tarjan's strongly connected components of 2+)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_in_the_orchestrator():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def distribution(name: str) -> str:
    """A requirement's distribution, normalized: "ray[tune]>=2" -> "ray", "PyYAML" -> "pyyaml"."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", name).group(0)).lower()


def imported_distributions(*folders: str) -> dict[str, str]:
    """Third-party distributions the code imports -> one file that imports it."""
    of_module = packages_distributions()
    ours = {"orchestrator", "models", "data_pipeline", "bench", "tests"}
    found = {}
    for p in sources(*folders):
        for name in imports(p):
            top = name.split(".")[0]
            if top in sys.stdlib_module_names or top in ours or top == "__future__":
                continue
            dists = of_module.get(top)
            assert dists, f"{relative(p)} imports {top}, which no installed distribution provides"
            # mlflow's modules come with mlflow-skinny too; the declared one is the one that counts
            found.setdefault(tuple(sorted(distribution(d) for d in dists)), relative(p))
    return found


def declared(*extras: str) -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = list(project["dependencies"]) + [
        r for extra in extras for r in project["optional-dependencies"][extra]
    ]
    return {distribution(r) for r in names}


def test_every_imported_package_is_declared_and_every_declared_one_imported():
    deps = declared()
    used = imported_distributions(*PACKAGES)
    undeclared = {dists: where for dists, where in used.items() if not deps & set(dists)}
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
    unused = deps - {d for dists in used for d in dists}
    assert not unused, (
        f"declared in pyproject.toml but imported by none of {PACKAGES}: {sorted(unused)}"
    )


def test_what_the_tests_import_is_declared_for_them():
    deps = declared("test")
    used = imported_distributions("tests")
    undeclared = {dists: where for dists, where in used.items() if not deps & set(dists)}
    assert not undeclared, (
        f"imported by the tests but in neither the dependencies nor the test extra: {undeclared}"
    )


def code_strings(path: Path) -> list[str]:
    """The string constants of `path`'s code: its docstrings and comments left out."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body
        ):
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
    ]


def test_the_run_records_are_spelled_by_their_owner_only():
    """The MLflow run id, the parent's record and done.json (and the run folder's other state
    files) are named in orchestrator/paths.py, and read and written through their owners
    (orchestrator/tracking/records.py, the identity and the checkpoints' cursor)."""
    records = (
        "done.json",
        "mlflow_run.json",
        "mlflow_parent.json",
        "identity.json",
        "timing.json",
        "cursor.json",
    )
    found = [
        f"{relative(p)}: {text!r}"
        for p in sources(*PACKAGES)
        if relative(p) != "orchestrator/paths.py"
        for text in code_strings(p)
        if any(name in text for name in records)
    ]
    assert not found, found


# ---------------------------------------------------------------- each stage gets its own settings

FRONT_DOOR = ("orchestrator/cli/", "orchestrator/driver/")  # they hold the whole config
MOST_WHOLE_CONFIG = 10  # the few entry points of a command beside them
MOST_LINES = 80


def functions(path: Path) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    tree = ast.parse(path.read_text(), str(path))
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def whole_config_functions(paths: list[Path]) -> list[str]:
    """`file:function` for each function with a parameter of type Config (or an untyped
    `config`): the functions that receive the whole config rather than their section."""
    found = []
    for path in paths:
        for function in functions(path):
            arguments = function.args
            for argument in [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]:
                kind = ast.unparse(argument.annotation).strip("\"'") if argument.annotation else ""
                if kind.rsplit(".", 1)[-1] == "Config" or (argument.arg == "config" and not kind):
                    where = relative(path) if path.is_relative_to(ROOT) else path.name
                    found.append(f"{where}:{function.name}")
    return found


def test_the_whole_config_stops_at_the_front_door_and_a_few_entry_points():
    below = [p for p in sources("orchestrator") if not relative(p).startswith(FRONT_DOOR)]
    found = whole_config_functions(below)
    assert len(found) <= MOST_WHOLE_CONFIG, found


def test_the_whole_config_counter_finds_one(tmp_path):
    module = tmp_path / "m.py"
    module.write_text(
        "def a(config: Config): ...\ndef b(config): ...\ndef c(cfg: 'config.Config'): ...\n"
        "def d(work: WorkPaths, config_name: str): ...\n"
    )
    found = [name.rsplit(":", 1)[1] for name in whole_config_functions([module])]
    assert found == ["a", "b", "c"]


def test_no_function_of_the_orchestrator_or_the_libraries_over_80_lines():
    long = [
        f"{relative(p)}:{f.name} ({f.end_lineno - f.lineno + 1} lines)"
        for p in sources(*PACKAGES, "bench")
        for f in functions(p)
        if f.end_lineno - f.lineno + 1 > MOST_LINES
    ]
    assert not long, long
