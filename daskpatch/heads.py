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
from fractions import Fraction
from typing import Any, NamedTuple

import dask.array as da
import numpy as np
from dask.base import tokenize

from daskpatch.adapters.heads import Head, Heads, HeadsFn, head_values, parse_heads, parse_tta
from daskpatch.adapters.batch import BatchFn
from daskpatch.adapters.torch import as_model, check_model_input, to_numpy
from daskpatch.engine.numbers import acc_dtype, cast, nan_error
from daskpatch.errors import ModelOutputError, ParameterError
from daskpatch.geometry.layout import parse_layout
from daskpatch.geometry.parse import parse_bool, parse_per_axis
from daskpatch.geometry.scale import INFER, Scale, parse_out_scale, scaled_length
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


def apply_heads(apply: Callable[..., list[da.Array]], volume: Any, fn: Any, size: Any, stride: Any,
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
    batch = _batch_shape(patch, layout.channels if model_has_ch else None, channel_last)
    model = as_model(fn)
    scales = _head_scales(kwargs.pop("out_scale", None), heads, patch,
                          lambda: _probe(model, heads, batch, volume.dtype, model_has_ch,
                                         channel_last))
    spatials = [patch if sc is None else _scaled_patch(sc, patch, heads.label(h))
                for h, sc in zip(heads.heads, scales)]
    axes = (f"{described}: fn gets batches ({', '.join(map(str, batch))}) and must return "
            f"{_returns(heads, spatials, model_has_ch, channel_last)}")
    check_model_input(model, model_layout, (1,) + batch[1:], axes)
    hfn = HeadsFn(model, heads, flips, uncertainty, squeeze, channel_last, model_has_ch, acc,
                  spatials, axes)
    # one overlap-add per resolution (group of heads), all from the same model calls
    totals = [sum(heads.heads[i].channels for i in g) for g in hfn.groups]
    h0 = heads.heads[0]
    direct = heads.kind == "array" and not uncertainty and h0.dtype is not None \
        and h0.dtype.kind in "fc"
    ys = apply(volume, hfn, size, stride,
               [(scales[g[0]], t * (2 if uncertainty else 1), h0.dtype if direct else acc,
                 "out_scale" if len(hfn.groups) == 1 else f"out_scale[{heads.heads[g[0]].name!r}]")
                for g, t in zip(hfn.groups, totals)], channel_axis=channel_axis, **kwargs)
    if direct:
        return ys[0]
    ch = None if layout.channel_axis is None else layout.channel_axis % ys[0].ndim
    results: list[Any] = [None] * len(heads.heads)
    for y, group, total in zip(ys, hfn.groups, totals):
        offset = 0
        for i in group:
            h = heads.heads[i]
            assert h.dtype is not None
            label = heads.label(h)
            mean = _split(y, ch, offset, h.channels, None, squeeze, h.dtype, label, "mean")
            if uncertainty:
                std_dtype = h.dtype if h.dtype.kind == "f" else np.dtype(np.float32)
                std = _split(y, ch, offset, h.channels, total + offset, squeeze, std_dtype,
                             label, "std")
                results[i] = Uncertain(mean, std)
            else:
                results[i] = mean
            offset += h.channels
    if heads.kind == "array":
        return results[0]
    if heads.kind == "tuple":
        return tuple(results)
    return {h.name: r for h, r in zip(heads.heads, results)}


def _head_scales(out_scale: Any, heads: Heads, patch: tuple[int, ...],
                 probe: Callable[[], list[tuple[int, ...]]]) -> list[Scale | None]:
    """Each head's ``out_scale``: one for every head (a number, one per spatial axis), one per
    head (a dict keyed by the heads' names, positions for a tuple), or ``"infer"``: read off
    each head's output for one patch (``probe`` runs the model once)."""
    n = len(patch)
    if isinstance(out_scale, str) and out_scale == INFER:
        return [tuple(Fraction(o, i) for o, i in zip(sp, patch)) for sp in probe()]
    if isinstance(out_scale, Mapping):
        names = [h.name for h in heads.heads]
        if heads.kind == "array" or set(out_scale) != set(names):
            raise ParameterError(
                f"out_scale as a dict gives one scale per head and must name the heads "
                f"out_channels declares ({names if heads.kind != 'array' else 'none'}); got "
                f"the keys {list(out_scale)}", param="out_scale", value=out_scale,
                expected=names, mentions=("out_channels",))
        return [parse_out_scale(out_scale[k], n, f"out_scale[{k!r}]") for k in names]
    if isinstance(out_scale, str):
        try:
            return [parse_out_scale(out_scale, n)] * len(heads.heads)
        except ParameterError:
            raise ParameterError(f"out_scale must be a positive number, one per spatial axis, "
                                 f"a dict of one per head, or {INFER!r}; got {out_scale!r}",
                                 param="out_scale", value=out_scale,
                                 expected=f"a number or {INFER!r}") from None
    return [parse_out_scale(out_scale, n)] * len(heads.heads)


def _scaled_patch(scale: Scale, patch: tuple[int, ...], label: str) -> tuple[int, ...]:
    """A head's spatial patch shape: the patch's times its ``scale``, in whole voxels."""
    out = []
    for a, (p, f) in enumerate(zip(patch, scale)):
        v = scaled_length(p, f)
        if v is None or v == 0:
            raise ParameterError(
                f"out_scale of {label} maps the patch size {p} on spatial axis {a} to {p * f} "
                f"voxels ({p} x {f}), not a whole number; choose a size that the scale maps to "
                f"whole voxels", param="out_scale", value=str(f), expected="whole voxels",
                mentions=("size",))
        out.append(v)
    return tuple(out)


def _probe(model: Any, heads: Heads, batch: tuple, dtype: np.dtype, has_ch: bool,
           channel_last: bool) -> list[tuple[int, ...]]:
    """Each head's spatial shape for one all-zero patch (``out_scale="infer"``: the model runs
    once, on the caller's thread; nothing is read)."""
    x = np.zeros((1,) + tuple(batch[1:]), dtype=dtype)
    out = head_values(heads, BatchFn(model, (), "")(x), x)
    shapes = []
    for h, v in zip(heads.heads, out):
        shape = tuple(getattr(to_numpy(v), "shape", ()))
        spatial = shape[2:] if has_ch and not channel_last else \
            shape[1:-1] if has_ch else shape[1:]
        if len(shape) < 1 + len(batch[1:]) or len(spatial) != len(batch) - (2 if has_ch else 1) \
                or not all(spatial):
            raise ModelOutputError(
                f"out_scale={INFER!r}: {heads.label(h)} has shape {shape} for a batch of shape "
                f"{x.shape}; expected (1, ...) with {len(batch) - (2 if has_ch else 1)} "
                f"spatial axes", expected=len(batch), got=shape)
        shapes.append(spatial)
    return shapes


def _batch_shape(patch: tuple[int, ...], channels: int | None, channel_last: bool) -> tuple:
    if channels is None:
        return ("B",) + patch
    return ("B",) + ((*patch, channels) if channel_last else (channels, *patch))


def _returns(heads: Heads, spatials: list[tuple[int, ...]], has_ch: bool,
             channel_last: bool) -> str:
    shapes = ["(" + ", ".join(map(str, _batch_shape(sp, h.channels if has_ch else None,
                                                     channel_last))) + ")"
              for h, sp in zip(heads.heads, spatials)]
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
