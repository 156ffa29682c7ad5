"""The house rules that a reader relies on, checked on the source itself.

No module of neuronpatch uses another module's private name: a name another module
needs is public inside its package (``neuronpatch.engine`` exports what ranking and
controls use). A private module (``neuronpatch.engine._forward``) is imported only
from inside its own package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "neuronpatch"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (SRC / rel).with_suffix(".py").exists() or (SRC / rel / "__init__.py").exists()


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _outsider(importer: str, target: str) -> str | None:
    """The first private part of module ``target`` that ``importer`` is outside of, if any."""
    parts = target.split(".")
    for i, part in enumerate(parts):
        if _private(part):
            owner = ".".join(parts[:i])  # the package that owns the private module
            if not (importer == owner or importer.startswith(owner + ".")):
                return ".".join(parts[: i + 1])
    return None


def violations(path: Path) -> list[str]:
    """Every use in ``path`` of another neuronpatch module's private name."""
    me = _module_name(path)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    aliases: dict[str, str] = {}  # local name -> neuronpatch module it stands for
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("neuronpatch"):
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else "neuronpatch"
                    if (bad := _outsider(me, a.name)) is not None:
                        found.append(f"{path.name}:{node.lineno}: imports private module {bad}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("neuronpatch"):
            if (bad := _outsider(me, node.module)) is not None:
                found.append(f"{path.name}:{node.lineno}: imports from private module {bad}")
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if _is_module(full):
                    aliases[a.asname or a.name] = full
                    if (bad := _outsider(me, full)) is not None:
                        found.append(f"{path.name}:{node.lineno}: imports private module {bad}")
                elif _private(a.name) and node.module != me:
                    found.append(f"{path.name}:{node.lineno}: imports {node.module}.{a.name}")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases and _private(node.attr) and aliases[node.value.id] != me):
            found.append(f"{path.name}:{node.lineno}: uses {aliases[node.value.id]}.{node.attr}")
    return found


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_no_module_uses_another_modules_private_name(path: Path) -> None:
    assert violations(path) == []


def test_the_check_catches_what_it_is_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The checker itself, on a module that does every forbidden thing once.
    src = tmp_path / "src"
    (src / "neuronpatch" / "engine").mkdir(parents=True)
    for name in ("neuronpatch/__init__.py", "neuronpatch/engine/__init__.py",
                 "neuronpatch/engine/_forward.py", "neuronpatch/stats.py"):
        (src / name).write_text("", encoding="utf-8")
    bad = src / "neuronpatch" / "rank.py"
    bad.write_text("from neuronpatch import engine, stats\n"
                   "from neuronpatch.engine._forward import run_rows\n"
                   "from neuronpatch.stats import _CONSTANT\n"
                   "x = engine._run(stats._TOL)\n", encoding="utf-8")
    inside = src / "neuronpatch" / "engine" / "_api.py"
    inside.write_text("from neuronpatch.engine._forward import run_rows\n", encoding="utf-8")
    monkeypatch.setattr(f"{__name__}.SRC", src)
    found = violations(bad)
    assert len(found) == 4, found
    assert any("engine._run" in f for f in found) and any("stats._TOL" in f for f in found)
    assert violations(inside) == []
