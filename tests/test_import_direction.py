"""Imports point one way: hil.cli → hil.jobs → the rest of hil → calibration, sim, drivers.

Read from the source with `ast`, function-level imports included, so a lazy import inside a
function cannot hide a cycle.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("hil", "calibration", "sim", "drivers")

# importer's package → packages (top-level) it must not import
FORBIDDEN = {
    "drivers": {"hil", "calibration", "sim"},
    "calibration": {"hil", "sim"},
    "sim": {"hil", "calibration"},
}


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path) -> set[str]:
    """Every module a file imports, absolute, relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = module_name(path, root).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package[: len(package) - node.level + 1], *filter(None, [base])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def violations(root: Path) -> list[str]:
    bad = []
    for top in PACKAGES:
        for path in sorted((root / top).rglob("*.py")):
            importer = module_name(path, root)
            broken: dict[str, str] = {}  # rule → first import that breaks it
            for target in sorted(imports_of(path, root)):
                for why in _rules(importer, target):
                    broken.setdefault(why, target)
            bad += [f"{importer} imports {target}: {why}" for why, target in broken.items()]
    return bad


def _rules(importer: str, target: str) -> list[str]:
    top, head = importer.split(".")[0], target.split(".")[0]
    broken = []
    if head in FORBIDDEN.get(top, ()):
        broken.append(f"{top} may not import {head}")
    inside = lambda room: target == room or target.startswith(room + ".")  # noqa: E731
    entry = ("hil.__main__", "hil.entry")  # the console script and `python -m hil`
    if inside("hil.cli") and not (importer.startswith("hil.cli") or importer in entry):
        broken.append("nothing outside hil.cli imports the command line")
    if inside("hil.jobs") and not importer.startswith(("hil.cli", "hil.jobs")):
        broken.append("only the command line and other jobs call jobs")
    return broken


def test_the_tree_imports_one_way():
    assert violations(ROOT) == []


@pytest.mark.parametrize(
    ("where", "line", "rule"),
    [
        ("calibration/geometry_extra.py", "import hil\n", "calibration may not import hil"),
        (
            "calibration/x.py",
            "def f():\n    from sim import world\n",
            "calibration may not import sim",
        ),
        ("sim/x.py", "from calibration import calfile\n", "sim may not import calibration"),
        ("drivers/x.py", "import sim.world\n", "drivers may not import sim"),
        ("hil/data/x.py", "from hil.jobs import capture\n", "only the command line"),
        ("hil/jobs/x.py", "from hil.cli import common\n", "nothing outside hil.cli"),
        ("hil/jobs/x.py", "from ..cli import common\n", "nothing outside hil.cli"),
    ],
)
def test_an_import_against_the_direction_is_found(tmp_path, where, line, rule):
    for top in PACKAGES:
        (tmp_path / top).mkdir()
        (tmp_path / top / "__init__.py").write_text("")
    target = tmp_path / where
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(line)
    found = violations(tmp_path)
    assert len(found) == 1 and rule in found[0], found
