"""The package layout: vlmscale's packages import one another one way only, each imports on its own, and
README's layout table names exactly the packages there are (issue #15)."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(importlib.util.find_spec("vlmscale").origin).parent  # the tree on PYTHONPATH, without importing it
ROOT = PKG.parent


def unit_of(module: str) -> str | None:
    """The package-level unit a dotted module belongs to: ``vlmscale.train.step`` -> ``train``,
    ``vlmscale.constants`` -> ``constants``; None outside vlmscale."""
    parts = module.split(".")
    if parts[0] != "vlmscale" or len(parts) < 2:
        return None
    return parts[1]


def units() -> list[str]:
    return sorted({p.stem for p in PKG.glob("*.py") if p.name != "__init__.py"}
                  | {p.parent.name for p in PKG.glob("*/__init__.py")})


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at module level or inside functions."""
    here = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}  # `from vlmscale import constants`
    return out


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {u: set() for u in units()}
    for path in PKG.rglob("*.py"):
        src = unit_of(".".join(path.relative_to(ROOT).with_suffix("").parts))
        if src is None:
            continue
        for mod in imported_modules(path):
            dst = unit_of(mod)
            if dst is not None and dst != src and dst in graph:
                graph[src].add(dst)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(u: str) -> list[str] | None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in state and (cycle := visit(v)):
                return cycle
        stack.pop()
        state[u] = 2
        return None

    for u in sorted(graph):
        if u not in state and (cycle := visit(u)):
            return cycle
    return None


def test_package_import_graph_is_acyclic():
    graph = package_graph()
    cycle = find_cycle(graph)
    edges = "\n".join(f"  {u} -> {', '.join(sorted(vs))}" for u, vs in sorted(graph.items()))
    assert cycle is None, f"import cycle between packages: {' -> '.join(cycle)}\ngraph:\n{edges}"


def test_find_cycle_reports_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_each_package_imports_in_isolation():
    """A fresh interpreter per package, all started at once: an import that only works after another
    package was imported first (a hidden cycle) fails here."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = {u: subprocess.Popen([sys.executable, "-c", f"import vlmscale.{u}"], cwd=ROOT, env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for u in units()}
    failed = {}
    for u, p in procs.items():
        _, err = p.communicate(timeout=600)
        if p.returncode:
            failed[u] = err[-2000:]
    assert not failed, "\n".join(f"import vlmscale.{u} failed:\n{err}" for u, err in failed.items())


def layout_rows() -> set[str]:
    text = (ROOT / "README.md").read_text()
    table = text.split("## Layout", 1)[1]
    return set(re.findall(r"^\| `(vlmscale/[^`]*)`", table, flags=re.M))


def test_readme_layout_table_matches_the_tree():
    rows = layout_rows()
    missing = [r for r in rows if not (ROOT / r.rstrip("/")).exists()]
    assert not missing, f"README's layout table names paths that do not exist: {missing}"
    named = {r.rstrip("/").removeprefix("vlmscale/").removesuffix(".py") for r in rows}
    unlisted = [u for u in units() if u not in named]
    assert not unlisted, f"README's layout table has no row for: {unlisted}"


@pytest.mark.parametrize("text, expected", [("vlmscale.train.step", "train"), ("vlmscale.constants", "constants"),
                                             ("torch.nn", None), ("vlmscale", None)])
def test_unit_of(text, expected):
    assert unit_of(text) == expected
