"""The overlap-add engine: blend patches (or a model's predictions) back into a volume, by blocks.

``reconstruct`` and ``apply_patches`` share one mechanism (see the design page of the docs)::

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

This module parses the arguments, plans (the block shape; the block plan is
:meth:`daskpatch.grid.PatchGrid.block_plan`'s) and builds; the tasks are in
:mod:`daskpatch._engine` (spec, kernel, block, halo, spill, sink, engine) and their graphs in
:mod:`daskpatch._graph`.
"""

from __future__ import annotations

import itertools
import math
import os
from collections import Counter
from collections.abc import Callable
from typing import Any

import dask
import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.utils import parse_bytes

from daskpatch.config import get_bytes, get_int
from daskpatch.engine.block import BatchPool, apply_block, reconstruct_block
from daskpatch.graph.engine import Engine
from daskpatch.engine.kernel import make_weights
from daskpatch.engine.spec import ApplyBlock, ReconstructBlock
from daskpatch.storage.spill import parse_spill
from daskpatch.storage.spill import spill_bytes as spill_bytes  # re-exported until io imports it there
from daskpatch.graph.layers import engine_array
from daskpatch.graph.layers import engine_into as engine_into  # re-exported until io imports it there
from daskpatch.graph.layers import spill_into as spill_into  # re-exported until io imports it there
from daskpatch.engine.numbers import Numbers, check_fill
from daskpatch.engine.numbers import acc_dtype as _acc_dtype
from daskpatch.storage.sources import Volume
from daskpatch.storage.stores import window_digest
from daskpatch.adapters.torch import wrap_fn
from daskpatch.geometry.parse import (
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
from daskpatch.adapters.xarray import accepts_dataarray
from daskpatch.geometry.layout import full_grid, parse_layout
from daskpatch.rechunk import stride_multiples
from daskpatch.geometry.grid import PatchGrid
from daskpatch.geometry.windows import Blend, Window, parse_blend

__all__ = ["apply_patches", "reconstruct"]


# -- the block shape -----------------------------------------------------------------------------
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
    grid: PatchGrid, n_batch: int, itemsize: int, channels: int, input_chunks: tuple | None,
    batch_size: int = 1,
) -> tuple[int, ...]:
    """A stride-aligned spatial block near the ``daskpatch.block-bytes`` setting (the input's
    chunks if aligned), in at least ``daskpatch.min-blocks`` blocks where the volume allows.

    With ``batch_size`` > 1 the blocks also keep ``fn``'s batches full: the min-blocks split
    stops before a block would own fewer patches than a batch while the fill (see
    :func:`_batch_fill`) drops below :data:`MIN_FILL` (a small volume is not split into
    one-patch calls), and blocks that small grow until the fill reaches it, up to
    ``block-bytes`` or four batches' bytes, whichever is larger. Each block still makes at most
    one call with a part-filled batch."""
    block_bytes, min_blocks = get_bytes("block-bytes"), get_int("min-blocks")
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



def _block(grid: PatchGrid, n_batch: int, block_shape: Any, itemsize: int, channels: int,
           input_chunks: tuple | None, batch_size: int = 1) -> tuple[int, ...]:
    if block_shape is None:
        spatial = _auto_block(grid, n_batch, itemsize, channels, input_chunks, batch_size)
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
        assert window.array is not None  # a user window
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



