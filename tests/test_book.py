"""The book's notebooks as a Colab reader meets them: one setup cell, one repository URL,
imports that ``pip install dsm_lite[book]`` satisfies, and shared numerics."""
from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "book").glob("*.ipynb"))
COLAB = "https://colab.research.google.com/github"


def repository() -> tuple:
    """(owner/name, branch) from ``_config.yml``: the one place the repository is named."""
    cfg = yaml.safe_load((REPO / "_config.yml").read_text())["repository"]
    m = re.fullmatch(r"https://github\.com/([\w.-]+/[\w.-]+?)(\.git)?/?", cfg["url"])
    assert m, f"_config.yml repository.url is not a GitHub URL: {cfg['url']}"
    return m.group(1), cfg.get("branch", "main")


def expected_setup_cell() -> str:
    slug, branch = repository()
    return (
        "# Setup. On Colab, for a GPU: Runtime > Change runtime type > T4 GPU, then Run all.\n"
        "# This cell installs dsm_lite and what the book imports on Colab only; elsewhere it does nothing.\n"
        "import sys\n"
        'if "google.colab" in sys.modules:\n'
        f'    %pip install -q "dsm_lite[book] @ git+https://github.com/{slug}@{branch}"'
    )


def cells(path: Path, kind: str = "code") -> list:
    return ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == kind]


def python_of(cell: str) -> str:
    """A cell's source as the Python IPython runs (magics become function calls)."""
    from IPython.core.inputtransformer2 import TransformerManager

    return TransformerManager().transform_cell(cell)


def imported_modules(cell: str) -> set:
    tops = set()
    for node in ast.walk(ast.parse(python_of(cell))):
        if isinstance(node, ast.Import):
            tops |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            tops.add(node.module.split(".")[0])
    return tops


def test_there_are_chapters():
    assert len(NOTEBOOKS) >= 6


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_setup_cell_is_the_same_everywhere(path):
    assert cells(path)[0] == expected_setup_cell()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_colab_badge_points_at_this_notebook(path):
    slug, branch = repository()
    title = cells(path, "markdown")[0]
    links = re.findall(r"\(" + re.escape(COLAB) + r"/([^)\s]+)\)", title)
    assert links == [f"{slug}/blob/{branch}/book/{path.name}"], links


def test_every_url_naming_the_repository_agrees_with_config():
    """Badges, install lines and links anywhere in the notebooks, README and intro."""
    slug, branch = repository()
    texts = {p.name: p.read_text() for p in NOTEBOOKS + [REPO / "README.md", REPO / "book" / "intro.md"]}
    for name, text in texts.items():
        for found in re.findall(r"github\.com/([\w.-]+/[\w.-]+?)(?:\.git)?(?=[/@\"')\s])", text):
            if found.split("/")[0] in ("EliSchwartz", "thunderInfy", "VeriSilicon", "huggingface", "facebookresearch"):
                continue  # the photos' and references' public homes, not this repository
            assert found == slug, f"{name} names {found}, _config.yml says {slug}"
        for ref in re.findall(rf"{re.escape(slug)}(?:/blob/|@)([\w.-]+)", text):
            assert ref == branch, f"{name} points at branch {ref}, _config.yml says {branch}"


