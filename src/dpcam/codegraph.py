"""dpcam's own import graph: which source files a module runs.

:func:`imports` reads a module's ``import`` statements (function-local ones too) with :mod:`ast`, without importing
it; :func:`import_closure` follows them from a stage command's entry module. dvc.yaml lists that closure as a stage's
deps (:mod:`dpcam.pipeline`), and a grid run's stamp hashes the train stage's
(:func:`dpcam.train.family.run_stamp`), so an edit outside the code a stage runs neither makes DVC call it stale nor
retrains a finished run.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

SRC = Path(__file__).resolve().parents[1]  # the folder that holds the dpcam package
ROOT = SRC.parent  # the project root (where dvc.yaml lives) in a source checkout
CLI = "dpcam.cli"  # a stage command runs through the CLI (its module-level imports) and its entry module


def module_file(module: str) -> Path | None:
    """The source file of a dpcam module (``pkg/__init__.py`` for a package), None if there is none."""
    base = SRC.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


@cache
def imports(module: str, top_level_only: bool = False) -> frozenset[str]:
    """The dpcam modules ``module`` imports (all ``import`` statements, or only module-level ones)."""
    path = module_file(module)
    if path is None:
        return frozenset()
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "dpcam")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base.split(".")[0] != "dpcam":
                continue
            for a in node.names:  # `from dpcam import tracking` imports the module dpcam.tracking
                sub = f"{base}.{a.name}"
                found.add(sub if module_file(sub) else base)
    found = {m for m in found if module_file(m)}
    return frozenset(found | {p for m in found for p in _parents(m)})


def graph(top_level_only: bool = False) -> dict[str, frozenset[str]]:
    """Every dpcam module and the dpcam modules it imports."""
    mods = []
    for path in sorted((SRC / "dpcam").rglob("*.py")):
        rel = path.relative_to(SRC).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        mods.append(".".join(parts))
    return {m: imports(m, top_level_only) - {m} for m in mods}


def cycles(g: dict[str, frozenset[str]]) -> list[list[str]]:
    """Import cycles of graph ``g`` (each as a path that returns to its start); [] when it is acyclic.

    An import of a package's parent (``dpcam.explain`` by ``dpcam.explain.score``) is not an edge here:
    Python imports the parent package first, which never imports the child back in dpcam.
    """
    found, state = [], {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for n in sorted(g.get(m, ())):
            if m.startswith(n + "."):
                continue
            if state.get(n) == "open":
                found.append(path[path.index(n) :] + [n] if n in path else [m, n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    return found


def _closure(entry: str) -> set[str]:
    """The dpcam modules the stage command with this entry module runs: the entry's imports (function-local ones
    too), the CLI's module-level ones, and every package on the way."""
    seen: set[str] = set()
    todo = [entry, CLI, *_parents(entry)]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(imports(m, top_level_only=(m == CLI)))
    return seen


def import_closure(entry: str) -> list[str]:
    """Source files (relative to the project root) of everything the stage command with this entry module runs."""
    return sorted(str(module_file(m).relative_to(ROOT)) for m in _closure(entry))


def closure_files(entry: str) -> list[Path]:
    """The source files of :func:`import_closure`, absolute (also where dpcam is installed, not checked out)."""
    return sorted(module_file(m) for m in _closure(entry))
