"""Patch geometry: where the patches of a grid start, what they cover, which work block owns them.

:class:`PatchGrid` is pure geometry: it reads no data and holds only small per-axis arrays, so a
grid over a 10000^3 volume costs kilobytes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from daskpatch.errors import ParameterError
from daskpatch.geometry.parse import BORDERS, BorderMode, parse_choice, parse_int, parse_per_axis, parse_shape

__all__ = ["BlockPlan", "PatchGrid", "axis_starts"]


def axis_starts(n: int, size: int, stride: int, border: str) -> np.ndarray:
    """Start positions of the patches along one axis.

    Parameters
    ----------
    n : int
        Length of the axis.
    size, stride : int
        Patch length and step.
    border : {"shift", "pad", "drop"}
        ``"shift"`` moves the last patch back so that it ends flush with the axis; ``"pad"`` lets
        the last patch run past the end (it is read padded); ``"drop"`` keeps only patches that
        fit, which may leave the end of the axis uncovered.

    Examples
    --------
    >>> axis_starts(10, 4, 4, "shift").tolist()
    [0, 4, 6]
    >>> axis_starts(10, 4, 4, "pad").tolist()
    [0, 4, 8]
    >>> axis_starts(10, 4, 4, "drop").tolist()
    [0, 4]
    """
    if border == "pad":
        count = min(max(1, -(-(n - size) // stride) + 1), -(-n // stride))
        return np.arange(count, dtype=np.int64) * stride
    starts = np.arange(0, n - size + 1, stride, dtype=np.int64)
    if border == "shift" and (starts.size == 0 or starts[-1] + size < n):
        starts = np.append(starts, n - size)
    return starts


@dataclass(frozen=True)
class PatchGrid:
    """A regular grid of patches over an N-D volume (geometry only, no data).

    Parameters
    ----------
    shape : sequence of int
        Spatial shape of the volume.
    size : int or sequence of int
        Patch shape; an int means the same length on every axis.
    stride : int or sequence of int, optional
        Step between patch starts; ``None`` means ``stride = size`` (no overlap). A stride larger
        than the size samples sparsely (some voxels are not covered).
    border : {"shift", "pad", "drop"}
        What to do where the stride grid does not end flush with the volume: ``"shift"`` (default)
        moves the last patch on each axis back so it ends at the volume's end, as MONAI, TorchIO
        and nnU-Net place it; ``"pad"`` lets the last patch run past the end (its data is padded
        when read and cropped after reconstruction); ``"drop"`` drops incomplete patches (the seed's
        behaviour), leaving the remainder uncovered.

    Patches are numbered in C order over the per-axis starts.

    Examples
    --------
    >>> grid = PatchGrid((10, 8), size=4, stride=(4, 2))
    >>> grid.starts
    ((0, 4, 6), (0, 2, 4))
    >>> len(grid), grid.grid_shape
    (9, (3, 3))
    >>> grid[4]
    (slice(4, 8, None), slice(2, 6, None))
    >>> grid.start(8)
    (6, 4)
    >>> PatchGrid((10,), 4, border="drop").uncovered
    2
    """

    shape: tuple[int, ...]
    size: tuple[int, ...]
    stride: tuple[int, ...] = field(default=None)  # type: ignore[arg-type]
    border: BorderMode = "shift"

    def __init__(
        self, shape: Any, size: Any, stride: Any = None, *, border: BorderMode = "shift"
    ) -> None:
        shape = parse_shape(shape, "shape")
        size = parse_per_axis(size, len(shape), "size")
        stride = size if stride is None else parse_per_axis(stride, len(shape), "stride")
        border = parse_choice(border, "border", BORDERS)  # type: ignore[assignment]
        for ax, (n, s) in enumerate(zip(shape, size)):
            if s > n and border != "pad":
                raise ValueError(
                    f"size {size} is larger than the volume shape {shape} on axis {ax} "
                    f"({s} > {n}); with border={border!r} no patch fits there: use "
                    "border='pad' or a smaller size"
                )
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "stride", stride)
        object.__setattr__(self, "border", border)

    # -- per-axis geometry ---------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        """Number of spatial axes."""
        return len(self.shape)

    @cached_property
    def _starts(self) -> tuple[np.ndarray, ...]:
        return tuple(
            axis_starts(n, s, st, self.border)
            for n, s, st in zip(self.shape, self.size, self.stride)
        )

    @property
    def starts(self) -> tuple[tuple[int, ...], ...]:
        """Per-axis start positions, as tuples of ints."""
        return tuple(tuple(int(v) for v in s) for s in self._starts)

    def axis_starts(self, axis: int) -> np.ndarray:
        """Start positions along ``axis`` as a read-only int64 array."""
        out = self._starts[axis].view()
        out.flags.writeable = False
        return out

    @property
    def grid_shape(self) -> tuple[int, ...]:
        """Number of patches along each axis."""
        return tuple(len(s) for s in self._starts)

    def __len__(self) -> int:
        return math.prod(self.grid_shape)

    @property
    def padded_shape(self) -> tuple[int, ...]:
        """Extent the patches reach: ``shape`` except where ``border="pad"`` runs past the end."""
        return tuple(
            max(n, int(s[-1]) + z) if s.size else n
            for n, s, z in zip(self.shape, self._starts, self.size)
        )

    @property
    def pad_width(self) -> tuple[tuple[int, int], ...]:
        """Padding past the end of each axis needed to read every patch (``np.pad`` layout)."""
        return tuple((0, p - n) for p, n in zip(self.padded_shape, self.shape))

    # -- coverage ------------------------------------------------------------------------------
    def axis_coverage(self, axis: int) -> np.ndarray:
        """Boolean mask of the voxels along ``axis`` that at least one patch covers."""
        n, z = self.shape[axis], self.size[axis]
        diff = np.zeros(self.padded_shape[axis] + 1, dtype=np.int64)
        np.add.at(diff, self._starts[axis], 1)
        np.add.at(diff, self._starts[axis] + z, -1)
        return np.cumsum(diff)[:n] > 0

    @cached_property
    def uncovered(self) -> int:
        """Number of voxels of the volume that no patch covers."""
        covered = math.prod(int(self.axis_coverage(a).sum()) for a in range(self.ndim))
        return math.prod(self.shape) - covered

    # -- single patches ------------------------------------------------------------------------
    def _check_index(self, index: Any) -> int:
        i = parse_int(index, "index")
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"patch index {index} is out of range for a grid of {n} patches")
        return i % n

    def grid_index(self, index: int) -> tuple[int, ...]:
        """Per-axis position (in patches) of flat patch ``index``."""
        return tuple(int(v) for v in np.unravel_index(self._check_index(index), self.grid_shape))

    def start(self, index: int) -> tuple[int, ...]:
        """Voxel start of flat patch ``index``."""
        return tuple(int(s[g]) for s, g in zip(self._starts, self.grid_index(index)))

    def __getitem__(self, index: int) -> tuple[slice, ...]:
        """Slices of flat patch ``index`` (they may run past ``shape`` when ``border="pad"``)."""
        return tuple(slice(s, s + z) for s, z in zip(self.start(index), self.size))

    def __iter__(self) -> Iterator[tuple[slice, ...]]:
        for i in range(len(self)):
            yield self[i]

    # -- pictures --------------------------------------------------------------------------------
    def to_svg(self, block_shape: Any = None) -> str:
        """An SVG picture of the grid, as dask draws an array: the volume, the patch starts on
        each axis with their overlaps shaded, shifted border patches in red, and the work blocks
        of ``block_shape`` (a multiple of the stride) when given. Notebooks show it as the grid's
        ``_repr_html_``.

        Examples
        --------
        >>> svg = PatchGrid((64, 64, 48), 32, 16).to_svg(block_shape=32)
        >>> svg.startswith("<svg"), svg.count('class="start')
        (True, 8)
        """
        from daskpatch.viz import grid_svg

        return grid_svg(self, block_shape)

    def _repr_html_(self) -> str:
        return self.to_svg()

    # -- work blocks ---------------------------------------------------------------------------
    def normalize_block_shape(self, block_shape: Any) -> tuple[int, ...]:
        """Check that ``block_shape`` is a positive multiple of the stride on every axis."""
        block = parse_per_axis(block_shape, self.ndim, "block_shape")
        bad = [a for a in range(self.ndim) if block[a] % self.stride[a]]
        if bad:
            raise ParameterError(
                f"block_shape must be a multiple of the stride {self.stride} on every axis; "
                f"got {block} (axis {bad[0]})", param="block_shape", value=block,
                expected=f"multiples of {self.stride}"
            )
        return block

    def block_grid_shape(self, block_shape: Any) -> tuple[int, ...]:
        """Number of work blocks along each axis for ``block_shape``."""
        block = self.normalize_block_shape(block_shape)
        return tuple(-(-n // b) for n, b in zip(self.shape, block))

    def block_plan(self, block_shape: Any) -> BlockPlan:
        """The plan of the work blocks of ``block_shape``: which patches each owns, each one's
        extended range, which blocks' chunks each reaches (see :class:`BlockPlan`).

        Examples
        --------
        >>> plan = PatchGrid((16,), 4, 2).block_plan(8)
        >>> plan.owned[0], plan.ext[0], plan.targets[0]
        (((0, 4), (4, 7)), ((0, 10), (8, 16)), ((0, 1), (1,)))
        """
        return BlockPlan.of(self, self.normalize_block_shape(block_shape))

    def owner(self, index: int, block_shape: Any) -> tuple[int, ...]:
        """Block index of the work block that owns patch ``index`` (the block holding its start).

        Examples
        --------
        >>> PatchGrid((16, 16), 4, 2).owner(5, (8, 8))
        (0, 1)
        """
        return self.block_plan(block_shape).owner(self.grid_index(index))

    def block_patches(self, block_index: Any, block_shape: Any) -> np.ndarray:
        """Flat indices (C order) of the patches owned by the work block ``block_index``."""
        plan = self.block_plan(block_shape)
        idx = parse_per_axis(block_index, self.ndim, "block_index", minimum=0)
        if any(i >= n for i, n in zip(idx, plan.nblocks)):
            raise IndexError(f"block_index {idx} is out of range for a block grid of "
                             f"{plan.nblocks}")
        ranges = [np.arange(*plan.owned[a][i]) for a, i in enumerate(idx)]
        if any(r.size == 0 for r in ranges):
            return np.zeros(0, dtype=np.int64)
        return np.ravel_multi_index(np.ix_(*ranges), self.grid_shape).ravel()


@dataclass(frozen=True, eq=False)
class BlockPlan:
    """Per axis, the work blocks of a grid: the patches each owns, its extended buffer and the
    output chunks (one per block, the block's own range) it reaches.

    A patch belongs to the block holding its start; a block's extended range runs from its first
    patch's start to its last patch's end, so it reaches the chunks of the blocks above it (the
    halo). Made by :meth:`PatchGrid.block_plan`.
    """

    grid: PatchGrid
    block: tuple[int, ...]
    nblocks: tuple[int, ...]
    #: per axis, per block: its patches' index range ``[i0, i1)`` along the axis
    owned: tuple[tuple[tuple[int, int], ...], ...]
    #: per axis, per block: its extended buffer ``[lo, hi)`` (``(0, 0)``: no patch)
    ext: tuple[tuple[tuple[int, int], ...], ...]
    #: per axis, per chunk: the blocks whose buffers reach it
    sources: tuple[tuple[tuple[int, ...], ...], ...]
    #: per axis, per block: the chunks its buffer reaches
    targets: tuple[tuple[tuple[int, ...], ...], ...]

    @classmethod
    def of(cls, grid: PatchGrid, block: tuple[int, ...]) -> BlockPlan:
        nblocks = tuple(-(-n // b) for n, b in zip(grid.shape, block))
        owned_ax, ext_ax, sources_ax, targets_ax = [], [], [], []
        for a, (n, z, b) in enumerate(zip(grid.shape, grid.size, block)):
            s = grid.axis_starts(a)
            bounds = np.searchsorted(s // b, np.arange(nblocks[a] + 1))
            owned = tuple((int(bounds[i]), int(bounds[i + 1])) for i in range(nblocks[a]))
            ext = tuple((int(s[i0]), min(int(s[i1 - 1]) + z, n)) if i1 > i0 else (0, 0)
                        for i0, i1 in owned)
            srcs = tuple(tuple(k for k, (lo, hi) in enumerate(ext)
                               if hi > lo and lo < min((c + 1) * b, n) and hi > c * b)
                         for c in range(nblocks[a]))
            targets: list[list[int]] = [[] for _ in range(nblocks[a])]
            for c, blocks in enumerate(srcs):
                for k in blocks:
                    targets[k].append(c)
            owned_ax.append(owned)
            ext_ax.append(ext)
            sources_ax.append(srcs)
            targets_ax.append(tuple(tuple(t) for t in targets))
        return cls(grid, tuple(block), nblocks, tuple(owned_ax), tuple(ext_ax),
                   tuple(sources_ax), tuple(targets_ax))

    def chunk(self, a: int, c: int) -> tuple[int, int]:
        """The range ``[lo, hi)`` of output chunk (and block) ``c`` on axis ``a``."""
        n, b = self.grid.shape[a], self.block[a]
        return c * b, min((c + 1) * b, n)

    def has_patches(self, bidx: tuple[int, ...]) -> bool:
        """Whether block ``bidx`` owns any patch."""
        return all(self.owned[a][b][1] > self.owned[a][b][0] for a, b in enumerate(bidx))

    def owner(self, gidx: tuple[int, ...]) -> tuple[int, ...]:
        """The block owning the patch of grid index ``gidx``."""
        return tuple(int(self.grid.axis_starts(a)[i]) // b
                     for a, (i, b) in enumerate(zip(gidx, self.block)))
