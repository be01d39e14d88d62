"""dsm_lite.windows' grid geometry: patch coordinates and the contiguity of merged groups, against hand-made
grids and a breadth-first search."""
from collections import deque

import pytest
import torch

from dsm_lite.windows import group_contiguity, group_sizes, patch_coords


def test_patch_coords_row_major():
    assert patch_coords(5, (4, 4)) == (1, 1) and patch_coords(15, (4, 4)) == (3, 3)
    rows, cols = patch_coords(torch.tensor([0, 7]), (4, 4))
    assert rows.tolist() == [0, 1] and cols.tolist() == [0, 3]
    assert patch_coords(13, (2, 7)) == (1, 6)  # a non-square grid: the width decides


def test_group_contiguity_hand_made():
    g = torch.arange(16).view(1, 4, 4).clone()
    g[0, 0, 0] = g[0, 0, 1] = 0          # horizontal pair: connected, box 2 / size 2
    g[0, 2, 0] = g[0, 3, 3] = 8          # two far corners: not connected, box 2*4=8 / 2
    g[0, 1, 1] = g[0, 2, 2] = 5          # diagonal pair: not 4-connected, box 4 / 2
    share, spread = group_contiguity(g)
    assert torch.allclose(share, torch.tensor([1 / 3], dtype=torch.float64))
    assert torch.allclose(spread, torch.tensor([(1 + 4 + 2) / 3], dtype=torch.float64))


def test_group_contiguity_snake_and_nothing_merged():
    # a U-shaped group needs more than one flood-fill sweep; an identity grid has no merged group
    g = torch.arange(9).view(1, 3, 3).clone()
    for p in [(0, 0), (1, 0), (2, 0), (2, 1), (2, 2), (1, 2), (0, 2)]:
        g[0, p[0], p[1]] = 7
    share, spread = group_contiguity(torch.cat([g, torch.arange(9).view(1, 3, 3)]))
    assert share[0] == 1.0 and torch.isclose(spread[0], torch.tensor(9 / 7, dtype=torch.float64))
    assert torch.isnan(share[1]) and torch.isnan(spread[1])


def test_group_contiguity_matches_bfs_random():
    gen = torch.Generator().manual_seed(0)
    groups = torch.randint(0, 12, (20, 5, 6), generator=gen)
    share, _ = group_contiguity(groups)
    for i in range(20):
        gi = groups[i]
        ok = []
        for k in gi.unique():
            cells = {tuple(p) for p in (gi == k).nonzero().tolist()}
            if len(cells) < 2:
                continue
            start = next(iter(cells)); seen = {start}; q = deque([start])
            while q:
                y, x = q.popleft()
                for nb in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                    if nb in cells and nb not in seen:
                        seen.add(nb); q.append(nb)
            ok.append(len(seen) == len(cells))
        assert abs(share[i].item() - sum(ok) / len(ok)) < 1e-12


def test_group_sizes_against_counting_by_hand():
    g = torch.Generator().manual_seed(0)
    groups = torch.randint(0, 6, (3, 4, 4), generator=g)
    got = group_sizes(groups)
    for b in range(3):
        for i in range(4):
            for j in range(4):
                assert got[b, i, j] == int((groups[b] == groups[b, i, j]).sum())
    assert group_sizes(torch.arange(16).view(1, 4, 4)).eq(1).all()  # nothing merged
    with pytest.raises(ValueError, match="lie in"):
        group_sizes(torch.full((1, 2, 2), 4))
    with pytest.raises(ValueError, match=r"\(B, h, w\)"):
        group_sizes(torch.zeros(4, 4, dtype=torch.long))


def test_group_sizes_counts_only_the_masked_patches():
    g = torch.Generator().manual_seed(1)
    groups = torch.randint(0, 5, (2, 3, 3), generator=g)
    mask = torch.rand(3, 3, generator=g) > 0.5
    got = group_sizes(groups, counted=mask)
    for b in range(2):
        for i in range(3):
            for j in range(3):
                assert got[b, i, j] == int(((groups[b] == groups[b, i, j]) & mask).sum())
    with pytest.raises(ValueError, match="counted"):
        group_sizes(groups, counted=torch.ones(2, 2, dtype=torch.bool))
