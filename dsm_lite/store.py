"""Versioned per-photo results: what the book's sweeps measured, kept in the repository.

The book's chapters 3-5 evaluate about a hundred merging configs on every photo of the training
sets (1000 + 3925) and about sixty on the unseen ILSVRC2012 validation photos (1299); chapter 0
runs the dense model on all three sets and chapter 2 a small merging test on 400 photos. On a
2-core CPU in float64 that takes hours, and every run of ``pytest --nbval`` would pay it again. Instead, the per-photo outcomes of every config (prediction, top-5, correctness,
agreement with the dense model, KL, confidence) live in one small file that ships with the
package, ``dsm_lite/results/book.npz``, and :func:`dsm_lite.sweeps.sweep` reads an entry
from it instead of running the model, when the entry's key matches exactly:

- the config, every ``patch`` option spelled out (defaults filled in);
- the model's weights fingerprint and class;
- the photos: their relative paths and preprocessing (for a bare tensor, a hash of its
  pixels), and a hash of the labels;
- the dtype the model ran in (the book runs in float64, see :mod:`dsm_lite.numerics`).

The key leaves out what must not change a result: the device, batch size, thread count,
torch and timm versions and dsm_lite's source. Whether a stored entry still matches what the
code computes is checked instead: :func:`verify` recomputes a seeded subset of photos for every
entry and compares (``tests/test_store.py``, run by CI under two CPU instruction sets). When
that check fails, rebuild the file with::

    python -m dsm_lite.store rebuild

which executes the book's notebooks with every sweep recomputed and recorded (on an H100 it
took 59, 85 and 150 s for chapters 3, 4 and 5; on a 2-core CPU it takes hours), and compare
the new file with the shipped one with ``python -m dsm_lite.store diff OLD NEW``.

The mode comes from the ``recompute`` argument of :func:`book_store` and ``$DSM_LITE_RESULTS``:
``read`` (default: serve what matches, compute the rest), ``off`` (compute everything),
``record:<path>`` (compute everything and write it to ``<path>``) or ``extend:<path>`` (serve
what ``<path>`` has, compute the rest and add it there: for new configs in a chapter).

File layout (one ``.npz``, format 2): ``__meta__`` (JSON: format, what rebuilt it);
``__photos__/<id>`` (JSON: one list of the photos' relative paths, shared by the entries that
ran on it); per entry key ``<key>/__meta__`` (JSON: config, context, ``photos_id``, and ``top5_base``,
the dense entry its top-5 is coded against) and
``<key>/<field>`` for the per-photo arrays of :class:`dsm_lite.evaluation.EvalResult`, packed
as the comment above ``_compact`` in the source says (top-5 coded against the dense entry, KL and
confidence in float32). On the book's 157 entries (90 on training photos, 67 on validation photos) that is
about 2.9 MB; format 1, which stored every
entry's photo list and float64 values, took 4.9 MB. ``python -m dsm_lite.store compact``
rewrites a store in the current format.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .assets import atomic_write
from .data import load_photos
from .evaluation import dense_logits, per_image_metrics
from .models import load_model, predict, weights_fingerprint
from .patching import patch, unpatch

__all__ = ["FORMAT", "BOOK_STORE", "FIELDS", "ResultStore", "book_store", "store_key",
           "StoreMismatch", "verify", "diff", "rebuild", "compact"]

FORMAT = 2
BOOK_STORE = Path(__file__).resolve().parent / "results" / "book.npz"
#: per-photo arrays kept for each entry (the fields of ``EvalResult`` less the logits)
FIELDS = ("pred", "top5", "correct1", "correct5", "agree", "kl", "confidence")
REBUILD_COMMAND = "python -m dsm_lite.store rebuild"
#: how a ResultStore opens its file: serve entries, write a new file, or add to an existing one
MODES = ("read", "record", "extend")


def store_key(config: Dict[str, Any], context: Dict[str, Any]) -> str:
    """Entry key: sha256 (32 hex digits) of the canonical JSON of a normalised config and a
    context (weights, model class, photos hash, dtype)."""
    blob = json.dumps({"config": config, "context": context}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class ResultStore:
    """Per-photo results keyed by (config, context), in one ``.npz`` file.

    ``mode="read"`` serves entries; ``"record"`` never serves, and :meth:`put` adds each new
    result to the file at once (appending, see :meth:`put`);
    ``"extend"`` serves what it has and records what it lacks (for adding configs to the
    book without recomputing the rest).
    """

    def __init__(self, path: os.PathLike | str = BOOK_STORE, mode: str = "read"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.path, self.mode = Path(path), mode
        self._entries: Optional[Dict[str, Dict[str, np.ndarray]]] = None

    def __repr__(self) -> str:
        return f"ResultStore({str(self.path)!r}, mode={self.mode!r}, entries={len(self)})"

    def __len__(self) -> int:
        return len(self.entries())

    def entries(self) -> Dict[str, Dict[str, np.ndarray]]:
        """key -> {"__meta__": dict, field: array}; read once, lazily."""
        if self._entries is None:
            self._entries = _read(self.path)
        return self._entries

    def get(self, key: str, n: int) -> Optional[Dict[str, np.ndarray]]:
        """The arrays of entry ``key`` if it exists, is complete and holds ``n`` photos."""
        if self.mode == "record":
            return None
        entry = self.entries().get(key)
        if entry is None or any(f not in entry or len(entry[f]) != n for f in FIELDS):
            return None
        return {f: entry[f] for f in FIELDS}

    def meta(self, key: str) -> Dict[str, Any]:
        return self.entries()[key]["__meta__"]

    def put(self, key: str, arrays: Dict[str, np.ndarray], meta: Dict[str, Any]) -> None:
        """Add or replace one entry (record or extend mode).

        A new key is appended to the file's zip archive, so recording costs the size of one
        entry, not of the whole file (a rebuild records hundreds). Replacing a key rewrites the
        file atomically. An append that is interrupted can leave the file unreadable: the
        rebuild records into a temporary file for that reason, and the shipped file is in git.
        """
        if self.mode == "read":
            raise RuntimeError(f"{self!r} is read-only; rebuild it with `{REBUILD_COMMAND}`")
        missing = [f for f in FIELDS if f not in arrays]
        if missing:
            raise ValueError(f"entry {key} lacks the per-photo fields {missing}")
        if not np.array_equal(arrays["pred"], np.asarray(arrays["top5"])[:, 0]):
            raise ValueError(f"entry {key}: pred must be top5[:, 0] (the store keeps top5 only)")
        entry = {"__meta__": meta, **{f: np.asarray(arrays[f]) for f in FIELDS}}
        if self.path.is_file() and not _holds(self.path, key):
            _append(self.path, key, entry)
            if self._entries is not None:
                self._entries[key] = entry
            return
        entries = dict(_read(self.path))  # others may have recorded meanwhile (one per chapter)
        entries[key] = entry
        _write(self.path, entries)
        self._entries = entries


# --------------------------------------------------------------------------- file format
# Format 2 packs what format 1 repeated (format 1 files are still read):
# - each photo list is stored once, as ``__photos__/<hash>``; an entry's meta names it;
# - ``pred`` is not stored: it is ``top5[:, 0]``;
# - ``top5`` is coded against the dense entry of the same photos when the file has one: a
#   class that the dense model also ranks in its top 5 is stored as that rank (0-4), any
#   other class c as c + 5. Merged models mostly keep the dense top 5, so the codes are
#   mostly 0-4 and compress to half;
# - ``kl`` and ``confidence`` are float32: relative rounding error 6e-8, so at most 6e-7 for
#   the largest KL stored (under 10), inside :func:`verify`'s 1e-6 tolerance; read back as
#   float64. (Fixed point would save a further 0.2 MB, at an absolute error that swamps the
#   tiny KL of the mildest configs.)
# - class indices and codes are int16, read back as int64.
_PHOTOS = "__photos__/"
_FLOAT32 = ("kl", "confidence")


def _compact(field: str, a: np.ndarray) -> np.ndarray:
    """The array as stored: int16 for class indices and codes, float32 for KL and confidence."""
    if field in _FLOAT32 and a.dtype.kind == "f":
        return a.astype(np.float32)
    if a.dtype.kind == "i" and (a.size == 0 or int(np.abs(a).max()) < 2 ** 15):
        return a.astype(np.int16)
    return a


def _expand(a: np.ndarray) -> np.ndarray:
    """Undo :func:`_compact`: int64 class indices, float64 values."""
    if a.dtype.kind == "i":
        return a.astype(np.int64)
    if a.dtype == np.float32:
        return a.astype(np.float64)
    return a


def _photos_id(photos: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(photos)).encode()).hexdigest()[:16]


def _dense_bases(entries: Dict[str, Dict[str, Any]]) -> Dict[str, str]:
    """entry key -> key of the dense entry with the same context and photos (the base its
    ``top5`` is coded against), for every non-dense entry that has one."""
    def ident(meta):
        return json.dumps([meta.get("context"), meta.get("photos")], sort_keys=True)

    dense = {ident(e["__meta__"]): k for k, e in entries.items()
             if e["__meta__"].get("config", {}).get("dense")}
    out = {}
    for k, e in entries.items():
        base = dense.get(ident(e["__meta__"]))
        if base is not None and base != k and len(entries[base]["top5"]) == len(e["top5"]):
            out[k] = base
    return out


def _code_top5(top5: np.ndarray, base: np.ndarray) -> np.ndarray:
    """(N, 5) classes -> (N, 5) codes: the class's rank in ``base``'s row if there, else class + 5."""
    same = top5[:, :, None] == base[:, None, :]  # (N, 5, 5)
    return np.where(same.any(-1), same.argmax(-1), top5 + 5)


def _decode_top5(codes: np.ndarray, base: np.ndarray) -> np.ndarray:
    ranks = np.minimum(codes, 4)
    return np.where(codes < 5, np.take_along_axis(base, ranks, axis=1), codes - 5)


def _members(key: str, entry: Dict[str, Any], base: Optional[Dict[str, Any]] = None,
             base_key: Optional[str] = None) -> Iterator[Tuple[str, np.ndarray]]:
    """The zip members of one entry (its photo list excluded: see :func:`_photo_members`)."""
    meta = dict(entry["__meta__"])
    photos = meta.pop("photos", None)
    if photos is not None:
        meta["photos_id"] = _photos_id(photos)
    top5 = np.asarray(entry["top5"])
    if base is not None:
        meta["top5_base"] = base_key
        top5 = _code_top5(top5, np.asarray(base["top5"]))
    yield f"{key}/__meta__", np.array(json.dumps(meta, sort_keys=True))
    yield f"{key}/top5", _compact("top5", top5)
    for field in FIELDS:
        if field not in ("pred", "top5"):
            yield f"{key}/{field}", _compact(field, np.asarray(entry[field]))


def _photo_members(entries: Iterator[Dict[str, Any]], have=()) -> Dict[str, np.ndarray]:
    out = {}
    for entry in entries:
        photos = entry["__meta__"].get("photos")
        if photos is not None and _PHOTOS + _photos_id(photos) not in have:
            out[_PHOTOS + _photos_id(photos)] = np.array(json.dumps(list(photos)))
    return out


def _write_member(zf: zipfile.ZipFile, name: str, arr: np.ndarray) -> None:
    """One ``<name>.npy`` member, as ``np.savez_compressed`` writes it."""
    with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array(f, np.asanyarray(arr), allow_pickle=False)


def _holds(path: Path, key: str) -> bool:
    with zipfile.ZipFile(path) as zf:
        return f"{key}/__meta__.npy" in zf.namelist()


def _append(path: Path, key: str, entry: Dict[str, Any]) -> None:
    """Write one entry's members into the existing archive. Its ``top5`` is stored plain: the
    rebuild's final :func:`compact` codes it against its dense entry."""
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        have = {n[:-len(".npy")] for n in zf.namelist()}
        for name, arr in [*_photo_members([entry], have).items(), *_members(key, entry)]:
            _write_member(zf, name, arr)


