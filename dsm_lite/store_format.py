"""The results store's file: per-photo results in one .npz file, their keys, and the store that reads and writes them.

The book's chapters 3-5 evaluate about a hundred merging configs on every photo of the training
sets (1000 + 3925) and about sixty on the unseen ILSVRC2012 validation photos (1299); chapter 0
runs the dense model on all three sets and chapter 2 a small merging test on 400 photos. On a
2-core CPU in float64 that takes hours, and every run of ``pytest --nbval`` would pay it again. Instead, the per-photo outcomes of every config (prediction, top-5, correctness,
agreement with the dense model, KL, confidence) live in one small file that ships with the
package, ``dsm_lite/results/book.npz``, and :func:`dsm_lite.sweeps.sweep` reads an entry
from it instead of running the model, when the entry's key (:func:`result_key`) matches exactly:

- the config, every ``patch`` option spelled out (defaults filled in);
- the model's weights fingerprint and class;
- the photos: their relative paths and preprocessing (for a bare tensor, a hash of its
  pixels), and a hash of the labels;
- the dtype the model ran in (the book runs in float64, see :mod:`dsm_lite.numerics`).

The key leaves out what must not change a result: the device, batch size, thread count,
torch and timm versions and dsm_lite's source. Whether a stored entry still matches what the
code computes is checked instead, by :func:`dsm_lite.store.verify`; the sweep cache, which
nothing checks, keys its files with the same :func:`result_key` on a context that adds them.

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

import datetime
import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .assets import atomic_write

__all__ = ["FORMAT", "BOOK_STORE", "FIELDS", "MODES", "REBUILD_COMMAND", "ResultStore", "book_store",
           "result_key", "key_blob", "photos_id", "compact"]

FORMAT = 2
BOOK_STORE = Path(__file__).resolve().parent / "results" / "book.npz"
#: per-photo arrays kept for each entry (the fields of ``EvalResult`` less the logits)
FIELDS = ("pred", "top5", "correct1", "correct5", "agree", "kl", "confidence")
REBUILD_COMMAND = "python -m dsm_lite.store rebuild"
#: how a ResultStore opens its file: serve entries, write a new file, or add to an existing one
MODES = ("read", "record", "extend")


def key_blob(config: Dict[str, Any], context: Dict[str, Any]) -> str:
    """The canonical JSON of a normalised config and a context: what :func:`result_key` hashes."""
    return json.dumps({"config": config, "context": context}, sort_keys=True, default=str)


def result_key(config: Dict[str, Any], context: Dict[str, Any]) -> str:
    """The key of one config's per-photo results: sha256 (32 hex digits) of :func:`key_blob`.

    The one key of the store and the sweep cache. The store's context names the weights, model
    class, photos, labels and dtype; the cache's adds what the store leaves out for
    :func:`dsm_lite.store.verify` to check (dsm_lite's source, torch and timm versions, device,
    batch size, the dense logits). A dense run's config is ``{"dense": True}``.
    """
    return hashlib.sha256(key_blob(config, context).encode()).hexdigest()[:32]


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


def photos_id(photos: Sequence[str]) -> str:
    """sha256 (16 hex digits) of a list of photo paths: the id of the list's ``__photos__`` member."""
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
        meta["photos_id"] = photos_id(photos)
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
        if photos is not None and _PHOTOS + photos_id(photos) not in have:
            out[_PHOTOS + photos_id(photos)] = np.array(json.dumps(list(photos)))
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
