"""The one block and chunk-size policy: multiples of the stride near a byte budget.

:func:`stride_multiples` picks, per axis, a multiple of the stride that keeps a block near a byte
budget, growing the smallest side first (roughly isotropic). It is the one policy behind
:func:`daskpatch.aligned_chunks` (Zarr chunks) and the engine's automatic work blocks
(:func:`work_block`, which also keeps a model's batches full).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from daskpatch.geometry.grid import PatchGrid


def stride_multiples(
    lengths: Sequence[int],
    strides: Sequence[int],
    budget: float,
    *,
    start: Sequence[int] | None = None,
    clamp: bool = True,
    ties: Literal["first", "last"] = "last",
) -> tuple[int, ...]:
    """How many strides a block spans per axis, so that it stays near ``budget`` elements.

    From ``start`` (one stride per axis by default) the smallest side grows by one stride while
    the block stays within ``budget`` elements; an axis stops growing once it covers its
    length. One stride per axis is the minimum even when it exceeds the budget.

    Parameters
    ----------
    lengths, strides : sequence of int
        Length and stride of each axis the block spans.
    budget : float
        Elements per block.
    start : sequence of int, optional
        Multiples to grow from (each at least 1 and at most ``ceil(length / stride)``).
    clamp : bool, default True
        Count a side that covers its whole axis at the axis length (a Zarr chunk, cut at the
        array's end); ``False`` counts the whole multiple of the stride (the engine's blocks).
    ties : {"last", "first"}, default "last"
        Which axis grows when several sides are equally small.

    Returns
    -------
    tuple of int
        The multiple of the stride per axis; the block side is ``multiple * stride`` (at most
        the length with ``clamp``).

    Examples
    --------
    >>> stride_multiples((512, 512, 512), (64, 64, 64), 2**21)
    (2, 2, 2)
    >>> stride_multiples((100, 40), (64, 64), 7000)  # a 100 x 40 chunk
    (2, 1)
    >>> stride_multiples((100, 40), (64, 64), 7000, clamp=False)  # 128 x 64 would exceed it
    (1, 1)
    """
    m = len(strides)
    kmax = [-(-n // s) for n, s in zip(lengths, strides)]
    k = [1] * m if start is None else list(start)

    def side(i: int, ki: int) -> int:
        return min(ki * strides[i], lengths[i]) if clamp else ki * strides[i]

    sign = -1 if ties == "last" else 1
    while True:
        total = math.prod(side(i, k[i]) for i in range(m))
        grow = [
            i for i in range(m)
            if k[i] < kmax[i] and total // side(i, k[i]) * side(i, k[i] + 1) <= budget
        ]
        if not grow:
            return tuple(k)
        i = min(grow, key=lambda i: (side(i, k[i]), sign * i))
        k[i] += 1


def _isotropic_start(lengths: Sequence[int], strides: Sequence[int], budget: float
                     ) -> list[int]:
    """A closed-form start for :func:`stride_multiples`: an isotropic cube of side L, with axes
    that hit a bound fixed there and the budget redistributed over the others. Axes whose single
    stride exceeds L are fixed first (that shrinks L); only then axes shorter than L are taken
    whole (that grows L, so it never forces another axis below one stride and the chunk stays
    within the budget)."""
    m = len(strides)
    kmax = [-(-n // s) for n, s in zip(lengths, strides)]
    k = [1] * m
    fixed: dict[int, int] = {}
    while len(fixed) < m:
        free = [i for i in range(m) if i not in fixed]
        side = (budget / math.prod(min(fixed[i] * strides[i], lengths[i]) for i in fixed)
                ) ** (1 / len(free))
        hit = {i: 1 for i in free if side <= strides[i]}
        if not hit:
            hit = {i: kmax[i] for i in free if side >= lengths[i]}
        if not hit:
            for i in free:
                k[i] = min(kmax[i], max(1, int(side // strides[i])))
            break
        fixed.update(hit)
    for i, ki in fixed.items():
        k[i] = ki
    return k


#: Batch fill the automatic block aims for where its blocks own fewer patches than a batch: the
#: fewest calls of ``fn`` the patches need, ``ceil(patches / batch_size)``, over the calls the
#: blocks make (each block calls ``fn`` on full batches and one remainder).
MIN_FILL = 0.9


def _batch_fill(starts: list[np.ndarray], block: list[int], batch_size: int
                ) -> tuple[float, int]:
    """The batch fill of spatial blocks ``block`` (voxels per axis) over the patch ``starts``,
    and the fewest patches a block owning any owns."""
    per_axis = [Counter(c for c in np.bincount(s // b).tolist() if c)
                for s, b in zip(starts, block)]
    smallest = math.prod(min(c) for c in per_axis) if all(per_axis) else 0
    if batch_size == 1:
        return 1.0, smallest
    calls = 0
    for combo in itertools.product(*[c.items() for c in per_axis]):
        calls += math.prod(m for _, m in combo) * -(-math.prod(n for n, _ in combo) // batch_size)
    ideal = -(-math.prod(len(s) for s in starts) // batch_size)
    return (ideal / calls if calls else 1.0), smallest


def _auto_block(
    grid: PatchGrid, n_batch: int, itemsize: int, channels: int,
    input_chunks: tuple[tuple[int, ...], ...] | None,
    batch_size: int, block_bytes: float, min_blocks: int,
) -> tuple[int, ...]:
    """A stride-aligned spatial block near ``block_bytes`` (the input's chunks if aligned), in
    at least ``min_blocks`` blocks where the volume allows.

    With ``batch_size`` > 1 the blocks also keep ``fn``'s batches full: the min-blocks split
    stops before a block would own fewer patches than a batch while the fill (see
    :func:`_batch_fill`) drops below :data:`MIN_FILL` (a small volume is not split into
    one-patch calls), and blocks that small grow until the fill reaches it, up to
    ``block-bytes`` or four batches' bytes, whichever is larger. Each block still makes at most
    one call with a part-filled batch."""
    spatial = range(n_batch, grid.ndim)
    stride = [grid.stride[a] for a in spatial]
    shape = [grid.shape[a] for a in spatial]
    axis_starts = [grid.axis_starts(a) for a in spatial]
    kmax = [-(-n // s) for n, s in zip(shape, stride)]
    batch_voxels = batch_size * math.prod(grid.size[a] for a in spatial)
    limit = max(block_bytes, 4 * batch_voxels * itemsize * channels)

    def full(mult: list[int]) -> tuple[bool, float, int]:
        """Whether the blocks ``mult`` keep the batches full; their fill and smallest block."""
        fill, smallest = _batch_fill(axis_starts, [m * s for m, s in zip(mult, stride)],
                                     batch_size)
        return smallest >= batch_size or fill >= MIN_FILL, fill, smallest

    def keeps(trial: list[int], mult: list[int]) -> bool:
        """Whether ``trial`` keeps the batches full, or at least as full as ``mult``."""
        ok, fill, _ = full(trial)
        return ok or fill >= full(mult)[1]

    def grow(mult: list[int], step: list[int]) -> tuple[int, ...]:
        """``mult``, or where its batches are not full, ``mult`` grown by ``step`` strides on
        one axis at a time (the one that fills the batches best, the smallest side on a tie)
        until they fill to :data:`MIN_FILL`, within ``limit``."""
        mult = list(mult)
        if full(mult)[0]:
            return tuple(m * s for m, s in zip(mult, stride))
        while full(mult)[1] < MIN_FILL:
            best = None
            for i in range(len(mult)):
                trial = list(mult)
                trial[i] = min(mult[i] + step[i], kmax[i])
                nbytes = math.prod(t * s for t, s in zip(trial, stride)) * itemsize * channels
                if trial[i] == mult[i] or nbytes > limit:
                    continue
                _, fill, smallest = full(trial)
                rank = (min(smallest, batch_size), fill, -mult[i] * stride[i])
                if best is None or rank > best[0]:
                    best = (rank, trial)
            if best is None:
                break
            mult = best[1]
        return tuple(m * s for m, s in zip(mult, stride))

    if input_chunks is not None:
        sizes = [input_chunks[a][0] for a in spatial]
        regular = all(len(set(input_chunks[a][:-1])) <= 1 and input_chunks[a][-1] <= sizes[i]
                      for i, a in enumerate(spatial))
        nbytes = math.prod(sizes) * itemsize * channels
        if regular and all(c % s == 0 for c, s in zip(sizes, stride)) and (
            block_bytes // 8 <= nbytes <= block_bytes * 2
        ):
            # whole input chunks: grown by whole chunks where the batches do not fill
            return grow([c // s for c, s in zip(sizes, stride)],
                        [c // s for c, s in zip(sizes, stride)])
    voxels = max(1, block_bytes // (itemsize * channels))
    # the one chunk-size policy (as aligned_chunks): whole strides, smallest axis grown first
    mult = list(stride_multiples(shape, stride, voxels, clamp=False, ties="first"))
    # enough blocks to keep every core busy on small volumes (but batches that fill) ...
    starts = [len(s) for s in axis_starts]
    while math.prod(-(-m // k) for m, k in zip(starts, mult)) < min_blocks:
        i = max(range(len(mult)), key=lambda j: mult[j] * stride[j])
        if mult[i] == 1:
            break
        trial = mult[:i] + [mult[i] - 1] + mult[i + 1:]
        if batch_size > 1 and not keeps(trial, mult):
            break
        mult = trial
    # ... and the same number of patch starts in each block of an axis, as far as possible
    even = [-(-m // -(-m // k)) for m, k in zip(starts, mult)]
    if batch_size == 1 or keeps(even, mult):
        mult = even
    return grow(mult, [1] * len(mult)) if batch_size > 1 else tuple(
        m * s for m, s in zip(mult, stride))



def work_block(grid: PatchGrid, n_batch: int, block_shape: Any, itemsize: int, channels: int,
               input_chunks: tuple[tuple[int, ...], ...] | None, batch_size: int,
               block_bytes: float, min_blocks: int
               ) -> tuple[int, ...]:
    """The work-block shape (batch axes 1): ``block_shape`` checked against the grid, or with
    ``None`` the automatic block (:func:`_auto_block`) for ``itemsize``-byte accumulators of
    ``channels`` channels."""
    if block_shape is None:
        spatial = _auto_block(grid, n_batch, itemsize, channels, input_chunks, batch_size,
                              block_bytes, min_blocks)
    else:
        spatial_grid = PatchGrid(grid.shape[n_batch:], grid.size[n_batch:],
                                 grid.stride[n_batch:], border=grid.border)
        spatial = spatial_grid.normalize_block_shape(block_shape)
    return (1,) * n_batch + tuple(spatial)
