"""Wall time of every chapter, executed top to bottom as a reader runs it (stored sweep results
read from dsm_lite/results/book.npz, a cold result cache), one chapter after another.

    DSM_LITE_ASSETS=../shared/assets python benchmarks/chapter_times.py [NOTEBOOK ...]

Prints a Markdown table (chapter, seconds, minutes) headed by the machine, for the book's
roadmap (book/intro.md). Run it on a quiet machine: other jobs on the cores slow every chapter.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import nbformat
import torch
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("notebooks", nargs="*", help="default: book/*.ipynb")
    args = p.parse_args(argv)
    paths = [Path(x) for x in args.notebooks] or sorted((ROOT / "book").glob("*.ipynb"))
    os.environ["DSM_LITE_CACHE"] = tempfile.mkdtemp(prefix="dsm-lite-times-")  # cold, like a new reader
    where = (torch.cuda.get_device_name() if torch.cuda.is_available() else
             f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores")
    print(f"# chapter wall times on {where} (torch {torch.__version__})")
    print("| chapter | seconds | minutes |")
    print("|---|---|---|")
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        t0 = time.perf_counter()
        NotebookClient(nb, timeout=3600, kernel_name="python3",
                       resources={"metadata": {"path": str(path.parent)}}).execute()
        dt = time.perf_counter() - t0
        print(f"| {path.stem} | {dt:.0f} | {dt / 60:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
