"""Where dsm_lite's files come from: an offline assets folder, or a verified download.

Two sources, one layout. ``$DSM_LITE_ASSETS`` points at a folder laid out as
``weights/<model>.safetensors``, ``imagenet-sample/<file>``, ``imagenette-val/<wnid>/<file>``,
``ilsvrc2012-val/<wnid>/<file>`` plus a ``SHA256SUMS`` file. Without it, files are downloaded into a cache
(``$DSM_LITE_CACHE`` or ``~/.cache/dsm_lite``) with the same layout, each checked against
the sha256 manifests shipped in ``dsm_lite/manifests/``.

Downloads (:func:`fetch_many`) run ``DSM_LITE_DOWNLOAD_WORKERS`` (default 16) at a time with
one tqdm bar per batch, retry transient failures with bounded exponential backoff, and write
each file atomically (temp file beside it, sha256 checked, ``os.replace``), so an interrupted
run resumes where it stopped.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import random
import secrets
import sys
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
import urllib.error
import urllib.parse
import urllib.request
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, Optional

from tqdm import tqdm

__all__ = [
    "DEFAULT_MODEL", "AssetNotFoundError", "ChecksumError", "DownloadError", "OfflineError",
    "DownloadsFailedError", "assets_dir", "cache_dir", "manifest", "sha256_file", "fetch", "fetch_many",
]

MANIFEST_DIR = Path(__file__).parent / "manifests"
#: the book's model: the one model whose weights dsm_lite's manifest lists (``manifests/weights.sha256``)
DEFAULT_MODEL = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"

# Download policy (module constants so tests and odd networks can adjust them).
DEFAULT_WORKERS = 16     # concurrent downloads; $DSM_LITE_DOWNLOAD_WORKERS overrides
TRIES = 5                # attempts per file for transient failures
BACKOFF_S = 0.5          # wait before the 2nd attempt; doubles each time (with jitter) ...
BACKOFF_MAX_S = 8.0      # ... up to this (also caps a server's Retry-After)
ABORT_AFTER = 32         # a batch gives up after this many files in a row failed for good
TRANSIENT_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})
_CHUNK = 1 << 16
# Temp files are ".part-<pid>-<token>-<random>": a leftover of a dead process (or of an earlier
# process that had the same pid) is recognised and removed; a live one is never touched.
_TOKEN = secrets.token_hex(4)
_PART = ".part-"

# Pinned commits of the public homes of the image sets (see the assets folder's README.md).
# A mirror given through DSM_LITE_DATA_URL must be laid out like the assets folder instead.
SOURCES = {
    "imagenet-sample": (
        "https://raw.githubusercontent.com/EliSchwartz/imagenet-sample-images/"
        "bc69043e2862758a1906c6a24a792bb28c6bb2ff/"
    ),
    "imagenette-val": (
        "https://raw.githubusercontent.com/thunderInfy/imagenette/"
        "b850f030ff0701c36a4adc8b928ea9483a46915b/val/"
    ),
    # 1299 ILSVRC2012 validation photos, resized to 227x227 by their publisher; the source
    # keeps them in one flat folder, the assets folder (and the cache) in WordNet-id folders.
    "ilsvrc2012-val": (
        "https://raw.githubusercontent.com/VeriSilicon/acuity-dataset/"
        "aded2e9f22cd8fe0745aa57356c68cb95457aad9/ILSVRC2012_VAL_SET/data/"
    ),
}
#: groups whose public source is one flat folder: the label folder is left out of the URL
FLAT_SOURCES = frozenset({"ilsvrc2012-val"})


class AssetNotFoundError(FileNotFoundError):
    """A file expected in ``$DSM_LITE_ASSETS`` (or in a manifest) is not there."""


class ChecksumError(RuntimeError):
    """A file's sha256 differs from the published one (or none is published)."""


class DownloadError(RuntimeError):
    """The server answered, but not with the file (404, 500, ...)."""


class OfflineError(RuntimeError):
    """The network (or the hub) could not be reached."""


