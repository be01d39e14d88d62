"""Time of downloading every photo (imagenet-sample + imagenette-val, 4925 files) through a faulty server.

The photos are served from an offline assets folder by the loopback-only test server
(``tests/faulty_server.py``, run in its own process) that drops a share of requests (half closed
without an answer, half HTTP 503), cuts some bodies short and delays some, and fetched with
``dsm_lite.assets.fetch_many`` (retries, sha256 checks, atomic writes) into a fresh temporary
cache outside the repository, once per concurrency. Each run is followed by a second call,
which must find everything cached (no request; it only re-hashes the files).

Usage (numbers depend on the machine; commit the output with the machine named):

    python benchmarks/downloads.py --assets ../shared/assets --workers 16 1 \\
        > benchmarks/results/downloads-loopback.txt
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Dict

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from dsm_lite.assets import BACKOFF_MAX_S, BACKOFF_S, TRIES, fetch_many, manifest  # noqa: E402


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except (OSError, StopIteration):
        name = platform.processor() or "unknown CPU"
    return f"{name}, {os.cpu_count()} logical CPUs (shared), Python {platform.python_version()}, {platform.system()}"


def stats(url: str, what: str = "__stats__") -> dict:
    with urllib.request.urlopen(f"{url}/{what}", timeout=10) as r:
        return json.load(r)


def run(files: Dict[str, str], assets: Path, workers: int, args, label: str) -> str:
    cache = Path(tempfile.mkdtemp(prefix="dsm_lite-dl-", dir=args.tmp))
    os.environ["DSM_LITE_CACHE"] = str(cache)
    server = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "faulty_server.py"), str(assets), "--seed", str(args.seed),
         "--drop", str(args.drop), "--truncate", str(args.truncate), "--delay-frac", str(args.delay_frac),
         "--delay", str(args.delay), "--latency", str(args.latency), "--lifetime", "3600"],
        stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().strip()
        t0 = time.perf_counter()
        fetch_many(files, base_url=url, workers=workers, progress=args.progress)
        wall = time.perf_counter() - t0
        first = stats(url)
        stats(url, "__reset__")
        t0 = time.perf_counter()
        fetch_many(files, base_url=url, workers=workers, progress=args.progress)
        rerun = time.perf_counter() - t0
        assert stats(url)["requests"] == 0, "a cached file was downloaded again"
        size = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
        n_files = sum(1 for p in cache.rglob("*") if p.is_file())
        assert n_files == len(files), f"{n_files} files in the cache, {len(files)} expected (temp files left?)"
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(cache, ignore_errors=True)
    requests = first["requests"]
    return (f"{label:<20} {workers:>7} {len(files):>6} {wall:>8.1f} {len(files) / wall:>8.0f} "
            f"{size / wall / 1e6:>6.1f} {requests:>8} {requests - len(files):>7} {first['max_inflight']:>8} "
            f"{rerun:>9.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--assets", type=Path, default=Path(os.environ.get("DSM_LITE_ASSETS", REPO.parent / "shared" / "assets")))
    ap.add_argument("--workers", type=int, nargs="+", default=[16, 1])
    ap.add_argument("--drop", type=float, default=0.05, help="share of requests dropped (half closed, half 503)")
    ap.add_argument("--truncate", type=float, default=0.01, help="share of bodies cut to half")
    ap.add_argument("--delay-frac", type=float, default=0.10, help="share of requests delayed")
    ap.add_argument("--delay", type=float, default=0.25, help="that delay, in seconds")
    ap.add_argument("--latency", type=float, default=0.0, help="extra wait on every request, in seconds")
    ap.add_argument("--subset-serial", type=int, default=0,
                    help="with workers=1, fetch only this many files (0: all) and extrapolate")
    ap.add_argument("--no-clean", dest="clean", action="store_false", help="skip the run without faults")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tmp", default=tempfile.gettempdir(), help="where the temporary caches go")
    ap.add_argument("--progress", action="store_true", help="show the tqdm bar (stderr)")
    args = ap.parse_args()
    os.environ.pop("DSM_LITE_ASSETS", None)
    os.environ.pop("DSM_LITE_DATA_URL", None)
    if (REPO.resolve() in Path(args.tmp).resolve().parents) or Path(args.tmp).resolve() == REPO.resolve():
        sys.exit("--tmp must be outside the repository")

    files = {**manifest("imagenet-sample"), **manifest("imagenette-val")}
    print(f"# dsm_lite downloads through a faulty loopback server ({time.strftime('%Y-%m-%d')})")
    print(f"# machine: {machine()}")
    print(f"# {len(files)} photos, {sum((args.assets / r).stat().st_size for r in files) / 1e6:.0f} MB, from "
          "the offline assets folder; server (threads) in its own process, 127.0.0.1")
    print(f"# faults: {args.drop:.0%} of requests dropped (half closed without answer, half HTTP 503), "
          f"{args.truncate:.0%} of bodies cut to half, {args.delay_frac:.0%} delayed {args.delay * 1000:.0f} ms, "
          f"every request +{args.latency * 1000:.0f} ms; drawn per request (seed {args.seed})")
    print(f"# retry policy: {TRIES} tries, backoff {BACKOFF_S} s doubling "
          f"(x U[0.5, 1] jitter, cap {BACKOFF_MAX_S} s)")
    print("# wall: first call, empty cache; requests - files = retried attempts; max in: most requests "
          "open at the server at once (a worker's next request can arrive before the server thread of its "
          "last one has returned, hence 2 with 1 worker); cached: second call (all files re-hashed, no request)")
    print(f"{'run':<20} {'workers':>7} {'files':>6} {'wall s':>8} {'files/s':>8} {'MB/s':>6} "
          f"{'requests':>8} {'retried':>7} {'max in':>8} {'cached s':>9}")
    scenarios = [("faults", args)]
    if args.clean:
        clean = argparse.Namespace(**{**vars(args), "drop": 0.0, "truncate": 0.0, "delay_frac": 0.0})
        scenarios.append(("no faults", clean))
    for name, sc in scenarios:
        for w in args.workers:
            subset = files
            label = name
            if w == 1 and args.subset_serial:
                subset = dict(list(files.items())[:: max(1, len(files) // args.subset_serial)][: args.subset_serial])
                label = f"{name} (subset)"
            print(run(subset, args.assets, w, sc, label), flush=True)
            if subset is not files:
                print(f"{'':<20} ^ extrapolated to {len(files)} files: "
                      f"about {len(files) / len(subset):.1f}x the wall time above", flush=True)


if __name__ == "__main__":
    main()
