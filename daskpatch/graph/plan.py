"""The immutable plan of an overlap-add (:class:`OverlapAdd`), and the one preparation shared by
:func:`daskpatch.reconstruct` and :func:`daskpatch.apply_patches` (:func:`prepare`): from a patch
grid, a window and the result's dtype to a frozen :class:`Blending` (geometry, window weights,
numerics, the work blocks), plus a reader that says how a block gets its patches."""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import dask.array as da
from dask.base import tokenize

import numpy as np

from daskpatch.config import get_bytes, get_int
from daskpatch.engine.batches import BatchPool
from daskpatch.engine.block import apply_block, reconstruct_block
from daskpatch.engine.kernel import make_weights
from daskpatch.errors import ParameterTypeError, UncoveredVoxelsError
from daskpatch.engine.numbers import Numbers, check_fill
from daskpatch.engine.numbers import acc_dtype as _acc_dtype
from daskpatch.engine.spec import ApplyBlock, ReconstructBlock, Weights
from daskpatch.geometry.blocks import work_block
from daskpatch.geometry.grid import BlockPlan, PatchGrid
from daskpatch.geometry.layout import Layout
from daskpatch.errors import ParameterError
from daskpatch.geometry.parse import _describe
from daskpatch.geometry.windows import Window, parse_blend
from daskpatch.geometry.windows import window as full_window
from daskpatch.graph.inputs import Volume
from daskpatch.graph.layers import LazyLayer, new_array
from daskpatch.storage.spill import Spill, parse_spill
from daskpatch.storage.stores import window_digest


@dataclass(frozen=True, eq=False)
class Blending:
    """Everything an overlap-add's tasks are made from, except what they read and the model."""

    kind: str  #: ``"apply_patches"`` or ``"reconstruct"``
    grid: PatchGrid
    layout: Layout
    window: Window  #: scaled to the accumulator dtype
    block: tuple[int, ...]  #: the work-block shape (batch axes 1)
    plan: BlockPlan
    weights: Weights
    numbers: Numbers
    channels: int  #: channels of the result
    acc_dtype: np.dtype
    out_dtype: np.dtype
    fill_value: Any
    spill: Spill | bool | None
    slab: int  #: the ``daskpatch.slab-bytes`` setting: the order of float sums
    params: dict  #: the parameters that determine the result, JSON-ready (the fingerprint's)

    @property
    def n_batch(self) -> int:
        return self.layout.n_batch

    def token(self) -> tuple:
        """What names the engine's tasks, besides its input and model."""
        w = self.window
        return (self.grid, self.block, w.blend, w.sigma_scale, w.array, self.fill_value,
                self.layout, self.spill, self.slab)


def parse_window(blend: Any, grid: PatchGrid, n_batch: int, sigma_scale: Any,
                 min_weight: Any = None) -> Window:
    """Parse ``blend`` against the spatial patch shape (weights below ``min_weight`` times the
    peak raised to it); a user window gets size-1 batch axes."""
    window = parse_blend(blend, grid.size[n_batch:], sigma_scale)
    if min_weight is not None:
        window = _clamped(window, grid.size[n_batch:], min_weight)
    if n_batch and isinstance(window.sigma_scale, tuple):  # batch axes: patches of size 1
        window = Window(window.blend, (1.0,) * n_batch + window.sigma_scale, window.array,
                        window.source)
    if n_batch and not window.separable:
        assert window.array is not None  # a user window
        window = Window("user", window.sigma_scale, window.array.reshape(grid.size),
                        window.source)
    return window


