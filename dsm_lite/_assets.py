"""Where dsm_lite's files come from: an offline assets folder, or a verified download.

Two sources, one layout. ``$DSM_LITE_ASSETS`` points at a folder laid out as
``weights/<model>.safetensors``, ``imagenet-sample/<file>``, ``imagenette-val/<wnid>/<file>``
plus a ``SHA256SUMS`` file. Without it, files are downloaded into a cache
(``$DSM_LITE_CACHE`` or ``~/.cache/dsm_lite``) with the same layout, each checked against
the sha256 manifests shipped in ``dsm_lite/manifests/``.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from functools import lru_cache
from pathlib import Path
from typing import Dict, Optional

__all__ = [
    "AssetNotFoundError", "ChecksumError", "DownloadError", "OfflineError",
    "assets_dir", "cache_dir", "manifest", "sha256_file", "fetch",
]

MANIFEST_DIR = Path(__file__).parent / "manifests"

# Pinned commits of the public homes of the two image sets (see the assets folder's README.md).
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
}


class AssetNotFoundError(FileNotFoundError):
    """A file expected in ``$DSM_LITE_ASSETS`` (or in a manifest) is not there."""


class ChecksumError(RuntimeError):
    """A file's sha256 differs from the published one (or none is published)."""


class DownloadError(RuntimeError):
    """The server answered, but not with the file (404, 500, ...)."""


class OfflineError(RuntimeError):
    """The network (or the hub) could not be reached."""


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
    return base + urllib.parse.quote(url_rel)


def fetch(rel: str, sha256: str, base_url: Optional[str] = None, timeout: float = 60.0) -> Path:
    """Path of the cached file ``rel``, downloading and verifying it first if needed.

    The download goes to a temp file beside its destination and is renamed into place
    only after its sha256 matches, so an interrupted or bad download leaves nothing behind.
    """
    dest = cache_dir() / rel
    if dest.is_file() and sha256_file(dest) == sha256:
        return dest
    url = _source_url(rel, base_url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".part-", dir=dest.parent)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:
                    for block in iter(lambda: resp.read(1 << 20), b""):
                        h.update(block)
                        out.write(block)
            except urllib.error.HTTPError as e:
                raise DownloadError(f"Downloading {url} failed: HTTP {e.code} {e.reason}.") from None
            except (urllib.error.URLError, OSError) as e:
                raise OfflineError(
                    f"Cannot download {url} ({e}). Without internet, set DSM_LITE_ASSETS to the "
                    "offline assets folder."
                ) from None
        if h.hexdigest() != sha256:
            raise ChecksumError(
                f"{url} has sha256 {h.hexdigest()}, expected {sha256}; the file was not kept."
            )
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest
