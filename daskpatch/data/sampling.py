"""Sampling for the training loaders: the O(chunks) chunk index and the draws that use it.

The index keeps one count per storage chunk of a label or weight array (foreground voxels, or the
weight sum), computed once with one Dask reduction task per chunk and cached in the Zarr array's
attributes (:data:`INDEX_ATTR`). :func:`draw` picks a chunk from that small table, reads that one
chunk and picks a voxel in it: memory is O(number of chunks), never O(voxels). Every draw uses
its own generator (``[seed, epoch, index]``), and the epoch lives in shared memory
(:class:`_SharedEpoch`) so DataLoader workers see it change.
"""

from __future__ import annotations

import inspect
import math
import multiprocessing
import multiprocessing.context
import numbers
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import dask
import dask.array as da
import numpy as np

from daskpatch.geometry.layout import Layout
from daskpatch.data.volumes import Source
from daskpatch.storage.sources import open_zarr
from daskpatch.geometry.parse import _describe

if TYPE_CHECKING:
    from daskpatch.data.volumes import VolumeSet

#: Name of the Zarr attribute that caches the per-chunk counts of a label or weight array.
INDEX_ATTR = "daskpatch_index"
_INDEX_VERSION = 1

#: Largest number of per-chunk counts cached in a Zarr attribute (larger indexes are recounted).
_MAX_CACHED_COUNTS = 2**17

#: Voxels per index cell for sources without storage chunks (NumPy arrays): 64^3 in 3-D.
_DEFAULT_CELL_VOXELS = 2**18

class _SharedEpoch:
    """An epoch number that the copies of a dataset in DataLoader workers see change.

    The number lives in shared memory (a ``multiprocessing.RawValue``), which forked workers
    inherit and spawned workers receive while they start, so ``set_epoch`` in the main process
    reaches workers that outlive an epoch (``persistent_workers=True``). Pickled any other way
    (``copy.deepcopy``, ``pickle.dumps``) the copy gets its own number, starting from the
    current one.
    """

    def __init__(self, value: int = 0) -> None:
        self._value = multiprocessing.RawValue("q", value)

    def get(self) -> int:
        return int(self._value.value)

    def set(self, value: int) -> None:
        self._value.value = value

    def __getstate__(self) -> dict[str, Any]:
        if multiprocessing.context.get_spawning_popen() is not None:  # starting a process
            return {"shared": self._value}
        return {"value": self.get()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "shared" in state:
            self._value = state["shared"]
        else:
            self._value = multiprocessing.RawValue("q", state["value"])


def _takes_rng(transform: Callable) -> bool:
    """Whether ``transform`` has a parameter named ``rng`` (it is then called with one)."""
    try:
        params = inspect.signature(transform).parameters
    except (TypeError, ValueError):  # some builtins and C callables have no signature
        return False
    p = params.get("rng")
    return p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)


