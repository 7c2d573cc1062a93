"""The architecture rules that keep the two stages apart (STYLE.md, 'For this project' 1-2)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("store", "teacher_dump", "student_train")
# Modules at the top beside the packages: the command line and the demo, which call both stages.
TOP_MODULES = ("cli", "cli_support", "cli_viz", "demo")


def imported_packages(package: str) -> dict[str, set[str]]:
    """Map each module file of `package` to the top-level packages it imports."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        names: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


def test_shared_package_imports_no_stage():
    for module, names in imported_packages("distilpose").items():
        assert not names & set(STAGES), f"{module} imports a stage: {names & set(STAGES)}"


def test_stages_meet_only_through_the_store():
    for module, names in imported_packages("teacher_dump").items():
        assert "student_train" not in names, module
    for module, names in imported_packages("student_train").items():
        assert "teacher_dump" not in names, module
    for module, names in imported_packages("store").items():
        assert not names & {"teacher_dump", "student_train"}, module


def test_top_level_layout():
    for name in ("teacher_dump", "store", "student_train", "distilpose", "tests", "benchmarks"):
        assert (ROOT / name).is_dir(), name
    for name in (*(f"{m}.py" for m in TOP_MODULES), "pyproject.toml", "README.md"):
        assert (ROOT / name).is_file(), name
    stray = {p.stem for p in ROOT.glob("*.py")} - set(TOP_MODULES)
    assert not stray, f"top-level modules not in TOP_MODULES: {stray}"


def test_no_package_imports_the_top_level_modules():
    """The command line and the demo sit on top: no package (shared code or stage) needs them."""
    for package in ("distilpose", *STAGES):
        for module, names in imported_packages(package).items():
            assert not names & set(TOP_MODULES), f"{module} imports {names & set(TOP_MODULES)}"


# ---- distilpose/ grouped by role (the tree reads as the architecture) --------------------------

SHARED = ROOT / "distilpose"
# One subpackage per role, and the few small helpers every role uses, at the top of distilpose/.
ROLES = {"models", "data", "training", "evaluation", "inference", "viz", "weights"}
HELPERS = {"cluster", "device", "errors", "geometry", "io", "limits", "progress"}


def distilpose_imports(path: Path) -> set[str]:
    """The parts of distilpose/ (a role or a helper) that one file imports, anywhere in it."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            dotted = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            dotted = [node.module]
            if node.module == "distilpose":
                dotted = [f"distilpose.{alias.name}" for alias in node.names]
        else:
            continue
        names.update(d.split(".")[1] for d in dotted if d.startswith("distilpose."))
    return names


def test_shared_package_is_grouped_by_role():
    modules = {path.stem for path in SHARED.glob("*.py")} - {"__init__"}
    assert modules <= HELPERS, f"flat modules in distilpose/: {modules - HELPERS}"
    packages = {path.parent.name for path in SHARED.glob("*/__init__.py")}
    assert packages <= ROLES, f"unknown roles in distilpose/: {packages - ROLES}"
    stray = {p.parent.name for p in SHARED.glob("*/*.py")} - packages
    assert not stray, f"folders of modules without __init__.py: {stray}"


def test_roles_are_layered():
    """Helpers import only helpers; data no other role; models at most data; evaluation's pure
    metrics at most data (inference scores through them); using a model (inference) does not
    need the trainer; the trainer draws nothing (the stages pass it a drawing hook)."""
    allowed = {
        **{name: HELPERS for name in HELPERS},
        "data": HELPERS | {"data"},
        "models": HELPERS | {"data", "models"},
        "inference": HELPERS | ROLES - {"training"},
        "evaluation": HELPERS | {"data", "evaluation"},
        "training": HELPERS | ROLES - {"viz", "inference", "evaluation"},
    }
    found = []
    for path in sorted(SHARED.rglob("*.py")):
        rel = path.relative_to(SHARED)
        part = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        if part in allowed and (extra := distilpose_imports(path) - allowed[part]):
            found.append(f"distilpose/{rel} imports {sorted(extra)}")
    assert not found, found


# ---- each fact once (issue: one geometry, one home for each helper) ---------------------------

PACKAGES = ("distilpose", *STAGES)
REGISTRY_NAMES = {"MODEL_NAMES", "build_model", "create_model", "model_config"}
# The paper's crop size is written once, as the geometry's default; builders read it from there.
PAPER_SIZE_HOMES = {"distilpose/geometry.py", "distilpose/models/registry.py"}


def source_files(*roots: str) -> list[Path]:
    files: list[Path] = []
    for root in roots:
        path = ROOT / root
        files += [path] if path.is_file() else sorted(path.rglob("*.py"))
    return files


def nodes_outside_the_size_homes():
    """(file, AST node) of every node in non-test code outside PAPER_SIZE_HOMES."""
    for path in source_files(*PACKAGES, *(f"{m}.py" for m in TOP_MODULES), "benchmarks", "docs"):
        rel = str(path.relative_to(ROOT))
        if rel not in PAPER_SIZE_HOMES:
            for node in ast.walk(ast.parse(path.read_text(), filename=rel)):
                yield rel, node


def test_no_paper_size_literal_outside_the_geometry():
    found = []
    for rel, node in nodes_outside_the_size_homes():
        if isinstance(node, ast.Tuple | ast.List) and len(node.elts) == 2:
            values = [getattr(e, "value", None) for e in node.elts]
            if values == [192, 256]:
                found.append(f"{rel}:{node.lineno}")
    assert not found, f"(192, 256) written outside distilpose/geometry.py: {found}"


# Crop and heatmap sizes of the built-in models, either way round: written only where the
# builders' defaults live (the geometry's default, the registry's tiny/demo configs).
MODEL_SIZES = {(192, 256), (48, 64), (96, 128), (24, 32)}
MODEL_SIZES |= {(h, w) for w, h in MODEL_SIZES}
SIZE_NAMES = {"input_size", "heatmap_size", "patch_size", "patch_grid"}


def test_no_size_literal_outside_the_builders_defaults():
    """No model size as neighbouring ints of a tuple or list (`(256, 192)`, `17, 64, 48, ...`),
    and no size fallback (`getattr(config, "input_size", ...)`), outside the builders' homes."""
    found = []
    for rel, node in nodes_outside_the_size_homes():
        if isinstance(node, ast.Tuple | ast.List):
            values = [getattr(e, "value", None) for e in node.elts]
            if any(pair in MODEL_SIZES for pair in zip(values, values[1:], strict=False)):
                found.append(f"{rel}:{node.lineno} {values}")
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "id", None) == "getattr"
            and len(node.args) == 3
            and getattr(node.args[1], "value", None) in SIZE_NAMES
        ):
            found.append(f"{rel}:{node.lineno} getattr(..., {node.args[1].value!r}, ...)")
    assert not found, f"model sizes written outside the geometry and the registry: {found}"


