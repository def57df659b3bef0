"""The package's import graph has no cycle, counting imports inside functions too.

An edge A -> B means module A imports B somewhere (module level or in a function). Importing ``a.b.c``
also runs ``a/__init__`` and ``a/b/__init__``, so those are edges too, except where the package is an
ancestor of A itself (Python has already started it). A cycle here is a cycle a reader has to untangle,
whether or not Python happens to survive it at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import moekit

PACKAGE_DIR = Path(moekit.__file__).parent


def module_name(path: Path, root: Path = PACKAGE_DIR) -> str:
    parts = ["moekit", *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    files = {module_name(f, root): f for f in root.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                # `from pkg import name` imports pkg.name when that is a module
                targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in files else target for a in node.names]
            for target in targets:
                if not target.startswith("moekit"):
                    continue
                parts = target.split(".")
                for i in range(1, len(parts) + 1):  # the target and every package above it
                    dep = ".".join(parts[:i])
                    if dep in files and dep != mod and not mod.startswith(dep + "."):
                        graph[mod].add(dep)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("planted", ["module level", "inside a function"])
def test_a_planted_cycle_is_found(tmp_path, planted):
    pkg = tmp_path / "moekit"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("from moekit.sub.b import thing\n")
    body = "from moekit.sub import a\n" if planted == "module level" else "def f():\n    from . import a\n"
    (pkg / "sub" / "b.py").write_text(body + "thing = 1\n")
    (pkg / "c.py").write_text("import moekit.sub.a\n")
    assert find_cycle(import_graph(pkg)) == ["moekit.sub.a", "moekit.sub.b", "moekit.sub.a"]


def test_a_package_init_that_imports_back_is_a_cycle(tmp_path):
    pkg = tmp_path / "moekit"
    (pkg / "x").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "x" / "__init__.py").write_text("from moekit.x.impl import f\n")
    (pkg / "x" / "impl.py").write_text("def f():\n    from moekit.y import g\n")
    (pkg / "y.py").write_text("from moekit.x import f\n")  # runs x/__init__, which needs impl, which needs y
    assert find_cycle(import_graph(pkg)) is not None
