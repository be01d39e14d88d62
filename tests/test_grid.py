"""dsm_lite.grid: patch coordinates and the contiguity of merged groups, against hand-made
grids and a breadth-first search."""
from collections import deque

import torch

from dsm_lite.grid import group_contiguity, patch_coords


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