def book_requirements() -> set:
    """Import names that ``pip install dsm_lite[book]`` brings, plus what any Python has."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + project["optional-dependencies"]["book"]
    names = {re.split(r"[<>=!~\[ ;]", r)[0].strip().lower().replace("-", "_") for r in reqs}
    import_name = {"pillow": "PIL", "myst_nb": "myst_nb", "ipykernel": "IPython"}
    mods = {import_name.get(n, n) for n in names} | {"dsm_lite"}
    # ipykernel brings IPython; matplotlib brings numpy; both are dependencies anyway
    return mods | set(sys.stdlib_module_names)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_imports_only_what_the_book_extra_brings(path):
    allowed = book_requirements()
    used = set().union(*(imported_modules(c) for c in cells(path)))
    assert used <= allowed, f"{path.name} imports {sorted(used - allowed)}, not in dsm_lite[book]"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_imports_and_numerics_live_in_the_second_code_cell(path):
    """The CI step that mimics Colab runs the first two code cells: they must hold every import."""
    code = cells(path)
    later = set().union(*(imported_modules(c) for c in code[2:]))
    assert not later, f"{path.name} imports {sorted(later)} after its import cell"
    assert "book_numerics(" in code[1], f"{path.name} does not set the book's numerics"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_eval_of_strings(path):
    for cell in cells(path):
        calls = [n for n in ast.walk(ast.parse(python_of(cell)))
                 if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in ("eval", "exec")]
        assert not calls, f"{path.name} calls eval/exec on a string"


def test_book_numerics_turns_tf32_off_everywhere():
    import torch

    from dsm_lite.numerics import book_numerics, numerics_report

    old = numerics_report()
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("medium")
        book_numerics(seed=3)
        assert numerics_report() == dict(default_dtype=torch.float64, matmul_tf32=False, cudnn_tf32=False, cudnn_benchmark=False,
                                         cudnn_deterministic=True, float32_matmul_precision="highest")
        a = torch.rand(3)
        assert a.dtype == torch.float64
        book_numerics(seed=3)
        assert torch.equal(a, torch.rand(3))  # seeded
        book_numerics(seed=3, dtype=torch.float32)
        assert torch.rand(3).dtype == torch.float32
    finally:
        torch.set_default_dtype(old["default_dtype"])
        torch.backends.cuda.matmul.allow_tf32 = old["matmul_tf32"]
        torch.backends.cudnn.allow_tf32 = old["cudnn_tf32"]
        torch.backends.cudnn.benchmark = old["cudnn_benchmark"]
        torch.backends.cudnn.deterministic = old["cudnn_deterministic"]
        torch.set_float32_matmul_precision(old["float32_matmul_precision"])


TENSOR_FACTORIES = {"randn", "rand", "randint", "randperm", "zeros", "ones", "full", "empty", "arange",
                    "eye", "linspace", "tensor"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_tensors_name_their_device(path):
    """A tensor a chapter makes goes either to ``device=`` or is said to stay on the CPU.

    On a GPU runtime, a batch made on the CPU and fed to the model is the bug chapter 5 had;
    the package's functions move photos themselves, so CPU tensors are fine when the line
    says so (a comment naming the CPU). Device mix-ups inside the package are caught by
    tests/test_device.py under fake CUDA tensors.
    """
    for k, cell in enumerate(cells(path)):
        code = python_of(cell)
        lines = code.splitlines()
        for node in ast.walk(ast.parse(code)):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                    and node.func.attr in TENSOR_FACTORIES
                    and not any(kw.arg == "device" for kw in node.keywords)):
                line = lines[node.lineno - 1]
                assert "CPU" in line.partition("#")[2], (
                    f"{path.name} code cell {k}: `{line.strip()}` makes a tensor without device=; "
                    "pass device=DEVICE, or say in a comment on that line why the CPU is right")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_glued_values_are_plain_numbers_and_text(path):
    """A glued numpy scalar is stored as ``np.float64(0.8)``, which myst-nb cannot format
    (``{glue:text}`x:.1%``` then fails the -W build): glue Python floats and ints."""
    bad = []
    for cell in json.loads(path.read_text())["cells"]:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "display_data" and "scrapbook" in out.get("metadata", {}):
                text = "".join(out["data"].get("application/papermill.record/text/plain", ""))
                if re.match(r"np\.\w+\(", text):
                    bad.append(f"{out['metadata']['scrapbook']['name']} = {text}")
    assert not bad, f"{path.name} glues numpy scalars: {bad}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_stderr_on_the_page(path):
    """Warnings, progress bars and profiler lines go to stderr: none may reach a stored page."""
    noise = ["".join(out.get("text", ""))[:80] for cell in json.loads(path.read_text())["cells"]
             for out in cell.get("outputs", []) if out.get("name") == "stderr"]
    assert not noise, f"{path.name} stores stderr output: {noise}"
