"""The statistics calls the notebooks make, on seeded synthetic inputs, for a bit-exact regression.

``calls()`` makes every statistics call the book makes, in the form the notebooks make it now
(``dsm_lite.stats`` on NumPy arrays where the book once called ``evaluation.bootstrap_ci``,
``evaluation.paired_bootstrap`` and ``evaluation.wilson_ci``; on float64 tensors where it called
``probes.bootstrap_ci`` and ``probes.percentile_band``; and ``plots.band``), and returns their
outputs as nested lists of floats, keyed by the old names. ``data/stats_golden.json`` holds the
outputs of the implementation before ``dsm_lite.stats`` existed (commit 7770199), which the
notebooks' stored outputs were computed with; test_stats checks that today's calls return
exactly the same floats. Regenerate it only with that old code and this file as of commit
4904015 (which calls the old names):

    git archive 7770199 dsm_lite | tar -x -C /tmp/old
    git show 4904015:tests/stats_cases.py > /tmp/old/stats_cases.py
    PYTHONPATH=/tmp/old python /tmp/old/stats_cases.py > tests/data/stats_golden.json
"""
from __future__ import annotations

import json
from typing import Any, Dict, List

import numpy as np
import torch


def _floats(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return float(x)


def calls() -> Dict[str, List[Any]]:
    from dsm_lite import plots, stats

    out: Dict[str, List[Any]] = {}
    rng = np.random.default_rng(2024)
    arrays = [rng.normal(size=250) * 0.1, rng.random(250) < 0.7, rng.exponential(size=97),
              rng.normal(size=3)]
    for i, x in enumerate(arrays):
        y = np.roll(x, 1) * 0.5 + 0.2 * rng.normal(size=len(x))
        for seed, n_boot in ((0, 2000), (5, 300)):
            key = f"{i}/{seed}/{n_boot}"
            out["evaluation.bootstrap_ci " + key] = [_floats(v) for v in stats.bootstrap_ci(x, n_boot, seed)]
            out["evaluation.bootstrap_ci median " + key] = [
                _floats(v) for v in stats.bootstrap_ci(x, n_boot, seed, 0.9, stat=np.median)]
            out["evaluation.paired_bootstrap " + key] = [_floats(v) for v in stats.paired_bootstrap(x, y, n_boot, seed)]
            out["evaluation.paired_bootstrap median " + key] = [
                _floats(v) for v in stats.paired_bootstrap(x, y, n_boot, seed, stat=np.median)]
        out[f"plots.band {i}"] = [_floats(v) for v in plots.band(x)]
    g = torch.Generator().manual_seed(7)
    tensors = [torch.randn(256, 12, generator=g, dtype=torch.float64) * 0.05,
               torch.rand(12, 2, 3, generator=g, dtype=torch.float64),
               (torch.rand(400, 5, generator=g) < 0.6).float()]
    for i, v in enumerate(tensors):
        for dim in range(v.dim() if v.dim() == 3 else 1):
            for level, seed in ((0.95, 0), (0.9, 3)):
                ci = stats.bootstrap_ci(v, 2000, seed, level, dim=dim)
                out[f"probes.bootstrap_ci {i}/{dim}/{level}/{seed}"] = [_floats(t) for t in ci]
            out[f"probes.percentile_band {i}/{dim}"] = [_floats(t) for t in stats.percentile_band(v, dim=dim)]
            out[f"plots.band tensor {i}/{dim}"] = [_floats(t) for t in plots.band(v, 5, 95, axis=dim)]
    for s, n in ((8, 10), (0, 20), (20, 20), (81, 263), (1, 29)):
        for level in (0.95, 0.9):
            out[f"evaluation.wilson_ci {s}/{n}/{level}"] = [_floats(v) for v in stats.wilson_ci(s, n, level)]
    return out


if __name__ == "__main__":
    import dsm_lite

    assert not hasattr(dsm_lite, "stats"), "run with the code before dsm_lite.stats (see the docstring)"
    print("{\n" + ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(calls().items())) + "\n}")