def test_registry_is_imported_at_module_top():
    found = []
    for path in source_files(*PACKAGES):
        rel = str(path.relative_to(ROOT))
        for func in ast.walk(ast.parse(path.read_text(), filename=rel)):
            if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(func):
                if not isinstance(node, ast.ImportFrom) or not node.module:
                    continue
                names = {alias.name for alias in node.names}
                if node.module == "distilpose.models.registry" or (
                    node.module == "distilpose.models" and names & REGISTRY_NAMES
                ):
                    found.append(f"{rel}:{node.lineno}")
    assert not found, f"function-local imports of the model registry: {found}"


# ---- no import cycles (issue 26) ---------------------------------------------------------------
# Every import counts: at module top, inside functions (lazy) and under `if TYPE_CHECKING:`. A
# lazy import still says "this module needs that one", so a cycle through it is still a cycle.

GRAPH_ROOTS = ("distilpose", *STAGES, "benchmarks", *(f"{m}.py" for m in TOP_MODULES))


def module_name(path: Path, root: Path) -> str:
    """distilpose/models/registry.py -> "distilpose.models.registry"; a package's __init__.py is
    the package itself."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, name: str, modules: set[str]) -> set[str]:
    """The project modules one file imports: absolute and relative imports, `from pkg import
    mod` as the module `pkg.mod`, a name from a package (`from pkg import f`) as `pkg`."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = name.split(".") if is_package else name.split(".")[:-1]
                here = here[: len(here) - (node.level - 1)]
                base = ".".join([*here, *([node.module] if node.module else [])])
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of a name inside a.b
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: Path, roots: tuple[str, ...]) -> dict[str, set[str]]:
    """{module: the project modules it imports} over every .py file under `roots`."""
    paths = {module_name(p, root): p for p in source_files_in(root, roots)}
    return {name: imported_modules(p, name, set(paths)) for name, p in paths.items()}


def source_files_in(root: Path, roots: tuple[str, ...]) -> list[Path]:
    files: list[Path] = []
    for r in roots:
        path = root / r
        files += [path] if path.is_file() else sorted(path.rglob("*.py"))
    return files


def package_of(module: str) -> str:
    """The package level: a subpackage of distilpose/ (`distilpose.models`) or a top-level one
    (`store`); the helpers at the top of distilpose/ (`distilpose.io`) and cli.py are modules of no
    subpackage and stand for themselves; `distilpose` is its __init__ (the lazy `Inferencer`)."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "distilpose" else parts[0]


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        here = package_of(module)
        packages.setdefault(here, set()).update(package_of(t) for t in targets)
        packages[here].discard(here)
    return packages


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a] (depth-first search), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_import_cycle_between_modules():
    graph = import_graph(ROOT, GRAPH_ROOTS)
    assert len(graph) > 60 and "distilpose.models.registry" in graph  # the whole tree was read
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_import_cycle_between_packages():
    packages = package_graph(import_graph(ROOT, GRAPH_ROOTS))
    assert {"distilpose.inference", "distilpose.evaluation", "store", "cli"} <= set(packages)
    cycle = find_cycle(packages)
    assert cycle is None, "import cycle between packages: " + " -> ".join(cycle or [])


def test_cycle_finder_sees_lazy_and_relative_imports(tmp_path):
    """The graph counts a function-local relative import: a.x -> a.y -> (lazily) a.x is a cycle,
    and so is the package loop a.x -> b.z -> a.y."""
    for rel, text in {
        "a/__init__.py": "",
        "a/x.py": "from a import y\n",
        "a/y.py": "def f():\n    from . import x\n",
        "b/__init__.py": "",
        "b/z.py": "import a.y\n",
    }.items():
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_text(text)
    graph = import_graph(tmp_path, ("a", "b"))
    assert find_cycle(graph) == ["a.x", "a.y", "a.x"]
    graph["a.y"] = {"b.z"}
    graph["b.z"] = {"a.x"}
    assert find_cycle(graph) == ["a.x", "a.y", "b.z", "a.x"]
    assert find_cycle(package_graph(graph)) == ["a", "b", "a"]
    assert find_cycle({"a.x": {"a.y"}, "a.y": set()}) is None
