"""Checking and rebuilding the stored per-photo results: verify, diff, rebuild, and the command line.

The book's sweeps read their per-photo results from ``dsm_lite/results/book.npz`` (its format,
keys and modes: :mod:`dsm_lite.store_format`) when the key matches, and the key leaves out the
device, batch size, thread count, torch and timm versions and dsm_lite's source. Whether a stored entry
still matches what the code computes is checked instead: :func:`verify` recomputes a seeded
subset of photos for every entry and compares (``tests/test_store.py``, run by CI under two CPU
instruction sets). When that check fails, rebuild the file with::

    python -m dsm_lite.store rebuild

which executes the book's notebooks with every sweep recomputed and recorded (on an H100 it
took 59, 85 and 150 s for chapters 3, 4 and 5; on a 2-core CPU it takes hours), and compare
the new file with the shipped one with ``python -m dsm_lite.store diff OLD NEW``.
``python -m dsm_lite.store compact`` rewrites a store in the current format.

"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .data import load_photos
from .evaluation import dense_logits, per_image_metrics
from .models import load_model, predict, weights_fingerprint
from .patching import patch, unpatch
from .store_format import BOOK_STORE, FIELDS, REBUILD_COMMAND, ResultStore, compact, photos_id

__all__ = ["StoreMismatch", "verify", "diff", "rebuild"]


# --------------------------------------------------------------------------- verification
@dataclass
class StoreMismatch:
    """One stored entry whose recomputed photos differ from what is stored."""
    key: str
    label: str
    photos: List[str]
    fields: List[str]
    max_kl_error: float

    def __str__(self) -> str:
        return (f"{self.label} [{self.key[:8]}]: {', '.join(self.fields)} differ on "
                f"{len(self.photos)} photo(s), e.g. {self.photos[0]}; max |KL error| "
                f"{self.max_kl_error:.2e}")


def verify(path: os.PathLike | str = BOOK_STORE, n_photos: int = 8, seed: int = 0,
           kl_tol: float = 1e-6, keys: Optional[Sequence[str]] = None,
           progress: bool = False) -> Tuple[int, List[StoreMismatch]]:
    """Recompute ``n_photos`` seeded photos of every entry (or of ``keys``) and compare.

    Each entry draws its photos (seeded by its key) from a pool of ``4 * n_photos`` photos
    seeded by its photo list, which all entries on that list share: each pooled photo is
    decoded and run through the dense model once, however many entries check it.

    Predictions, top-5, correctness and agreement must match exactly; KL and confidence within
    ``kl_tol`` (absolute). Configs with ``feature="random"`` replay their first recorded
    batch instead, since a photo's random draws depend on its place in the batch. Runs on the
    CPU with the entry's dtype as the default dtype (as the book runs), each photo loaded from
    its relative path and preprocessed as :func:`dsm_lite.load_images` does.

    Returns (entries checked, mismatches).
    """
    store = ResultStore(path, mode="read")
    entries = store.entries()
    default_dtype = torch.get_default_dtype()
    try:
        return _verify(entries, n_photos, seed, kl_tol, keys, progress)
    finally:
        torch.set_default_dtype(default_dtype)


def _verify(entries, n_photos, seed, kl_tol, keys, progress) -> Tuple[int, List[StoreMismatch]]:
    keys = sorted(entries) if keys is None else list(keys)
    mismatches: List[StoreMismatch] = []
    models: Dict[Tuple[str, str], torch.nn.Module] = {}
    photos = _PhotoCache()
    for key in keys:
        meta = entries[key]["__meta__"]
        ctx, cfg = meta["context"], meta["config"]
        dtype = getattr(torch, ctx["dtype"].replace("torch.", ""))
        torch.set_default_dtype(dtype)  # as the book ran: random features are drawn in it
        if (ctx["weights"], ctx["dtype"]) not in models:
            m = load_model().to(dtype)
            if weights_fingerprint(m) != ctx["weights"]:
                raise ValueError(f"entry {key} was recorded with weights {ctx['weights']}, "
                                 f"load_model() gives {weights_fingerprint(m)}")
            models[(ctx["weights"], ctx["dtype"])] = m
        model = models[(ctx["weights"], ctx["dtype"])]
        idx, batch = _photos_to_check(key, meta, n_photos, seed)
        sub = [meta["photos"][i] for i in idx]
        images, labels, dense = photos.get(sub, model, (ctx["weights"], ctx["dtype"]))
        if cfg.get("dense"):
            logits = dense
        else:
            patch(model, **cfg)
            try:
                logits = predict(model, images, min(batch, len(sub)))
            finally:
                unpatch(model)
        got = per_image_metrics(logits, dense, labels)._arrays()
        m = _mismatch(key, meta, {f: entries[key][f][idx] for f in FIELDS}, got, sub, kl_tol)
        if m is not None:
            mismatches.append(m)
        if progress:
            print(f"{'FAIL' if m is not None else 'ok  '} {meta.get('label')} {cfg.get('method', '')} "
                  f"r={cfg.get('r', 0)}", file=sys.stderr)
    return len(keys), mismatches


#: each photo list's entries are checked on photos drawn from one seeded pool this many times
#: ``n_photos`` large, so the dense model runs once per pooled photo, not once per entry
_POOL = 4


def _photos_to_check(key: str, meta: Dict[str, Any], n_photos: int, seed: int) -> Tuple[np.ndarray, int]:
    """(indices into the entry's photo list, batch size) of the photos :func:`verify` recomputes."""
    paths = meta["photos"]
    if meta["config"].get("feature") == "random":
        # random features are drawn per forward pass, (B, N, D) at a time, so a photo's
        # draws depend on its place in its batch: replay the recorded first batch
        batch = meta["recorded"]["batch_size"]
        return np.arange(min(batch, len(paths))), batch
    pool_rng = np.random.default_rng([seed, int(photos_id(paths)[:8], 16)])
    pool = pool_rng.choice(len(paths), size=min(_POOL * n_photos, len(paths)), replace=False)
    rng = np.random.default_rng([seed, int(key[:8], 16)])
    idx = np.sort(rng.choice(pool, size=min(n_photos, len(pool)), replace=False))
    return idx, len(idx)


class _PhotoCache:
    """Photos :func:`verify` has decoded, with their labels and the dense model's logits, so
    entries that check the same photo decode it and run the dense model on it once."""

    def __init__(self):
        self.pixels: Dict[Tuple[str, str], Tuple[torch.Tensor, int]] = {}
        self.dense: Dict[Tuple[Tuple[str, str], str], torch.Tensor] = {}

    def get(self, rels: List[str], model: torch.nn.Module, model_id: Tuple[str, str]):
        """(images (k, 3, H, W), labels (k,), dense logits (k, K)) of ``rels``."""
        dtype = str(torch.get_default_dtype())  # the dtype the photos are preprocessed in
        new = [r for r in dict.fromkeys(rels) if (dtype, r) not in self.pixels]
        if new:
            images, labels = load_photos(new, model)
            self.pixels.update(((dtype, r), (x, int(y))) for r, x, y in zip(new, images, labels))
        images = torch.stack([self.pixels[dtype, r][0] for r in rels])
        labels = torch.tensor([self.pixels[dtype, r][1] for r in rels], dtype=torch.long)
        todo = [i for i, r in enumerate(rels) if (model_id, r) not in self.dense]
        if todo:
            logits = dense_logits(model, images[todo], batch_size=len(todo), progress=False)
            self.dense.update(((model_id, rels[i]), row) for i, row in zip(todo, logits))
        return images, labels, torch.stack([self.dense[(model_id, r)] for r in rels])


def _mismatch(key: str, meta: Dict[str, Any], want: Dict[str, np.ndarray], have: Dict[str, Any],
              photos: Sequence[str], kl_tol: float) -> Optional[StoreMismatch]:
    """Compare one entry's per-photo arrays: exact for predictions, top-5, correctness and
    agreement; within ``kl_tol`` for KL and confidence. None when they match."""
    bad_fields, bad_photos, kl_err = [], set(), 0.0
    for f in FIELDS:
        a, b = np.asarray(want[f]), np.asarray(have[f])
        if f in ("kl", "confidence"):
            err = np.abs(a - b)
            kl_err = max(kl_err, float(err.max(initial=0.0))) if f == "kl" else kl_err
            rows = np.flatnonzero(err > kl_tol)
        else:
            rows = np.flatnonzero((a != b).reshape(len(photos), -1).any(axis=1))
        if len(rows):
            bad_fields.append(f)
            bad_photos.update(photos[i] for i in rows)
    if not bad_fields:
        return None
    return StoreMismatch(key, str(meta.get("label")), sorted(bad_photos), bad_fields, kl_err)


def diff(a: os.PathLike | str, b: os.PathLike | str,
         kl_tol: float = 1e-6) -> Tuple[int, List[StoreMismatch], List[str], List[str]]:
    """Compare two stores entry by entry, on every photo (e.g. the shipped file against one
    rebuilt on a GPU). Returns (entries in both, mismatches, keys only in ``a``, keys only in
    ``b``); an entry whose photos differ counts as a mismatch of every field."""
    ea, eb = ResultStore(a).entries(), ResultStore(b).entries()
    mismatches = []
    for key in sorted(set(ea) & set(eb)):
        meta = ea[key]["__meta__"]
        photos = meta.get("photos") or [str(i) for i in range(len(ea[key]["pred"]))]
        if eb[key]["__meta__"].get("photos") != meta.get("photos"):
            mismatches.append(StoreMismatch(key, str(meta.get("label")), list(photos), list(FIELDS),
                                            float("nan")))
            continue
        m = _mismatch(key, meta, ea[key], eb[key], photos, kl_tol)
        if m is not None:
            mismatches.append(m)
    return (len(set(ea) & set(eb)), mismatches, sorted(set(ea) - set(eb)), sorted(set(eb) - set(ea)))


# --------------------------------------------------------------------------- rebuild
def rebuild(notebooks: Sequence[os.PathLike | str], out: os.PathLike | str = BOOK_STORE,
            timeout: int = 7200) -> Path:
    """Execute ``notebooks`` in order with every sweep recomputed and recorded into a fresh
    store, then move it to ``out``. Outputs of the notebooks are not saved."""
    # the book's extra (myst-nb brings them), not the package's own dependencies
    import nbformat
    from nbclient import NotebookClient

    out = Path(out)
    fd, tmp = tempfile.mkstemp(prefix=".rebuild-", suffix=".npz", dir=out.parent)
    os.close(fd)
    os.unlink(tmp)  # the store starts empty; the first put() creates it
    old = os.environ.get("DSM_LITE_RESULTS")
    os.environ["DSM_LITE_RESULTS"] = f"record:{tmp}"
    try:
        for path in notebooks:
            path = Path(path)
            print(f"rebuild: executing {path}", file=sys.stderr, flush=True)
            nb = nbformat.read(path, as_version=4)
            NotebookClient(nb, timeout=timeout, kernel_name="python3",
                           resources={"metadata": {"path": str(path.parent)}}).execute()
        if not Path(tmp).is_file():
            raise RuntimeError("no sweep recorded anything: do the notebooks pass store=?")
        os.replace(compact(tmp), out)
    finally:
        if old is None:
            os.environ.pop("DSM_LITE_RESULTS", None)
        else:
            os.environ["DSM_LITE_RESULTS"] = old
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsm_lite.store", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    rb = sub.add_parser("rebuild", help="re-execute the book's notebooks, recording every sweep")
    rb.add_argument("notebooks", nargs="*", help="default: every book/*.ipynb that reads the store")
    rb.add_argument("--out", default=str(BOOK_STORE))
    vf = sub.add_parser("verify", help="recompute a seeded subset of photos of every entry")
    vf.add_argument("--path", default=str(BOOK_STORE))
    vf.add_argument("--photos", type=int, default=8)
    vf.add_argument("--seed", type=int, default=0)
    cp = sub.add_parser("compact", help="rewrite a store in the current format")
    cp.add_argument("path", nargs="?", default=str(BOOK_STORE))
    df = sub.add_parser("diff", help="compare two stores on every photo (e.g. shipped vs rebuilt)")
    df.add_argument("a")
    df.add_argument("b")
    args = p.parse_args(argv)
    if args.cmd == "rebuild":
        nbs = args.notebooks or [str(x) for x in sorted(Path("book").glob("*.ipynb"))
                                 if "book_store(" in x.read_text()]
        print(f"rebuilt {rebuild(nbs, args.out)}")
        return 0
    if args.cmd == "compact":
        path = compact(args.path)
        print(f"{path}: {len(ResultStore(path))} entries, {path.stat().st_size / 1e6:.2f} MB")
        return 0
    if args.cmd == "diff":
        common, bad, only_a, only_b = diff(args.a, args.b)
        print(f"{common} entries in both: {len(bad)} differ; {len(only_a)} only in {args.a}, "
              f"{len(only_b)} only in {args.b}")
        for m in bad:
            print(f"  {m}")
        return 1 if bad or only_a or only_b else 0
    checked, bad = verify(args.path, args.photos, args.seed, progress=True)
    print(f"{checked} entries checked on {args.photos} photos each "
          f"({platform.machine()}, torch {torch.__version__}): {len(bad)} differ")
    for m in bad:
        print(f"  {m}")
    if bad:
        print(f"rebuild the store with `{REBUILD_COMMAND}`")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(_main())