def _read(path: Path) -> Dict[str, Dict[str, Any]]:
    if not path.is_file():
        return {}
    raw: Dict[str, Dict[str, Any]] = {}
    photos: Dict[str, List[str]] = {}
    try:
        with np.load(path, allow_pickle=False) as z:
            head = json.loads(str(z["__meta__"]))
            if head.get("format") in (1, FORMAT):
                for name in z.files:
                    if name.startswith(_PHOTOS):
                        photos[name[len(_PHOTOS):]] = json.loads(str(z[name]))
                    elif name != "__meta__":
                        key, field = name.split("/", 1)
                        value = z[name]
                        value = json.loads(str(value)) if field == "__meta__" else _expand(value)
                        raw.setdefault(key, {})[field] = value
                out = {k: _decode_entry(k, raw, photos) for k in raw}
    except (OSError, KeyError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is not a readable result store ({e}); rebuild it with "
                         f"`{REBUILD_COMMAND}`") from e
    if head.get("format") not in (1, FORMAT):
        raise ValueError(f"{path}: store format {head.get('format')}, this dsm_lite reads "
                         f"1 and {FORMAT}; rebuild it with `{REBUILD_COMMAND}`")
    return out


def _decode_entry(key: str, raw: Dict[str, Dict[str, Any]], photos: Dict[str, List[str]]) -> Dict[str, Any]:
    """Undo :func:`_members` for one entry (a format 1 entry passes through)."""
    entry = raw[key]
    meta = entry["__meta__"]
    if "photos_id" in meta:
        meta["photos"] = photos[meta.pop("photos_id")]
    base = meta.pop("top5_base", None)
    if base is not None:
        entry["top5"] = _decode_top5(entry["top5"], raw[base]["top5"])  # bases are stored plain
    if "pred" not in entry and "top5" in entry:
        entry["pred"] = entry["top5"][:, 0].copy()
    return entry