class DownloadsFailedError(DownloadError):
    """Some files of a batch could not be downloaded.

    Attributes:
        failures: ``{relative path: the error that ended its download}``, in manifest order.
        total: how many files the batch had to download.
        not_attempted: files left alone once the batch was abandoned (see ``ABORT_AFTER``).
    """

    def __init__(self, message: str, failures: Dict[str, BaseException], total: int, not_attempted: int):
        super().__init__(message)
        self.failures, self.total, self.not_attempted = failures, total, not_attempted


class _OfflineDownloadsFailedError(DownloadsFailedError, OfflineError):
    """A failed batch whose every failure was the network being unreachable."""


def _repo_root(start: Path) -> Optional[Path]:
    """Nearest ancestor of ``start`` holding ``_toc.yml`` (the book's root), if any."""
    for d in (start, *start.parents):
        if (d / "_toc.yml").is_file():
            return d
    return None


def assets_dir() -> Optional[Path]:
    """The absolute assets folder named by ``$DSM_LITE_ASSETS``, or None when unset.

    A relative value is tried against the current directory first, then against the
    book's root (the folder with ``_toc.yml``, found from the cwd or from this package),
    so ``DSM_LITE_ASSETS=../shared/assets`` set at the repo root still works for a
    notebook whose cwd is ``book/``.
    """
    value = os.environ.get("DSM_LITE_ASSETS", "").strip()
    if not value:
        return None
    p = Path(value).expanduser()
    if p.is_absolute():
        candidates = [p]
    else:
        roots = [Path.cwd(), _repo_root(Path.cwd()), _repo_root(Path(__file__).resolve().parent)]
        candidates = [r / p for r in roots if r is not None]
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    raise AssetNotFoundError(
        f"DSM_LITE_ASSETS={value!r} is not a folder (tried {', '.join(map(str, candidates))}). "
        "Point it at the offline assets folder, or unset it to download from the public sources."
    )


def cache_dir() -> Path:
    """Download cache: ``$DSM_LITE_CACHE`` or ``~/.cache/dsm_lite``."""
    return Path(os.environ.get("DSM_LITE_CACHE") or Path.home() / ".cache" / "dsm_lite").expanduser()


def _read_sums(path: Path) -> Dict[str, str]:
    sums = {}
    for line in path.read_text().splitlines():
        if line.strip():
            sha, rel = line.split(None, 1)
            rel = rel.strip().lstrip("*")
            sums[rel[2:] if rel.startswith("./") else rel] = sha.lower()
    return sums


@lru_cache(maxsize=None)
def manifest(group: str) -> Dict[str, str]:
    """Shipped ``{relative path: sha256}`` for ``group`` (``weights``, ``imagenet-sample``, ...).

    Keys are relative to the assets folder and sorted.
    """
    path = MANIFEST_DIR / f"{group}.sha256"
    return dict(sorted(_read_sums(path).items())) if path.is_file() else {}


def assets_sums(root: Path) -> Dict[str, str]:
    """``{relative path: sha256}`` from ``root/SHA256SUMS`` (empty if the file is absent)."""
    path = root / "SHA256SUMS"
    return _read_sums(path) if path.is_file() else {}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _source_url(rel: str, base_url: Optional[str]) -> str:
    base = base_url or os.environ.get("DSM_LITE_DATA_URL")
    if base:
        # A mirror is laid out like the assets folder: <base>/<group>/<path>.
        url_rel = rel
        base = base.rstrip("/") + "/"
    else:
        group, url_rel = rel.split("/", 1)
        if group not in SOURCES:
            raise AssetNotFoundError(f"No public source known for {rel!r}; set DSM_LITE_ASSETS.")
        base = SOURCES[group]
        if group in FLAT_SOURCES:
            url_rel = url_rel.rsplit("/", 1)[-1]
    return base + urllib.parse.quote(url_rel)


