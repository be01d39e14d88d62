"""Concurrent, retried, atomic downloads (dsm_lite.assets.fetch_many) against a faulty loopback server."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Dict, Iterator

import pytest

from dsm_lite import assets
from dsm_lite.assets import (ChecksumError, DownloadError, DownloadsFailedError, OfflineError, fetch,
                              fetch_many, manifest)
from dsm_lite.data import load_images
from faulty_server import FaultyServer, random_plan

N = 40
FAULTS = ["drop", "reset", "503", "429", "truncate", "truncate_nolength", "stall", "500"]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty download cache; no assets folder, no mirror; fast retries."""
    monkeypatch.delenv("DSM_LITE_ASSETS", raising=False)
    monkeypatch.delenv("DSM_LITE_DATA_URL", raising=False)
    monkeypatch.delenv("DSM_LITE_DOWNLOAD_WORKERS", raising=False)
    monkeypatch.setenv("DSM_LITE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(assets, "BACKOFF_S", 0.01)
    return tmp_path / "cache"


@pytest.fixture
def mirror(tmp_path: Path) -> Dict[str, str]:
    """N small random files laid out like the assets folder (two groups, a subfolder, a quote
    and a space in names); returns their manifest ``{relative path: sha256}``."""
    rng = __import__("random").Random(0)
    files = {}
    for i in range(N):
        rel = f"imagenette-val/n0{i % 3}/f{i:03d}.JPEG" if i % 2 else f"imagenet-sample/n{i:03d}_jack-o' {i}.JPEG"
        data = bytes(rng.getrandbits(8) for _ in range(2000 + 97 * i))
        path = tmp_path / "mirror" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        files[rel] = hashlib.sha256(data).hexdigest()
    return dict(sorted(files.items()))


@pytest.fixture
def server(tmp_path: Path) -> Iterator[FaultyServer]:
    with FaultyServer(tmp_path / "mirror", lifetime_s=60) as srv:
        yield srv


def cached_files(cache: Path) -> Dict[str, str]:
    """Every file under the cache (temp files included) -> sha256."""
    return {p.relative_to(cache).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in cache.rglob("*") if p.is_file()} if cache.exists() else {}


def test_faults_are_retried_and_every_file_arrives_verified(cache, mirror, server, capsys) -> None:
    index = {rel: i for i, rel in enumerate(mirror)}

    def plan(rel: str, attempt: int):
        i = index[rel]
        if attempt == 0 and i % 2 == 0:  # every other file fails once, each fault in turn
            fault = FAULTS[(i // 2) % len(FAULTS)]
            return fault, (1.0 if fault == "stall" else 0.0)
        return "ok", 0.05 if i % 3 == 0 else 0.0  # some answers are slow

    server.plan = plan
    got = fetch_many(mirror, base_url=server.url, workers=8, timeout=0.5)
    assert list(got) == list(mirror) and all(got[r] == cache / r for r in mirror)
    assert cached_files(cache) == mirror  # all verified, and no temp file left
    assert {r: server.requests[r] for r in mirror} == {r: 2 - index[r] % 2 for r in mirror}
    assert server.max_inflight > 1  # concurrency happened
    err = capsys.readouterr().err
    assert "dsm_lite download" in err and f"{N}/{N}" in err and "retried" in err


def test_concurrency_follows_workers(cache, mirror, server, monkeypatch) -> None:
    server.plan = lambda rel, attempt: ("ok", 0.02)
    real, lock, inflight = assets._download_once, threading.Lock(), [0, 0]  # now, most

    def counted(*args, **kwargs):
        with lock:
            inflight[0] += 1
            inflight[1] = max(inflight)
        try:
            return real(*args, **kwargs)
        finally:
            with lock:
                inflight[0] -= 1

    monkeypatch.setattr(assets, "_download_once", counted)
    fetch_many(mirror, base_url=server.url, workers=1, progress=False)
    assert inflight[1] == 1
    for p in cache.rglob("*.JPEG"):
        p.unlink()
    inflight[1] = 0
    monkeypatch.setenv("DSM_LITE_DOWNLOAD_WORKERS", "4")
    fetch_many(mirror, base_url=server.url, progress=False)
    assert inflight[1] == 4 and server.max_inflight >= 2
    monkeypatch.setenv("DSM_LITE_DOWNLOAD_WORKERS", "0")
    with pytest.raises(ValueError, match="positive integer"):
        fetch_many(mirror, base_url=server.url)


def test_404_fails_at_once_and_a_rerun_fetches_only_the_rest(cache, mirror, server, capsys) -> None:
    missing = set(list(mirror)[::2])
    server.plan = lambda rel, attempt: ("404" if rel in missing else "ok", 0.0)
    with pytest.raises(DownloadsFailedError) as info:
        fetch_many(mirror, base_url=server.url, workers=8)
    e = info.value
    assert isinstance(e, DownloadError) and not isinstance(e, OfflineError)
    assert set(e.failures) == missing and e.total == N and e.not_attempted == 0
    msg = str(e)
    assert msg.startswith(f"{N // 2} of {N} files could not be downloaded:")
    assert "HTTP 404" in msg and min(missing) in msg and "DSM_LITE_ASSETS" in msg and "DSM_LITE_DATA_URL" in msg
    assert "run again to resume" in msg and "... and 0 more" not in msg and msg.count("HTTP 404") == 20
    assert all(server.requests[r] == 1 for r in missing)  # not retried
    assert cached_files(cache) == {r: s for r, s in mirror.items() if r not in missing}  # nothing partial
    capsys.readouterr()

    server.reset_counts()
    server.plan = lambda rel, attempt: ("ok", 0.0)
    fetch_many(mirror, base_url=server.url, workers=8)
    assert set(server.requests) == missing and sum(server.requests.values()) == len(missing)
    assert cached_files(cache) == mirror
    assert f"{len(missing)}/{len(missing)}" in capsys.readouterr().err

    server.reset_counts()  # all cached: no request, no output
    assert fetch_many(mirror, base_url=server.url) == {r: cache / r for r in mirror}
    assert sum(server.requests.values()) == 0 and capsys.readouterr() == ("", "")


def test_interrupted_run_leaves_no_partial_file_and_resumes(cache, mirror, server, monkeypatch) -> None:
    slow = set(list(mirror)[8:])
    server.plan = lambda rel, attempt: ("slow_body", 0.3) if rel in slow else ("ok", 0.0)
    real_wait, completions = assets.wait, []

    def interrupted_wait(*args, **kwargs):
        completions.append(1)
        if len(completions) == 6:  # Ctrl-C while 4 downloads are half-way through their body
            raise KeyboardInterrupt
        return real_wait(*args, **kwargs)

    monkeypatch.setattr(assets, "wait", interrupted_wait)
    with pytest.raises(KeyboardInterrupt):
        fetch_many(mirror, base_url=server.url, workers=4, progress=False)
    done = cached_files(cache)  # temp files included: there must be none
    assert 0 < len(done) < N and all(mirror.get(r) == s for r, s in done.items())
    assert len(server.requests) < N  # the rest of the batch was dropped, not waited for

    monkeypatch.setattr(assets, "wait", real_wait)
    server.reset_counts()
    server.plan = lambda rel, attempt: ("ok", 0.0)
    fetch_many(mirror, base_url=server.url, workers=4, progress=False)
    assert set(server.requests) == set(mirror) - set(done) and max(server.requests.values()) == 1
    assert cached_files(cache) == mirror


def test_error_in_a_worker_stops_the_batch(cache, mirror, server, monkeypatch) -> None:
    server.plan = lambda rel, attempt: ("ok", 0.02)
    real, calls = assets._download_once, []

    def broken(url, dest, sha256, timeout, stop=None):
        calls.append(url)
        if len(calls) == 15:
            raise PermissionError("cache not writable")  # not a download failure: no retry
        real(url, dest, sha256, timeout, stop)

    monkeypatch.setattr(assets, "_download_once", broken)
    with pytest.raises(PermissionError, match="not writable"):
        fetch_many(mirror, base_url=server.url, workers=4, progress=False)
    done = cached_files(cache)
    assert 0 < len(done) <= 14 and all(mirror.get(r) == s for r, s in done.items())
    assert len(calls) < N


def test_stale_partial_files_are_cleaned_and_corrupt_files_refetched(cache, mirror, server) -> None:
    rels = list(mirror)[:4]
    folder = (cache / rels[0]).parent
    folder.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    stale = folder / f".part-{dead}-0123abcd-xyz"  # a process killed mid-download
    mine = folder / f".part-{os.getpid()}-{assets._TOKEN}-xyz"  # in use by this process
    earlier_me = folder / f".part-{os.getpid()}-ffffffff-xyz"  # an earlier process with our pid
    for p in (stale, mine, earlier_me):
        p.write_bytes(b"half")
    (cache / rels[0]).write_bytes(b"not the file")  # e.g. edited by hand
    fetch_many({r: mirror[r] for r in rels}, base_url=server.url, progress=False)
    assert not stale.exists() and not earlier_me.exists() and mine.exists()
    mine.unlink()
    assert cached_files(cache) == {r: mirror[r] for r in rels}


def test_transient_failures_give_up_after_bounded_tries(cache, mirror, server) -> None:
    bad, dropped = list(mirror)[:2]
    server.plan = lambda rel, attempt: {bad: ("503", 0.0), dropped: ("drop", 0.0)}.get(rel, ("ok", 0.0))
    with pytest.raises(DownloadsFailedError) as info:
        fetch_many(mirror, base_url=server.url, progress=False)
    assert set(info.value.failures) == {bad, dropped}
    assert server.requests[bad] == server.requests[dropped] == assets.TRIES
    assert "HTTP 503" in str(info.value.failures[bad]) and f"after {assets.TRIES} tries" in str(info.value)
    assert isinstance(info.value.failures[dropped], OfflineError)
    assert len(cached_files(cache)) == N - 2


def test_unreachable_server_is_offline_and_the_batch_gives_up(cache, mirror, monkeypatch) -> None:
    with socket_closed_port() as url:
        monkeypatch.setattr(assets, "ABORT_AFTER", 5)
        monkeypatch.setattr(assets, "TRIES", 2)
        with pytest.raises(OfflineError) as info:
            fetch_many(mirror, base_url=url, workers=2, progress=False)
    e = info.value
    assert isinstance(e, DownloadsFailedError) and len(e.failures) + e.not_attempted == N
    assert e.not_attempted >= N - 5 - 2 and "not attempted after 5 failures in a row" in str(e)


def test_wrong_file_is_a_checksum_error_without_retry(cache, mirror, server, tmp_path) -> None:
    a, b = list(mirror)[:2]
    (tmp_path / "mirror" / a).write_bytes((tmp_path / "mirror" / b).read_bytes())
    with pytest.raises(ChecksumError, match="expected"):
        fetch(a, mirror[a], base_url=server.url)
    assert server.requests[a] == 1 and cached_files(cache) == {}


def test_single_fetch_retries(cache, mirror, server) -> None:
    rel = list(mirror)[0]
    server.plan = lambda r, attempt: ("reset" if attempt < 2 else "ok", 0.0)
    assert fetch(rel, mirror[rel], base_url=server.url) == cache / rel
    assert server.requests[rel] == 3 and cached_files(cache) == {rel: mirror[rel]}


def test_load_images_through_a_faulty_mirror(real_assets, cache, monkeypatch, capsys) -> None:
    with FaultyServer(real_assets, random_plan(seed=1, p_drop=0.3, p_truncate=0.1, delay_s=0.05)) as srv:
        monkeypatch.setenv("DSM_LITE_DATA_URL", srv.url)
        s = load_images("imagenette-val", n=20, seed=0)
        assert not srv.requests  # nothing fetched until the pixels are needed
        s.images
        assert srv.max_inflight > 1 and sum(srv.requests.values()) > 20  # some were retried
    files = manifest("imagenette-val")
    assert cached_files(cache) == {r: files[r] for r in s.paths}
    assert "Downloading imagenette-val" in capsys.readouterr().err


def test_offline_assets_print_nothing(with_assets, capsys) -> None:
    load_images("imagenet-sample", n=3).images
    assert capsys.readouterr() == ("", "")


class socket_closed_port:
    """A loopback URL on which nothing listens (connection refused)."""

    def __enter__(self) -> str:
        import socket
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        pass
