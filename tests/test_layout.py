"""The package layout holds: a pure core, layers that import only downwards, no import circle
inside a package, no module reaching into another's private names, and a wheel that is the
product alone and carries its migrations (docs/explanation/design.md: the package map)."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KEEPER = ROOT / "keeper"

#: Each package's layer: a module may import from its own layer and those below, never above.
#: config, log, crypto and metrics share a layer (none imports another; metrics is low so the
#: WeChat client can count its calls); avatars sits below sweep because a sweep runs the
#: avatar pass; observe (the database's metrics, the forecast) reads the store beside it.
LAYERS: dict[str, int] = {
    "errors": 0, "clock": 0, "loop": 0,
    "core": 1,
    "config": 2, "log": 2, "crypto": 2, "metrics": 2,
    "wechat": 3,
    "store": 4,
    "avatars": 5, "events": 5, "observe": 5, "limiter": 5,
    "sweep": 6,
    "service": 7,
    "api": 8,
    "cli": 9,
    "__main__": 10,
}
#: The simulator ships in keeper.wechat but imitates WeChat: it imports only keeper's errors,
#: its pure core and itself (sharing the client's code would make it agree with the client).
SIMULATOR = "wechat.simulator"
SIMULATOR_MAY_IMPORT = {"errors", "core", SIMULATOR}
IO_LIBRARIES = ("requests", "sqlalchemy", "apscheduler", "psycopg")


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_of(module: str) -> str | None:
    """``keeper.store.db`` -> ``store``; ``keeper.wechat.simulator.x`` -> ``wechat.simulator``;
    ``keeper`` itself (its ``__version__``) -> None: anyone may import it."""
    parts = module.split(".")[1:]
    if not parts:
        return None
    if parts[:2] == ["wechat", "simulator"]:
        return SIMULATOR
    return parts[0]


def rank(package: str) -> int:
    return LAYERS[package.split(".")[0]]


def keeper_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every keeper import in the file, function-level ones included."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "keeper"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "keeper":  # from keeper import X: X may be a module
                found += [(node.lineno, f"keeper.{a.name}") for a in node.names
                          if (KEEPER / a.name).exists() or (KEEPER / f"{a.name}.py").exists()]
                found += [(node.lineno, "keeper") for a in node.names if a.name == "__version__"]
            elif node.module.split(".")[0] == "keeper":
                found.append((node.lineno, node.module))
    return found


def sources() -> list[Path]:
    return sorted(KEEPER.rglob("*.py"))


#: The trees whose modules must form no circle and import no private name: the product and the
#: benchmarks (tests may import private names: they check them).
CHECKED_TREES = ("keeper", "bench")


@dataclass(frozen=True)
class Imported:
    """One name a module takes from a module of the tree (``name`` None: the module itself)."""

    line: int
    module: str
    name: str | None


def tree_modules(root: Path, top: str) -> dict[str, Path]:
    """Every module of the tree ``root/top``, by dotted name."""
    return {module_name(p, root): p for p in sorted((root / top).rglob("*.py"))}


def imported(path: Path, module: str, modules: Mapping[str, Path]) -> list[Imported]:
    """What ``module`` (at ``path``) imports from ``modules``: at any depth, under
    ``TYPE_CHECKING`` too, relative imports resolved. ``from pkg import mod`` names the module
    ``pkg.mod``; ``from mod import name`` names ``name`` in ``mod``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Imported] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [Imported(node.lineno, a.name, None) for a in node.names if a.name in modules]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*parts, base] if base else parts)
            for a in node.names:
                if f"{base}.{a.name}" in modules:
                    found.append(Imported(node.lineno, f"{base}.{a.name}", None))
                elif base in modules:
                    found.append(Imported(node.lineno, base, a.name))
    return found


def import_graph(root: Path, top: str) -> dict[str, set[str]]:
    """module -> the modules of the same tree it imports."""
    modules = tree_modules(root, top)
    return {m: {i.module for i in imported(p, m, modules)} - {m} for m, p in modules.items()}


