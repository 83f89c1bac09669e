"""Several heads, test-time flips and uncertainty for :func:`daskpatch.apply_patches`: ONE
overlap-add of all of them, split into one lazy array per head afterwards.

The model is wrapped (:class:`~daskpatch.adapters.heads.HeadsFn`) so that every head, averaged
over the flips, is one block of channels of a single floating prediction, followed (with
``uncertainty=True``) by the averaged squares. The engine blends that prediction once -- every
patch goes through the model once per flip, whatever the number of heads -- and each head's
result is a slice of it, cast to the head's dtype by the rules of :mod:`daskpatch.engine.numbers`
(integers rounded half to even and saturated, bool above 0.5, NaN an error). The heads share one
graph: ``dask.compute(*heads)`` or :func:`daskpatch.to_zarr` of the dict runs the model once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import dask.array as da
import numpy as np
from dask.base import tokenize

from daskpatch.adapters.heads import Head, Heads, HeadsFn, parse_heads, parse_tta
from daskpatch.adapters.torch import as_model, check_model_input
from daskpatch.engine.numbers import acc_dtype, cast, nan_error
from daskpatch.errors import ParameterError
from daskpatch.geometry.layout import parse_layout
from daskpatch.geometry.parse import parse_bool, parse_per_axis
from daskpatch.geometry.scale import parse_out_scale
from daskpatch.graph.inputs import Volume, with_channel_axis

__all__ = ["Uncertain", "apply_heads", "wants_heads"]


class Uncertain(NamedTuple):
    """What ``apply_patches(..., uncertainty=True)`` returns for each output: the weighted mean
    of the predictions covering each voxel (patches and flips) and their weighted standard
    deviation, both lazy."""

    mean: Any
    std: Any


def wants_heads(out_channels: Any, dtype: Any, tta: Any, uncertainty: Any) -> bool:
    """Whether :func:`daskpatch.apply_patches` goes through :func:`apply_heads`."""
    return (tta is not None or uncertainty is not False
            or isinstance(out_channels, (Mapping, tuple, list))
            or isinstance(dtype, (Mapping, tuple, list)))


def apply_heads(apply: Callable[..., da.Array], volume: Any, fn: Any, size: Any, stride: Any,
                *, out_channels: Any, dtype: Any, tta: Any, uncertainty: Any,
                channel_axis: Any, **kwargs: Any) -> Any:
    """:func:`daskpatch.apply_patches` (``apply``) of a model with several heads, ``tta`` or
    ``uncertainty``: one overlap-add of every head (and square), split per head."""
    heads = parse_heads(out_channels, dtype)
    uncertainty = parse_bool(uncertainty, "uncertainty")
    if not hasattr(volume, "ndim"):
        volume = Volume.from_user(volume, None).array
    layout = parse_layout(volume.ndim, size, channel_axis, shape=volume.shape)
    n_spatial = volume.ndim - layout.n_batch - (layout.channel_axis is not None)
    flips = parse_tta(tta, n_spatial)
    described = layout.describe()
    in_dtype = np.dtype(volume.dtype)
    default = in_dtype if in_dtype.kind in "fc" else np.dtype(np.float32)
    heads = Heads(heads.kind, tuple(
        Head(h.name, layout.channels if h.channels is None else h.channels,
             default if h.dtype is None else h.dtype) for h in heads.heads))
    kinds = {h.dtype.kind for h in heads.heads if h.dtype is not None}
    if uncertainty and "c" in kinds:
        raise ParameterError("uncertainty=True needs real dtypes (a standard deviation of "
                             "complex predictions is not defined here); got a complex dtype",
                             param="uncertainty", value=True, mentions=("dtype",))
    # the sums are accumulated in float64 for uncertainty: E[p^2] - m^2 cancels
    acc = np.dtype(np.float64) if uncertainty else np.result_type(
        *[acc_dtype(h.dtype) for h in heads.heads])
    total = sum(h.channels for h in heads.heads)
    engine_channels = total * (2 if uncertainty else 1)
    has_ch = layout.channel_axis is not None
    channel_last = has_ch and not layout.channels_first
    squeeze = False
    model_layout = layout  # how the model's batches are read
    widest = max(h.channels for h in heads.heads)
    if not has_ch and (widest > 1 or engine_channels > 1):
        volume, channel_axis = with_channel_axis(volume), 0
        squeeze = widest == 1  # the model takes and gives no channel axis
        layout = parse_layout(volume.ndim, size, 0, shape=volume.shape)
        if not squeeze:
            model_layout = layout
    model_has_ch = layout.channel_axis is not None and not squeeze
    patch = tuple(parse_per_axis(size, n_spatial, "size"))
    out_patch = _scaled_patch(kwargs.get("out_scale"), patch)
    batch = _batch_shape(patch, layout.channels if model_has_ch else None, channel_last)
    model = as_model(fn)
    axes = (f"{described}: fn gets batches ({', '.join(map(str, batch))}) and must return "
            f"{_returns(heads, out_patch, model_has_ch, channel_last)}")
    check_model_input(model, model_layout, (1,) + batch[1:], axes)
    hfn = HeadsFn(model, heads, flips, uncertainty, squeeze, channel_last, model_has_ch, acc,
                  out_patch, axes)
    h0 = heads.heads[0]
    direct = heads.kind == "array" and not uncertainty and h0.dtype is not None \
        and h0.dtype.kind in "fc"
    y = apply(volume, hfn, size, stride, channel_axis=channel_axis,
              out_channels=engine_channels, dtype=h0.dtype if direct else acc, **kwargs)
    if direct:
        return y
    ch = None if layout.channel_axis is None else layout.channel_axis % y.ndim
    results: list[Any] = []
    offset = 0
    for h in heads.heads:
        assert h.dtype is not None
        label = heads.label(h)
        mean = _split(y, ch, offset, h.channels, None, squeeze, h.dtype, label, "mean")
        if uncertainty:
            std_dtype = h.dtype if h.dtype.kind == "f" else np.dtype(np.float32)
            std = _split(y, ch, offset, h.channels, total + offset, squeeze, std_dtype, label,
                         "std")
            results.append(Uncertain(mean, std))
        else:
            results.append(mean)
        offset += h.channels
    if heads.kind == "array":
        return results[0]
    if heads.kind == "tuple":
        return tuple(results)
    return {h.name: r for h, r in zip(heads.heads, results)}


def _scaled_patch(out_scale: Any, patch: tuple[int, ...]) -> tuple[int, ...]:
    """The heads' spatial shape: the patch's, times ``out_scale`` (one scale for every head;
    ``"infer"`` would run the model while the graph is built, which several heads refuse). A
    scale that maps the patch to no whole shape is left to :func:`daskpatch.apply_patches`,
    whose error names the axis."""
    if out_scale is None:
        return patch
    if isinstance(out_scale, str):
        raise ParameterError(
            f"out_scale with several heads, tta or uncertainty must be a number or one per "
            f"spatial axis (one scale for every head); got {out_scale!r}",
            param="out_scale", value=out_scale, expected="a number or one per spatial axis")
    scale = parse_out_scale(out_scale, len(patch))
    if scale is None:
        return patch
    scaled = [p * f for p, f in zip(patch, scale)]
    if any(v.denominator != 1 for v in scaled):
        return patch
    return tuple(int(v) for v in scaled)


def _batch_shape(patch: tuple[int, ...], channels: int | None, channel_last: bool) -> tuple:
    if channels is None:
        return ("B",) + patch
    return ("B",) + ((*patch, channels) if channel_last else (channels, *patch))


def _returns(heads: Heads, patch: tuple[int, ...], has_ch: bool, channel_last: bool) -> str:
    shapes = ["(" + ", ".join(map(str, _batch_shape(patch, h.channels if has_ch else None,
                                                     channel_last))) + ")"
              for h in heads.heads]
    if heads.kind == "array":
        return shapes[0]
    if heads.kind == "tuple":
        return "a tuple (" + ", ".join(shapes) + ")"
    return "a dict {" + ", ".join(f"{h.name!r}: {s}" for h, s in zip(heads.heads, shapes)) + "}"


def _split(y: da.Array, ch: int | None, lo: int, k: int, sq_lo: int | None, squeeze: bool,
           dtype: np.dtype, label: str, what: str) -> da.Array:
    """Channels ``lo:lo + k`` of the blended ``y`` (the mean of a head), or with ``sq_lo`` the
    standard deviation from them and the squares at ``sq_lo:sq_lo + k``, cast to ``dtype``;
    ``squeeze`` drops the channel axis (of one)."""
    func = functools.partial(_head_block, ch=ch, lo=lo, k=k, sq_lo=sq_lo, squeeze=squeeze,
                             dtype=dtype, label=label)
    if ch is None:
        chunks = y.chunks
        ndim = y.ndim
        drop: list[int] = []
    elif squeeze:
        chunks = y.chunks[:ch] + y.chunks[ch + 1:]
        ndim = y.ndim - 1
        drop = [ch]
    else:
        chunks = y.chunks[:ch] + ((k,),) + y.chunks[ch + 1:]
        ndim = y.ndim
        drop = []
    name = f"head-{what}-" + tokenize(y.name, ch, lo, k, sq_lo, squeeze, str(dtype))
    return da.map_blocks(func, y, chunks=chunks, drop_axis=drop, dtype=dtype,
                         meta=np.empty((0,) * ndim, dtype=dtype), name=name)


def _head_block(block: np.ndarray, *, ch: int | None, lo: int, k: int, sq_lo: int | None,
                squeeze: bool, dtype: np.dtype, label: str, block_info: Any = None
                ) -> np.ndarray:
    """One chunk of a head (its mean, or with ``sq_lo`` its standard deviation), cast."""
    canon = block[None] if ch is None else np.moveaxis(block, ch, 0)
    mean = canon[lo:lo + k]
    if sq_lo is None:
        x = mean
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            x = np.sqrt(np.maximum(canon[sq_lo:sq_lo + k] - mean * mean, 0))

    def nan_at(idx: tuple[int, ...]) -> Exception:
        info = (block_info or {}).get(None, {})
        loc = list(info.get("array-location", [(0, n) for n in block.shape]))
        key = list(info.get("chunk-location", (0,) * block.ndim))
        if ch is not None and not squeeze:  # the spatial bounds, without the channel axis
            del loc[ch]
        bounds = tuple((int(a), int(b)) for a, b in loc)
        err = nan_error(dtype, tuple(key), bounds, k, None if squeeze else ch,
                        (idx[0],) + tuple(a + i for (a, _), i in zip(bounds, idx[1:])))
        return ValueError(f"{label}: {err}")

    out = cast(np.ascontiguousarray(x), dtype, nan_at)
    if squeeze or ch is None:
        return out[0]
    return np.moveaxis(out, 0, ch)
