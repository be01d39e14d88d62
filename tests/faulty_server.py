"""A loopback-only HTTP file server that misbehaves on purpose, for download tests and benchmarks.

Each GET is answered according to ``plan(path, attempt)`` (``attempt`` counts this path's
requests from 0), which returns an action and a delay in seconds slept before it:

- ``"ok"``: the file, with its Content-Length.
- ``"drop"``: the connection is closed without a response.
- ``"reset"``: the connection is reset (RST).
- ``"503"``, ``"500"``, ``"429"``, ``"404"``: that status (429 with ``Retry-After: 0``).
- ``"truncate"``: Content-Length of the whole file, then only its first half, then close.
- ``"truncate_nolength"``: no Content-Length, half the file, then close.
- ``"stall"``: the delay is meant to outlast the client's timeout; then the file.
- ``"slow_body"``: headers and half the file at once, the other half after the delay.

The server records every request (``requests``: path -> count) and the largest number of
requests in flight at once (``max_inflight``); ``GET /__stats__`` returns them as JSON
(``{"requests": total, "files": distinct paths, "max_inflight": ...}``) and ``GET /__reset__``
clears them, for a server run in another process (``python tests/faulty_server.py FOLDER``,
which prints its URL). It binds 127.0.0.1 only and shuts itself down after ``lifetime_s``
even if ``stop()`` is never called.
"""
from __future__ import annotations

import argparse
import hashlib
import http.server
import json
import random
import socket
import struct
import threading
import time
import urllib.parse
from collections import Counter
from pathlib import Path
from typing import Callable, Optional, Tuple

Plan = Callable[[str, int], Tuple[str, float]]


def always_ok(path: str, attempt: int) -> Tuple[str, float]:
    return "ok", 0.0


def random_plan(seed: int = 0, p_drop: float = 0.05, p_delay: float = 0.1, delay_s: float = 0.25,
                p_truncate: float = 0.0, latency_s: float = 0.0) -> Plan:
    """Faults drawn independently per request (reproducible: seeded by path and attempt).

    ``p_drop``: share of requests that fail (half closed without a response, half HTTP 503);
    ``p_truncate``: share cut to half their body; ``p_delay``: share delayed by ``delay_s``;
    every request also waits ``latency_s`` (a round trip to a far server).
    """
    def plan(path: str, attempt: int) -> Tuple[str, float]:
        digest = hashlib.sha256(f"{seed}|{path}|{attempt}".encode()).digest()
        rng = random.Random(digest)
        u, delay = rng.random(), latency_s + (delay_s if rng.random() < p_delay else 0.0)
        if u < p_drop / 2:
            return "drop", delay
        if u < p_drop:
            return "503", delay
        if u < p_drop + p_truncate:
            return "truncate", delay
        return "ok", delay
    return plan


class FaultyServer:
    """``with FaultyServer(folder, plan) as srv: fetch from srv.url``."""

    def __init__(self, folder: Path, plan: Plan = always_ok, lifetime_s: float = 120.0):
        self.folder = Path(folder).resolve()
        self.plan = plan
        self.requests: Counter = Counter()
        self.inflight = 0
        self.max_inflight = 0
        self._lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                rel = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
                if rel in ("__stats__", "__reset__"):
                    if rel == "__reset__":
                        outer.reset_counts()
                    with outer._lock:
                        body = json.dumps({"requests": sum(outer.requests.values()), "files": len(outer.requests),
                                           "max_inflight": outer.max_inflight}).encode()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                with outer._lock:
                    attempt = outer.requests[rel]
                    outer.requests[rel] += 1
                    outer.inflight += 1
                    outer.max_inflight = max(outer.max_inflight, outer.inflight)
                try:
                    action, delay = outer.plan(rel, attempt)
                    if delay and action != "slow_body":
                        time.sleep(delay)
                    self._act(rel, action, delay)
                finally:
                    with outer._lock:
                        outer.inflight -= 1

            def _act(self, rel: str, action: str, delay: float) -> None:
                path = (outer.folder / rel).resolve()
                if action == "404" or outer.folder not in path.parents or not path.is_file():
                    self.send_error(404)
                    return
                if action in ("500", "503"):
                    self.send_error(int(action))
                    return
                if action == "429":
                    self.send_response(429)
                    self.send_header("Retry-After", "0")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if action == "drop":
                    self.close_connection = True
                    return
                if action == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                    self.close_connection = True
                    return
                body = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                if action != "truncate_nolength":
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if action.startswith("truncate"):
                    body = body[: len(body) // 2]
                    self.close_connection = True
                if action == "slow_body":
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    time.sleep(delay)
                    body = body[len(body) // 2:]
                self.wfile.write(body)

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            block_on_close = False
            request_queue_size = 256  # socketserver's 5 drops SYNs under load (1 s client stalls)

            def handle_error(self, request, client_address):  # a client gone on a stall: fine
                pass

        self._server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._timer = threading.Timer(lifetime_s, self._server.shutdown)
        self._timer.daemon = True
        self._stopped = False

    def start(self) -> "FaultyServer":
        self._thread.start()
        self._timer.start()
        return self

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._timer.cancel()
            self._server.shutdown()
            self._server.server_close()

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()
            self.max_inflight = 0

    def __enter__(self) -> "FaultyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    """Serve FOLDER with :func:`random_plan` faults until killed (or ``--lifetime`` seconds)."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--drop", type=float, default=0.05)
    ap.add_argument("--delay-frac", type=float, default=0.1)
    ap.add_argument("--delay", type=float, default=0.25)
    ap.add_argument("--truncate", type=float, default=0.0)
    ap.add_argument("--latency", type=float, default=0.0)
    ap.add_argument("--lifetime", type=float, default=3600.0)
    a = ap.parse_args()
    srv = FaultyServer(a.folder, random_plan(a.seed, a.drop, a.delay_frac, a.delay, a.truncate, a.latency),
                       lifetime_s=a.lifetime)
    print(srv.url, flush=True)
    srv.start()
    srv._thread.join()
    srv.stop()


if __name__ == "__main__":
    main()