def circles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The import circles among modules of one package (same parent): strongly connected
    components of more than one module, found by Tarjan's algorithm."""
    def parent(m: str) -> str:
        return m.rpartition(".")[0]

    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in graph or parent(w) != parent(v):
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = [stack.pop()]
            while component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def private_imports(root: Path, top: str) -> list[str]:
    """Where a module of the tree imports another module's ``_private`` name, or reads one
    through a module it imported (``import keeper.x as x; x._y``)."""
    modules = tree_modules(root, top)
    offending = []
    for m, path in modules.items():
        found = imported(path, m, modules)
        where = f"{path.relative_to(root)}"
        offending += [f"{where}:{i.line} imports {i.module}.{i.name}" for i in found
                      if i.name and i.name.startswith("_") and not i.name.startswith("__")
                      and i.module != m]
        aliases = {}
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                aliases.update({a.asname: a.name for a in node.names
                                if a.asname and a.name in modules})
            elif isinstance(node, ast.ImportFrom):
                aliases.update({a.asname or a.name: i.module for a in node.names for i in found
                                if i.line == node.lineno and i.name is None
                                and i.module.endswith(f".{a.name}")})
        offending += [f"{where}:{n.lineno} reads {aliases[n.value.id]}.{n.attr}"
                      for n in ast.walk(ast.parse(path.read_text()))
                      if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                      and n.value.id in aliases and aliases[n.value.id] != m
                      and n.attr.startswith("_") and not n.attr.startswith("__")]
    return offending


@pytest.mark.parametrize("top", CHECKED_TREES)
def test_no_import_circle_inside_a_package(top: str) -> None:
    assert circles(import_graph(ROOT, top)) == []


@pytest.mark.parametrize("top", CHECKED_TREES)
def test_no_module_imports_another_modules_private_name(top: str) -> None:
    assert private_imports(ROOT, top) == []


def _write_tree(root: Path, files: Mapping[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_the_circle_check_finds_a_circle_through_a_type_checking_import(tmp_path: Path) -> None:
    _write_tree(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg.b import B\n",
        "pkg/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import c\n",
        "pkg/c.py": "def f() -> None:\n    from pkg import a\n",
        "pkg/d.py": "import pkg.a\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/e.py": "from pkg.d import x\n",
    })
    assert circles(import_graph(tmp_path, "pkg")) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_the_private_check_finds_a_private_name_imported_or_read(tmp_path: Path) -> None:
    _write_tree(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "_X = 1\nY = _X\n",
        "pkg/b.py": "from pkg.a import _X, Y\n",
        "pkg/c.py": "from pkg import a\nZ = a._X + a.Y\n",
        "pkg/d.py": "from .a import __doc__, Y\n",
    })
    assert private_imports(tmp_path, "pkg") == [
        "pkg/b.py:1 imports pkg.a._X", "pkg/c.py:2 reads pkg.a._X"]


def test_every_package_has_a_layer() -> None:
    packages = {package_of(module_name(p)) for p in sources()} - {None}
    assert {p.split(".")[0] for p in packages if p} <= set(LAYERS)


@pytest.mark.e2e
def test_the_core_imports_no_io_library() -> None:
    modules = sorted(module_name(p) for p in (KEEPER / "core").rglob("*.py"))
    code = (f"import sys\nfor m in {modules!r}: __import__(m)\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {IO_LIBRARIES!r}))")
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=False)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "[]"
    assert "keeper.core.models" in modules and "keeper.core.policy" in modules


def test_no_package_imports_one_above_it() -> None:
    offending = []
    for path in sources():
        here = package_of(module_name(path))
        if here is None:
            continue
        for line, module in keeper_imports(path):
            there = package_of(module)
            if there is None or there == here:
                continue
            if here == SIMULATOR:
                allowed = there in SIMULATOR_MAY_IMPORT
            elif here.split(".")[0] == "core":
                allowed = there == "errors"
            elif there == SIMULATOR:
                allowed = here == "cli"  # a test tool: only `keeper simulate`, demo and bench
            else:
                allowed = rank(there) <= rank(here)
            if not allowed:
                offending.append(f"{path.relative_to(ROOT)}:{line} ({here}) imports {module}")
    assert offending == []


