"""The package layout holds: a pure core, layers that import only downwards, small modules, and
a wheel that carries its migrations (README, "Design in a page": the package map)."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KEEPER = ROOT / "keeper"

#: Each package's layer: a module may import from its own layer and those below, never above.
#: config, log, crypto and metrics share a layer (none imports another; metrics is low so the
#: WeChat client can count its calls); avatars sits below sweep because a sweep runs the
#: avatar pass; observe (the database's metrics, the forecast) reads the store beside it.
LAYERS: dict[str, int] = {
    "errors": 0,
    "core": 1,
    "config": 2, "log": 2, "crypto": 2, "metrics": 2,
    "wechat": 3,
    "store": 4,
    "avatars": 5, "events": 5, "observe": 5,
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
MAX_LINES = 300
MAY_BE_LONGER = {"keeper/cli/main.py"}  # the command line's main: every command's wiring


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
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


def test_every_package_has_a_layer() -> None:
    packages = {package_of(module_name(p)) for p in sources()} - {None}
    assert {p.split(".")[0] for p in packages if p} <= set(LAYERS)


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


def test_no_module_is_longer_than_about_300_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for p in sources()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert set(long) <= MAY_BE_LONGER, long


@pytest.mark.timeout(300)
def test_the_wheel_carries_the_migrations_and_upgrades_a_database(tmp_path: Path) -> None:
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
         "-w", str(wheels), str(ROOT)], capture_output=True, text=True, check=False)
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob("keeper-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
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