class _Transient(Exception):
    """One attempt failed in a way worth retrying (connection, timeout, 5xx/429, short body)."""

    def __init__(self, reason: str, final: Callable[[str], Exception], retry_after: Optional[float] = None):
        super().__init__(reason)
        self.reason, self.final, self.retry_after = reason, final, retry_after


class _Cancelled(Exception):
    """The batch was abandoned while this file was in flight."""


def _offline(url: str) -> Callable[[str], Exception]:
    return lambda why: OfflineError(
        f"Cannot download {url} ({why}). Without internet, set DSM_LITE_ASSETS to the offline "
        "assets folder.")


def _retry_after(e: urllib.error.HTTPError) -> Optional[float]:
    try:
        return float(e.headers.get("Retry-After", ""))
    except (TypeError, ValueError, AttributeError):
        return None


@contextlib.contextmanager
def atomic_write(path: Path, prefix: str = ".part-", suffix: str = "",
                 mode: Optional[int] = None) -> Iterator[Path]:
    """Write ``path`` all at once or not at all: yields a temp file beside it (same file system,
    so the rename is atomic), which replaces ``path`` when the block ends without an error and is
    removed otherwise. A reader never sees half a file, and an interrupted write leaves only
    the old file. ``mode``: the new file's permissions (mkstemp makes it private).

    The one way dsm_lite writes a file it may read back: downloads, the sweep cache, the store.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _download_once(url: str, dest: Path, sha256: str, timeout: float,
                   stop: Optional[threading.Event] = None) -> None:
    """One attempt: stream ``url`` into a temp file beside ``dest``, check it, rename it into place.

    Raises:
        _Transient: worth another try (connection refused/reset/dropped, timeout, HTTP 5xx/429,
            a body shorter than its Content-Length, or a wrong sha256 of a body without one).
        DownloadError: the server answered without the file (404, 403, ...).
        ChecksumError: a complete body (of the announced length) with the wrong sha256.
        _Cancelled: ``stop`` was set meanwhile.
    """
    with atomic_write(dest, prefix=f"{_PART}{os.getpid()}-{_TOKEN}-") as tmp:
        with open(tmp, "wb") as out:
            try:
                resp = urllib.request.urlopen(url, timeout=timeout)
            except urllib.error.HTTPError as e:
                e.close()
                why = f"HTTP {e.code} {e.reason}"
                if e.code in TRANSIENT_HTTP:
                    raise _Transient(why, lambda w: DownloadError(f"Downloading {url} failed: {w}."),
                                     _retry_after(e)) from None
                raise DownloadError(f"Downloading {url} failed: {why}.") from None
            except urllib.error.URLError as e:  # refused, unreachable, DNS
                raise _Transient(str(e.reason), _offline(url)) from None
            except (OSError, http.client.HTTPException) as e:  # dropped, reset, timed out
                raise _Transient(f"{type(e).__name__}: {e}".rstrip(": "), _offline(url)) from None
            h, size = hashlib.sha256(), 0
            with resp:
                length = resp.headers.get("Content-Length")
                while True:
                    if stop is not None and stop.is_set():
                        raise _Cancelled()
                    try:
                        block = resp.read(_CHUNK)
                    except (OSError, http.client.HTTPException) as e:
                        raise _Transient(f"{type(e).__name__} while reading", _offline(url)) from None
                    if not block:
                        break
                    h.update(block)
                    out.write(block)
                    size += len(block)
        if length is not None and size != int(length):
            raise _Transient(f"truncated body: {size} of {length} bytes",
                             lambda w: DownloadError(f"Downloading {url} failed: {w}."))
        if h.hexdigest() != sha256:
            msg = f"{url} has sha256 {h.hexdigest()}, expected {sha256}; the file was not kept."
            if length is None:  # no announced length: it may just have been cut short
                raise _Transient("sha256 mismatch", lambda w: ChecksumError(msg))
            raise ChecksumError(msg)


def _download(url: str, dest: Path, sha256: str, timeout: float, tries: int,
              stop: Optional[threading.Event] = None, on_retry: Optional[Callable[[], None]] = None) -> Path:
    """Download with up to ``tries`` attempts, waiting ``BACKOFF_S * 2**k`` (jittered, capped) between them."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(max(1, tries)):
        if attempt:
            if on_retry is not None:
                on_retry()
            delay = min(BACKOFF_MAX_S, BACKOFF_S * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
            if last.retry_after is not None:
                delay = max(delay, min(last.retry_after, BACKOFF_MAX_S))
            if stop is not None and stop.wait(delay):
                raise _Cancelled()
            if stop is None:
                time.sleep(delay)
        try:
            _download_once(url, dest, sha256, timeout, stop)
            return dest
        except _Transient as e:
            last = e
    raise last.final(f"{last.reason}; gave up after {max(1, tries)} tries")


def _cached(dest: Path, sha256: str) -> bool:
    return dest.is_file() and sha256_file(dest) == sha256


def fetch(rel: str, sha256: str, base_url: Optional[str] = None, timeout: float = 60.0) -> Path:
    """Path of the cached file ``rel``, downloading and verifying it first if needed.

    The download goes to a temp file beside its destination and is renamed into place
    only after its sha256 matches, so an interrupted or bad download leaves nothing behind.
    Transient failures are retried (``TRIES`` attempts, exponential backoff). No progress bar;
    use :func:`fetch_many` for batches.

    Raises:
        DownloadError: the server has no such file (404, ...) or kept failing (5xx, short bodies).
        ChecksumError: the file downloaded has the wrong sha256.
        OfflineError: the server could not be reached.
    """
    dest = cache_dir() / rel
    if _cached(dest, sha256):
        return dest
    return _download(_source_url(rel, base_url), dest, sha256, timeout, TRIES)


def _alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate it there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's live process
        return True
    return True


def _remove_stale_parts(folders: List[Path], max_age_s: float = 3600.0) -> None:
    """Delete temp files left in ``folders`` by interrupted downloads of dead processes."""
    for folder in folders:
        if not folder.is_dir():
            continue
        for part in folder.glob(_PART + "*"):
            fields = part.name[len(_PART):].split("-")
            try:
                pid, token = int(fields[0]), fields[1]
                stale = token != _TOKEN if pid == os.getpid() else not _alive(pid)
            except (ValueError, IndexError):  # an older naming: only when clearly abandoned
                try:
                    stale = time.time() - part.stat().st_mtime > max_age_s
                except OSError:
                    continue
            if stale:
                try:
                    part.unlink()
                except OSError:
                    pass


def _failure_message(failures: Dict[str, BaseException], total: int, not_attempted: int,
                     shown: int = 20) -> str:
    lines = [f"{len(failures)} of {total} files could not be downloaded"
             + (f" ({not_attempted} more not attempted after {ABORT_AFTER} failures in a row)"
                if not_attempted else "") + ":"]
    for rel, err in list(failures.items())[:shown]:
        lines.append(f"  {rel}: {err}")
    if len(failures) > shown:
        lines.append(f"  ... and {len(failures) - shown} more (see the error's .failures)")
    lines.append(
        f"Files already downloaded stay in {cache_dir()}: run again to resume (only the missing "
        "files are fetched). Or set DSM_LITE_ASSETS to an offline assets folder, or "
        "DSM_LITE_DATA_URL to a mirror laid out like it.")
    return "\n".join(lines)


def _default_workers() -> int:
    value = os.environ.get("DSM_LITE_DOWNLOAD_WORKERS", "").strip()
    if not value:
        return DEFAULT_WORKERS
    try:
        workers = int(value)
    except ValueError:
        workers = 0
    if workers < 1:
        raise ValueError(f"DSM_LITE_DOWNLOAD_WORKERS={value!r}: use a positive integer.")
    return workers


def fetch_many(
    files: Mapping[str, str],
    base_url: Optional[str] = None,
    workers: Optional[int] = None,
    timeout: float = 60.0,
    progress: bool = True,
    desc: str = "dsm_lite download",
) -> Dict[str, Path]:
    """Cached paths of ``files``, downloading those missing, ``workers`` at a time.

    Files already in the cache with the right sha256 are skipped. The rest are downloaded
    concurrently (each: temp file beside its destination, sha256 check, ``os.replace``), with
    transient failures retried ``TRIES`` times with exponential backoff and HTTP 404 failing at
    once. One tqdm bar on stderr counts the files downloaded; nothing is printed when all are
    cached. Once every file has finished, failures raise one error that lists them; a rerun
    resumes. After ``ABORT_AFTER`` files in a row fail for good the rest are not attempted.

    Args:
        files: ``{relative path: sha256}``, e.g. a slice of :func:`manifest`.
        base_url: a mirror laid out like the assets folder (default ``$DSM_LITE_DATA_URL``,
            else the public sources).
        workers: concurrent downloads (default ``$DSM_LITE_DOWNLOAD_WORKERS`` or 16).
        timeout: seconds a connection may stay silent before the attempt counts as failed.
        progress: show the tqdm bar.
        desc: the bar's label.

    Returns:
        ``{relative path: absolute cached path}`` in the order of ``files``.

    Raises:
        DownloadsFailedError: some files could not be downloaded (an ``OfflineError`` too when
            every failure was the network being unreachable); the others are kept.
        AssetNotFoundError: a file has no public source (and no mirror is given).
    """
    workers = _default_workers() if workers is None else int(workers)
    if workers < 1:
        raise ValueError(f"workers={workers}: use at least 1.")
    root = cache_dir()
    out = {rel: root / rel for rel in files}
    urls = {rel: _source_url(rel, base_url) for rel in files}  # fails early on a bad path
    if not files:
        return out
    with ThreadPoolExecutor(max_workers=workers) as pool:  # hashing releases the GIL
        cached = list(pool.map(lambda rel: _cached(out[rel], files[rel]), files))
    todo = [rel for rel, ok in zip(files, cached) if not ok]
    if not todo:
        return out
    _remove_stale_parts(sorted({out[rel].parent for rel in todo}))

    stop = threading.Event()
    lock = threading.Lock()
    retries = [0]

    def on_retry() -> None:
        with lock:
            retries[0] += 1

    def job(rel: str) -> Path:
        if stop.is_set():
            raise _Cancelled()
        return _download(urls[rel], out[rel], files[rel], timeout, TRIES, stop, on_retry)

    failures: Dict[str, BaseException] = {}
    not_attempted, in_a_row = 0, 0
    bar = tqdm(total=len(todo), desc=desc, unit="file", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    pool = ThreadPoolExecutor(max_workers=min(workers, len(todo)))
    try:
        pending: Dict[Future, str] = {pool.submit(job, rel): rel for rel in todo}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                rel = pending.pop(fut)
                try:
                    fut.result()
                    in_a_row = 0
                    bar.update(1)
                except _Cancelled:
                    not_attempted += 1
                except (DownloadError, ChecksumError, OfflineError) as e:
                    failures[rel] = e
                    in_a_row += 1
                    if in_a_row >= ABORT_AFTER and not stop.is_set():
                        stop.set()  # in-flight downloads stop at their next block
                        for f in pending:
                            f.cancel()
            cancelled = [f for f in pending if f.cancelled()]
            for f in cancelled:
                pending.pop(f)
            not_attempted += len(cancelled)
            if retries[0] or failures:
                bar.set_postfix_str(f"{retries[0]} retried, {len(failures)} failed", refresh=False)
    except BaseException:  # Ctrl-C or a bug: stop the others and leave no temp file behind
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=True)
        bar.close()
    if failures or not_attempted:
        failures = {rel: failures[rel] for rel in files if rel in failures}
        offline = all(isinstance(e, OfflineError) for e in failures.values())
        cls = _OfflineDownloadsFailedError if offline else DownloadsFailedError
        raise cls(_failure_message(failures, len(todo), not_attempted), failures, len(todo), not_attempted)
    return out
