"""Lazy patch extraction: a volume in, a Dask array of patches ``(N, ...patch)`` out."""

from __future__ import annotations

import math
from typing import Any

import dask
import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.utils import parse_bytes

from daskpatch.geometry.layout import Layout, full_grid, parse_layout
from daskpatch.graph.layers import LazyLayer, new_array
from daskpatch.graph.inputs import Volume
from daskpatch.geometry.parse import BORDERS, PAD_MODES, BorderMode, PadMode, parse_choice, parse_pad_value
from daskpatch.adapters.xarray import accepts_dataarray

__all__ = ["extract_patches"]


def _groups(grid_shape: tuple[int, ...], per_group: int) -> tuple[int, ...]:
    """Grid-space group shape whose flat indices are contiguous: ``(1, .., c_j, full, .., full)``."""
    out = list(grid_shape)
    budget = max(1, per_group)
    for ax in range(len(grid_shape) - 1, -1, -1):
        if budget >= grid_shape[ax]:
            budget //= grid_shape[ax]
            continue
        out[ax] = budget
        out[:ax] = [1] * ax
        break
    return tuple(out)


@accepts_dataarray
def extract_patches(
    volume: Any,
    size: int | tuple[int, ...],
    stride: int | tuple[int, ...] | None = None,
    *,
    border: BorderMode = "shift",
    pad_mode: PadMode = "reflect",
    channel_axis: int | None = None,
    pad_value: float = 0,
) -> da.Array:
    """Cut a volume into patches, lazily.

    Parameters
    ----------
    volume : array-like
        A NumPy, Dask or Zarr array. Nothing is read until the result is computed; with a Zarr
        store (or a Dask array over one) each task reads only the chunks its patches overlap.
    size : int or tuple of int
        Patch shape. An int applies to every spatial axis. A tuple with fewer entries than the
        volume's non-channel axes makes the leading extra axes batch axes (a stack of volumes):
        each volume gets its own grid and the patches are concatenated in volume order.
    stride : int or tuple of int, optional
        Step between patches (``None``: ``stride = size``, no overlap).
    border : {"shift", "pad", "drop"}
        See :class:`PatchGrid`. ``"pad"`` reads past the end with ``pad_mode``.
    pad_mode : {"reflect", "symmetric", "edge", "wrap", "constant"}
        How ``border="pad"`` fills the part of a patch past the volume (``np.pad`` modes;
        ``"constant"`` fills ``pad_value``).
    channel_axis : int, optional
        The volume's channel axis, kept whole in every patch: patches are ``(N, C, *size)`` when it
        comes before the spatial axes, ``(N, *size, C)`` when it is the last axis.
    pad_value : number
        The fill of ``pad_mode="constant"`` (MONAI's ``cval``; e.g. -1024 for CT in Hounsfield
        units); it must fit the volume's dtype.

    Returns
    -------
    dask.array.Array
        Patches ``(N, *size)`` (with the channel axis where ``channel_axis`` says), in C order over
        the per-axis starts of :class:`PatchGrid`, chunked along ``N`` in groups of about
        ``dask.config.get("array.chunk-size")`` bytes.

    Examples
    --------
    >>> import numpy as np
    >>> vol = np.arange(6 * 5, dtype=np.float32).reshape(6, 5)
    >>> p = extract_patches(vol, 4, 2)
    >>> p.shape
    (4, 4, 4)
    >>> bool((p[3].compute() == vol[2:6, 1:5]).all())
    True
    >>> extract_patches(np.zeros((2, 8, 8, 3)), (4, 4), channel_axis=-1).shape
    (8, 4, 4, 3)
    """
    if not hasattr(volume, "ndim"):
        volume = Volume.from_user(volume, None).array  # raises a TypeError for non-arrays
    layout = parse_layout(volume.ndim, size, channel_axis, shape=volume.shape)
    border = parse_choice(border, "border", BORDERS)  # type: ignore[assignment]
    pad_mode = parse_choice(pad_mode, "pad_mode", PAD_MODES)  # type: ignore[assignment]
    vol = Volume.from_user(volume, layout.channel_axis)
    pad_value = parse_pad_value(pad_value, pad_mode, vol.dtype)
    grid = full_grid(vol.shape, layout.n_batch, size, stride, border)
    nb = layout.n_batch
    patch = grid.size[nb:]

    patch_bytes = math.prod(patch) * vol.channels * vol.dtype.itemsize
    target = parse_bytes(dask.config.get("array.chunk-size"))
    group = _groups(grid.grid_shape, target // max(patch_bytes, 1))
    starts = [grid.axis_starts(a) for a in range(grid.ndim)]

    shape = layout.patch_shape(patch, vol.channels)
    name = "extract-patches-" + tokenize(vol.name, grid, pad_mode, pad_value, layout)
    ranges = [[(i, min(i + g, n)) for i in range(0, n, g)]
              for n, g in zip(grid.grid_shape, group)]
    counts = [len(r) for r in ranges]
    key_tail = (0,) * len(shape)

    def contains(key: Any) -> bool:
        return (isinstance(key, tuple) and len(key) == 2 + len(shape) and key[0] == name
                and isinstance(key[1], int) and 0 <= key[1] < n_groups
                and key[2:] == key_tail)

    def task(key: tuple) -> tuple[tuple, set]:
        gidx = np.unravel_index(key[1], counts)
        offsets = [starts[a][slice(*ranges[a][g])] for a, g in enumerate(gidx)]
        lo = tuple(int(o[0]) for o in offsets)
        hi = tuple(int(o[-1]) + z for o, z in zip(offsets, grid.size))
        read, deps = vol.read_task(lo, hi, pad_mode, pad_value)
        rel = [o - l for o, l in zip(offsets, lo)]
        return (_cut, read, rel, grid.size, nb, layout), deps

    n_groups = math.prod(counts)
    per_group = np.ones((), dtype=np.int64)
    for r in ranges:
        per_group = np.multiply.outer(per_group, [i1 - i0 for i0, i1 in r])
    chunks = (tuple(per_group.ravel().tolist()),) + tuple((s,) for s in shape)
    layer = LazyLayer(lambda: ((name, g, *key_tail) for g in range(n_groups)), n_groups,
                      contains, task)
    collections, extra = vol.source_layer()
    return new_array(name, layer, chunks, np.empty((0,) * len(chunks), dtype=vol.dtype),
                     collections, extra)


def _cut(region: np.ndarray, rel: list[np.ndarray], size: tuple[int, ...], n_batch: int,
         layout: Layout) -> np.ndarray:
    """Cut the patches at relative starts ``rel`` (per axis, C-order product) out of a region."""
    counts = [len(r) for r in rel]
    out = np.empty((math.prod(counts), region.shape[0]) + size[n_batch:], dtype=region.dtype)
    for k, idx in enumerate(np.ndindex(*counts)):
        sl = tuple(slice(int(r[i]), int(r[i]) + z) for r, i, z in zip(rel, idx, size))
        out[k] = region[(slice(None),) + sl].reshape(out.shape[1:])
    return layout.from_canonical(out)
