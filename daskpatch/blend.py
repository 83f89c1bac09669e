"""The overlap-add engine: blend patches (or a model's predictions) back into a volume, by blocks.

``reconstruct`` and ``apply_patches`` share one mechanism (see DESIGN.md)::

    out(x) = sum_i w_i(x - start_i) * f(patch_i)(x - start_i)  /  W(x)

The volume is split into work blocks aligned with the stride grid; a patch belongs to the block
holding its start. Three tasks per block:

1. **accumulate** — read the block's region plus the high-side halo (``size - stride``), run ``fn``
   on the block's own patches in batches (each patch goes through the model exactly once) and add
   ``w * f(patch)`` into an extended buffer;
2. **halo** — copy the parts of that buffer that fall into other blocks' chunks, keyed by chunk,
   so the buffer itself can be freed as soon as its own chunk is done;
3. **add** — one output chunk (stride-aligned, equal to the block) sums its own buffer and the halo
   pieces its lower neighbours sent, and casts. No division: built-in windows are pre-normalised
   per axis (:mod:`daskpatch.windows`); a non-separable user window carries its weight sum as an
   extra channel, divided once here.

Each output chunk is produced by exactly one task, so writing the result to Zarr needs no locks.
"""

from __future__ import annotations

import atexit
import copy
import itertools
import math
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dask
import dask.array as da
import numpy as np
import zarr.storage
from dask.base import clone_key, tokenize
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer
from dask.utils import key_split, parse_bytes
from zarr.abc.store import Store
from zarr.buffer import default_buffer_prototype
from zarr.core.sync import sync as _zarr_sync

from ._layer import LazyLayer, key_names, lazy_graph, rename_task, renamed_layer
from ._numbers import Numbers, cast, check_fill, doubled, nan_error, saturate, wide_dtype
from ._numbers import acc_dtype as _acc_dtype
from ._regions import Volume
from ._store import window_digest
from ._torch import wrap_fn
from ._validate import (
    BORDERS,
    PAD_MODES,
    BorderMode,
    PadMode,
    _describe,
    parse_choice,
    parse_int,
    parse_pad_value,
    parse_shape,
)
from ._xarray import accepts_dataarray
from .extract import Layout, full_grid, parse_layout
from .grid import PatchGrid
from .windows import Blend, Window, parse_blend

__all__ = ["apply_patches", "reconstruct"]

#: Default byte budget of one work block's accumulation buffer (``block_shape=None``).
BLOCK_BYTES = 64 * 2**20
#: Fewest work blocks the automatic block shape aims for, where the volume allows it.
MIN_BLOCKS = 8
#: With ``spill=None``, :func:`daskpatch.to_zarr` spills the halos of a result whose blocks hand
#: more than this many bytes to their neighbours (held in memory, they grow with the volume),
#: unless the ``daskpatch.spill-bytes`` setting of :mod:`dask.config` says otherwise.
SPILL_BYTES = 128 * 2**20
#: Scratch of the row-by-row accumulation (sized to stay in a core's cache).
SLAB_BYTES = 2**19


