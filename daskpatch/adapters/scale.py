"""A model's output resolution: ``out_scale`` declared, or inferred from one patch, and the output
grid the predictions blend on (:func:`scaled_model`)."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import numpy as np

from daskpatch.adapters.batch import BatchFn, wrap_fn
from daskpatch.adapters.torch import to_numpy
from daskpatch.errors import ModelOutputError, ParameterError
from daskpatch.geometry.grid import PatchGrid
from daskpatch.geometry.layout import Layout
from daskpatch.geometry.scale import INFER, Scale, parse_out_scale, scaled_grid

__all__ = ["infer_scale", "scaled_model"]


def _spatial_of(layout: Layout, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The spatial part of a patch ``shape`` in the user's layout (no batch axis)."""
    if layout.channel_axis is None:
        return shape
    return shape[1:] if layout.channels_first else shape[:-1]


def infer_scale(fn: BatchFn, layout: Layout, spatial: tuple[int, ...], channels: int,
                out_channels: int, dtype: np.dtype) -> Scale:
    """The scale of ``fn``'s output patches, read off its output for one all-zero patch of the
    volume's dtype (the model runs once, on the caller's thread; nothing is read)."""
    batch = np.zeros((1,) + layout.patch_shape(spatial, channels), dtype=dtype)
    out = to_numpy(fn(batch))
    got = tuple(getattr(out, "shape", ()))
    rank = 1 + len(layout.patch_shape(spatial, out_channels))
    with_channels = layout.patch_shape((0,) * len(spatial), out_channels)
    if len(got) != rank or got[0] != 1 or any(
            g != w for g, w in zip(got[1:], with_channels) if w):
        raise ModelOutputError(
            f"out_scale={INFER!r}: fn returned shape {got} for a batch of shape {batch.shape}; "
            f"expected (1, ...) with {len(spatial)} spatial axes"
            + (f" and {out_channels} channels" if layout.channel_axis is not None else "")
            + f": {fn.axes}", expected=rank, got=got)
    out_spatial = _spatial_of(layout, got[1:])
    scale = tuple(Fraction(o, i) for o, i in zip(out_spatial, spatial))
    if any(f == 0 for f in scale):
        raise ModelOutputError(f"out_scale={INFER!r}: fn returned an empty patch {got} for a "
                               f"batch of shape {batch.shape}", expected="a non-empty patch",
                               got=got)
    return scale


def scaled_model(fn: Any, out_scale: Any, grid: PatchGrid, layout: Layout,
                 shape: tuple[int, ...], channels: int, out_channels: int, dtype: np.dtype,
                 param: str = "out_scale") -> tuple[BatchFn, PatchGrid, Scale | None]:
    """The model as ``apply_patches`` calls it, the grid its predictions blend on (``grid``
    itself, or scaled by ``out_scale``), and the scale (``None``: the input's resolution).

    ``out_scale`` is ``None``, a number or one per spatial axis (see
    :func:`~daskpatch.geometry.scale.parse_out_scale`), or ``"infer"``: the model runs once on an
    all-zero patch and its output shape gives the scale. ``param`` names it in errors.
    """
    nb = layout.n_batch
    spatial = grid.size[nb:]
    if isinstance(out_scale, str) and out_scale == INFER:
        probe = wrap_fn(fn, layout, shape, spatial, channels, out_channels)
        scale: Scale | None = infer_scale(probe, layout, spatial, channels, out_channels,
                                          dtype)
    elif isinstance(out_scale, str):
        try:
            scale = parse_out_scale(out_scale, len(spatial))
        except ParameterError:
            raise ParameterError(f"out_scale must be a positive number, one per spatial axis, "
                                 f"or {INFER!r}; got {out_scale!r}", param="out_scale",
                                 value=out_scale, expected=f"a number or {INFER!r}") from None
    else:
        scale = parse_out_scale(out_scale, len(spatial))
    if scale is None or all(f == 1 for f in scale):
        return wrap_fn(fn, layout, shape, spatial, channels, out_channels), grid, None
    out = scaled_grid(grid, nb, scale, param=param)
    text = "(" + ", ".join(str(f) for f in scale) + ")"
    return (wrap_fn(fn, layout, shape, spatial, channels, out_channels, out.size[nb:], text),
            out, scale)
