"""The package's floors hold: no import cycle among its modules, and none imports from a floor above its own.

Read from the source with ``ast``, not by importing: every ``from .x import y`` / ``from . import x``
(and absolute ``shortened_llm.x``) anywhere in a module counts, the ones inside functions too,
because a function-level import is how a cycle hides. The package ``__init__`` is left out: it
imports the public names of everything by design, and nothing imports it back by a relative name.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "shortened_llm"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / PACKAGE
# The modules every step builds on; they may import one another and nothing else of the package.
GROUND_FLOOR = ("errors", "registry", "dtypes", "record", "gguf_layout", "presets", "families")


def module_name(path: Path, package_dir: Path = PACKAGE_DIR) -> str:
    """``a/b.py`` -> ``"a.b"``, ``a/__init__.py`` -> ``"a"``, the package's own ``__init__.py`` -> ``""``."""
    parts = path.relative_to(package_dir).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, name: str, is_package: bool, known: set[str]) -> set[str]:
    """The modules of the package (among ``known``) that module ``name``'s ``source`` imports, anywhere in it."""
    parts = name.split(".") if name else []
    base = parts if is_package else parts[:-1]  # what a one-dot import is relative to
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)]
                target = [*anchor, *(node.module.split(".") if node.module else [])]
            elif node.module and (node.module == PACKAGE or node.module.startswith(PACKAGE + ".")):
                target = node.module.split(".")[1:]
            else:
                continue
            prefix = ".".join(target)
            # `from .x import y` imports x; `from . import x` (or `from .x import sub`) imports the module x(.sub)
            candidates = [prefix] + [".".join([*target, a.name]) for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name.split(".", 1)[1] for a in node.names if a.name.startswith(PACKAGE + ".")]
        else:
            continue
        found.update(c for c in candidates if c in known and c != name)
    return found


def package_imports(package_dir: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    """Module -> the package modules it imports, for every module but the package ``__init__``."""
    files = {module_name(f, package_dir): f for f in package_dir.rglob("*.py")}
    known = set(files) - {""}
    return {name: imported_modules(f.read_text(encoding="utf-8"), name, f.name == "__init__.py", known)
            for name, f in files.items() if name}


def import_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module: each a set of modules that import each other.

    Two modules are in one component when each reaches the other along the edges; with a few
    dozen modules, a reachability walk from each is plenty.
    """
    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in edges.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    reach = {m: reachable(m) for m in edges}
    cycles, placed = [], set()
    for m in sorted(edges):
        if m in placed:
            continue
        component = sorted({m} | {n for n in reach[m] if m in reach.get(n, ())})
        placed.update(component)
        if len(component) > 1:
            cycles.append(component)
    return cycles


# ---- the checker itself can fail ----------------------------------------------------------------

def test_a_synthetic_cycle_is_found_and_named():
    assert import_cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b"]]
    # a three-module loop through a function-level import, beside modules that only lean on it
    edges = {"models": {"prune"}, "prune": {"importance"}, "importance": {"models", "errors"},
             "errors": set(), "cli": {"models", "errors"}}
    assert import_cycles(edges) == [["importance", "models", "prune"]]
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_function_level_and_every_relative_form_count():
    source = (
        "from .errors import unknown_name\n"
        "from . import subblock\n"
        "import shortened_llm.record\n"
        "def load():\n"
        "    from .models import load_model\n"
        "    from ..outside import x\n"
        "    from .reference import TABLES\n"
        "import json\n"
    )
    known = {"errors", "subblock", "record", "models", "reference", "prune"}
    assert imported_modules(source, "prune", False, known) == {"errors", "subblock", "record", "models", "reference"}
    # in a subpackage's __init__, one dot is the subpackage itself, two dots the package
    assert imported_modules("from ..errors import x\nfrom .tables import y\n", "reference", True,
                            {"errors", "reference.tables"}) == {"errors", "reference.tables"}


def test_the_walker_sees_the_package():
    edges = package_imports()
    assert {"export", "llamacpp", "models", "cli"} <= set(edges) and "" not in edges
    assert "llamacpp" in edges["export"] and "gguf_layout" in edges["llamacpp"]
    assert "models" in edges["imatrix"]  # imported inside a function only


# ---- the package ----------------------------------------------------------------------------------

def test_no_import_cycle_in_the_package():
    cycles = import_cycles(package_imports())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("module", GROUND_FLOOR)
def test_the_ground_floor_imports_nothing_above_it(module):
    edges = package_imports()
    assert module in edges, f"{PACKAGE}/{module}.py is missing"
    above = sorted(edges[module] - set(GROUND_FLOOR))
    assert not above, f"{module} is on the ground floor but imports {', '.join(above)}"


def test_the_core_never_imports_a_lesson():
    """``lessons`` (explorers, claims, grids, figures) is what only the notebooks use: it builds on the core, never under it."""
    edges = package_imports()
    assert any(m.startswith("lessons.") for m in edges)
    leaning = {m: sorted(t for t in to if t.startswith("lessons")) for m, to in edges.items() if not m.startswith("lessons")}
    leaning = {m: t for m, t in leaning.items() if t}
    assert not leaning, f"core modules import lessons: {leaning}"


# ---- the floors table of CONTRIBUTING.md ---------------------------------------------------------

CONTRIBUTING = PACKAGE_DIR.parent / "CONTRIBUTING.md"
# subpackages of data, not code: what they hold is read by the module that owns them
DATA_PACKAGES = ("configs", "tasks", "reference.")


def floors_table(text: str) -> dict[str, int]:
    """Module -> floor, read from the rows ``| N. name | `a`, `b` | ... |`` of the floors table; the
    ``lessons`` row is one floor above the top one."""
    import re

    floors: dict[str, int] = {}
    rows = [(int(m[1]), m[2]) for m in re.finditer(r"^\| (\d+)\. [^|]+\| ([^|]+)\|", text, re.M)]
    top = max(n for n, _ in rows) if rows else 0
    lessons = re.search(r"^\| lessons \| `lessons/`: ([^|]+)\|", text, re.M)
    rows += [(top + 1, lessons[1].replace("`", "`lessons.").replace("`lessons.,", "`,"))] if lessons else []
    for floor, cell in rows:
        for module in re.findall(r"`([a-z_.]+)`", cell):
            assert module not in floors, f"{module} is on two floors of CONTRIBUTING.md"
            floors[module] = floor
    return floors


def test_the_floors_table_reads_its_rows():
    text = ("| 0. ground | `errors`, `dtypes` | x |\n| 1. data | `models` | y (`not_a_module` in the prose) |\n"
            "| lessons | `lessons/`: `plots`, `claims` | z |\n")
    assert floors_table(text) == {"errors": 0, "dtypes": 0, "models": 1, "lessons.plots": 2, "lessons.claims": 2}


def test_every_module_is_on_one_floor_and_imports_nothing_above_it():
    floors = floors_table(CONTRIBUTING.read_text(encoding="utf-8"))
    edges = package_imports()
    modules = {m for m in edges if m not in ("__main__", "lessons") and not m.startswith(DATA_PACKAGES)}
    assert not modules - set(floors), f"not on the floors table of CONTRIBUTING.md: {sorted(modules - set(floors))}"
    assert not set(floors) - set(edges), f"on the table but not in the package: {sorted(set(floors) - set(edges))}"
    above = {m: sorted(f"{t} ({floors[t]})" for t in edges[m] if floors.get(t, -1) > floors[m]) for m in modules}
    above = {f"{m} ({floors[m]})": t for m, t in above.items() if t}
    assert not above, f"modules importing from a floor above their own: {above}"
