"""Batch arrays that block tasks reuse instead of faulting in fresh memory for every batch."""

from __future__ import annotations

import threading

import numpy as np

from daskpatch.engine import memory as _memory


class BatchPool:
    """Batch arrays reused by block tasks.

    A fresh batch (8 patches of 128^3 float32 is 64 MiB) costs its page faults on every block
    (~8 ms here, as much as copying the patches in); reused, it costs the copy alone. Each
    engine owns a pool (its block tasks share it on the threaded scheduler; pickled to a worker,
    a task gets a fresh, empty one), emptied whenever none of its block tasks holds a batch, so
    nothing stays allocated after a compute; a pool with ``keep=True`` (one
    :func:`daskpatch.to_numpy` job's) keeps its batches until :meth:`clear`.
    """

    def __init__(self, keep: bool = False) -> None:
        self.lock = threading.Lock()
        self.active = 0
        self.free: dict[tuple[tuple[int, ...], str], list[np.ndarray]] = {}
        self.keep = keep

    # a lock does not pickle: a copy starts empty
    def __reduce__(self) -> tuple[type[BatchPool], tuple[bool]]:
        return (type(self), (self.keep,))

    def clear(self) -> None:
        with self.lock:
            self.free.clear()

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        with self.lock:
            self.active += 1
            stack = self.free.get((shape, dtype.str))
            if stack:
                return stack.pop()
        return _memory.zeros(shape, dtype)

    def give(self, batch: np.ndarray) -> None:
        with self.lock:
            self.active -= 1
            if self.active == 0 and not self.keep:
                self.free.clear()
            else:
                self.free.setdefault((batch.shape, batch.dtype.str), []).append(batch)
