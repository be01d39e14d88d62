"""Progress bars: one tqdm bar on stderr over the photos a loop runs through, silent unless asked for."""
from __future__ import annotations

import sys

from tqdm import tqdm

__all__ = ["progress_bar"]


def progress_bar(total: int, desc: str, progress: bool) -> tqdm:
    """A tqdm bar over ``total`` images on stderr, silent unless ``progress``."""
    return tqdm(total=total, desc=desc, disable=not progress, leave=False, file=sys.stderr, unit="img")
