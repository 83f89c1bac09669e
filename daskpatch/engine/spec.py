"""What each block task of the engine needs, as one frozen value per task.

A task takes its spec as ONE argument, plus its data dependencies (the region read, the patch
chunks, the block buffers and halo pieces), so a task's tuple in the graph reads as
``(function, spec, *data)``. Specs hold arrays (the weights), so they compare by identity.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from daskpatch.engine.numbers import Numbers
from daskpatch.geometry.layout import Layout


@dataclass(frozen=True, eq=False)
class Weights:
    """The windows' weights of one engine, shared by its blocks.

    ``q[a]`` (separable windows) holds axis ``a``'s normalised weight row of each patch start,
    ``q_ids[a]`` the id of each distinct row; ``user`` is a non-separable window (``q`` is then
    ``None``); ``slab_bytes`` sizes the scratch of the row-by-row accumulation (the
    ``daskpatch.slab-bytes`` setting when the graph was built).
    """

    q: list[np.ndarray] | None
    q_ids: list[np.ndarray]
    user: np.ndarray | None
    slab_bytes: int

    def sliced(self, ranges: Sequence[tuple[int, int]]) -> Weights:
        """The rows of the patch starts ``[i0, i1)`` per axis only: what one block's task
        carries (its pickled size then does not grow with the volume)."""
        q = None if self.q is None else [qa[i0:i1] for qa, (i0, i1) in zip(self.q, ranges)]
        ids = [qa[i0:i1] for qa, (i0, i1) in zip(self.q_ids, ranges)]
        return Weights(q, ids, self.user, self.slab_bytes)


@dataclass(frozen=True, eq=False)
class ApplyBlock:
    """The accumulate task of one ``apply_patches`` block: run ``fn`` on its patches (``fn`` is
    not part of the spec: the task reads it from the graph's one model key)."""

    block: tuple[int, ...]  # the block's index (named in errors)
    region_lo: tuple[int, ...]  # where the region read starts (padded coordinates)
    ext_lo: tuple[int, ...]  # the extended buffer's start
    ext_shape: tuple[int, ...]
    owned: tuple[range, ...]  # per axis, the block's patch indices (from 0: its own starts)
    starts: tuple[np.ndarray, ...]  # per axis, the block's own patch starts
    weights: Weights  # sliced to the block's own starts
    batch_size: int
    layout: Layout
    n_batch: int
    out_channels: int
    numbers: Numbers
    patch_shape: tuple[int, ...]
    origin: tuple[int, ...] = ()  # per axis, the grid index of the block's first start
    grid_shape: tuple[int, ...] = ()  # the grid's shape (patch indices in errors)
    # a model predicting at another resolution (``out_scale``): per axis, the block's patch
    # starts on the output grid (the buffer's coordinates) and the output patch shape; empty:
    # the same as ``starts`` and ``patch_shape`` (``region_lo``/``starts`` are the input's)
    out_starts: tuple[np.ndarray, ...] = ()
    out_patch_shape: tuple[int, ...] = ()


@dataclass(frozen=True, eq=False)
class ReconstructBlock:
    """The accumulate task of one ``reconstruct`` block: its patches from the patch array."""

    where: tuple[tuple[int, int], ...]  # per patch: (which chunk of the task's, row in it)
    ext_lo: tuple[int, ...]
    ext_shape: tuple[int, ...]
    gidxs: tuple[tuple[int, ...], ...]  # each patch's index among the block's own starts
    starts: tuple[tuple[int, ...], ...]  # start of each patch
    weights: Weights
    layout: Layout
    channels: int
    numbers: Numbers
    patch_shape: tuple[int, ...]


@dataclass(frozen=True, eq=False)
class ChunkSum:
    """The task summing one output chunk from its parts, and casting it.

    ``sels[k]``: a tuple of slices into part ``k`` (a block buffer) or the key of this chunk in a
    halo dict; ``dsts[k]``: where the part lands in the chunk; ``cov``: per axis, which voxels
    are covered (``None``: all); ``where``: (chunk index, spatial bounds) for error messages;
    ``copy`` (crop): the parts hold -0.0 where they do not own a voxel, so the sum is a copy.
    """

    dsts: tuple[tuple[slice, ...], ...]
    sels: tuple[Any, ...]
    chunk_shape: tuple[int, ...]
    channels: int
    user: int  # 1: the parts carry the weight sum as an extra channel, divided here
    cov: list[np.ndarray] | None
    fill_value: Any
    acc_dtype: np.dtype
    out_dtype: np.dtype
    channel_axis: int | None
    where: tuple[tuple[int, ...], tuple[tuple[int, int], ...]]
    copy: bool
