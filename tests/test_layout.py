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