def _parse_fraction(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number between 0 and 1; got {_describe(value)}")
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be between 0 and 1; got {value}")
    return value


# ----------------------------------------------------------------------------------------------
# The chunk index: one count per storage chunk
# ----------------------------------------------------------------------------------------------
IndexKind = Literal["foreground", "weight"]


def _cell_chunks(source: Source, layout: Layout) -> tuple[tuple[int, ...], ...]:
    """Index cells along each spatial axis: the storage chunks, or a default for NumPy."""
    out = []
    default = max(1, round(_DEFAULT_CELL_VOXELS ** (1 / len(layout.spatial_shape))))
    for ax, n in zip(layout.spatial_axes, layout.spatial_shape):
        c: Any = source.chunks[ax] if source.chunks is not None else default
        if isinstance(c, tuple):
            out.append(c)
        else:
            c = min(int(c), n)
            out.append((c,) * (n // c) + ((n % c,) if n % c else ()))
    return tuple(out)


def _count_block(block: np.ndarray, kind: str, channel_axis: int | None,
                 param: str) -> np.ndarray:
    """Reduce one chunk to its count: foreground voxels, or the weight sum."""
    out_shape = (1,) * block.ndim
    if kind == "foreground":
        mask: Any = block > 0
        if channel_axis is not None:
            mask = mask.any(axis=channel_axis)
        return np.full(out_shape, np.count_nonzero(mask), dtype=np.int64)
    w = block.astype(np.float64, copy=False)
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"{param} must be finite and >= 0 everywhere; found a negative, NaN or "
                         "infinite weight")
    return np.full(out_shape, w.sum(), dtype=np.float64)


def _count_graph(source: Source, layout: Layout, cells: tuple[tuple[int, ...], ...],
                 kind: str) -> da.Array:
    """Lazy per-cell counts with shape ``batch_shape + cell grid``: one task per chunk."""
    chunks: list[Any] = [None] * layout.ndim
    for ax in range(layout.ndim):
        if ax == layout.channel_axis:
            chunks[ax] = (source.shape[ax],)
        elif ax not in layout.spatial_axes:
            chunks[ax] = (1,) * source.shape[ax]
    for ax, c in zip(layout.spatial_axes, cells):
        chunks[ax] = c
    if source.is_dask:
        x = source.array.rechunk(tuple(chunks))
    else:
        x = da.from_array(source.array, chunks=tuple(chunks), asarray=False, lock=False,
                          inline_array=True, name=False)
    dtype = np.int64 if kind == "foreground" else np.float64
    counts = x.map_blocks(
        _count_block, kind, layout.channel_axis, source.param,
        chunks=tuple((1,) * len(c) for c in x.chunks), dtype=dtype,
        meta=np.empty((0,) * x.ndim, dtype=dtype),
    )
    if layout.channel_axis is not None:
        counts = counts[(slice(None),) * layout.channel_axis + (0,)]  # (squeeze)
    return counts


def _cache_spec(source: Source, layout: Layout, cells: tuple[tuple[int, ...], ...],
                kind: str) -> dict[str, Any]:
    return {
        "version": _INDEX_VERSION, "kind": kind, "shape": list(source.shape),
        "dtype": source.dtype.str, "channel_axis": layout.channel_axis,
        "n_batch": layout.n_batch, "cells": [list(c) for c in cells],
    }


def _read_cache(source: Source, spec: dict[str, Any],
                expected: tuple[int, ...]) -> np.ndarray | None:
    if not source.zarr_backed:
        return None
    cached = source.array.attrs.get(INDEX_ATTR)
    if not isinstance(cached, dict):
        return None
    if any(cached.get(k) != v for k, v in spec.items()):
        return None
    counts = cached.get("counts")
    if not isinstance(counts, list) or len(counts) != math.prod(expected):
        return None
    dtype = np.int64 if spec["kind"] == "foreground" else np.float64
    return np.asarray(counts, dtype=dtype).reshape(expected)


def _write_cache(source: Source, spec: dict[str, Any], counts: np.ndarray) -> bool:
    """Store the counts in the Zarr array's attributes; ``False`` when it is not writable."""
    if not source.zarr_backed or counts.size > _MAX_CACHED_COUNTS:
        return False
    value = dict(spec, counts=counts.ravel().tolist())
    try:
        if source.path is not None:
            target = open_zarr(source.path, source.param, mode="r+",
                               storage_options=source.storage_options)
        else:
            target = source.array
            if getattr(target.store, "read_only", False):
                return False
        target.update_attributes({INDEX_ATTR: value})
    except (PermissionError, OSError):
        return False
    return True


class _ChunkIndex:
    """Per-chunk counts of every volume, flattened into cumulative tables (O(chunks) memory)."""

    def __init__(self, sources: list[Source], layouts: list[Layout], kind: IndexKind,
                 volumes: tuple[tuple[int, tuple[int, ...]], ...], cache: str) -> None:
        self.kind = kind
        #: per item: spatial chunk boundaries along each axis
        self.bounds: list[tuple[np.ndarray, ...]] = []
        per_item: list[np.ndarray | None] = []
        todo: dict[int, da.Array] = {}
        specs = []
        for item, (src, lay) in enumerate(zip(sources, layouts)):
            cells = _cell_chunks(src, lay)
            self.bounds.append(tuple(np.cumsum((0,) + c, dtype=np.int64) for c in cells))
            spec = _cache_spec(src, lay, cells, kind)
            specs.append(spec)
            expected = lay.batch_shape + tuple(len(c) for c in cells)
            counts = _read_cache(src, spec, expected) if cache == "auto" else None
            per_item.append(counts)
            if counts is None:
                todo[item] = _count_graph(src, lay, cells, kind)
        #: items whose counts were computed (not read from a cache) by this call
        self.computed = tuple(todo)
        self.cached: tuple[int, ...] = ()
        if todo:
            results = dask.compute(*todo.values())
            written = []
            for item, counts in zip(todo, results):
                counts = np.asarray(counts)
                per_item[item] = counts
                if cache != "off" and _write_cache(sources[item], specs[item], counts):
                    written.append(item)
            self.cached = tuple(written)

        self.grid_shapes = [tuple(len(b) - 1 for b in bounds) for bounds in self.bounds]
        flat: list[np.ndarray] = []
        for item, batch in volumes:
            counts = per_item[item]
            assert counts is not None
            flat.append(np.asarray(counts[batch]).ravel())
        self.offsets = np.cumsum([0] + [f.size for f in flat], dtype=np.int64)
        self.volume_items = np.array([item for item, _ in volumes], dtype=np.int64)
        counts = np.concatenate(flat)
        self.cdf = np.cumsum(counts)
        if kind == "foreground":
            cell_voxels = np.concatenate([
                self._cell_voxels(item) for item, _ in volumes
            ])
            self.bg_cdf = np.cumsum(cell_voxels - counts)
        else:
            positive = np.flatnonzero(counts > 0)
            self.last_positive = int(positive[-1]) if positive.size else -1

    def _cell_voxels(self, item: int) -> np.ndarray:
        sizes = [np.diff(b) for b in self.bounds[item]]
        out = sizes[0]
        for s in sizes[1:]:
            out = np.multiply.outer(out, s)
        return np.asarray(out, dtype=np.int64).ravel()

    @property
    def n_cells(self) -> int:
        return int(self.offsets[-1])

    @property
    def nbytes(self) -> int:
        """Bytes held by the index tables."""
        arrays = [self.cdf, self.offsets, self.volume_items]
        arrays += [b for bounds in self.bounds for b in bounds]
        if self.kind == "foreground":
            arrays.append(self.bg_cdf)
        return sum(a.nbytes for a in arrays)

    def cell(self, c: int) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
        """Volume and spatial bounds ``[lo, hi)`` of flat cell ``c``."""
        v = int(np.searchsorted(self.offsets, c, side="right")) - 1
        item = int(self.volume_items[v])
        multi = np.unravel_index(c - int(self.offsets[v]), self.grid_shapes[item])
        bounds = self.bounds[item]
        lo = tuple(int(b[m]) for b, m in zip(bounds, multi))
        hi = tuple(int(b[m + 1]) for b, m in zip(bounds, multi))
        return v, lo, hi


# ----------------------------------------------------------------------------------------------
# Draws
# ----------------------------------------------------------------------------------------------
def draw(rng: np.random.Generator, volumes: VolumeSet, mode: str, index: _ChunkIndex | None,
         pos_fraction: float | None, voxel_cdf: np.ndarray) -> tuple[int, list[int]]:
    """One voxel ``(volume, spatial position)``: uniform over all volumes (``index`` None), by
    weight (``mode="weights"``) or label-balanced (``mode="label"``) through the chunk index."""
    if index is None:
        g = int(rng.integers(int(voxel_cdf[-1])))
        v = int(np.searchsorted(voxel_cdf, g, side="right"))
        local = g - (int(voxel_cdf[v - 1]) if v else 0)
        return v, [int(c) for c in np.unravel_index(local, volumes.spatial_shape(v))]
    positive, rank = False, 0
    if mode == "label":
        assert pos_fraction is not None
        positive = bool(rng.random() < pos_fraction)
        cdf = index.cdf if positive else index.bg_cdf
        target = int(rng.integers(int(cdf[-1])))
        c = int(np.searchsorted(cdf, target, side="right"))
        rank = target - (int(cdf[c - 1]) if c else 0)
    else:
        c = int(np.searchsorted(index.cdf, rng.random() * index.cdf[-1], side="right"))
        c = min(c, index.last_positive)
    v, lo, hi = index.cell(c)
    item, batch = volumes.volumes[v]
    if mode == "label":
        assert volumes.labels is not None and volumes.label_layouts is not None
        src, lay = volumes.labels[item], volumes.label_layouts[item]
    else:
        assert volumes.weights is not None and volumes.weight_layouts is not None
        src, lay = volumes.weights[item], volumes.weight_layouts[item]
    block = lay.channel_first(
        src.read(lay.index(batch, [slice(l, h) for l, h in zip(lo, hi)]))
    )
    if mode == "label":
        mask = (block > 0).any(axis=0)
        flat = np.flatnonzero(mask if positive else ~mask)
        if rank >= flat.size:
            _stale(src)
        k = int(flat[rank])
    else:
        cs = np.cumsum(block[0].ravel(), dtype=np.float64)
        if not cs.size or not cs[-1] > 0:
            _stale(src)
        k = min(int(np.searchsorted(cs, rng.random() * cs[-1], side="right")), cs.size - 1)
    offset = np.unravel_index(k, tuple(h - l for l, h in zip(lo, hi)))
    return v, [l + int(o) for l, o in zip(lo, offset)]


def _stale(src: Source) -> None:
    raise ValueError(
        f"{src.describe()} no longer matches its chunk index (the data changed after the "
        "counts were computed or cached); rebuild the dataset with cache_index='refresh'"
    )