def _clamped(window: Window, size: tuple[int, ...], min_weight: Any) -> Window:
    """``window`` with its weights below ``min_weight`` times its peak raised to it, as a user
    window (a clamped product of profiles is no product of profiles)."""
    if isinstance(min_weight, bool) or not isinstance(min_weight, (int, float, np.floating)) \
            or not 0 < float(min_weight) <= 1:
        raise ParameterError(f"min_weight must be a number in (0, 1] (a fraction of the "
                             f"window's peak) or None; got {_describe(min_weight)}",
                             param="min_weight", value=min_weight)
    if window.blend == "crop":
        raise ParameterError("min_weight does not apply to blend='crop' (each voxel comes from "
                             "one patch); got min_weight with blend='crop'",
                             param="min_weight", value=min_weight)
    if window.array is None:  # a built-in: the gaussian's floor as MONAI's (see window())
        arr = full_window(window.blend, size, window.sigma_scale)
        raised = full_window(window.blend, size, window.sigma_scale, float(min_weight))
    else:
        arr = np.asarray(window.array, dtype=np.float64)
        raised = np.maximum(arr, float(min_weight) * float(arr.max()))
    if (raised == arr).all():
        return window  # nothing to raise
    return parse_blend(raised, size, window.sigma_scale)


def check_coverage(grid: PatchGrid, fill_value: Any) -> None:
    """Refuse a grid that leaves voxels uncovered unless ``fill_value`` says what they hold."""
    if grid.uncovered and fill_value is None:
        sparse = [a for a in range(grid.ndim) if grid.stride[a] > grid.size[a]]
        fixes = []
        if grid.border == "drop":
            fixes.append("border='shift' or 'pad'")
        if sparse:
            fixes.append(f"a stride <= size (the stride is larger on axis {sparse[0]})")
        raise UncoveredVoxelsError(
            f"the patch grid leaves {grid.uncovered} of {math.prod(grid.shape)} voxels uncovered "
            f"(size={grid.size}, stride={grid.stride}, border={grid.border!r}); pass "
            f"fill_value=... to fill them explicitly, or use {' with '.join(fixes)}",
            uncovered=grid.uncovered, total=math.prod(grid.shape)
        )
    if fill_value is not None and not isinstance(fill_value, (int, float, np.number)):
        raise ParameterTypeError(
            f"fill_value must be a number or None; got {_describe(fill_value)}",
            param="fill_value", value=fill_value, expected="a number or None")


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


def prepare(kind: str, grid: PatchGrid, layout: Layout, window: Window, *, fill_value: Any,
            out_dtype: np.dtype, channels: int, block_shape: Any, input_chunks: tuple | None,
            batch_size: int, spill: Any, record: dict[str, Any]) -> Blending:
    """The frozen plan of one overlap-add: ``window`` (from :func:`parse_window`) weighting
    ``channels``-channel results of dtype ``out_dtype`` over ``grid``, in work blocks of
    ``block_shape`` (``None``: automatic, from the ``daskpatch.block-bytes`` and
    ``daskpatch.min-blocks`` settings and the input's chunks). ``record`` holds further
    parameters that determine the result (recorded in the fingerprint)."""
    check_fill(fill_value, out_dtype)
    copy = window.blend == "crop"
    acc_dtype = _acc_dtype(out_dtype, copy)
    window = window.scaled(_max_cover(grid), acc_dtype)
    nb = layout.n_batch
    block = work_block(grid, nb, block_shape, acc_dtype.itemsize, channels, input_chunks,
                       batch_size, get_bytes("block-bytes"), get_int("min-blocks"))
    slab = int(get_bytes("slab-bytes"))
    numbers = Numbers(acc_dtype, out_dtype, copy, grid.shape, block, channels,
                      layout.channel_axis)
    record = {
        "kind": kind, "size": list(grid.size[nb:]), "stride": list(grid.stride[nb:]),
        "border": grid.border, "blend": window.blend, "window": window_digest(window.array),
        "sigma_scale": (list(window.sigma_scale) if isinstance(window.sigma_scale, tuple)
                        else float(window.sigma_scale)), "channel_axis": layout.channel_axis,
        "fill_value": fill_value.item() if isinstance(fill_value, np.generic) else fill_value,
        "block_shape": list(block[nb:]),
        **{k: (str(np.dtype(v)) if k.endswith("dtype") else
               list(v) if isinstance(v, tuple) else v) for k, v in record.items()},
    }
    return Blending(kind, grid, layout, window, block, grid.block_plan(block),
                    make_weights(grid, window, slab), numbers, channels, acc_dtype,
                    np.dtype(out_dtype), fill_value, parse_spill(spill), slab, record)