# -- public functions ----------------------------------------------------------------------------
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
        block writes its halo in parts (one per neighbouring chunk it reaches; its own chunk's
        part stays in memory until that chunk is summed) and the scheduler holds only their
        names, so memory depends on the block size and the number of threads, not on the volume
        (at the cost of writing and reading the halos once). Each part is deleted as soon as its
        chunk has read it (on a ``distributed`` cluster, where a lost chunk is summed again,
        :func:`daskpatch.to_zarr` deletes them once all is written).
        ``None`` (default): in memory, except that :func:`daskpatch.to_zarr` spills into the
        output store when the halos exceed the ``daskpatch.spill-bytes`` setting of
        :mod:`dask.config` (default 128 MiB; it writes a graph of its own, leaving this array as
        it is, whose blocks run in the order of the chunks, each chunk written as soon as its
        own block is done). ``False``: always in memory. A directory, or any Zarr
        store: there (``True``: a temporary directory removed at exit). On a multi-machine
        cluster the location must be visible to every worker.

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
    plan = grid.block_plan(block)
    slab = int(get_bytes("slab-bytes"))  # the order of float sums: part of the name
    weights = make_weights(grid, window, slab)
    numbers = Numbers(acc_dtype, out_dtype, copy, grid.shape, block, channels, ch)
    nbounds = np.cumsum((0,) + patches.chunks[0])
    spilled = parse_spill(spill)  # last: a temporary directory only for a valid call
    name = "reconstruct-" + tokenize(patches.name, shape, grid, block, window.blend,
                                     window.sigma_scale, window.array, fill_value, ch, spilled,
                                     slab)
    axis_starts = [grid.axis_starts(a) for a in range(grid.ndim)]

    def accumulate(bidx, ext_lo, ext_hi):
        owned = [range(*plan.owned[a][b]) for a, b in enumerate(bidx)]
        gidxs = list(itertools.product(*owned))
        flat = np.ravel_multi_index(tuple(np.array(gidxs).T), grid.grid_shape)
        cid = np.searchsorted(nbounds, flat, "right") - 1
        used = sorted(set(cid.tolist()))
        pos = {c: k for k, c in enumerate(used)}
        where = [(pos[c], int(f - nbounds[c])) for c, f in zip(cid.tolist(), flat.tolist())]
        keys = [(patches.name, c) + (0,) * (patches.ndim - 1) for c in used]
        starts = [tuple(int(axis_starts[a][i]) for a, i in enumerate(g)) for g in gidxs]
        spec = ReconstructBlock(tuple(where), ext_lo,
                                tuple(h - lo for lo, h in zip(ext_lo, ext_hi)), tuple(gidxs),
                                tuple(starts), weights, layout, channels, numbers, grid.size)
        return (reconstruct_block, spec, keys), set(keys)

    params = _params("reconstruct", grid, nb, window, block, fill_value, ch, shape=shape,
                     channels=channels, input_dtype=in_dtype, dtype=out_dtype)
    engine = Engine(plan, name, accumulate, channels, acc_dtype, out_dtype, fill_value, layout,
                    spilled, window, params=params)
    return engine_array(engine, [patches], None)


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
        on the threaded scheduler, and pickled to each worker process of a cluster. A slow
        ``fn`` (a model on an accelerator) runs in one helper thread of its block task, one
        batch at a time, while the task copies the next batch in and blends the previous one.
    size, stride, border, pad_mode, pad_value, channel_axis
        As in :func:`extract_patches`.
    blend, fill_value, block_shape, sigma_scale, spill
        As in :func:`reconstruct`.
    batch_size : int
        Patches per call of ``fn``: every call of a work block gets this many but its last;
        automatic blocks (``block_shape=None``) own at least a batch each where the volume
        allows, so a small volume is not cut into calls of one patch.
    out_channels : int, optional
        Channels ``fn`` returns (default: the volume's). Needs a channel axis when not 1.
    dtype : dtype, optional
        Result dtype; ``None`` means the volume's dtype when it is floating or complex, else
        float32. An integer dtype rounds to nearest and saturates at the type's limits (255.6 ->
        255 and -0.6 -> 0 as uint8); NaN has no integer value, and raises an error naming the
        output chunk and voxel. ``bool`` is the integers 0 and 1 by that rule: True where the
        blended value is above 0.5. A complex ``fn`` output needs a complex dtype (a TypeError says
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
    block = _block(grid, nb, block_shape, acc_dtype.itemsize, cout, chunks_in, batch_size)
    plan = grid.block_plan(block)
    slab = int(get_bytes("slab-bytes"))  # the order of float sums: part of the name
    weights = make_weights(grid, window, slab)
    numbers = Numbers(acc_dtype, out_dtype, copy, grid.shape, block, cout, layout.channel_axis)
    spilled = parse_spill(spill)  # last: a temporary directory only for a valid call
    # the model is ONE key of the graph, which every block task reads: a cluster ships it to
    # each worker once (and keeps it there), not once per block task
    model = "model-" + tokenize(fn)
    name = "apply-patches-" + tokenize(vol.name, model, grid, block, window.blend,
                                       window.sigma_scale, window.array, pad_mode, pad_value,
                                       batch_size, cout, out_dtype, fill_value, layout, spilled,
                                       slab)
    axis_starts = tuple(grid.axis_starts(a) for a in range(grid.ndim))
    batches = BatchPool()  # this engine's: emptied when none of its blocks holds a batch

    def accumulate(bidx, ext_lo, ext_hi):
        owned = [plan.owned[a][b] for a, b in enumerate(bidx)]
        starts = [axis_starts[a][i0:i1] for a, (i0, i1) in enumerate(owned)]
        lo = tuple(int(s[0]) for s in starts)
        hi = tuple(int(s[-1]) + z for s, z in zip(starts, grid.size))
        read, deps = vol.read_task(lo, hi, pad_mode, pad_value, lazy=True)
        spec = ApplyBlock(bidx, lo, ext_lo, tuple(h - lo_ for lo_, h in zip(ext_lo, ext_hi)),
                          tuple(range(*o) for o in owned), axis_starts, weights, batch_size,
                          layout, nb, cout, numbers, grid.size)
        return (apply_block, spec, read, batches, model), deps | {model}

    params = _params("apply_patches", grid, nb, window, block, fill_value, layout.channel_axis,
                     pad_mode=pad_mode, pad_value=pad_value, batch_size=batch_size,
                     input_shape=vol.shape,
                     channels=vol.channels, out_channels=cout, input_dtype=vol.dtype,
                     dtype=out_dtype)
    engine = Engine(plan, name, accumulate, cout, acc_dtype, out_dtype, fill_value, layout,
                    spilled, window, params=params)
    collections, extra = vol.source_layer()
    return engine_array(engine, collections, {**extra, model: fn})


def _params(kind: str, grid: PatchGrid, n_batch: int, window: Window, block: tuple[int, ...],
            fill_value: Any, channel_axis: int | None, **more: Any) -> dict:
    """An engine's :attr:`Engine.params`: its parameters as JSON-ready values."""
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
