"""The architecture rules that keep the two stages apart (STYLE.md, 'For this project' 1-2)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("store", "teacher_dump", "student_train")


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
    for name in ("cli.py", "pyproject.toml", "README.md"):
        assert (ROOT / name).is_file(), name


# ---- distilpose/ grouped by role (the tree reads as the architecture) --------------------------

SHARED = ROOT / "distilpose"
# One subpackage per role, and the few small helpers every role uses, at the top of distilpose/.
ROLES = {"models", "data", "training", "evaluation", "inference", "viz", "weights"}
HELPERS = {"device", "errors", "geometry", "io", "limits", "progress"}


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
    for path in source_files(*PACKAGES, "cli.py", "benchmarks", "docs"):
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
