"""benchmarks/gpu_check.sh: its CPU path runs end to end (tiny settings), and bad options fail clearly."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def run(*args, **env):
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=600)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_cuda_without_a_gpu_is_refused_clearly(tmp_path):
    out = run("--out", str(tmp_path))
    assert out.returncode == 2
    assert "no GPU" in out.stderr and "--device cpu" in out.stderr


def test_unknown_options_are_refused(tmp_path):
    assert run("--device", "tpu", "--out", str(tmp_path)).returncode == 2
    assert run("--bogus").returncode == 2


def test_cpu_path_runs_the_benchmark_and_reports(tmp_path):
    out = run("--device", "cpu", "--quick", "--skip-book", "--out", str(tmp_path))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = (tmp_path / "report.txt").read_text()
    assert "(cpu)" in report and "book under nbval (1 notebooks): skipped" in report
    assert "throughput (vit_tiny_patch16_224; batch 1): done" in report
    table = (tmp_path / "throughput.txt").read_text()
    assert "vit_tiny_patch16_224" in table and "efficiency" in table