def _write(path: Path, entries: Dict[str, Dict[str, Any]]) -> None:
    """Write ``entries`` as a new file (atomically), every ``top5`` coded against its base."""
    head = dict(format=FORMAT, rebuild=REBUILD_COMMAND, written=datetime.date.today().isoformat())
    bases = _dense_bases(entries)
    # 0o644: the store is package data, readable by all (a temp file starts private)
    with atomic_write(path, suffix=".npz", mode=0o644) as tmp, \
            zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        _write_member(zf, "__meta__", np.array(json.dumps(head, sort_keys=True)))
        for name, arr in sorted(_photo_members(iter(entries.values())).items()):
            _write_member(zf, name, arr)
        for key in sorted(entries):
            base = bases.get(key)
            for name, arr in _members(key, entries[key], entries.get(base), base):
                _write_member(zf, name, arr)


def compact(path: os.PathLike | str = BOOK_STORE) -> Path:
    """Rewrite a store in the current format, every ``top5`` coded against its dense entry
    (appended entries are stored plain). The entries read back the same."""
    path = Path(path)
    _write(path, _read(path))
    return path


def book_store(recompute: bool = False) -> Optional[ResultStore]:
    """The store the book's sweeps use: the shipped file in read mode, unless ``recompute``
    (a chapter's ``RECOMPUTE = True``) or ``$DSM_LITE_RESULTS`` says otherwise.

    ``$DSM_LITE_RESULTS``: ``off`` gives None (compute everything); ``record:<path>`` gives a
    store that records every sweep into ``<path>`` (used by ``python -m dsm_lite.store
    rebuild``); ``extend:<path>`` serves what ``<path>`` holds and records the rest there.
    """
    env = os.environ.get("DSM_LITE_RESULTS", "").strip()
    for mode in ("record", "extend"):
        if env.startswith(mode + ":"):
            return ResultStore(env[len(mode) + 1:], mode=mode)
    if env not in ("", "read", "off"):
        raise ValueError(f"$DSM_LITE_RESULTS must be read, off, record:<path> or "
                         f"extend:<path>, got {env!r}")
    if recompute or env == "off":
        return None
    return ResultStore(BOOK_STORE, mode="read")


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
    pool_rng = np.random.default_rng([seed, int(_photos_id(paths)[:8], 16)])
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
