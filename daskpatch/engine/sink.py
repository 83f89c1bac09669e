"""The in-memory sink of :func:`daskpatch.to_numpy`: block tasks add straight into the result."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from daskpatch.engine.batches import BatchPool


class Sink:
    """The in-memory result that block tasks add into directly (:func:`daskpatch.to_numpy` on
    the local scheduler), as a canonical ``(C, *grid)`` view.

    Block tasks run one after another, in C order (each depends on the previous one), so the
    sums are the same on every run and no two blocks write at once; with ``workers > 1`` each
    block splits its batch copies and its accumulation across a pool of that many threads. One
    batch is in memory at a time, as a model on one GPU, or torch with its own threads, wants.
    """

    def __init__(self, canon: np.ndarray, workers: int = 1) -> None:
        self.canon = canon
        self.workers = workers
        self.pool = ThreadPoolExecutor(workers, "daskpatch-sink") if workers > 1 else None
        self.batches = BatchPool(keep=True)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
        self.batches.clear()

    def view(self, lo: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
        return self.canon[(slice(None),) + tuple(slice(l, l + n) for l, n in zip(lo, shape))]


def finish_into(out: np.ndarray, cov: list[np.ndarray] | None, fill_value: Any,
                done: list[Any]) -> None:
    """Fill the voxels no patch covers once every block is in (``done``: their results)."""
    if cov is not None:
        mask = np.ones((), dtype=bool)
        for c in cov:
            mask = np.logical_and.outer(mask, c)
        out[:, ~mask] = fill_value