# -- geometry of the blocks ----------------------------------------------------------------------
class _Plan:
    """Per-axis bookkeeping of blocks, owned patches, extended buffers and output chunks."""

    def __init__(self, grid: PatchGrid, block: tuple[int, ...], window: Window) -> None:
        self.grid, self.block, self.window = grid, block, window
        self.nblocks = tuple(-(-n // b) for n, b in zip(grid.shape, block))
        self.starts = [grid.axis_starts(a) for a in range(grid.ndim)]
        self.owned: list[list[tuple[int, int]]] = []  # per axis, per block: patch index range
        self.ext: list[list[tuple[int, int]]] = []  # per axis, per block: buffer [lo, hi)
        self.sources: list[list[list[int]]] = []  # per axis, per chunk: contributing blocks
        self.targets: list[list[list[int]]] = []  # per axis, per block: chunks it reaches
        self.q: list[np.ndarray | None] = []  # per axis normalised weights (n_starts, size)
        self.q_ids: list[np.ndarray] = []  # per axis id of each distinct weight row
        for a, (n, z, b, s) in enumerate(zip(grid.shape, grid.size, block, self.starts)):
            owner = s // b
            bounds = np.searchsorted(owner, np.arange(self.nblocks[a] + 1))
            owned = [(int(bounds[i]), int(bounds[i + 1])) for i in range(self.nblocks[a])]
            ext = [(int(s[i0]), min(int(s[i1 - 1]) + z, n)) if i1 > i0 else (0, 0)
                   for i0, i1 in owned]
            srcs = [[k for k, (lo, hi) in enumerate(ext)
                     if hi > lo and lo < min((c + 1) * b, n) and hi > c * b]
                    for c in range(self.nblocks[a])]
            self.owned.append(owned)
            self.ext.append(ext)
            self.sources.append(srcs)
            targets: list[list[int]] = [[] for _ in range(self.nblocks[a])]
            for c, blocks in enumerate(srcs):
                for k in blocks:
                    targets[k].append(c)
            self.targets.append(targets)
            if window.separable:
                q = window.axis_weights(s, z, grid.padded_shape[a], axis=a)
                _, ids = np.unique(q, axis=0, return_inverse=True)
                self.q.append(q)
                self.q_ids.append(ids.ravel())
            else:
                self.q.append(None)
                self.q_ids.append(np.zeros(len(s), dtype=np.int64))
        self.coverage = [grid.axis_coverage(a) for a in range(grid.ndim)]

    def chunk(self, a: int, c: int) -> tuple[int, int]:
        n, b = self.grid.shape[a], self.block[a]
        return c * b, min((c + 1) * b, n)

    def has_patches(self, bidx: tuple[int, ...]) -> bool:
        return all(self.owned[a][b][1] > self.owned[a][b][0] for a, b in enumerate(bidx))


def _auto_block(
    grid: PatchGrid, n_batch: int, itemsize: int, channels: int, input_chunks: tuple | None
) -> tuple[int, ...]:
    """A stride-aligned spatial block near :data:`BLOCK_BYTES` (the input's chunks if aligned)."""
    spatial = range(n_batch, grid.ndim)
    stride = [grid.stride[a] for a in spatial]
    shape = [grid.shape[a] for a in spatial]
    if input_chunks is not None:
        sizes = [input_chunks[a][0] for a in spatial]
        regular = all(len(set(input_chunks[a][:-1])) <= 1 and input_chunks[a][-1] <= sizes[i]
                      for i, a in enumerate(spatial))
        nbytes = math.prod(sizes) * itemsize * channels
        if regular and all(c % s == 0 for c, s in zip(sizes, stride)) and (
            BLOCK_BYTES // 8 <= nbytes <= BLOCK_BYTES * 2
        ):
            return tuple(sizes)
    voxels = max(1, BLOCK_BYTES // (itemsize * channels))
    mult = [1] * len(stride)
    while True:  # grow the smallest axis (in voxels) that can still grow
        options = [i for i in range(len(stride))
                   if mult[i] * stride[i] < shape[i]
                   and math.prod(m * s for m, s in zip(mult, stride)) // (mult[i] * stride[i])
                   * ((mult[i] + 1) * stride[i]) <= voxels]
        if not options:
            break
        i = min(options, key=lambda j: mult[j] * stride[j])
        mult[i] += 1
    # enough blocks to keep every core busy on small volumes ...
    starts = [len(grid.axis_starts(a)) for a in spatial]
    while math.prod(-(-m // k) for m, k in zip(starts, mult)) < MIN_BLOCKS:
        i = max(range(len(mult)), key=lambda j: mult[j] * stride[j])
        if mult[i] == 1:
            break
        mult[i] -= 1
    # ... and the same number of patch starts in each block of an axis, as far as possible
    mult = [-(-m // -(-m // k)) for m, k in zip(starts, mult)]
    return tuple(m * s for m, s in zip(mult, stride))


# -- task functions ------------------------------------------------------------------------------
class _BatchPool:
    """Batch arrays reused by block tasks.

    A fresh batch (8 patches of 128^3 float32 is 64 MiB) costs its page faults on every block
    (~8 ms here, as much as copying the patches in); reused, it costs the copy alone. The
    process-wide pool is emptied whenever no block task holds a batch, so nothing stays
    allocated after a compute; a pool with ``keep=True`` (one :func:`daskpatch.to_numpy` job's)
    keeps its batches until :meth:`clear`.
    """

    def __init__(self, keep: bool = False) -> None:
        self.lock = threading.Lock()
        self.active = 0
        self.free: dict = {}
        self.keep = keep

    def clear(self) -> None:
        with self.lock:
            self.free.clear()

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        with self.lock:
            self.active += 1
            stack = self.free.get((shape, dtype.str))
            if stack:
                return stack.pop()
        return np.empty(shape, dtype=dtype)

    def give(self, batch: np.ndarray) -> None:
        with self.lock:
            self.active -= 1
            if self.active == 0 and not self.keep:
                self.free.clear()
            else:
                self.free.setdefault((batch.shape, batch.dtype.str), []).append(batch)


_BATCHES = _BatchPool()


class _Sink:
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
        self.batches = _BatchPool(keep=True)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
        self.batches.clear()

    def view(self, lo: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
        return self.canon[(slice(None),) + tuple(slice(l, l + n) for l, n in zip(lo, shape))]


def _then(previous: Any, result: Any) -> Any:
    """``result``, computed after ``previous`` (a task that orders blocks)."""
    return result


class _Accumulator:
    """The extended buffer of one block and the weights of its patches.

    With a ``sink`` (separable windows, two or more axes) the buffer is the result itself, and
    each slab is added into it. ``numbers`` (:class:`~daskpatch._numbers.Numbers`) gives the
    dtypes; with ``numbers.copy`` (crop) each patch's owned box is copied into the buffer, whose
    other voxels hold the additive identity (-0.0 for floats), so summing buffers copies too.

    Every sum into the buffer is made out of place under ``np.errstate(over="raise")``: where
    one overflows (finite data near the dtype's limit, weights summing to 1 + ulp) the buffer is
    still intact, and that slab is summed again in float64 at half scale, doubled and saturated
    (:mod:`daskpatch._numbers`).
    """

    def __init__(self, ext_lo, ext_shape, channels, numbers: Numbers, q, q_ids, user_window,
                 sink: _Sink | None = None):
        self.lo = np.asarray(ext_lo)
        self.shape = tuple(ext_shape)
        extra = user_window is not None
        self.sink = sink
        self.numbers = numbers
        acc_dtype = numbers.acc
        if sink is not None:
            self.buf = sink.view(tuple(ext_lo), self.shape)
        elif numbers.copy and acc_dtype.kind in "fc":
            self.buf = np.full((channels + extra,) + self.shape, -0.0, dtype=acc_dtype)
        else:
            self.buf = np.zeros((channels + extra,) + self.shape, dtype=acc_dtype)
        self.q, self.q_ids, self.user = q, q_ids, user_window
        self.acc_dtype = acc_dtype
        self.own = _owned_boxes(q) if numbers.copy else None
        self._w: dict = {}
        self._planes: dict = {}
        self._scratch: dict = {}

    def weight(self, gidx: tuple[int, ...]) -> np.ndarray:
        """A patch's whole weight in :meth:`add`: the user window, or on one axis its row
        (separable weights on two or more axes go through :meth:`add_batch`'s planes)."""
        if self.user is not None:
            return self.user
        key = int(self.q_ids[0][gidx[0]])
        w = self._w.get(key)
        if w is None:
            w = self._w[key] = self.q[0][gidx[0]].astype(self.acc_dtype)
        return w

    def add_batch(self, gidxs: list, starts: list, ys: list) -> None:
        """Add patches ``ys[m]`` ``(C, *size)`` placed at absolute ``starts[m]``, weighted.

        Separable weights are applied row by row: patches with the same start (and weight row) on
        the first axis form a group; for each slab of a few rows of the buffer, the group's
        patches, each times its cached weight plane (the outer product over the other axes), are
        summed into a scratch that stays in cache, which is then scaled by the first axis's
        weights and added into the buffer once. Memory traffic: each output read once and the
        buffer updated once per group, instead of a multiply and an add over every whole patch.
        """
        if ys and ys[0].dtype.kind == "c" and self.numbers.out.kind != "c":
            raise TypeError(
                f"fn returned {ys[0].dtype} values but the result dtype is {self.numbers.out}: "
                "the imaginary part would be lost; pass "
                f"dtype={np.promote_types(ys[0].dtype, self.numbers.out)} (or return real values)"
            )
        if self.own is not None:
            for g, st, y in zip(gidxs, starts, ys):
                self._copy(g, st, y)
            return
        if self.user is not None or len(self.shape) < 2:
            for g, st, y in zip(gidxs, starts, ys):
                self.add(g, st, y)
            return
        groups: dict = {}
        for m, (g, st) in enumerate(zip(gidxs, starts)):
            rel = tuple(int(v) for v in np.asarray(st) - self.lo)
            groups.setdefault((rel[0], int(self.q_ids[0][g[0]])), []).append((m, rel, g))
        for (r0, _), members in groups.items():
            self._add_group(r0, members, ys)

    def _add_group(self, r0: int, members: list, ys: list) -> None:
        dt, rest = self.acc_dtype, len(self.shape) - 1
        channels = ys[members[0][0]].shape[0]
        ext = [tuple(min(y, b - r) for y, b, r in zip(ys[m].shape[1:], self.shape, rel))
               for m, rel, _ in members]
        lo = [min(rel[a + 1] for _, rel, _ in members) for a in range(rest)]
        hi = [max(rel[a + 1] + e[a + 1] for (_, rel, _), e in zip(members, ext))
              for a in range(rest)]
        box = tuple(h - l for l, h in zip(lo, hi))
        rows = max(1, SLAB_BYTES // (channels * math.prod(box) * dt.itemsize))
        n0 = max(e[0] for e in ext)
        rows = min(rows, n0)
        tmp_shape = tuple(max(e[a + 1] for e in ext) for a in range(rest))
        whole = slice(None)

        def weights(dtype: np.dtype) -> tuple[np.ndarray, list]:
            col = self.q[0][members[0][2][0]].astype(dtype)
            return col.reshape(col.shape + (1,) * rest), [self._plane(g, dtype)
                                                          for _, _, g in members]

        col, planes = weights(dt)

        def fill(slab: np.ndarray, tmp: np.ndarray, i: int, n: int, col: np.ndarray,
                 planes: list) -> None:
            """``slab`` = rows ``i:i + n`` of the group's weighted patches. The first patch
            is multiplied straight into the slab, which is zeroed only around it."""
            first = True
            for (m, rel, _), e, plane in zip(members, ext, planes):
                k = min(n, e[0] - i)
                if k <= 0:
                    continue
                inner = tuple(slice(0, x) for x in e[1:])
                place = tuple(slice(r - l, r - l + x) for r, l, x in zip(rel[1:], lo, e[1:]))
                src = ys[m][(whole, slice(i, i + k)) + inner]
                if first and k == n:
                    _zero_around(slab, place)
                    np.multiply(src, plane[inner], out=slab[(whole, whole) + place],
                                casting="unsafe")
                    first = False
                    continue
                if first:
                    slab.fill(0)
                    first = False
                t = tmp[(whole, slice(0, k)) + inner]
                np.multiply(src, plane[inner], out=t, casting="unsafe")
                d = slab[(whole, slice(0, k)) + place]
                np.add(d, t, out=d)
            if first:
                slab.fill(0)
            np.multiply(slab, col[i:i + n], out=slab)

        def run(part: int, i0: int, i1: int) -> None:
            acc = self._scratch_array(("acc", part), (channels, rows) + box)
            tmp = self._scratch_array(("tmp", part), (channels, rows) + tmp_shape)
            with np.errstate(over="raise"):
                for i in range(i0, i1, rows):
                    n = min(rows, i1 - i)
                    if self.sink is not None:
                        dst = self.sink.view((int(self.lo[0]) + r0 + i,) + tuple(
                            int(o) + l for o, l in zip(self.lo[1:], lo)), (n,) + box)[:channels]
                    else:
                        dst = self.buf[(slice(0, channels), slice(r0 + i, r0 + i + n))
                                       + tuple(slice(l, h) for l, h in zip(lo, hi))]
                    slab = acc[:, :n]
                    try:
                        fill(slab, tmp, i, n, col, planes)
                        np.add(dst, slab, out=slab)  # out of place: dst survives an overflow
                    except FloatingPointError:  # the same rows in float64, saturated
                        wide = wide_dtype(dt)
                        col64, planes64 = weights(wide)
                        with np.errstate(over="ignore"):
                            half = np.empty(slab.shape, wide)
                            fill(half, np.empty((channels, n) + tmp_shape, wide), i, n,
                                 col64 * 0.5, planes64)
                            half += dst.astype(wide) * 0.5
                        slab[...] = saturate(doubled(half), dt)
                    np.copyto(dst, slab)

        pool = self.sink.pool if self.sink is not None else None
        if pool is None or n0 <= rows:
            run(0, 0, n0)
            return
        # blocks run one at a time into a sink: each splits its rows across the cores
        cut = np.linspace(0, -(-n0 // rows), self.sink.workers + 1).round().astype(int) * rows
        parts = [(p, int(a), min(int(b), n0)) for p, (a, b) in enumerate(zip(cut, cut[1:]))
                 if a < b and a < n0]
        for f in [pool.submit(run, *part) for part in parts]:
            f.result()

    def _plane(self, gidx: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """Outer product of the weight rows of all axes but the first, cached by row identity."""
        key = tuple(int(ids[i]) for ids, i in zip(self.q_ids[1:], gidx[1:])) + (dtype.str,)
        w = self._planes.get(key)
        if w is None:
            w = np.ones((), dtype=np.float64)
            for q, i in zip(self.q[1:], gidx[1:]):
                w = np.multiply.outer(w, q[i])
            w = self._planes[key] = w.astype(dtype)
        return w

    def _scratch_array(self, key: tuple, shape: tuple[int, ...]) -> np.ndarray:
        """A scratch array of ``shape``: one buffer per ``key``, grown when too small."""
        n = math.prod(shape)
        flat = self._scratch.get(key)
        if flat is None or flat.size < n:
            flat = self._scratch[key] = np.empty(n, dtype=self.acc_dtype)
        return flat[:n].reshape(shape)

    def add(self, gidx: tuple[int, ...], start: np.ndarray, data: np.ndarray) -> None:
        """Add one patch's ``data`` ``(C, *size)`` placed at absolute ``start``."""
        w = self.weight(gidx)
        rel = start - self.lo
        size = data.shape[1:]
        end = np.minimum(rel + size, self.shape)
        dst = tuple(slice(int(r), int(e)) for r, e in zip(rel, end))
        src = tuple(slice(0, int(e - r)) for r, e in zip(rel, end))  # border="pad": cropped
        n = data.shape[0]
        target = self.buf[(slice(0, n),) + dst]
        data, wc = data[(slice(None),) + src], w[src]
        # one reused scratch buffer: no fresh (page-faulting) temporary per patch
        tmp = self._scratch_array(("add",), data.shape)
        try:
            with np.errstate(over="raise"):
                np.multiply(data, wc, out=tmp, casting="unsafe")
                np.add(target, tmp, out=tmp)  # out of place: target survives an overflow
        except FloatingPointError:  # the same sum in float64 at half scale, saturated
            with np.errstate(over="ignore"):
                half = data.astype(wide_dtype(tmp.dtype)) * (wc * 0.5) + target * 0.5
            tmp[...] = saturate(doubled(half), tmp.dtype)
        np.copyto(target, tmp)
        if self.user is not None:  # weights scaled to add up to at most 1: no overflow
            self.buf[(n,) + dst] += wc

    def _copy(self, gidx: tuple[int, ...], start: np.ndarray, data: np.ndarray) -> None:
        """Copy the box of ``data`` ``(C, *size)`` (at absolute ``start``) its patch owns."""
        own = self.own
        assert own is not None  # copy mode only
        rel = np.asarray(start) - self.lo
        src, dst = [], []
        for a, (r, i) in enumerate(zip(rel.tolist(), gidx)):
            o0, o1 = own[a][i]
            d0, d1 = r + o0, min(r + o1, self.shape[a])
            if d1 <= d0:
                return
            src.append(slice(o0, o0 + d1 - d0))
            dst.append(slice(d0, d1))
        piece = data[(slice(None),) + tuple(src)]
        target = self.buf[(slice(0, piece.shape[0]),) + tuple(dst)]
        origin = [int(self.lo[a]) + d.start for a, d in enumerate(dst)]

        def nan_at(idx: tuple[int, ...]) -> Exception:
            return self.numbers.nan_error((idx[0],) + tuple(o + i for o, i in zip(origin, idx[1:])))

        target[...] = cast(piece, target.dtype, nan_at)


def _zero_around(slab: np.ndarray, place: tuple[slice, ...]) -> None:
    """Zero ``slab`` ``(C, rows, *box)`` outside ``place`` (slices of the box's axes)."""
    head: tuple[slice, ...] = (slice(None), slice(None))
    for sl, n in zip(place, slab.shape[2:]):
        if sl.start > 0:
            slab[head + (slice(0, sl.start),)] = 0
        if sl.stop < n:
            slab[head + (slice(sl.stop, n),)] = 0
        head += (sl,)


def _owned_boxes(q: list[np.ndarray]) -> list[list[tuple[int, int]]]:
    """Per axis, per patch: the ``[lo, hi)`` (in the patch) of the voxels it owns under crop's
    0/1 weights (an interval: the crop rule is a partition of each axis)."""
    boxes = []
    for qa in q:
        nz = qa > 0
        lo = nz.argmax(axis=1)
        hi = qa.shape[1] - nz[:, ::-1].argmax(axis=1)
        hi = np.where(nz.any(axis=1), hi, lo)
        boxes.append(list(zip(lo.tolist(), hi.tolist())))
    return boxes


def _describe_output(out: Any) -> str:
    """A model output's type and shape (or length); its values only when they are a few
    scalars (a list of arrays would print megabytes)."""
    kind = type(out).__name__
    shape = getattr(out, "shape", None)
    if shape is not None:
        return f"a {kind} of shape {tuple(shape)}"
    try:
        n = len(out)
    except TypeError:
        text = repr(out)
        return f"{text} of type {kind}" if len(text) <= 80 else f"a {kind}"
    if n <= 8 and isinstance(out, (list, tuple)) and all(
            isinstance(v, (bool, int, float, complex, str)) and len(repr(v)) <= 20 for v in out):
        return f"{out!r} of type {kind} (length {n})"
    return f"a {kind} of length {n}"


def _check_output(out: Any, batch_shape: tuple, expected: tuple) -> np.ndarray:
    """Check a model's output against the shape the engine expects back."""
    if not (hasattr(out, "shape") and hasattr(out, "dtype")):
        hint = " (stack it with numpy.stack)" if isinstance(out, (list, tuple)) else ""
        raise TypeError(
            f"fn must return an array of shape {expected} for a batch of shape {batch_shape}; "
            f"got {_describe_output(out)}{hint}"
        )
    out = np.asarray(out)
    if out.dtype.kind not in "biufc":
        raise TypeError(
            f"fn must return numbers (a numeric dtype) for a batch of shape {batch_shape}; "
            f"got an array of dtype {out.dtype} ({out.dtype.name}) and shape {out.shape}"
        )
    if out.shape != expected:
        raise ValueError(
            f"fn returned shape {out.shape} for a batch of shape {batch_shape}; expected "
            f"{expected} (the batch's patch shape, with out_channels channels where the volume "
            "has a channel axis)"
        )
    return out


def _batch_note(block: tuple[int, ...], gidxs: list, starts: list, grid_shape: tuple[int, ...],
                region_lo: np.ndarray, region_shape: tuple[int, ...]) -> str:
    """Where a failing batch of ``fn`` was: its work block, its patches, the region read."""
    flat = [int(np.ravel_multi_index(g, grid_shape)) for g in gidxs]
    shown = 8
    st = ", ".join(str(tuple(int(v) for v in x)) for x in starts[:shown])
    more = f", ... ({len(starts)} patches)" if len(starts) > shown else ""
    ids = ", ".join(map(str, flat[:shown])) + (", ..." if len(flat) > shown else "")
    region = ", ".join(f"{int(lo)}:{int(lo) + n}" for lo, n in zip(region_lo, region_shape))
    return (
        f"daskpatch: raised for fn's batch of {len(starts)} "
        f"patch{'es' if len(starts) != 1 else ''} (indices {ids} in the order of "
        f"extract_patches) starting at {st}{more}, in apply_patches work block {tuple(block)}, "
        f"which reads the input region [{region}] (non-channel axes, padded coordinates)"
    )


def _apply_block(region, region_lo, ext_lo, ext_shape, owned, starts, q, q_ids, user, fn,
                 batch_size, layout, n_batch, out_channels, acc_dtype, out_patch_shape, block=(),
                 sink=None):
    """Accumulate task of ``apply_patches``: run ``fn`` on the block's patches in batches.

    An exception raised by ``fn``, or by the check of what it returned, is re-raised as it is
    with a note (PEP 678) naming the work ``block``, the batch's patches and the region read.
    """
    acc = _Accumulator(ext_lo, ext_shape, out_channels, acc_dtype, q, q_ids, user, sink)
    region_lo = np.asarray(region_lo)
    items = [(g, np.array([s[i] for s, i in zip(starts, g)]))
             for g in itertools.product(*owned)]
    size = tuple(int(v) for v in out_patch_shape)
    channels = region.shape[0]
    spatial = size[n_batch:]
    pool = sink.pool if sink is not None else None
    batches = sink.batches if sink is not None else _BATCHES
    full = batches.take((min(batch_size, len(items)), channels) + spatial, region.dtype)
    try:
        for b0 in range(0, len(items), batch_size):
            chunk = items[b0:b0 + batch_size]
            batch = full[:len(chunk)]

            def put(k: int, st: np.ndarray, batch: np.ndarray = batch) -> None:
                rel = st - region_lo
                sl = tuple(slice(int(r), int(r) + z) for r, z in zip(rel, size))
                batch[k] = region[(slice(None),) + sl].reshape(batch.shape[1:])

            if pool is None:
                for k, (_, st) in enumerate(chunk):
                    put(k, st)
            else:
                for f in [pool.submit(put, k, st) for k, (_, st) in enumerate(chunk)]:
                    f.result()
            user_batch = layout.from_canonical(batch)
            expected = layout.patch_shape(spatial, out_channels)
            try:
                out = _check_output(fn(user_batch), user_batch.shape, (len(chunk),) + expected)
            except Exception as err:
                note = _batch_note(block, [g for g, _ in chunk], [st for _, st in chunk],
                                   tuple(len(s) for s in starts), region_lo, region.shape[1:])
                axes = getattr(fn, "axes", None)  # how the volume's axes were read
                if axes:
                    note += f"; fn was called on a batch of shape {user_batch.shape}; {axes}"
                err.add_note(note)
                raise
            out = layout.to_canonical(out).reshape((len(chunk), out_channels) + size)
            acc.add_batch([g for g, _ in chunk], [st for _, st in chunk], list(out))
    finally:
        batches.give(full)
    return acc.buf if sink is None else None


def _reconstruct_block(chunks, where, ext_lo, ext_shape, gidxs, starts, q, q_ids, user, layout,
                       channels, numbers, size, sink=None):
    """Accumulate task of ``reconstruct``: the block's patches come from the patch array."""
    acc = _Accumulator(ext_lo, ext_shape, channels, numbers, q, q_ids, user, sink)
    ys = [layout.to_canonical(np.asarray(chunks[c][i:i + 1]))[0].reshape((channels,) + size)
          for c, i in where]
    acc.add_batch(gidxs, [np.asarray(st) for st in starts], ys)
    return acc.buf if sink is None else None


class _Spill:
    """Where spilled block parts wait: raw bytes under ``prefix/<engine name>/`` of a Zarr store.

    Any Zarr store works (a local directory, an object store, the output array's own store), so
    a cluster's workers see the parts wherever they can see the output. The reader knows each
    part's shape and dtype from the geometry, so a part is stored as plain bytes.
    """

    def __init__(self, store: Any, prefix: str = "") -> None:
        self.store, self.prefix = store, prefix.strip("/")

    def __repr__(self) -> str:  # part of the graph's name: the same target gives the same name
        return f"_Spill({self.store!r}, {self.prefix!r})"

    def __dask_tokenize__(self) -> str:
        return repr(self)

    def key(self, name: str, block: tuple[int, ...], target: tuple[int, ...]) -> str:
        part = f"{'.'.join(map(str, block))}-{'.'.join(map(str, target))}"
        return "/".join(p for p in (self.prefix, name, part) if p)

    def put(self, key: str, data: np.ndarray) -> None:
        raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        _zarr_sync(self.store.set(key, default_buffer_prototype().buffer.from_array_like(raw)))

    def get(self, key: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        buf = _zarr_sync(self.store.get(key, prototype=default_buffer_prototype()))
        if buf is None:
            raise FileNotFoundError(f"spilled block part {key!r} is missing from {self.store!r}")
        return buf.as_numpy_array().view(dtype).reshape(shape)

    def clear(self, name: str) -> None:
        """Delete the parts of one engine (after its result is written)."""
        if self.store.supports_deletes:
            _zarr_sync(self.store.delete_dir("/".join(p for p in (self.prefix, name) if p)))


def _halo(buf: np.ndarray, pieces: list, spill: _Spill | None = None, name: str = "",
          bidx: tuple[int, ...] = ()) -> dict:
    """Copy the parts of a block buffer that belong to other chunks, keyed by chunk index.

    With ``spill`` the parts — the block's own chunk included — are written there and the dict
    holds their keys, so the scheduler keeps only names between a block and the chunks it
    reaches, whatever order it runs them in.
    """
    if spill is None:
        return {target: buf[(slice(None),) + sl].copy() for target, sl in pieces}
    out = {}
    for target, sl in pieces:
        key = spill.key(name, bidx, target)
        spill.put(key, buf[(slice(None),) + sl])
        out[target] = (spill, key)
    return out


def _add(parts, dsts, sels, chunk_shape, channels, user, cov, fill_value, acc_dtype, out_dtype,
         channel_axis, after=None, where=None, copy=False):
    """Sum one output chunk from its own block buffer and its neighbours' halo pieces.

    ``parts[k]`` is a block buffer (``sels[k]`` a tuple of slices into it) or a halo dict
    (``sels[k]`` the key of this chunk); ``dsts[k]`` is where the part lands in the chunk.
    ``where`` is ``(chunk index, spatial bounds)`` for error messages; ``copy`` (crop): the parts
    hold -0.0 (the additive identity) where they do not own a voxel, so the sum is a copy.
    The sum (and a cast to a narrower float) is redone in float64 and saturated if it overflows;
    the cast to an integer dtype rounds and saturates (:func:`daskpatch._numbers.cast`).
    """
    shape = (channels + user,) + tuple(chunk_shape)

    def nan_at(idx: tuple[int, ...]) -> Exception:
        key, bounds = where
        return nan_error(out_dtype, key, bounds, channels, channel_axis,
                         (idx[0],) + tuple(lo + i for (lo, _), i in zip(bounds, idx[1:])))

    try:
        with np.errstate(over="raise"):
            out = cast(_chunk_sum(parts, sels, dsts, shape, user, acc_dtype, acc_dtype, copy),
                       out_dtype, nan_at)
    except FloatingPointError:  # the same sum in float64 at half scale, saturated
        with np.errstate(over="ignore"):
            half = _chunk_sum(parts, sels, dsts, shape, user, acc_dtype, wide_dtype(acc_dtype),
                              copy, 0.5)
        out = cast(doubled(half), out_dtype, nan_at)
    if cov is not None:
        mask = np.ones((), dtype=bool)
        for c in cov:
            mask = np.logical_and.outer(mask, c)
        out[:, ~mask] = fill_value
    if channel_axis is None:
        return out[0]
    return np.moveaxis(out, 0, channel_axis)


def _chunk_sum(parts, sels, dsts, shape, user, acc_dtype, dtype, copy, scale=None) -> np.ndarray:
    """The parts of a chunk summed in ``dtype`` (and divided by the user window's weights),
    times ``scale`` if given."""
    if copy and np.dtype(dtype).kind in "fc":
        out = np.full(shape, -0.0, dtype=dtype)
    else:
        out = np.zeros(shape, dtype=dtype)
    for part, sel, dst in zip(parts, sels, dsts):
        if isinstance(part, dict):
            piece = part[sel]
            if isinstance(piece, tuple):  # spilled: (where, key)
                piece_shape = (shape[0],) + tuple(d.stop - d.start for d in dst)
                piece = piece[0].get(piece[1], piece_shape, np.dtype(acc_dtype))
        else:
            piece = part[(slice(None),) + sel]
        if scale is not None:
            factor = np.full((shape[0],) + (1,) * (len(shape) - 1), scale)
            if user:
                factor[-1] = 1.0  # the weights: their ratio with the data is halved
            piece = piece * factor
        region = out[(slice(None),) + dst]
        np.add(region, piece, out=region)
    if user:
        w = out[-1]
        out = out[:-1]
        np.divide(out, w, out=out, where=w > 0)
    return out


def _finish_into(out: np.ndarray, cov: list | None, fill_value: Any, done: list) -> None:
    if cov is not None:
        mask = np.ones((), dtype=bool)
        for c in cov:
            mask = np.logical_and.outer(mask, c)
        out[:, ~mask] = fill_value


# -- graph ---------------------------------------------------------------------------------------
class _Engine:
    """The accumulate/halo/add tasks of one overlap-add, made on demand (see :class:`LazyLayer`).

    ``accumulate(bidx, ext_lo, ext_hi) -> (task, dependencies)`` makes the accumulate task of a
    block; it is what differs between :func:`reconstruct` and :func:`apply_patches`.
    """

    def __init__(self, plan: _Plan, name: str, accumulate: Callable, channels: int,
                 acc_dtype: np.dtype, out_dtype: np.dtype, fill_value: Any, layout: Layout,
                 spill: _Spill | bool | None, params: dict | None = None):
        self.plan, self.name, self.accumulate = plan, name, accumulate
        #: what determines the result besides the model and the input data (JSON-ready): the
        #: fingerprint :func:`daskpatch.to_zarr` stores and ``resume=True`` checks
        self.params = dict(params or {})
        #: ``None``: halos in memory, but :func:`spill_into` may still send them to a store
        self.auto = spill is None
        self.spill: _Spill | None = spill if isinstance(spill, _Spill) else None
        self.acc_name, self.halo_name = "acc-" + name, "halo-" + name
        self.names: dict[str, str] = {}  # input key names -> new names (see renamed)
        self.args = (channels, 0 if plan.window.separable else 1)
        self.dtypes = (fill_value, acc_dtype, out_dtype)
        self.ch = layout.channel_axis
        ndim = plan.grid.ndim
        self.halo_ax: list = []  # [a][b] -> [(c, buffer slice)]
        self.src_ax: list = []  # [a][c] -> [(b, buffer slice, chunk slice)]
        for a in range(ndim):
            ov = {}
            for c, blocks in enumerate(plan.sources[a]):
                cl, ch = plan.chunk(a, c)
                for b in blocks:
                    lo, hi = plan.ext[a][b]
                    ov[b, c] = (slice(max(cl, lo) - lo, min(ch, hi) - lo),
                                slice(max(cl, lo) - cl, min(ch, hi) - cl))
            self.halo_ax.append([[(c, ov[b, c][0]) for c in plan.targets[a][b]]
                                 for b in range(plan.nblocks[a])])
            self.src_ax.append([[(b, *ov[b, c]) for b in plan.sources[a][c]]
                                for c in range(plan.nblocks[a])])
        self.owning = [[b for b in range(n) if plan.owned[a][b][1] > plan.owned[a][b][0]]
                       for a, n in enumerate(plan.nblocks)]
        self.self_only = [[b for b in own if plan.targets[a][b] == [b]]
                          for a, own in enumerate(self.owning)]
        self.cov_needed = plan.grid.uncovered > 0
        # bytes the blocks hand to other chunks: what waits in memory without spilling
        ext = math.prod(sum(hi - lo for lo, hi in e) for e in plan.ext)
        self.halo_bytes = (ext - math.prod(plan.grid.shape)) * (channels + self.args[1]) \
            * np.dtype(acc_dtype).itemsize

    def _accumulate(self, bidx: tuple[int, ...], ext_lo: tuple[int, ...],
                    ext_hi: tuple[int, ...]) -> tuple[Any, set]:
        """The accumulate task of a block (inputs under their current names) and its inputs."""
        task, deps = self.accumulate(bidx, ext_lo, ext_hi)
        if self.names:
            task = rename_task(task, self.names)
            deps = {rename_task(d, self.names) for d in deps}
        return task, deps

    @property
    def count(self) -> int:
        n_acc = math.prod(len(o) for o in self.owning)
        n_halo = 0 if self.spill else n_acc - math.prod(len(o) for o in self.self_only)
        return n_acc + n_halo + math.prod(self.plan.nblocks)

    def renamed(self, name: str, spill: _Spill | None, names: dict[str, str]) -> _Engine:
        """A new engine computing the same result under the new output name ``name`` (its block
        and halo tasks renamed with it), with its parts sent to ``spill`` (``None``: in memory),
        and reading its inputs under the key names ``names`` maps them to (old -> new).

        ``self`` is left as it is: keys of the two engines never meet, so both can be computed
        at once, on one scheduler (see :func:`spill_into`).
        """
        engine = copy.copy(self)
        engine.name, engine.acc_name, engine.halo_name = name, "acc-" + name, "halo-" + name
        engine.spill, engine.auto = spill, False
        engine.names = dict(names)
        return engine

    # -- keys ------------------------------------------------------------------------------------
    def keys(self):
        for bidx in itertools.product(*self.owning):
            yield (self.acc_name, *bidx)
        for bidx in itertools.product(*self.owning):
            if self._has_halo(bidx):
                yield (self.halo_name, *bidx)
        for cidx in itertools.product(*[range(n) for n in self.plan.nblocks]):
            yield self._out_key(cidx)

    def _has_halo(self, bidx: tuple[int, ...]) -> bool:
        if self.spill:  # the accumulate task writes every part itself
            return False
        return any(self.plan.targets[a][b] != [b] for a, b in enumerate(bidx))

    def _out_key(self, cidx: tuple[int, ...]) -> tuple:
        if self.ch is None:
            return (self.name, *cidx)
        key = list(cidx)
        key.insert(self.ch, 0)
        return (self.name, *key)

    def _index(self, key: Any) -> tuple[str, tuple[int, ...]] | None:
        if not isinstance(key, tuple) or not key or key[0] not in (
                self.acc_name, self.halo_name, self.name):
            return None
        idx = key[1:]
        if key[0] == self.name and self.ch is not None:
            if len(idx) != len(self.plan.nblocks) + 1 or idx[self.ch] != 0:
                return None
            idx = idx[:self.ch] + idx[self.ch + 1:]
        if len(idx) != len(self.plan.nblocks) or not all(
                isinstance(i, int) and 0 <= i < n for i, n in zip(idx, self.plan.nblocks)):
            return None
        if key[0] != self.name and not self.plan.has_patches(idx):
            return None
        if key[0] == self.halo_name and not self._has_halo(idx):
            return None
        return key[0], idx

    def contains(self, key: Any) -> bool:
        return self._index(key) is not None

    def _pieces(self, bidx: tuple[int, ...], with_own: bool) -> list:
        """(target chunk, buffer slices) for the chunks block ``bidx`` reaches."""
        return [
            (target, tuple(p[1] for p in combo))
            for combo in itertools.product(*[self.halo_ax[a][b] for a, b in enumerate(bidx)])
            for target in [tuple(p[0] for p in combo)]
            if with_own or target != bidx
        ]

    # -- tasks -----------------------------------------------------------------------------------
    def task(self, key: tuple) -> tuple[tuple, set]:
        kind, idx = self._index(key)  # type: ignore[misc]
        if kind == self.acc_name:
            ext_lo = tuple(self.plan.ext[a][b][0] for a, b in enumerate(idx))
            ext_hi = tuple(self.plan.ext[a][b][1] for a, b in enumerate(idx))
            task, deps = self._accumulate(idx, ext_lo, ext_hi)
            if self.spill:  # the buffer is written whole, in parts; only their keys stay
                task = (_halo, task, self._pieces(idx, True), self.spill, self.name, idx)
            return task, deps
        if kind == self.halo_name:
            acc = (self.acc_name, *idx)
            return (_halo, acc, self._pieces(idx, False)), {acc}
        parts, sels, dsts = [], [], []
        for combo in itertools.product(*[self.src_ax[a][c] for a, c in enumerate(idx)]):
            bidx = tuple(p[0] for p in combo)
            dsts.append(tuple(p[2] for p in combo))
            if self.spill:
                parts.append((self.acc_name, *bidx))
                sels.append(idx)
            elif bidx == idx:
                parts.append((self.acc_name, *bidx))
                sels.append(tuple(p[1] for p in combo))
            else:
                parts.append((self.halo_name, *bidx))
                sels.append(idx)
        bounds = [self.plan.chunk(a, c) for a, c in enumerate(idx)]
        cov = None
        if self.cov_needed:
            cov = [self.plan.coverage[a][lo:hi] for a, (lo, hi) in enumerate(bounds)]
            if all(c.all() for c in cov):
                cov = None
        shape = tuple(hi - lo for lo, hi in bounds)
        # Depending on this block's own halo task (unused here) makes the scheduler copy the
        # halo out before the chunk is summed, so the block buffer is freed right after.
        after = (self.halo_name, *idx) if self.plan.has_patches(idx) and self._has_halo(idx) \
            else None
        task = (_add, parts, dsts, sels, shape, *self.args, cov, *self.dtypes, self.ch, after,
                (self._out_key(idx)[1:], tuple(bounds)), self.plan.window.blend == "crop")
        return task, set(parts) | ({after} if after else set())

    def into(self, out: np.ndarray, workers: int) -> tuple[dict, tuple, _Sink] | None:
        """Tasks that accumulate straight into the in-memory result ``out`` (zeroed; shared
        memory: the local scheduler only), with no halo or chunk tasks; ``None`` where that path
        does not apply (a non-separable window needs a division, another dtype a cast, one axis
        no slabs)."""
        fill_value, acc_dtype, out_dtype = self.dtypes
        if self.args[1] or out_dtype != acc_dtype or self.plan.grid.ndim < 2:
            return None
        canon = out[None] if self.ch is None else np.moveaxis(out, self.ch, 0)
        sink = _Sink(canon, workers)
        # each job writes into its own array: keys of their own, never another job's
        tag = f"{self.name}-{uuid.uuid4().hex}"
        dsk: dict = {}
        previous = None
        for bidx in itertools.product(*self.owning):
            ext_lo = tuple(self.plan.ext[a][b][0] for a, b in enumerate(bidx))
            ext_hi = tuple(self.plan.ext[a][b][1] for a, b in enumerate(bidx))
            task, _ = self._accumulate(bidx, ext_lo, ext_hi)
            key = ("into-" + tag, *bidx)
            dsk[key] = (_then, previous, task + (sink,))  # blocks in C order, one at a time
            previous = key
        cov = self.plan.coverage if self.cov_needed else None
        key = ("into-done-" + tag,)
        dsk[key] = (_finish_into, canon, cov, fill_value, list(dsk))
        return dsk, key, sink

    def layer(self) -> LazyLayer:
        layer = LazyLayer(self.keys, self.count, self.contains, self.task)
        layer.engine = self  # type: ignore[attr-defined]  # found again by spill_into
        return layer

    def array(self, collections: list, extra: dict | None) -> da.Array:
        graph = lazy_graph(self.name, self.layer(), collections, extra)
        plan = self.plan
        chunks = [tuple(plan.chunk(a, c)[1] - plan.chunk(a, c)[0] for c in range(n))
                  for a, n in enumerate(plan.nblocks)]
        if self.ch is not None:
            chunks.insert(self.ch, (self.args[0],))
        meta = np.empty((0,) * len(chunks), dtype=self.dtypes[2])
        return da.Array(graph, self.name, tuple(chunks), meta=meta)


# -- public functions ----------------------------------------------------------------------------
def _block(grid: PatchGrid, n_batch: int, block_shape: Any, itemsize: int, channels: int,
           input_chunks: tuple | None) -> tuple[int, ...]:
    if block_shape is None:
        spatial = _auto_block(grid, n_batch, itemsize, channels, input_chunks)
    else:
        spatial_grid = PatchGrid(grid.shape[n_batch:], grid.size[n_batch:],
                                 grid.stride[n_batch:], border=grid.border)
        spatial = spatial_grid.normalize_block_shape(block_shape)
    return (1,) * n_batch + tuple(spatial)


def _window(blend: Any, grid: PatchGrid, n_batch: int, sigma_scale: Any) -> Window:
    """Parse ``blend`` against the spatial patch shape; a user window gets size-1 batch axes."""
    window = parse_blend(blend, grid.size[n_batch:], sigma_scale)
    if n_batch and isinstance(window.sigma_scale, tuple):  # batch axes: patches of size 1
        window = Window(window.blend, (1.0,) * n_batch + window.sigma_scale, window.array,
                        window.source)
    if n_batch and not window.separable:
        window = Window("user", window.sigma_scale, window.array.reshape(grid.size),
                        window.source)
    return window


def _max_cover(grid: PatchGrid) -> int:
    """The most patches that overlap one voxel (a bound: the product of the per-axis counts)."""
    cover = 1
    for a in range(grid.ndim):
        diff = np.zeros(grid.padded_shape[a] + 1, dtype=np.int64)
        starts = grid.axis_starts(a)
        np.add.at(diff, starts, 1)
        np.add.at(diff, starts + grid.size[a], -1)
        cover *= int(np.cumsum(diff).max())
    return cover


def _check_coverage(grid: PatchGrid, fill_value: Any) -> None:
    if grid.uncovered and fill_value is None:
        sparse = [a for a in range(grid.ndim) if grid.stride[a] > grid.size[a]]
        fixes = []
        if grid.border == "drop":
            fixes.append("border='shift' or 'pad'")
        if sparse:
            fixes.append(f"a stride <= size (the stride is larger on axis {sparse[0]})")
        raise ValueError(
            f"the patch grid leaves {grid.uncovered} of {math.prod(grid.shape)} voxels uncovered "
            f"(size={grid.size}, stride={grid.stride}, border={grid.border!r}); pass "
            f"fill_value=... to fill them explicitly, or use {' with '.join(fixes)}"
        )
    if fill_value is not None and not isinstance(fill_value, (int, float, np.number)):
        raise TypeError(f"fill_value must be a number or None; got {_describe(fill_value)}")


def _check_spill_dir(spill: str | os.PathLike) -> None:
    """Refuse a ``spill`` directory that cannot be written, while the graph is built (the tasks
    would fail much later). Creates nothing: a file is created and removed in the directory, or
    in its nearest existing parent."""
    path = os.path.abspath(os.fspath(spill))
    probe = path
    while not os.path.lexists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ValueError(
            f"spill must be a directory this process can create or write; got {path!r}, but "
            f"{probe!r} is {'a file' if os.path.exists(probe) else 'not a directory'}"
        )
    try:
        fd, name = tempfile.mkstemp(prefix=".daskpatch-probe-", dir=probe)
        os.close(fd)
        os.remove(name)
    except OSError as err:
        raise ValueError(
            f"spill must be a directory this process can create or write; got {path!r}, but "
            f"{probe!r} cannot be written ({err.strerror or err})"
        ) from err


def _parse_spill(spill: Any) -> _Spill | bool | None:
    """``None``: automatic; ``False``: in memory; ``True``: a temporary directory; a directory
    or a Zarr store: there."""
    if spill is None or spill is False:
        return spill
    if spill is True:
        path = tempfile.mkdtemp(prefix="daskpatch-spill-")
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        return _Spill(zarr.storage.LocalStore(path))
    if isinstance(spill, (str, os.PathLike)):
        _check_spill_dir(spill)
        return _Spill(zarr.storage.LocalStore(os.fspath(spill)))
    if isinstance(spill, Store):
        return _Spill(spill)
    raise TypeError(
        "spill must be None, False, True, a directory path (str or os.PathLike) or a zarr store; "
        f"got {_describe(spill)}"
    )


def spill_bytes() -> float:
    """The halo size above which :func:`daskpatch.to_zarr` spills an engine's halos: the
    ``daskpatch.spill-bytes`` setting of :mod:`dask.config` (bytes, or a string such as
    ``"64 MiB"``), else :data:`SPILL_BYTES`.

    Examples
    --------
    >>> import dask
    >>> with dask.config.set({"daskpatch.spill-bytes": "1 MiB"}):
    ...     spill_bytes()
    1048576
    """
    value = dask.config.get("daskpatch.spill-bytes", None)
    if value is None:
        return SPILL_BYTES
    if isinstance(value, str):
        try:
            return parse_bytes(value)
        except ValueError as err:
            raise ValueError(
                f"dask.config setting daskpatch.spill-bytes must be a number of bytes or a "
                f"string such as '64 MiB'; got {_describe(value)}"
            ) from err
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            "dask.config setting daskpatch.spill-bytes must be a number of bytes or a string "
            f"such as '64 MiB'; got {_describe(value)}"
        )
    if not value >= 0:
        raise ValueError(f"dask.config setting daskpatch.spill-bytes must be >= 0; got {value}")
    return value


def spill_into(x: da.Array, store: Any, prefix: str, *, threshold: float | None = None
               ) -> tuple[da.Array, list[tuple[_Spill, str]]]:
    """``x`` computed with the halos of its overlap-add engines sent to ``store`` under
    ``prefix``, as a new array (a new graph with keys of its own); ``x`` is left as it is.

    Engines built with ``spill=None`` whose halos exceed ``threshold`` bytes (default
    :func:`spill_bytes`) spill there; engines built with an explicit ``spill`` keep it. A
    spilled engine's tasks return other things (part names, not buffers) than the in-memory
    engine's, so it gets new names -- its output chunks' too -- and so does every layer above it
    (a downstream operation, a rechunk), rebuilt over the new names: the two graphs share no
    key whose task differs, and ``x`` computed on the same cluster at the same time (a kept
    future) is unaffected. The new names derive from the spill target (the same call gives the
    same names, so ``resume=True`` finds the parts of an interrupted run).

    Returns the array and the ``(spill, engine name)`` pairs to :meth:`_Spill.clear` once the
    result is written. Used by :func:`daskpatch.to_zarr`, which spills into the output store
    (visible to every worker that writes the output).
    """
    threshold = spill_bytes() if threshold is None else threshold
    graph = x.dask
    engines = {n: layer.engine for n, layer in graph.layers.items()
               if isinstance(getattr(layer, "engine", None), _Engine)}
    spilling = {n for n, e in engines.items() if e.auto and e.halo_bytes > threshold}
    if not spilling:
        return x, [(e.spill, e.name) for e in engines.values() if e.spill is not None]
    target = _Spill(store, prefix)
    seed = tokenize("spilled", target, sorted(spilling))
    # the spilled engines and every layer that depends on them, directly or not
    dependents: dict[str, set[str]] = {}
    for n, deps in graph.dependencies.items():
        for d in deps:
            dependents.setdefault(d, set()).add(n)
    above, todo = set(), list(spilling)
    while todo:
        n = todo.pop()
        if n not in above:
            above.add(n)
            todo.extend(dependents.get(n, ()))
    names: dict[str, str] = {}  # old key name -> new, for every key of those layers
    for n in above:
        if n in engines:
            e = engines[n]
            tag = "-spilled" if n in spilling else ""
            new = f"{key_split(e.name)}{tag}-{tokenize(e.name, seed)}"
            names.update({e.name: new, e.acc_name: "acc-" + new, e.halo_name: "halo-" + new})
        else:
            names.update({k: clone_key(k, seed) for k in key_names(graph.layers[n])})
    rename = {n: names.get(n) or clone_key(n, seed) for n in above}  # layer names
    layers, used = {}, []
    for n, layer in graph.layers.items():
        if n in engines:
            e = engines[n]
            if n in above:
                e = e.renamed(names[e.name], target if n in spilling else e.spill, names)
                layer = e.layer()
                layer.annotations = graph.layers[n].annotations
            if e.spill is not None:
                used.append((e.spill, e.name))
        elif n in above:
            layer = renamed_layer(layer, names)
        layers[rename.get(n, n)] = layer
    deps = {rename.get(n, n): {rename.get(d, d) for d in ds}
            for n, ds in graph.dependencies.items()}
    new_graph = HighLevelGraph(layers, deps)
    return da.Array(new_graph, names.get(x.name, x.name), x.chunks, meta=x._meta), used


def engine_into(x: da.Array, out: np.ndarray, workers: int = 1
                ) -> tuple[Delayed, Callable[[], None]] | None:
    """A job accumulating the overlap-add result ``x`` straight into ``out`` (zeroed by the
    caller) with ``workers`` threads per block, and what to call after it; ``None`` when ``x``
    is not an engine's result or the direct path does not apply. Used by
    :func:`daskpatch.to_numpy` on the local scheduler."""
    engine = getattr(x.dask.layers.get(x.name), "engine", None)
    if not isinstance(engine, _Engine):
        return None
    made = engine.into(out, workers)
    if made is None:
        return None
    dsk, key, sink = made
    layers = {k: v for k, v in x.dask.layers.items() if k != x.name}
    deps = {k: set(v) for k, v in x.dask.dependencies.items() if k != x.name}
    name = key[0]
    layers[name] = MaterializedLayer(dsk)
    deps[name] = set(x.dask.dependencies[x.name])
    return Delayed(key, HighLevelGraph(layers, deps), layer=name), sink.close


@accepts_dataarray
def reconstruct(
    patches: Any,
    shape: tuple[int, ...],
    size: int | tuple[int, ...],
    stride: int | tuple[int, ...] | None = None,
    *,
    border: BorderMode = "shift",
    blend: Blend = "gaussian",
    channel_axis: int | None = None,
    fill_value: float | None = None,
    block_shape: int | tuple[int, ...] | None = None,
    sigma_scale: float | tuple[float, ...] = 0.125,
    spill: bool | str | os.PathLike | None = None,
) -> da.Array:
    """Blend patches back into a volume, lazily (overlap-add with exact normalisation).

    Parameters
    ----------
    patches : array-like
        ``(N, *size)`` patches (``(N, C, *size)`` or ``(N, *size, C)`` with a channel axis), in
        the order of :func:`extract_patches`: NumPy, Dask or Zarr.
    shape : tuple of int
        Full shape of the result, channel and batch axes included.
    size, stride, border
        The grid the patches were cut with (see :class:`PatchGrid`).
    blend : str, array or callable
        ``"gaussian"`` (default; sigma = ``sigma_scale`` x size, as nnU-Net and MONAI),
        ``"constant"`` (plain mean), ``"hann"``, ``"triangular"``, ``"crop"`` (each voxel from the
        patch whose centre is nearest: voxels are copied, never multiplied by zero weights), an
        array of patch shape, or a callable ``f(size) -> array``. User windows must be positive
        and finite; their scale does not matter (they are normalised).
    channel_axis : int, optional
        Channel axis of ``shape``.
    fill_value : float, optional
        Value of voxels no patch covers (``border="drop"``, or ``stride > size``). Without it such
        a grid raises an error that counts the uncovered voxels. It must fit the result dtype
        (a whole number in range for integers; finite values within range, inf or nan for
        floats), checked when the graph is built.
    block_shape : int or tuple of int, optional
        Work-block (and output chunk) shape, a multiple of the stride; ``None`` picks one near
        64 MiB.
    sigma_scale : float or tuple of float
        Gaussian sigma as a fraction of the patch size, or one per spatial axis (e.g.
        ``(0.125, 0.125, 0.25)`` for anisotropic voxels, where a patch is short on one axis).
    spill : None, bool, path or zarr store, optional
        Where the halo parts that a block hands to its neighbours' chunks wait between tasks.
        Held in memory, they cost about one plane of halos (roughly ``3 * (size - stride)``
        voxels times the volume's cross-section), which grows with the volume. Spilled, each
        block writes its buffer in parts (one per output chunk it reaches) and the scheduler holds
        only their names, so memory depends on the block size and the number of threads, not on
        the volume (at the cost of writing and reading about twice the output's bytes).
        ``None`` (default): in memory, except that :func:`daskpatch.to_zarr` spills into the
        output store, and deletes the parts after writing, when the halos exceed the
        ``daskpatch.spill-bytes`` setting of :mod:`dask.config` (default 128 MiB; it writes a
        graph of its own, leaving this array as it is). ``False``: always in memory. A directory, or any Zarr
        store: there (``True``: a temporary directory removed at exit); ``to_zarr`` deletes the
        parts after writing, a plain ``compute`` leaves them. On a multi-machine cluster the
        location must be visible to every worker.

    Returns
    -------
    dask.array.Array
        The volume, chunked by work blocks. Floating (and complex) patches keep their dtype;
        others give float32, except ``blend="crop"``, which copies voxels and keeps the patches'
        dtype exactly (int64 above 2**53 too). A result never leaves the range of the values
        blended into it beyond rounding, and finite values never overflow to inf.

    Examples
    --------
    >>> import numpy as np
    >>> from daskpatch import extract_patches
    >>> vol = np.random.default_rng(0).random((20, 17), dtype=np.float32)
    >>> p = extract_patches(vol, 8, 4)
    >>> back = reconstruct(p, vol.shape, 8, 4, blend="hann")
    >>> bool(np.allclose(back.compute(), vol, atol=1e-6))
    True
    """
    shape = parse_shape(shape, "shape")
    layout = parse_layout(len(shape), size, channel_axis, name="shape", shape=shape)
    border = parse_choice(border, "border", BORDERS)  # type: ignore[assignment]
    ch = layout.channel_axis
    grid_shape = shape if ch is None else shape[:ch] + shape[ch + 1:]
    channels = 1 if ch is None else shape[ch]
    grid = full_grid(grid_shape, layout.n_batch, size, stride, border)
    nb = layout.n_batch
    spatial = grid.size[nb:]
    window = _window(blend, grid, nb, sigma_scale)
    _check_coverage(grid, fill_value)
    expected = (len(grid),) + layout.patch_shape(spatial, channels)
    if not (hasattr(patches, "shape") and hasattr(patches, "dtype")):
        raise TypeError(f"patches must be a NumPy, Dask or Zarr array; got {_describe(patches)}")
    if tuple(patches.shape) != expected:
        raise ValueError(
            f"patches must have shape {expected} for shape={shape}, size={spatial}, "
            f"stride={grid.stride[nb:]}, border={border!r}, channel_axis={channel_axis}; "
            f"got {tuple(patches.shape)}"
        )
    in_dtype = np.dtype(patches.dtype)
    copy = window.blend == "crop"
    if copy and in_dtype.kind in "biu":
        out_dtype = in_dtype
    else:
        out_dtype = np.result_type(in_dtype, np.float32)
    check_fill(fill_value, out_dtype)
    acc_dtype = _acc_dtype(out_dtype, copy)
    window = window.scaled(_max_cover(grid), acc_dtype)
    if not isinstance(patches, da.Array):
        per = max(1, parse_bytes(dask.config.get("array.chunk-size"))
                  // max(1, math.prod(expected[1:]) * in_dtype.itemsize))
        patches = da.from_array(patches, chunks=(per,) + expected[1:])
    patches = patches.rechunk({i: -1 for i in range(1, patches.ndim)})
    block = _block(grid, nb, block_shape, acc_dtype.itemsize, channels, None)
    plan = _Plan(grid, block, window)
    numbers = Numbers(acc_dtype, out_dtype, copy, grid.shape, block, channels, ch)
    nbounds = np.cumsum((0,) + patches.chunks[0])
    spill = _parse_spill(spill)  # last: a temporary directory only for a valid call
    name = "reconstruct-" + tokenize(patches.name, shape, grid, block, window.blend,
                                     window.sigma_scale, window.array, fill_value, ch, spill)
    user = window.array

    def accumulate(bidx, ext_lo, ext_hi):
        owned = [range(*plan.owned[a][b]) for a, b in enumerate(bidx)]
        gidxs = list(itertools.product(*owned))
        flat = np.ravel_multi_index(tuple(np.array(gidxs).T), grid.grid_shape)
        cid = np.searchsorted(nbounds, flat, "right") - 1
        used = sorted(set(cid.tolist()))
        pos = {c: k for k, c in enumerate(used)}
        where = [(pos[c], int(f - nbounds[c])) for c, f in zip(cid.tolist(), flat.tolist())]
        keys = [(patches.name, c) + (0,) * (patches.ndim - 1) for c in used]
        starts = [tuple(int(plan.starts[a][i]) for a, i in enumerate(g)) for g in gidxs]
        q = [plan.q[a] for a in range(grid.ndim)] if window.separable else None
        task = (_reconstruct_block, keys, where, ext_lo,
                tuple(h - lo for lo, h in zip(ext_lo, ext_hi)), gidxs, starts, q,
                plan.q_ids, user, layout, channels, numbers, grid.size)
        return task, set(keys)

    params = _params("reconstruct", grid, nb, window, block, fill_value, ch, shape=shape,
                     channels=channels, input_dtype=in_dtype, dtype=out_dtype)
    engine = _Engine(plan, name, accumulate, channels, acc_dtype, out_dtype, fill_value, layout,
                     spill, params=params)
    return engine.array([patches], None)


@accepts_dataarray
def apply_patches(
    volume: Any,
    fn: Callable[[np.ndarray], np.ndarray],
    size: int | tuple[int, ...],
    stride: int | tuple[int, ...] | None = None,
    *,
    border: BorderMode = "shift",
    pad_mode: PadMode = "reflect",
    pad_value: float = 0,
    blend: Blend = "gaussian",
    batch_size: int = 1,
    channel_axis: int | None = None,
    out_channels: int | None = None,
    dtype: Any = None,
    block_shape: int | tuple[int, ...] | None = None,
    fill_value: float | None = None,
    sigma_scale: float | tuple[float, ...] = 0.125,
    spill: bool | str | os.PathLike | None = None,
) -> da.Array:
    """Run ``fn`` on every patch of a volume, in batches, and blend the results, lazily.

    Every patch goes through ``fn`` exactly once (no halo recomputation, unlike ``map_overlap``),
    and the graph has three tasks per work block whatever the number of patches.

    Parameters
    ----------
    volume : array-like
        NumPy, Dask or Zarr array. A Zarr array (or a Dask array straight over one, as from
        :func:`open_volume`) is read region by region inside the tasks.
    fn : callable or torch.nn.Module
        ``fn(batch) -> batch``: takes a NumPy batch ``(B, *size)`` (``(B, C, *size)`` or
        ``(B, *size, C)`` with a channel axis, as in the volume) and returns the same spatial patch
        shape, with ``out_channels`` channels, in any numeric dtype. It may return a
        ``torch.Tensor``: it is detached, copied to the CPU and converted to NumPy (float16 and
        bfloat16 as float32). A ``torch.nn.Module`` is used as it is, wrapped in
        :class:`~daskpatch.TorchModel` (``module.eval()``; each batch as a tensor on the
        module's device and dtype, under ``torch.inference_mode()`` in whichever thread or worker
        runs it); use ``TorchModel`` itself for another device, dtype or mixed precision. Torch
        layers take channel-first batches: give a single-channel volume one with
        ``volume[None]`` and ``channel_axis=0``. ``fn`` is called from several threads at once
        on the threaded scheduler, and pickled to each worker process of a cluster.
    size, stride, border, pad_mode, pad_value, channel_axis
        As in :func:`extract_patches`.
    blend, fill_value, block_shape, sigma_scale, spill
        As in :func:`reconstruct`.
    batch_size : int
        Most patches per call of ``fn``.
    out_channels : int, optional
        Channels ``fn`` returns (default: the volume's). Needs a channel axis when not 1.
    dtype : dtype, optional
        Result dtype; ``None`` means the volume's dtype when it is floating or complex, else
        float32. An integer dtype rounds to nearest and saturates at the type's limits (255.6 ->
        255 and -0.6 -> 0 as uint8); NaN has no integer value, and raises an error naming the
        output chunk and voxel. A complex ``fn`` output needs a complex dtype (a TypeError says
        so). A value beyond a floating dtype's range saturates at its largest finite value.

    Returns
    -------
    dask.array.Array
        The blended result, shaped like the volume (with ``out_channels`` channels), chunked by
        stride-aligned work blocks.

    Examples
    --------
    >>> import numpy as np
    >>> vol = np.random.default_rng(0).random((40, 30), dtype=np.float32)
    >>> out = apply_patches(vol, lambda b: 2 * b, 16, 8, batch_size=4)
    >>> bool(np.allclose(out.compute(), 2 * vol, atol=1e-5))
    True
    """
    if not callable(fn):
        raise TypeError(f"fn must be a callable taking a batch of patches; got {_describe(fn)}")
    batch_size = parse_int(batch_size, "batch_size", minimum=1)
    if not hasattr(volume, "ndim"):
        volume = Volume.from_user(volume, None).array
    layout = parse_layout(volume.ndim, size, channel_axis, shape=volume.shape)
    border = parse_choice(border, "border", BORDERS)  # type: ignore[assignment]
    pad_mode = parse_choice(pad_mode, "pad_mode", PAD_MODES)  # type: ignore[assignment]
    vol = Volume.from_user(volume, layout.channel_axis)
    pad_value = parse_pad_value(pad_value, pad_mode, vol.dtype)
    nb = layout.n_batch
    grid = full_grid(vol.shape, nb, size, stride, border)
    window = _window(blend, grid, nb, sigma_scale)
    _check_coverage(grid, fill_value)
    if out_channels is None:
        cout = vol.channels
    else:
        cout = parse_int(out_channels, "out_channels", minimum=1)
        if layout.channel_axis is None and cout != 1:
            raise ValueError(
                f"out_channels={cout} needs a channel axis: the volume has channel_axis=None "
                "(add one, e.g. volume[None] with channel_axis=0)"
            )
    fn = wrap_fn(fn, layout, tuple(volume.shape), grid.size[nb:], vol.channels, cout)
    if dtype is None:
        out_dtype = vol.dtype if vol.dtype.kind in "fc" else np.dtype(np.float32)
    else:
        try:
            out_dtype = np.dtype(dtype)
        except TypeError as err:
            raise TypeError(f"dtype must be a NumPy dtype; got {_describe(dtype)}") from err
    check_fill(fill_value, out_dtype)
    copy = window.blend == "crop"
    acc_dtype = _acc_dtype(out_dtype, copy)
    window = window.scaled(_max_cover(grid), acc_dtype)
    chunks_in = getattr(vol.array, "chunks", None)  # Zarr: ints; Dask: tuples
    if isinstance(chunks_in, tuple):
        chunks_in = [c if isinstance(c, tuple) else (int(c),) for c in chunks_in]
        if layout.channel_axis is not None:
            del chunks_in[layout.channel_axis]
        chunks_in = tuple(chunks_in)
    else:
        chunks_in = None
    block = _block(grid, nb, block_shape, acc_dtype.itemsize, cout, chunks_in)
    plan = _Plan(grid, block, window)
    numbers = Numbers(acc_dtype, out_dtype, copy, grid.shape, block, cout, layout.channel_axis)
    spill = _parse_spill(spill)  # last: a temporary directory only for a valid call
    name = "apply-patches-" + tokenize(vol.name, fn, grid, block, window.blend, window.sigma_scale,
                                       window.array, pad_mode, pad_value, batch_size, cout,
                                       out_dtype, fill_value, layout, spill)
    user = window.array
    q = plan.q if window.separable else None

    def accumulate(bidx, ext_lo, ext_hi):
        owned = [plan.owned[a][b] for a, b in enumerate(bidx)]
        starts = [plan.starts[a][i0:i1] for a, (i0, i1) in enumerate(owned)]
        lo = tuple(int(s[0]) for s in starts)
        hi = tuple(int(s[-1]) + z for s, z in zip(starts, grid.size))
        read, deps = vol.read_task(lo, hi, pad_mode, pad_value)
        task = (_apply_block, read, lo, ext_lo, tuple(h - lo_ for lo_, h in zip(ext_lo, ext_hi)),
                [range(*o) for o in owned], plan.starts, q, plan.q_ids, user, fn, batch_size,
                layout, nb, cout, numbers, grid.size, bidx)
        return task, deps

    params = _params("apply_patches", grid, nb, window, block, fill_value, layout.channel_axis,
                     pad_mode=pad_mode, pad_value=pad_value, batch_size=batch_size,
                     input_shape=vol.shape,
                     channels=vol.channels, out_channels=cout, input_dtype=vol.dtype,
                     dtype=out_dtype)
    engine = _Engine(plan, name, accumulate, cout, acc_dtype, out_dtype, fill_value, layout,
                     spill, params=params)
    return engine.array(*vol.source_layer())


def _params(kind: str, grid: PatchGrid, n_batch: int, window: Window, block: tuple[int, ...],
            fill_value: Any, channel_axis: int | None, **more: Any) -> dict:
    """An engine's :attr:`_Engine.params`: its parameters as JSON-ready values."""
    return {
        "kind": kind, "size": list(grid.size[n_batch:]), "stride": list(grid.stride[n_batch:]),
        "border": grid.border, "blend": window.blend, "window": window_digest(window.array),
        "sigma_scale": (list(window.sigma_scale) if isinstance(window.sigma_scale, tuple)
                        else float(window.sigma_scale)), "channel_axis": channel_axis,
        "fill_value": fill_value.item() if isinstance(fill_value, np.generic) else fill_value,
        "block_shape": list(block[n_batch:]),
        **{k: (str(np.dtype(v)) if k.endswith("dtype") else
               list(v) if isinstance(v, tuple) else v) for k, v in more.items()},
    }
