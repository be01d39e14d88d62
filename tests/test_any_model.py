"""Every chapter runs end to end on other timm ViTs, changing only ``MODEL``.

A smoke test of the code path, never a result: the models have timm's random weights (the hub
is out of reach, and no accuracy is read), each chapter sees a few seeded photos per set, and
the store cannot serve them (its keys hold the weights' fingerprint), so every sweep really
runs. Nothing is written back: ``$DSM_LITE_RESULTS`` is ``read`` and the sweep cache is a
temporary folder.

The three models differ from the book's ViT-Ti where a hard-wired number would break:
DeiT-S (6 heads, 384 channels), ViT-B (12 heads, 768 channels) and the distilled DeiT-S, whose
two prefix tokens (class and distillation) change every token count. After each chapter the
test compares what the chapter glued for the model's shape (depth, tokens, schedules, MACs)
with the same quantities computed here from the model itself.

The injected cell (after the parameter cell, as papermill injects parameters) replaces
``load_model`` by its ``pretrained=False`` form, caps every photo set at ``PHOTOS``, and sets
float32, as :func:`dsm_lite.book_dtype` does for another model on a GPU.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

REPO = Path(__file__).resolve().parents[1]
CHAPTERS = sorted(p for p in (REPO / "book").glob("0[0-5]_*.ipynb"))
MODELS = ["deit_small_patch16_224", "vit_base_patch16_224", "deit_small_distilled_patch16_224"]
PHOTOS = 2  # per set: every statistic is defined, and ViT-B stays quick

INJECTED = '''
MODEL = {model!r}
dsm_lite.book_numerics(SEED, torch.float32)  # as another model on a GPU runs (dsm_lite.book_dtype)
import dsm_lite.data as _data, dsm_lite.models as _models
def _random_weights(name=dsm_lite.DEFAULT_MODEL, device=None, pretrained=True):
    torch.manual_seed(SEED)
    return _models.load_model(name, device, pretrained=False)
def _few(name="imagenet-sample", model=None, n=None, seed=0, stratified=True, base_url=None, files=None):
    files = None if files is None else files[:{photos}]
    n = None if files is not None else min(n or {photos}, {photos})
    return _data.load_images(name, model, n, seed, stratified, base_url, files)
dsm_lite.load_model = _random_weights
dsm_lite.load_images = _few
load_model, load_images = _random_weights, _few
'''

# After the chapter: what it glued, and the shape facts of its model (as JSON on stdout).
REPORT = '''
import json as _json
_m = model
_shape = dict(depth=len(_m.blocks), prefix=_m.num_prefix_tokens, heads=_m.blocks[0].attn.num_heads,
              dim=_m.embed_dim, grid=list(_m.patch_embed.grid_size),
              tokens=_m.num_prefix_tokens + _m.patch_embed.num_patches)
print("SMOKE-REPORT" + _json.dumps(dict(shape=_shape, name=type(_m).__name__)))
'''


def _glued(nb) -> dict:
    """The values a notebook glued, by key (plain text form)."""
    out = {}
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            key = o.get("metadata", {}).get("scrapbook", {}).get("name")
            if key is not None:
                out[key] = o["data"].get("application/papermill.record/text/plain")
    return out


def _report(nb) -> dict:
    for o in nb.cells[-1].get("outputs", []):
        if o.get("name") == "stdout" and "SMOKE-REPORT" in o["text"]:
            return json.loads(o["text"].split("SMOKE-REPORT", 1)[1])
    raise AssertionError("the report cell printed nothing")


def _expected(chapter: str, shape: dict, model_name: str) -> dict:
    """Glue keys whose values follow from the architecture alone, as the chapter must glue them."""
    import timm

    import dsm_lite
    from dsm_lite.schedules import ModelShape

    m = timm.create_model(model_name, pretrained=False)
    dense = dsm_lite.schedule(m, "tome", r=0)
    grid = "x".join(map(str, shape["grid"]))
    delay = dsm_lite.default_delay(shape["depth"])
    if chapter.startswith("00"):
        return dict(ch0_depth=shape["depth"], ch0_dim=shape["dim"], ch0_heads=shape["heads"],
                    ch0_patches=shape["grid"][0] * shape["grid"][1], ch0_D=delay)
    if chapter.startswith("01"):
        return dict(ch1_depth=shape["depth"], ch1_heads=shape["heads"], ch1_dim=shape["dim"], ch1_grid=repr(grid))
    if chapter.startswith("02"):
        return dict(ch2_n_tokens=shape["tokens"], ch2_depth=shape["depth"],
                    ch2_D_paper=dsm_lite.default_delay(shape["depth"]))
    if chapter.startswith("03"):
        return dict(ch3_n_tokens=shape["tokens"], ch3_depth=shape["depth"], ch3_dim=shape["dim"],
                    ch3_grid=repr(grid), ch3_gmacs_dense=round(dense.macs / 1e9, 3),
                    ch3_tokens_r8=dsm_lite.schedule(m, "tome", r=8).tokens[-1])
    if chapter.startswith("04"):
        return dict(ch4_n0=shape["grid"][0] * shape["grid"][1], ch4_side=shape["grid"][0],
                    **{f"ch4_T_{r}": dsm_lite.schedule(m, "spatial", windows="joint", r=r).local_blocks
                       for r in (4, 8, 12, 16)})
    if chapter.startswith("05"):
        sched = dsm_lite.schedule(m, "dsm", windows="paper", r=16, delay=delay)
        return dict(ch5_depth=shape["depth"], ch5_D_paper=delay, ch5_tokens_end=sched.tokens[-1],
                    ch5_sched_gmacs=sched.macs / 1e9)
    return {}


def _run_chapter(path: Path, model_name: str, km) -> list:
    """Execute one chapter on ``model_name`` in the running kernel ``km``; the problems found."""
    nb = nbformat.read(path, as_version=4)
    code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    params = code[1]  # the parameter cell (test_book checks that imports live there)
    nb.cells.insert(params + 1, nbformat.v4.new_code_cell(INJECTED.format(model=model_name, photos=PHOTOS)))
    nb.cells.insert(0, nbformat.v4.new_code_cell("%reset -f"))  # nothing left from the last chapter
    nb.cells.append(nbformat.v4.new_code_cell(REPORT))
    client = nbclient.NotebookClient(nb, km=km, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        return [f"{path.stem}: {str(e).strip().splitlines()[-1]}"]
    report = _report(nb)
    glued = _glued(nb)
    expected = _expected(path.stem, report["shape"], model_name)
    return [f"{path.stem}: glued {k} = {glued.get(k)}, the model gives {v}"
            for k, v in expected.items() if glued.get(k) != str(v)]


@pytest.mark.slow
@pytest.mark.parametrize("model_name", MODELS)
def test_every_chapter_runs_on_another_vit(model_name, tmp_path, monkeypatch):
    """One kernel per model, reset before each chapter: a kernel's start and imports cost about
    as much as a chapter's own work here, and ``%reset -f`` still fails a chapter that leans on
    a name another chapter defined."""
    from jupyter_client import KernelManager

    monkeypatch.setenv("DSM_LITE_RESULTS", "read")
    monkeypatch.setenv("DSM_LITE_CACHE", str(tmp_path))
    monkeypatch.delenv("MPLBACKEND", raising=False)
    km = KernelManager(kernel_name="python3")
    km.start_kernel(cwd=str(CHAPTERS[0].parent))
    try:
        problems = [p for path in CHAPTERS for p in _run_chapter(path, model_name, km)]
    finally:
        km.shutdown_kernel(now=True)
    assert not problems, f"on {model_name}:\n" + "\n".join(problems)
