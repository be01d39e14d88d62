"""Shared fixtures: the offline assets folder, a loopback HTTP mirror of it, and the real
ViT-Ti with its photos (loaded once per test module, unpatched around each test)."""
from __future__ import annotations

import functools
import http.server
import os
import threading
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]

# Without a GPU, the fused Triton kernels (dsm_lite.fused_merge) are tested in Triton's CPU
# interpreter, which Triton reads when the kernels are defined: set it before any test loads
# them. Notebooks run by nbval inherit it and are unaffected (backend="auto" is eager on a CPU).
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def real_assets() -> Path:
    """The real assets folder: $DSM_LITE_ASSETS, or ../shared/assets beside the repo (CI sets the former)."""
    from dsm_lite.assets import assets_dir

    root = assets_dir() if os.environ.get("DSM_LITE_ASSETS") else None
    root = root or (REPO.parent / "shared" / "assets")
    if not (root / "SHA256SUMS").is_file():
        pytest.skip("real assets not found: set DSM_LITE_ASSETS to the offline assets folder")
    return root.resolve()


@pytest.fixture
def with_assets(real_assets: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DSM_LITE_ASSETS", str(real_assets))
    return real_assets


@pytest.fixture
def serve():
    """``serve(folder) -> base URL`` of a loopback-only HTTP server; stopped after the test."""
    servers = []

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest output clean
            pass

    def start(folder: Path) -> str:
        handler = functools.partial(Quiet, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler, bind_and_activate=False)
        server.request_queue_size = 64  # the default 5 drops SYNs of concurrent downloads (1 s stalls)
        server.server_bind()
        server.server_activate()
        server.timeout = 5
        threading.Thread(target=server.serve_forever, daemon=True).start()
        # Safety net: the server shuts itself down even if teardown never runs (daemon: never
        # keeps the interpreter alive).
        timer = threading.Timer(300, server.shutdown)
        timer.daemon = True
        timer.start()
        servers.append((server, timer))
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server, timer in servers:
        timer.cancel()
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------- the real ViT-Ti
@pytest.fixture(scope="module")
def vit_ti():
    """The real ViT-Ti (offline weights; the test is skipped without them), once per module."""
    from reference import load_vit_ti

    return load_vit_ti()


@pytest.fixture(scope="module")
def photos(vit_ti):
    """8 real photos of imagenet-sample, preprocessed for ViT-Ti."""
    from reference import load_photos

    return load_photos(vit_ti, n=8)


@pytest.fixture
def ti(vit_ti):
    """The real ViT-Ti, unpatched before and after each test (fused attention restored)."""
    from reference import unpatched_during

    yield from unpatched_during(vit_ti)
