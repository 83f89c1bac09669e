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

This module parses the arguments and builds the frozen plan
(:class:`~daskpatch.graph.plan.OverlapAdd`, prepared by :func:`daskpatch.graph.plan.prepare`) that
the returned array's layer holds; the per-block work is in :mod:`daskpatch.engine`, the tasks and
graphs in :mod:`daskpatch.graph`, and each output lowers the plan for itself
(:mod:`daskpatch.graph.lowering`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from typing import Any

import dask
import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.utils import parse_bytes

from daskpatch.config import get_bytes, get_int
from daskpatch.engine.batches import BatchPool
from daskpatch.engine.numbers import acc_dtype
from daskpatch.geometry.blocks import work_block
from daskpatch.graph.engine import engine_array
from daskpatch.graph.plan import (
    ApplyReader,
    FusedReader,
    OverlapAdd,
    ReconstructReader,
    check_coverage,
    fused_array,
    parse_window,
    prepare,
)
from daskpatch.errors import ParameterError, ParameterTypeError
from daskpatch.graph.inputs import Volume, with_channel_axis
from daskpatch.adapters.scale import scaled_model
from daskpatch.geometry.scale import scale_text, scaled_chunks
from daskpatch.geometry.parse import (
    BORDERS,
    PAD_MODES,
    BorderMode,
    PadMode,
    _describe,
    parse_choice,
    parse_int,
    parse_pad_value,
    parse_result_dtype,
    parse_shape,
)
from daskpatch.adapters.xarray import accepts_dataarray
from daskpatch.geometry.layout import full_grid, parse_layout
from daskpatch.geometry.windows import Blend
from daskpatch.heads import apply_heads, wants_heads

__all__ = ["apply_patches", "reconstruct"]


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
    min_weight: float | None = None,
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
    min_weight : float, optional
        Window weights below ``min_weight`` times the window's peak are raised to it (in
        ``(0, 1]``; for the gaussian, the peak of the continuous gaussian, which a patch of
        even size samples just off: see :func:`daskpatch.window`).
        ``blend="gaussian", min_weight=1e-3`` is MONAI's
        ``sliding_window_inference(mode="gaussian")`` window, which clamps its gaussian there;
        the default (``None``) keeps the exact gaussian, whose far voxels weigh nearly nothing.
        The clamped window is no product of 1-D profiles: it blends as a user window does.
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
    window = parse_window(blend, grid, nb, sigma_scale, min_weight)
    check_coverage(grid, fill_value)
    expected = (len(grid),) + layout.patch_shape(spatial, channels)
    if not (hasattr(patches, "shape") and hasattr(patches, "dtype")):
        raise ParameterTypeError(
            f"patches must be a NumPy, Dask or Zarr array; got {_describe(patches)}",
            param="patches", value=patches, expected="a NumPy, Dask or Zarr array")
    if tuple(patches.shape) != expected:
        raise ParameterError(
            f"patches must have shape {expected} for shape={shape}, size={spatial}, "
            f"stride={grid.stride[nb:]}, border={border!r}, channel_axis={channel_axis}; "
            f"got {tuple(patches.shape)}", param="patches", value=tuple(patches.shape),
            expected=expected, mentions=("shape", "size", "stride", "border", "channel_axis")
        )
    in_dtype = np.dtype(patches.dtype)
    if window.blend == "crop" and in_dtype.kind in "biu":
        out_dtype = in_dtype
    else:
        out_dtype = np.result_type(in_dtype, np.float32)
    b = prepare("reconstruct", grid, layout, window, fill_value=fill_value, out_dtype=out_dtype,
                channels=channels, block_shape=block_shape, input_chunks=None, batch_size=1,
                spill=spill, record=dict(shape=shape, channels=channels,
                                         input_dtype=in_dtype, dtype=out_dtype))
    if not isinstance(patches, da.Array):
        per = max(1, parse_bytes(dask.config.get("array.chunk-size"))
                  // max(1, math.prod(expected[1:]) * in_dtype.itemsize))
        patches = da.from_array(patches, chunks=(per,) + expected[1:])
    patches = patches.rechunk({i: -1 for i in range(1, patches.ndim)})
    name = "reconstruct-" + tokenize(patches.name, shape, b.token())
    reader = ReconstructReader(patches.name, patches.ndim, np.cumsum((0,) + patches.chunks[0]),
                               channels, tuple(grid.axis_starts(a) for a in range(grid.ndim)))
    return engine_array(OverlapAdd(name, b, reader), [patches], None)


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
    min_weight: float | None = None,
    out_scale: float | tuple[float, ...] | Mapping[Any, Any] | str | None = None,
    tta: str | Sequence[Sequence[int]] | None = None,
    uncertainty: bool = False,
) -> Any:
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
    blend, fill_value, block_shape, sigma_scale, spill, min_weight
        As in :func:`reconstruct`.
    batch_size : int
        Patches per call of ``fn``: every call of a work block gets this many but its last;
        automatic blocks (``block_shape=None``) own at least a batch each where the volume
        allows, so a small volume is not cut into calls of one patch.
    out_channels : int, dict or tuple, optional
        Channels ``fn`` returns (default: the volume's). A volume without a channel axis and
        ``out_channels > 1`` (one channel in, K classes out) is read with a channel axis of 1
        in front: ``fn`` gets ``(B, 1, *size)``, the result is ``(K, *volume.shape)``. A dict
        ``{name: K}`` or a tuple of channel counts declares a model with several heads: ``fn``
        returns a dict (those keys) or a tuple of arrays, each of the patch's spatial shape, and
        the result is the same structure of lazy arrays sharing one graph (the model runs once
        per patch for all heads; :func:`to_zarr` of it writes a group).
    dtype : dtype, optional
        Result dtype; ``None`` means the volume's dtype when it is floating or complex, else
        float32. An integer dtype rounds to nearest and saturates at the type's limits (255.6 ->
        255 and -0.6 -> 0 as uint8); NaN has no integer value, and raises an error naming the
        output chunk and voxel. ``bool`` is the integers 0 and 1 by that rule: True where the
        blended value is above 0.5. A complex ``fn`` output needs a complex dtype (a TypeError says
        so). A value beyond a floating dtype's range saturates at its largest finite value.
        With several heads: one dtype for all, or a dict/tuple of one per head.
    out_scale : float, tuple of float, dict or "infer", optional
        A model whose output patch is a scaled version of its input patch: the output voxels
        per input voxel, one number or one per spatial axis (``2`` for a 2x super-resolution
        network, ``(1, 0.5, 0.5)`` for one predicting at half resolution in-plane).
        ``"infer"`` reads it off the model's output for one all-zero patch (the model runs
        once, when the graph is built). The result has the volume's spatial shape times the
        scale, blended on the output grid (patch size and stride times the scale, windows of
        the scaled size); ``block_shape`` then counts output voxels (a multiple of the scaled
        stride). Shape, size and stride must each map to whole voxels on every axis, so that
        every output patch starts exactly at its input patch's start times the scale (a
        ``border="shift"`` patch flush with the end included); otherwise a ValueError names the
        axis. ``None`` (default): the input's resolution. With several heads: one scale for
        every head, a dict of one per head (keyed as ``out_channels``; positions for a tuple),
        or ``"infer"``, which reads each head's off its output. Heads at different resolutions
        still cost one model call per patch; ``block_shape`` then counts the first head's
        voxels.
    tta : {"flip"}, list of axis sets, optional
        Test-time augmentation: ``fn`` runs on each flip of the batch (``"flip"``: every subset
        of the spatial axes, ``2**n`` calls per batch; or a list such as ``[(), (0,), (1, 2)]``
        of spatial axes, 0 the first, ``()`` the batch as it is); each output is flipped back
        and the outputs are averaged before blending (nnU-Net's mirroring).
    uncertainty : bool
        Return ``(mean, std)`` (a named tuple) for each output: ``std`` is the weighted standard
        deviation of the predictions covering each voxel (overlapping patches and flips, with
        the window's weights), from the same model calls: the squares are blended as further
        channels, in float64, and ``std = sqrt(max(E[p**2] - mean**2, 0))``. Its dtype is the
        output's when floating, else float32.

    Returns
    -------
    dask.array.Array, dict, tuple or (mean, std)
        The blended result, shaped like the volume (with ``out_channels`` channels, and its
        spatial shape times ``out_scale``), chunked by stride-aligned work blocks; with
        declared heads, a dict or tuple of them; with ``uncertainty=True``, a ``(mean, std)``
        named tuple in place of each.

    Examples
    --------
    >>> import numpy as np
    >>> vol = np.random.default_rng(0).random((40, 30), dtype=np.float32)
    >>> out = apply_patches(vol, lambda b: 2 * b, 16, 8, batch_size=4)
    >>> bool(np.allclose(out.compute(), 2 * vol, atol=1e-5))
    True

    A model predicting at twice the resolution (nearest-neighbour upsampling here):

    >>> up = apply_patches(vol, lambda b: b.repeat(2, axis=1).repeat(2, axis=2), 16, 8,
    ...                    out_scale=2)
    >>> up.shape
    (80, 60)
    >>> bool(np.allclose(up.compute(), vol.repeat(2, 0).repeat(2, 1), atol=1e-5))
    True

    Several heads:

    >>> heads = apply_patches(vol, lambda b: {"seg": np.concatenate([b, -b], 1), "d": b + 1},
    ...                       16, 8, out_channels={"seg": 2, "d": 1}, dtype={"d": "uint8",
    ...                       "seg": "float32"})
    >>> heads["seg"].shape, heads["d"].shape, heads["d"].dtype
    ((2, 40, 30), (1, 40, 30), dtype('uint8'))

    Heads at different resolutions, each scale read off the model's output:

    >>> full, half = apply_patches(vol, lambda b: (b, b[:, ::2, ::2]), 16, 8,
    ...                            out_channels=(1, 1), out_scale="infer")
    >>> full.shape, half.shape
    ((40, 30), (20, 15))

    Test-time flips with per-voxel uncertainty:

    >>> mean, std = apply_patches(vol, lambda b: b ** 2, 16, 8, tta="flip", uncertainty=True)
    >>> bool(np.allclose(mean.compute(), vol ** 2, atol=1e-5)), float(std.max().compute()) < 1e-3
    (True, True)
    """
    if not callable(fn):
        raise TypeError(f"fn must be a callable taking a batch of patches; got {_describe(fn)}")
    if wants_heads(out_channels, dtype, tta, uncertainty):  # one overlap-add, split per head
        return apply_heads(_apply, volume, fn, size, stride, out_channels=out_channels,
                           dtype=dtype, tta=tta, uncertainty=uncertainty,
                           channel_axis=channel_axis, border=border, pad_mode=pad_mode,
                           pad_value=pad_value, blend=blend, batch_size=batch_size,
                           block_shape=block_shape, fill_value=fill_value,
                           sigma_scale=sigma_scale, spill=spill, min_weight=min_weight,
                           out_scale=out_scale)
    if not hasattr(volume, "ndim"):
        volume = Volume.from_user(volume, None).array
    if channel_axis is None and out_channels is not None and \
            parse_int(out_channels, "out_channels", minimum=1) > 1:
        # one channel in, K out: the volume gets a channel axis in front, the model (B, 1, ...)
        volume, channel_axis = with_channel_axis(volume), 0
    (y,) = _apply(volume, fn, size, stride, [(out_scale, out_channels, dtype, "out_scale")],
                  channel_axis=channel_axis, border=border, pad_mode=pad_mode,
                  pad_value=pad_value, blend=blend, batch_size=batch_size,
                  block_shape=block_shape, fill_value=fill_value, sigma_scale=sigma_scale,
                  spill=spill, min_weight=min_weight)
    return y


def _apply(volume: Any, fn: Any, size: Any, stride: Any,
           outputs: Sequence[tuple[Any, Any, Any, str]],
           *, channel_axis: Any, border: Any, pad_mode: Any, pad_value: Any, blend: Any,
           batch_size: Any, block_shape: Any, fill_value: Any, sigma_scale: Any, spill: Any,
           min_weight: Any) -> list[da.Array]:
    """The overlap-adds of :func:`apply_patches`: one per ``(out_scale, out_channels, dtype,
    name)`` of ``outputs`` (``name``: how errors call its ``out_scale``), over the same patches.

    One output is one engine whose blocks run ``fn``. Several (the groups of heads at different
    resolutions of a :class:`~daskpatch.adapters.heads.HeadsFn`, which returns one array per
    output) share one task per block that runs ``fn`` once on its patches and accumulates every
    output, each output's engine taking its buffer from it. Their work blocks cover the same
    patches: the block of the first output (or, automatic, of the finest, sized for them all)
    scaled to each.
    """
    batch_size = parse_int(batch_size, "batch_size", minimum=1)
    layout = parse_layout(volume.ndim, size, channel_axis, shape=volume.shape)
    border = parse_choice(border, "border", BORDERS)
    pad_mode = parse_choice(pad_mode, "pad_mode", PAD_MODES)
    vol = Volume.from_user(volume, layout.channel_axis)
    pad_value = parse_pad_value(pad_value, pad_mode, vol.dtype)
    nb = layout.n_batch
    in_grid = full_grid(vol.shape, nb, size, stride, border)
    check_coverage(in_grid, fill_value)
    chunks_in = getattr(vol.array, "chunks", None)  # Zarr: ints; Dask: tuples
    if isinstance(chunks_in, tuple):
        chunks_in = [c if isinstance(c, tuple) else (int(c),) for c in chunks_in]
        if layout.channel_axis is not None:
            del chunks_in[layout.channel_axis]
        chunks_in = tuple(chunks_in)
    else:
        chunks_in = None
    made = []  # per output: (grid, scale, channels, dtype, window)
    for out_scale, out_channels, dtype, param in outputs:
        cout = vol.channels if out_channels is None else \
            parse_int(out_channels, "out_channels", minimum=1)
        # the grid the predictions blend on: the input's, or scaled by out_scale
        fn, grid, scale = scaled_model(fn, out_scale, in_grid, layout, tuple(volume.shape),
                                       vol.channels, cout, vol.dtype, param)
        out_dtype = parse_result_dtype(dtype)
        if out_dtype is None:
            out_dtype = vol.dtype if vol.dtype.kind in "fc" else np.dtype(np.float32)
        made.append((grid, scale, cout, out_dtype,
                     parse_window(blend, grid, nb, sigma_scale, min_weight)))
    blocks: list[Any] = [block_shape] * len(made)
    if len(made) > 1:
        blocks = _shared_blocks(made, block_shape, nb, chunks_in, batch_size)
    # the model is ONE key of the graph, which every block task reads: a cluster ships it to
    # each worker once (and keeps it there), not once per block task
    model = "model-" + tokenize(fn)
    plans: list[OverlapAdd] = []
    for (grid, scale, cout, out_dtype, window), block in zip(made, blocks):
        b = prepare("apply_patches", grid, layout, window, fill_value=fill_value,
                    out_dtype=out_dtype, channels=cout, block_shape=block,
                    input_chunks=None if chunks_in is None else
                    scaled_chunks(chunks_in, nb, scale),
                    batch_size=batch_size, spill=spill,
                    record=dict(pad_mode=pad_mode, pad_value=pad_value, batch_size=batch_size,
                                input_shape=vol.shape, channels=vol.channels, out_channels=cout,
                                input_dtype=vol.dtype, dtype=out_dtype,
                                **({} if scale is None else {  # the user's size and stride
                                    "size": in_grid.size[nb:], "stride": in_grid.stride[nb:],
                                    "out_scale": scale_text(scale)}),
                                **getattr(fn, "params", {})))  # a HeadsFn's heads, tta
        name = "apply-patches-" + tokenize(vol.name, model, b.token(), pad_mode, pad_value,
                                           batch_size, cout, out_dtype, len(plans),
                                           *(() if scale is None else (scale_text(scale),)))
        reader = ApplyReader(vol, pad_mode, pad_value, batch_size, model,
                             tuple(in_grid.axis_starts(a) for a in range(grid.ndim)),
                             BatchPool(), fn, None if scale is None and len(made) == 1
                             else in_grid.size)
        plans.append(OverlapAdd(name, b, reader))
    collections, extra = vol.source_layer()
    extra = {**extra, model: fn}
    if len(plans) == 1:
        return [engine_array(plans[0], collections, extra)]
    owned = plans[0].blending.plan.owned
    if any(p.blending.plan.owned != owned for p in plans):  # _shared_blocks' promise
        raise AssertionError("the outputs' work blocks do not cover the same patches")
    together = fused_array(plans, collections, extra)
    return [engine_array(OverlapAdd(p.name, p.blending, FusedReader(together.name, g, fn)),
                         [together], None) for g, p in enumerate(plans)]


def _shared_blocks(made: list, block_shape: Any, nb: int, chunks_in: Any, batch_size: int
                   ) -> list[tuple[int, ...]]:
    """The spatial work block of each output, covering the same patches: ``block_shape``
    counts the first output's voxels; ``None`` sizes the finest output's block for the buffers
    of every output (and its chunks for the input's)."""
    ref = 0
    if block_shape is None:
        ref = max(range(len(made)), key=lambda k: math.prod(made[k][0].shape))
    grid, scale, cout, out_dtype, window = made[ref]
    total = sum(math.prod(g.shape) * c for g, _, c, _, _ in made)
    channels = -(-total // math.prod(grid.shape))  # every output's buffer, in the finest's
    itemsize = acc_dtype(out_dtype, window.blend == "crop").itemsize
    block = work_block(grid, nb, block_shape, itemsize, channels,
                       None if chunks_in is None else scaled_chunks(chunks_in, nb, scale),
                       batch_size, get_bytes("block-bytes"), get_int("min-blocks"))[nb:]
    # in input voxels: a multiple of the input's stride, since block is one of the scaled's
    on_input = [Fraction(v) / f for v, f in zip(block, scale or (1,) * len(block))]
    return [tuple(int(v * f) for v, f in zip(on_input, s or (1,) * len(block)))
            for _, s, *_ in made]
