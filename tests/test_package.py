"""The package's shape: an acyclic import graph with every import at the top, a concern per
module, a curated top-level API, and notebooks that call the package instead of defining analysis."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import dsm_lite
from dsm_lite import package

REPO = Path(__file__).resolve().parents[1]
#: imports that stay inside a function, with why: optional extras and a version shim
ALLOWED_NESTED = {
    ("store", "rebuild", "import nbformat"),                    # the book's extra (myst-nb)
    ("store", "rebuild", "from nbclient import NotebookClient"),
    ("schedules", "to_frame", "import pandas as pd"),           # `import dsm_lite` without pandas
    ("models", "_is_network_error",                             # older huggingface_hub lacks it
     "from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled"),
    ("fused_merge", "_kernels", "from . import triton_kernels as k"),  # Triton is optional
    ("fused_merge", "_fused_merge_impl", "from torch.library import wrap_triton"),  # torch >= 2.6
}


def test_import_graph_is_acyclic_with_imports_at_the_top():
    graph = package.import_graph()
    layers = package.layers(graph)  # raises on a cycle
    assert layers["merging"] == 0 and layers["stats"] == 0
    # the engine never imports the analysis
    engine = {m for m, g in package.GROUPS.items() if g.startswith("engine")}
    analysis = {m for m, g in package.GROUPS.items() if g in ("analysis", "figures")}
    assert all(not (graph[m] & analysis) for m in engine)
    # the results store's file format sits low (it needs only the atomic write), under the sweeps
    # and the store's checks; the photos need no model
    assert graph["store_format"] <= {"assets"} and "store_format" in graph["sweeps"] & graph["store"]
    assert "models" not in graph["data"]
    assert set(package.nested_imports()) <= ALLOWED_NESTED


def test_layers_find_a_cycle():
    with pytest.raises(ValueError, match="a -> b -> a"):
        package.layers({"a": {"b"}, "b": {"a"}, "c": set()})
    assert package.layers({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == {"a": 1, "b": 0, "c": 2}


def test_every_module_states_its_concern_and_has_a_role():
    for m in package.modules():
        assert len(package.concern(m)) > 20, m
    assert set(package.GROUPS) == set(package.modules())


def test_curated_api_is_the_engine_and_analysis_is_namespaced():
    assert len(dsm_lite.__all__) == len(set(dsm_lite.__all__))
    for name in dsm_lite.__all__:
        assert getattr(dsm_lite, name) is not None
    for old in ("bootstrap_ci", "paired_bootstrap", "sweep", "AttentionProbe", "plot_tradeoff"):
        assert old not in dsm_lite.__all__
    # a fresh interpreter: patching needs neither pandas' analysis modules nor matplotlib
    code = ("import sys, dsm_lite; assert 'matplotlib.pyplot' not in sys.modules; "
            "assert 'dsm_lite.sweeps' not in sys.modules; from dsm_lite import sweeps; "
            "assert dsm_lite.stats.bootstrap_ci and dsm_lite.sweeps is sweeps")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        dsm_lite.nope


def _functions(source: str):
    """(name, lines) of every function a notebook cell defines (IPython magics stripped)."""
    code = "\n".join(l[:len(l) - len(l.lstrip())] + "pass" if l.lstrip().startswith(("%", "!")) else l
                     for l in source.splitlines())
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.FunctionDef):
            yield node.name, node.end_lineno - node.lineno + 1


@pytest.mark.parametrize("path", sorted((REPO / "book").glob("*.ipynb")), ids=lambda p: p.stem)
def test_notebooks_define_no_long_functions(path):
    """Analysis lives in the package: a chapter may define a helper of a few lines, no more."""
    cells = json.loads(path.read_text())["cells"]
    long = [(name, n) for c in cells if c["cell_type"] == "code"
            for name, n in _functions("".join(c["source"])) if n > 10]
    assert long == []


def test_import_dsm_lite_loads_neither_pandas_nor_matplotlib():
    """The engine alone: the analysis modules (pandas) and the figures (matplotlib) load on first
    use, so `import dsm_lite` in a serving process pulls in neither."""
    code = ("import sys, dsm_lite; heavy = [m for m in ('pandas', 'matplotlib', 'seaborn') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
