"""The layout README's "How it works" describes, held by the source itself: every module is
in the table, the daemon side never loads the push driver, multipart works with what the
uploader lends it (no import of transfer, no reach into its private fields), and the
uploader is built by the composition root alone. Read with `ast`, nothing is imported."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "asyncsync"
README = ROOT / "README.md"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def module_path(name: str) -> Path | None:
    """The file of module ``name`` of the package, or None (outside it, or not a module)."""
    if name != "asyncsync" and not name.startswith("asyncsync."):
        return None
    base = PACKAGE.parent.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@cache
def tree_of(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def package_modules() -> set[str]:
    return {module_name(path) for path in PACKAGE.rglob("*.py")
            if path.name not in ("__init__.py", "__main__.py")}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.Module, *, eager: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement; ``eager``: only those that run when the module is imported
    (not inside a function, not under TYPE_CHECKING)."""
    if not eager:
        yield from (node for node in ast.walk(tree)
                    if isinstance(node, ast.Import | ast.ImportFrom))
        return
    todo: list[ast.stmt] = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If):
            todo += node.orelse if _is_type_checking(node.test) else node.body + node.orelse
        elif isinstance(node, ast.Try | ast.TryStar):
            todo += node.body + node.orelse + node.finalbody
            todo += [stmt for handler in node.handlers for stmt in handler.body]
        elif isinstance(node, ast.With | ast.ClassDef):
            todo += node.body


@cache
def direct_imports(path: Path, *, eager: bool = False) -> frozenset[str]:
    """The package's modules that ``path`` imports: anywhere in it (at the top, inside a
    function, under TYPE_CHECKING), or with ``eager`` only on import. ``from .x import y``
    counts ``x.y`` when that is a module, and importing a module loads every package above
    it."""
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found: set[str] = set()
    for node in _import_nodes(tree_of(path), eager=eager):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            names = [target, *(f"{target}.{alias.name}" for alias in node.names)]
        for name in names:
            parts = name.split(".")
            for end in range(1, len(parts) + 1):
                prefix = ".".join(parts[:end])
                if module_path(prefix) is not None:
                    found.add(prefix)
    found.discard(this)
    return frozenset(found)


def imported_by(name: str, *, eager: bool = False) -> set[str]:
    """Every module of the package that importing ``name`` may load (``eager``: loads
    there and then), itself included."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        path = module_path(current)
        assert path is not None, current
        todo.extend(direct_imports(path, eager=eager) - seen)
    return seen


def readme_table_modules() -> list[str]:
    """The module names the "How it works" table lists (first column, `path.py` cells)."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## How it works\n", 1)[1].split("\n## ", 1)[0]
    listed: list[str] = []
    for line in section.splitlines():
        if not line.startswith("| "):
            continue
        first_cell = line.split("|")[1]
        listed += re.findall(r"`([\w/]+)\.py`", first_cell)
    return [name.replace("/", ".") for name in listed]


def test_the_readme_table_lists_every_module_once() -> None:
    listed = readme_table_modules()
    duplicates = sorted({name for name in listed if listed.count(name) > 1})
    assert not duplicates, f"listed twice in README's table: {duplicates}"
    in_table = {f"asyncsync.{name}" for name in listed}
    in_source = package_modules()
    assert not in_source - in_table, "missing from README's table: " + ", ".join(
        sorted(in_source - in_table))
    assert not in_table - in_source, "in README's table but not in src/: " + ", ".join(
        sorted(in_table - in_source))


def test_the_import_walk_resolves_relative_and_lazy_imports() -> None:
    """The walk the tests below trust: it finds what the CLI imports at the top, lazily in a
    function, and what `from . import x` names; the eager walk leaves out the lazy ones and
    those under TYPE_CHECKING."""
    cli = PACKAGE / "cli.py"
    assert "asyncsync.options" in direct_imports(cli, eager=True)  # at the top
    assert "asyncsync.commands.push" in direct_imports(cli)  # inside a function
    assert "asyncsync.commands.push" not in direct_imports(cli, eager=True)
    assert "asyncsync.commands" in direct_imports(cli)  # the package above it is loaded too
    assert "asyncsync.commands.push" in imported_by("asyncsync.cli")
    config = PACKAGE / "config.py"  # options.py under TYPE_CHECKING
    assert "asyncsync.options" in direct_imports(config)
    assert "asyncsync.options" not in direct_imports(config, eager=True)


@pytest.mark.parametrize("module", [
    "asyncsync.commands.record", "asyncsync.commands.run", "asyncsync.commands.watch",
    "asyncsync.integrations.runsync",
])
def test_the_daemon_side_never_loads_the_push_driver(module: str) -> None:
    """watch, run, the run record and attach() get their stages from the composition root,
    not from push: nothing they import, however deep or lazily, is commands/push.py."""
    assert module_path(module) is not None
    assert "asyncsync.commands.push" not in imported_by(module)


def test_multipart_does_not_import_transfer() -> None:
    """transfer imports multipart; the way back, even for a type, would be a cycle."""
    transfer, multipart = "asyncsync.pipeline.transfer", "asyncsync.pipeline.multipart"
    assert multipart in direct_imports(PACKAGE / "pipeline" / "transfer.py", eager=True)
    assert transfer not in direct_imports(PACKAGE / "pipeline" / "multipart.py")
    assert transfer not in imported_by(multipart, eager=True)


def foreign_private_attributes(tree: ast.Module) -> list[str]:
    """``x._name`` where x is anything but ``self`` or ``cls``: a private field of another
    object (``self.up._budget`` included)."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        private = node.attr.startswith("_") and not node.attr.startswith("__")
        own = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
        if private and not own:
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


@pytest.mark.parametrize("name", ["multipart.py", "transfer.py"])
def test_no_private_field_of_another_object_is_read(name: str) -> None:
    assert foreign_private_attributes(tree_of(PACKAGE / "pipeline" / name)) == []


def test_the_private_field_check_sees_a_reach_into_another_object() -> None:
    tree = ast.parse("self.up._budget.release(grant)\nself._own\ncls._too\n"
                     "up._manifest\nself.__class__\n")
    assert sorted(foreign_private_attributes(tree)) == ["line 1: self.up._budget",
                                                        "line 4: up._manifest"]


def test_the_uploader_is_built_by_the_composition_root_alone() -> None:
    """`Uploader(` is called in pipeline/session.py and nowhere else in src/."""
    callers = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(tree_of(path)):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            called = func.id if isinstance(func, ast.Name) else (
                func.attr if isinstance(func, ast.Attribute) else None)
            if called == "Uploader":
                callers.add(path.relative_to(PACKAGE).as_posix())
    assert callers == {"pipeline/session.py"}
