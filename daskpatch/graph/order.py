"""The order in which an overlap-add's blocks start on a ``distributed`` cluster.

Blocks differ in size (the blocks at the volume's far sides own fewer patch starts), and
``dask.order`` ranks tasks by the graph's shape only, so the biggest block may start last and
leave one worker waiting at the end. :class:`BiggestFirst` is the ``priority`` annotation of the
engines' layers (:class:`daskpatch.graph.engine.EngineLayer`) and of the jobs
:func:`daskpatch._sched.to_delayed` makes: the longest-processing-time-first rule.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


class BiggestFirst:
    """The ``priority`` annotation (a function of the key) that starts the blocks of
    overlap-add ``engines`` biggest first on a ``distributed`` cluster.

    A block owning ``n`` patches gets priority ``n - biggest``: the biggest blocks keep dask's
    order (priority 0, as every task without one), smaller ones wait for the tasks ready
    before them, the smallest last. With 7 patch starts per axis, 8 blocks own 64, 48, 36 or
    27 patches; ``dask.order`` alone ranked the 64-patch block 7th of 8 in
    :func:`daskpatch.to_zarr`'s job. Keys of other tasks get ``None`` (no annotation). Local
    schedulers ignore annotations.

    Examples
    --------
    >>> import numpy as np, daskpatch as dp, daskpatch.graph.engine
    >>> r = dp.apply_patches(np.zeros((14, 14), np.float32), lambda b: b, 4, 2,
    ...                      block_shape=8)
    >>> (engine,) = daskpatch.graph.engine.find_engines(r).values()
    >>> engine.block_patches()
    ((4, 2), (4, 2))
    >>> order = BiggestFirst([engine])
    >>> [order((engine.acc_name, i, j)) for i, j in [(0, 0), (0, 1), (1, 1)]]
    [0, -8, -12]
    >>> order((engine.name, 0, 0)) is None
    True
    """

    def __init__(self, engines: Iterable[Any]) -> None:
        self.sizes: dict[str, tuple[tuple[tuple[int, ...], ...], int]] = {}
        for e in engines:
            counts = e.block_patches()
            self.sizes[e.acc_name] = (counts, math.prod(max(c) for c in counts))

    def __call__(self, key: Any) -> int | None:
        if not isinstance(key, tuple) or not key or key[0] not in self.sizes:
            return None
        counts, biggest = self.sizes[key[0]]
        return math.prod(c[i] for c, i in zip(counts, key[1:])) - biggest


def then(previous: Any, result: Any) -> Any:
    """``result``, computed after ``previous`` (a task that orders blocks)."""
    return result