@dataclass(frozen=True, eq=False)
class ApplyReader:
    """How an ``apply_patches`` block gets its predictions: it reads its region of ``volume``
    (padded with ``pad_mode``) and runs the model (the graph's one key ``model``) on its own
    patches in batches of ``batch_size``."""

    volume: Volume
    pad_mode: str
    pad_value: Any
    batch_size: int
    model: str
    axis_starts: tuple[np.ndarray, ...]
    batches: BatchPool  #: the plan's: emptied when none of its blocks holds a batch
    fn: Any = None  #: the model itself (the graph holds it under ``model``): fingerprinted
    #: the input patch shape when the model predicts at another resolution (``out_scale``):
    #: the plan's grid is then the output grid, ``axis_starts`` and this the input grid's
    in_size: tuple[int, ...] | None = None

    @property
    def sinks(self) -> bool:
        """Whether blocks may add into an in-memory result straight (not when the model
        blends on its device: each block's buffer comes back whole)."""
        return not getattr(self.fn, "on_device", False)

    def accumulate(self, b: Blending, bidx: tuple[int, ...], ext_lo: tuple[int, ...],
                   ext_hi: tuple[int, ...]) -> tuple[Any, set[Any]]:
        """The accumulate task of block ``bidx`` (buffer ``[ext_lo, ext_hi)``) and its inputs."""
        owned = [b.plan.owned[a][i] for a, i in enumerate(bidx)]
        # the input region: the block's patches on the input grid (the plan's, unless scaled)
        starts = tuple(self.axis_starts[a][i0:i1] for a, (i0, i1) in enumerate(owned))
        size = b.grid.size if self.in_size is None else self.in_size
        lo = tuple(int(s[0]) for s in starts)
        hi = tuple(int(s[-1]) + z for s, z in zip(starts, size))
        # every block's interval per axis: how many blocks read each input chunk
        regions = tuple(tuple((int(st[i0]), int(st[i1 - 1]) + z) for i0, i1 in ax if i1 > i0)
                        for ax, st, z in zip(b.plan.owned, self.axis_starts, size))
        read, deps = self.volume.read_task(lo, hi, self.pad_mode, self.pad_value, lazy=True,
                                           regions=regions)
        out_starts: tuple[np.ndarray, ...] = ()
        if self.in_size is not None:  # where the predictions go: the output grid's starts
            out_starts = tuple(b.grid.axis_starts(a)[i0:i1] for a, (i0, i1) in enumerate(owned))
        # the task carries its own starts and weight rows only, not the whole axes'
        spec = ApplyBlock(bidx, lo, ext_lo, tuple(h - lo_ for lo_, h in zip(ext_lo, ext_hi)),
                          tuple(range(i1 - i0) for i0, i1 in owned), starts,
                          b.weights.sliced(owned), self.batch_size, b.layout, b.n_batch,
                          b.channels, b.numbers, size,
                          tuple(i0 for i0, _ in owned), b.grid.grid_shape,
                          out_starts, () if self.in_size is None else b.grid.size)
        return (apply_block, spec, read, self.batches, self.model), deps | {self.model}


@dataclass(frozen=True, eq=False)
class FusedReader:
    """How a block of one output of a model with several gets its buffer: item ``output`` of
    the block's task in the layer ``name`` (:func:`fused_array`), which ran the model once on
    the block's patches for every output."""

    name: str
    output: int
    fn: Any = None  #: the model itself: fingerprinted
    #: an in-memory result cannot take this block's patches straight (see Engine.into)
    sinks = False

    def accumulate(self, b: Blending, bidx: tuple[int, ...], ext_lo: tuple[int, ...],
                   ext_hi: tuple[int, ...]) -> tuple[Any, set[Any]]:
        key = (self.name, *bidx)
        return (operator.getitem, key, self.output), {key}