def test_the_layer_check_catches_an_upward_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f() -> None:\n    from keeper.sweep.engine import Sweeper\n")
    assert keeper_imports(bad) == [(2, "keeper.sweep.engine")]
    assert rank(package_of("keeper.sweep.engine") or "") > rank("store")


@pytest.mark.timeout(300)
@pytest.mark.e2e
@pytest.mark.slow
def test_the_wheel_is_the_product_and_carries_the_migrations(tmp_path: Path) -> None:
    wheels, target, source = tmp_path / "wheels", tmp_path / "site", tmp_path / "source"
    # Built from a copy: setuptools' build/ directory in the checkout would keep files that
    # have since moved out of the package, and put them in the wheel.
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "var", "__pycache__", ".*_cache"))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
         "-w", str(wheels), str(source)], capture_output=True, text=True, check=False)
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob("keeper-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    # The wheel is the product: nothing from bench/, tests/, examples/ or contrib/.
    assert [n for n in names if not n.startswith(("keeper/", "keeper-"))] == []
    assert not any(n.startswith("keeper/") and "bench" in n for n in names)
    assert "keeper/store/migrations/env.py" in names
    assert "keeper/store/migrations/script.py.mako" in names
    assert sum(n.startswith("keeper/store/migrations/versions/0") for n in names) >= 4
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
         str(wheel)], capture_output=True, text=True, check=False)
    assert installed.returncode == 0, installed.stderr
    db_file = tmp_path / "keeper.db"
    code = (
        f"import sys; sys.path.insert(0, {str(target)!r})\n"
        "import keeper.store.db as db\n"
        f"assert db.__file__.startswith({str(target)!r}), db.__file__\n"
        f"engine = db.make_engine('sqlite:///{db_file}')\n"
        "before, after = db.upgrade(engine)\n"
        "assert after == db.head_revision(engine) is not None, (before, after)\n"
        "print(before, after)\n"
    )
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, check=False)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split()[0] == "None"


#: What no tracked file may name: the files of another checkout (a ``shared`` directory beside
#: this one, the outside contract file, the WeChat and fault-making notes kept there) and a
#: tracker's issue cited by its number. Built from parts, so that this file does not name them.
_OUTSIDE = re.compile("|".join((
    re.escape("." + "./" + "shared"),
    re.escape("CONTR" + "ACT" + ".md"),
    re.escape("wechat" + "-oauth2.md"),
    re.escape("fault" + "-injection.md"),
    r"(?i:\bissues?" + r"\s+\d+)",
    r"(?i:\bstop" + r"\s+\d+\b)",
)))


@pytest.mark.e2e  # git ls-files is a child process
def test_no_tracked_file_names_what_lies_outside_the_repository() -> None:
    """Every reason is stated here: a comment, a docstring, a test or a page says the reason
    itself, or points to a page under docs/ (docs/reference/wechat.md, docs/reference/contract.md,
    docs/explanation/faults.md), never to another checkout's files or a tracker's issue number,
    which a reader of this repository cannot open. Another project's public issue, cited with
    its repository and ``#``, is a public source and allowed."""
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the tracked files cannot be listed")
    listed = subprocess.run([git, "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    found: list[str] = []
    for name in listed.stdout.decode().split("\0"):
        path = ROOT / name
        if not name or not path.is_file():
            continue  # the separator's tail, or a tracked file deleted in this work tree
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary (the screenshots)
        for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            if _OUTSIDE.search(line):
                found.append(f"{name}:{number}: {line.strip()[:120]}")
    assert found == [], "say the reason itself, or point to a page under docs/:\n" + "\n".join(
        found)
