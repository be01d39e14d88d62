"""The package's own map: its modules, what each is for, and which imports which.

Read from the source with :mod:`ast` (nothing is imported), for the book's package page and
for the test that keeps the import graph acyclic with every import at the top of its module.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

__all__ = ["PACKAGE_DIR", "GROUPS", "modules", "concern", "import_graph", "nested_imports", "layers"]

PACKAGE_DIR = Path(__file__).resolve().parent

#: the role of every module: what a reader looks in it for
GROUPS = {
    **dict.fromkeys(("merging", "windows", "schedules", "patching", "measure", "devices", "numerics",
                     "fused_merge", "triton_kernels"),
                    "engine: merging, schedules, cost"),
    **dict.fromkeys(("models", "data", "assets", "progress"), "models and photos"),
    **dict.fromkeys(("evaluation", "sweeps", "store", "store_format", "stats", "compare", "claims", "probes"),
                    "analysis"),
    **dict.fromkeys(("plots", "matching_steps"), "figures"),
    "package": "this map",
}


def _tree(module: str) -> ast.Module:
    return ast.parse((PACKAGE_DIR / f"{module}.py").read_text())


def modules() -> List[str]:
    """The package's modules (``__init__`` excluded), sorted."""
    return sorted(p.stem for p in PACKAGE_DIR.glob("*.py") if p.stem != "__init__")


def concern(module: str) -> str:
    """The first sentence of a module's docstring: what it is for."""
    doc = ast.get_docstring(_tree(module)) or ""
    return doc.split("\n\n")[0].replace("\n", " ").strip()


def import_graph() -> Dict[str, Set[str]]:
    """``{module: the package modules it imports}``, from every relative import in its source."""
    graph: Dict[str, Set[str]] = {}
    names = set(modules())
    for m in modules():
        deps = set()
        for node in ast.walk(_tree(m)):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps.update([node.module] if node.module else [a.name for a in node.names])
        graph[m] = {d for d in deps if d in names}
    return graph


def nested_imports() -> List[Tuple[str, str, str]]:
    """``(module, function, import statement)`` for every import inside a function body."""
    out = []
    for m in modules():
        for fn in ast.walk(_tree(m)):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out += [(m, fn.name, ast.unparse(node)) for node in ast.walk(fn)
                        if isinstance(node, (ast.Import, ast.ImportFrom))]
    return out


def layers(graph: Dict[str, Set[str]]) -> Dict[str, int]:
    """Each module's layer: 0 for a module importing no other, else 1 + its deepest import's.

    Raises:
        ValueError: the graph has a cycle (named in the message).
    """
    depth: Dict[str, int] = {}

    def visit(m: str, path: Tuple[str, ...]) -> int:
        if m in path:
            raise ValueError("import cycle: " + " -> ".join(path[path.index(m):] + (m,)))
        if m not in depth:
            depth[m] = 1 + max((visit(d, path + (m,)) for d in graph[m]), default=-1)
        return depth[m]

    for m in graph:
        visit(m, ())
    return depth