def fused_array(plans: Sequence[OverlapAdd], collections: list, extra: dict) -> da.Array:
    """The tasks running the model once per block for several outputs over the same patches
    (``plans``, whose work blocks own the same patches, each read by an
    :class:`ApplyReader`): per block, :func:`~daskpatch.engine.block.apply_block` of every
    output's spec, returning one buffer per output. An array by name only (its engines read
    its keys, :class:`FusedReader`): never computed as one."""
    first = plans[0]
    plan = first.blending.plan
    name = "apply-fused-" + tokenize([p.name for p in plans])
    owning = [[b for b in range(n) if plan.owned[a][b][1] > plan.owned[a][b][0]]
              for a, n in enumerate(plan.nblocks)]

    def keys() -> Iterator[tuple]:
        for bidx in itertools.product(*owning):
            yield (name, *bidx)

    def contains(key: Any) -> bool:
        return (isinstance(key, tuple) and len(key) == 1 + len(owning) and key[0] == name
                and all(isinstance(i, int) and 0 <= i < n
                        for i, n in zip(key[1:], plan.nblocks))
                and plan.has_patches(key[1:]))

    def task(key: tuple) -> tuple[Any, set]:
        bidx = key[1:]
        specs: list[Any] = []
        deps: set[Any] = set()
        for p in plans:
            ext = p.blending.plan.ext
            t, deps = p.reader.accumulate(p.blending, bidx,
                                          tuple(ext[a][b][0] for a, b in enumerate(bidx)),
                                          tuple(ext[a][b][1] for a, b in enumerate(bidx)))
            specs.append(t[1])
        return (t[0], tuple(specs)) + t[2:], deps  # the region read once, the model once

    meta = np.empty((0,) * len(owning), dtype=object)
    return new_array(name, LazyLayer(keys, math.prod(len(o) for o in owning), contains, task),
                     tuple((1,) * n for n in plan.nblocks), meta, collections, extra)


@dataclass(frozen=True, eq=False)
class ReconstructReader:
    """How a ``reconstruct`` block gets its patches: rows of the patch array ``name`` (chunked
    along the patch axis at ``bounds``, whole on the others)."""

    name: str
    ndim: int
    bounds: np.ndarray
    channels: int
    axis_starts: tuple[np.ndarray, ...]

    def accumulate(self, b: Blending, bidx: tuple[int, ...], ext_lo: tuple[int, ...],
                   ext_hi: tuple[int, ...]) -> tuple[Any, set[Any]]:
        """The accumulate task of block ``bidx`` (buffer ``[ext_lo, ext_hi)``) and its inputs."""
        bounds = [b.plan.owned[a][i] for a, i in enumerate(bidx)]
        owned = [range(*o) for o in bounds]
        gidxs = list(itertools.product(*owned))
        flat = np.ravel_multi_index(tuple(np.array(gidxs).T), b.grid.grid_shape)
        cid = np.searchsorted(self.bounds, flat, "right") - 1
        used = sorted(set(cid.tolist()))
        pos = {c: k for k, c in enumerate(used)}
        where = [(pos[c], int(f - self.bounds[c])) for c, f in zip(cid.tolist(), flat.tolist())]
        keys = [(self.name, c) + (0,) * (self.ndim - 1) for c in used]
        starts = [tuple(int(self.axis_starts[a][i]) for a, i in enumerate(g)) for g in gidxs]
        local = tuple(tuple(i - o0 for i, (o0, _) in zip(g, bounds)) for g in gidxs)
        spec = ReconstructBlock(tuple(where), ext_lo,
                                tuple(h - lo for lo, h in zip(ext_lo, ext_hi)), local,
                                tuple(starts), b.weights.sliced(bounds), b.layout,
                                self.channels, b.numbers, b.grid.size)
        return (reconstruct_block, spec, keys), set(keys)


@dataclass(frozen=True, eq=False)
class OverlapAdd:
    """The immutable plan of one overlap-add, what :func:`daskpatch.apply_patches` and
    :func:`daskpatch.reconstruct` build: its name (a token of everything that determines the
    result), its :class:`Blending` and its reader. Every output lowers it into a graph of its
    own (:class:`~daskpatch.graph.engine.Engine`, :mod:`daskpatch.graph.lowering`)."""

    name: str
    blending: Blending
    reader: ApplyReader | ReconstructReader | FusedReader
