"""A model with several heads, test-time flips, and the squares an uncertainty needs, as ONE
function on NumPy batches that the overlap-add engine blends like any model.

:class:`HeadsFn` calls the user's model on a batch (and on each flip of it, for ``tta``),
checks every head it returns (a dict, a tuple or one array), un-flips them, averages them over
the flips and concatenates them along the channel axis into one floating prediction -- then, for
``uncertainty``, the averaged squares as further channels. Blending those sums with one window
gives, per voxel, the weighted mean ``m`` of each head and ``E[p**2]``, so that the standard
deviation ``sqrt(E[p**2] - m**2)`` covers the overlapping patches and the flips with no further
model call. :func:`daskpatch.apply_patches` splits the blended channels into the heads again
(:mod:`daskpatch.heads`).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from daskpatch.adapters.batch import BatchFn
from daskpatch.adapters.torch import as_model, to_numpy
from daskpatch.errors import (ModelOutputError, ModelOutputTypeError, ParameterError,
                              ParameterTypeError)
from daskpatch.geometry.parse import _describe, parse_int, parse_result_dtype

__all__ = ["TTA_MODES", "Head", "Heads", "HeadsFn", "head_values", "parse_heads", "parse_tta"]

#: Accepted names of ``tta`` (besides ``None`` and a list of axis sets).
TTA_MODES: tuple[str, ...] = ("flip",)

HeadsKind = Literal["array", "tuple", "dict"]


@dataclass(frozen=True)
class Head:
    """One output of a model: its name (a dict key, or its position in a tuple), channels and
    the dtype of its blended result (``None``: not given, the default rule applies)."""

    name: str | int
    channels: int
    dtype: np.dtype | None


@dataclass(frozen=True)
class Heads:
    """What a model returns: one array (``kind="array"``, one head named 0, its channel count
    ``None`` until known), a tuple or a dict of arrays."""

    kind: HeadsKind
    heads: tuple[Head, ...]

    def describe(self) -> str:
        if self.kind == "dict":
            return "{" + ", ".join(f"{h.name!r}: {h.channels}" for h in self.heads) + "}"
        return "(" + ", ".join(str(h.channels) for h in self.heads) + \
            ("," if len(self.heads) == 1 else "") + ")"

    def label(self, h: Head) -> str:
        return "fn's output" if self.kind == "array" else f"head {h.name!r}"


def parse_heads(out_channels: Any, dtype: Any) -> Heads:
    """``out_channels`` and ``dtype`` of :func:`daskpatch.apply_patches` as :class:`Heads`: an
    int (or ``None``) is one array; a dict ``{name: channels}`` or a tuple of channel counts
    declares the heads a model returns. ``dtype`` is one dtype for every head, or a dict (the
    same keys) or tuple (the same length) of one per head.

    Examples
    --------
    >>> parse_heads({"seg": 3, "dist": 1}, "float16").describe()
    "{'seg': 3, 'dist': 1}"
    >>> parse_heads((2, 1), None).kind
    'tuple'
    """
    if isinstance(out_channels, Mapping):
        kind: HeadsKind = "dict"
        if not out_channels:
            raise ParameterError("out_channels must declare at least one head; got an empty "
                                 "dict", param="out_channels", value=out_channels)
        for k in out_channels:
            if not (isinstance(k, str) and k) and not (isinstance(k, int)
                                                       and not isinstance(k, bool)):
                raise ParameterTypeError(
                    f"out_channels' keys must name the heads as the model's dict has them "
                    f"(non-empty strings or ints); got {_describe(k)}", param="out_channels",
                    value=k)
        names: list[str | int] = list(out_channels)
        counts = [out_channels[k] for k in out_channels]
    elif isinstance(out_channels, (tuple, list)):
        kind = "tuple"
        if not out_channels:
            raise ParameterError("out_channels must declare at least one head; got an empty "
                                 f"{type(out_channels).__name__}", param="out_channels",
                                 value=out_channels)
        names, counts = list(range(len(out_channels))), list(out_channels)
    else:
        kind, names, counts = "array", [0], [out_channels]
    channels = [None if c is None and kind == "array" else
                parse_int(c, "out_channels" if kind == "array" else
                          f"out_channels[{n!r}]", minimum=1) for n, c in zip(names, counts)]
    if isinstance(dtype, (Mapping, tuple, list)):
        if kind == "array":
            raise ParameterTypeError(
                f"dtype must be one NumPy dtype for a model returning one array; got "
                f"{_describe(dtype)} (a dtype per head needs out_channels declaring the heads)",
                param="dtype", value=dtype, mentions=("out_channels",))
        keys = list(dtype) if isinstance(dtype, Mapping) else list(range(len(dtype)))
        if kind == "dict" and not isinstance(dtype, Mapping) or \
                kind == "tuple" and isinstance(dtype, Mapping) or set(keys) != set(names):
            raise ParameterError(
                f"dtype must name the same heads as out_channels ({names}); got "
                f"{_describe(dtype)}", param="dtype", value=dtype, expected=names,
                mentions=("out_channels",))
        dtypes = [parse_result_dtype(dtype[n], f"dtype[{n!r}]") for n in names]  # type: ignore[index]
    else:
        dtypes = [parse_result_dtype(dtype, "dtype")] * len(names)
    return Heads(kind, tuple(Head(n, c, d)  # type: ignore[arg-type]
                             for n, c, d in zip(names, channels, dtypes)))


def parse_tta(tta: Any, n_spatial: int) -> tuple[tuple[int, ...], ...]:
    """The flips ``tta`` asks for, each a sorted tuple of spatial axes (0 is the first spatial
    axis of a patch; ``()`` the batch as it is).

    ``None``: the batch alone. ``"flip"``: every subset of the spatial axes (``2**n`` flips,
    nnU-Net's mirroring). A list of axis sets: exactly those flips.

    Examples
    --------
    >>> parse_tta("flip", 2)
    ((), (0,), (1,), (0, 1))
    >>> parse_tta([(), [-1]], 3)
    ((), (2,))
    """
    if tta is None:
        return ((),)
    if isinstance(tta, str):
        if tta not in TTA_MODES:
            raise ParameterError(f"tta must be None, one of {TTA_MODES} or a list of spatial "
                                 f"axis sets such as [(), (0,), (1, 2)]; got {tta!r}",
                                 param="tta", value=tta, expected=TTA_MODES)
        axes = range(n_spatial)
        return tuple(c for k in range(n_spatial + 1) for c in itertools.combinations(axes, k))
    if not isinstance(tta, Sequence) or not tta:
        raise ParameterTypeError(
            f"tta must be None, one of {TTA_MODES} or a non-empty list of spatial axis sets "
            f"such as [(), (0,), (1, 2)]; got {_describe(tta)}", param="tta", value=tta)
    flips: list[tuple[int, ...]] = []
    for entry in tta:
        if isinstance(entry, (str, bytes)) or not isinstance(entry, Sequence):
            raise ParameterTypeError(
                f"tta's entries must be sequences of spatial axes (() for the batch as it is, "
                f"(0,) to flip the first spatial axis); got {_describe(entry)}", param="tta",
                value=entry)
        axes_ = set()
        for a in entry:
            a = parse_int(a, "tta axis")
            if not -n_spatial <= a < n_spatial:
                raise ParameterError(
                    f"tta's axes are spatial axes of a patch, from {-n_spatial} to "
                    f"{n_spatial - 1} ({n_spatial} spatial axes); got {a} in {tuple(entry)}",
                    param="tta", value=a, expected=(-n_spatial, n_spatial - 1))
            axes_.add(a % n_spatial)
        flip = tuple(sorted(axes_))
        if flip in flips:
            raise ParameterError(f"tta names the flip of axes {flip} twice; got {tta!r}",
                                 param="tta", value=tta)
        flips.append(flip)
    return tuple(flips)


class HeadsFn(BatchFn):
    """The function the engine calls for a model with several heads, ``tta`` or
    ``uncertainty``: ``fn`` (the user's model) on each flip of the batch, every head checked
    against ``heads``, un-flipped, averaged over the flips and concatenated along the channel
    axis in ``acc`` (and with ``squares``, the averaged squares after them).

    The batch comes in the engine's layout: ``squeeze`` drops its channel axis of one for a
    model that takes no channel axis (and gives each head one back); ``channel_last`` puts the
    channel axis last (batches and heads). ``spatials`` is each head's spatial patch shape:
    heads at different resolutions fall into :attr:`groups` (one per spatial shape, in the
    order of their first head), and the function then returns one array per group, a tuple,
    each group concatenated as above (its heads, then their squares).
    """

    def __init__(self, fn: Any, heads: Heads, flips: tuple[tuple[int, ...], ...], squares: bool,
                 squeeze: bool, channel_last: bool, has_channel: bool, acc: np.dtype,
                 spatials: Sequence[tuple[int, ...]], axes: str) -> None:
        self.heads, self.flips, self.squares = heads, flips, squares
        self.squeeze, self.channel_last, self.has_channel = squeeze, channel_last, has_channel
        self.acc, self.spatials = np.dtype(acc), tuple(tuple(s) for s in spatials)
        shapes = list(dict.fromkeys(self.spatials))
        #: per group (one per distinct spatial shape): the indices of its heads
        self.groups = tuple(tuple(i for i, s in enumerate(self.spatials) if s == shape)
                            for shape in shapes)
        outs = []
        for shape, group in zip(shapes, self.groups):
            total = sum(heads.heads[i].channels for i in group) * (2 if squares else 1)
            outs.append((total,) + shape if not channel_last else shape + (total,))
            if not (has_channel or squeeze) and total == 1:
                outs[-1] = shape
        super().__init__(as_model(fn), outs[0], axes)
        #: each group's output patch shape in the engine's layout (no batch axis)
        self.out_shapes = tuple(outs)
        #: what determines the result besides the engine's parameters (its fingerprint)
        self.params: dict[str, Any] = {"heads": heads.kind,
                       "head_channels": {str(h.name): h.channels for h in heads.heads},
                       "tta": [list(f) for f in flips], "uncertainty": squares}
        if len(self.groups) > 1:
            self.params["head_shapes"] = {str(h.name): list(s)
                                          for h, s in zip(heads.heads, self.spatials)}

    @property
    def on_device(self) -> bool:
        """Heads, flips and squares are put together on the host: blocks blend there."""
        return False

    def __dask_tokenize__(self) -> Any:
        from dask.base import normalize_token

        return ("daskpatch-heads-fn", normalize_token(self.fn), self.out_shapes, self.heads,
                self.flips, self.squares, self.squeeze, self.channel_last, str(self.acc))

    def __call__(self, batch: np.ndarray) -> Any:
        x = batch[:, 0] if self.squeeze else batch
        # spatial axes of a batch in the model's layout (B, [C,] *spatial[, C])
        first = 2 if (self.has_channel and not self.channel_last) else 1
        sums: list[np.ndarray] | None = None
        for flip in self.flips:
            xin = np.ascontiguousarray(np.flip(x, tuple(first + a for a in flip))) if flip \
                else x
            parts = self._heads(BatchFn.__call__(self, xin), xin)
            means = [np.concatenate([parts[i] for i in g], axis=1) if len(g) > 1
                     else parts[g[0]] for g in self.groups]
            if flip:  # un-flipped in the canonical (B, C, *spatial) layout
                means = [np.flip(m, tuple(2 + a for a in flip)) for m in means]
            if sums is None:
                sums = [np.concatenate([m, np.square(m)], axis=1) if self.squares else
                        np.array(m, dtype=self.acc) for m in means]
            else:
                for s, m in zip(sums, means):
                    n = m.shape[1]
                    s[:, :n] += m
                    if self.squares:
                        s[:, n:] += np.square(m)
        assert sums is not None
        outs = []
        for s in sums:
            if len(self.flips) > 1:
                s /= len(self.flips)
            if self.channel_last:
                s = np.moveaxis(s, 1, -1)
            elif not (self.has_channel or self.squeeze) and s.shape[1] == 1:
                s = s[:, 0]
            outs.append(s)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def _heads(self, out: Any, batch: np.ndarray) -> list[np.ndarray]:
        """The heads of one output, checked, each ``(B, K, *spatial)`` in ``acc``."""
        return [self._head(h, to_numpy(v), batch, s)
                for h, v, s in zip(self.heads.heads, head_values(self.heads, out, batch),
                                   self.spatials)]

    def _head(self, h: Head, arr: Any, batch: np.ndarray, spatial: tuple[int, ...]
              ) -> np.ndarray:
        label = self.heads.label(h)
        if not (hasattr(arr, "shape") and hasattr(arr, "dtype")):
            raise ModelOutputTypeError(f"{label} must be an array; got {_what(arr)}",
                                       expected="an array", got=type(arr).__name__)
        arr = np.asarray(arr)
        if arr.dtype.kind not in "biufc":
            raise ModelOutputTypeError(
                f"{label} must hold numbers (a numeric dtype); got dtype {arr.dtype}",
                expected="a numeric dtype", got=arr.dtype)
        if arr.dtype.kind == "c" and self.acc.kind != "c":
            raise ModelOutputTypeError(
                f"{label} is complex ({arr.dtype}); pass a complex dtype for it (and no "
                f"uncertainty)", expected="a real dtype", got=arr.dtype)
        n = len(batch)
        chan = self.has_channel  # the model's own layout
        want = ((n,) + ((h.channels,) + spatial if not self.channel_last
                        else spatial + (h.channels,)) if chan else (n,) + spatial)
        if arr.shape != want:
            if arr.ndim < 1 or arr.shape[0] != n:
                why = (f"{arr.shape[0] if arr.ndim else 'no'} patches for a batch of {n} "
                       f"(shape {batch.shape})")
            else:
                sp = arr.shape[2:] if chan and not self.channel_last else \
                    arr.shape[1:-1] if chan else arr.shape[1:]
                if sp != spatial:
                    why = (f"spatial shape {sp}, not {spatial}: a head's spatial shape is the "
                           f"patch's times its out_scale (out_scale='infer' reads each head's "
                           f"off the model's output)")
                else:
                    why = (f"{arr.shape[-1 if self.channel_last else 1]} channels where "
                           f"out_channels declares {h.channels}")
            raise ModelOutputError(f"{label} has shape {arr.shape}, expected {want}: {why}",
                                   expected=want, got=arr.shape)
        if not chan:
            arr = arr[:, None]
        elif self.channel_last:
            arr = np.moveaxis(arr, -1, 1)
        return arr.astype(self.acc, copy=False)


def head_values(heads: Heads, out: Any, batch: np.ndarray) -> list[Any]:
    """The arrays of one output of ``fn`` in the order of ``heads``, after checking that it is
    the structure ``heads`` declares (one array, a dict with its keys, a tuple of its length)."""
    if heads.kind == "array":
        if isinstance(out, (Mapping, tuple, list)) and not hasattr(out, "shape"):
            what = (f"a dict with keys {list(out)}" if isinstance(out, Mapping)
                    else f"a {type(out).__name__} of {len(out)} items")
            raise ModelOutputTypeError(
                f"fn returned {what} for a batch of shape {batch.shape}, where one array "
                f"was expected; a model with several heads needs them declared: "
                f"out_channels={{name: channels, ...}} for a dict, or a tuple of channel "
                f"counts for a tuple", expected="an array", got=type(out).__name__)
        values = [out]
    elif heads.kind == "dict":
        if not isinstance(out, Mapping):
            raise ModelOutputTypeError(
                f"fn must return a dict with keys {[h.name for h in heads.heads]} (as "
                f"out_channels declares); got {_what(out)}", expected="a dict",
                got=type(out).__name__)
        want = [h.name for h in heads.heads]
        if set(out) != set(want):
            raise ModelOutputError(
                f"fn returned a dict with keys {list(out)}; out_channels declares the "
                f"heads {want} (every batch must return the same keys)", expected=want,
                got=list(out))
        values = [out[n] for n in want]
    else:
        if not isinstance(out, (tuple, list)) or hasattr(out, "shape"):
            raise ModelOutputTypeError(
                f"fn must return a tuple of {len(heads.heads)} arrays (as out_channels "
                f"declares); got {_what(out)}", expected="a tuple", got=type(out).__name__)
        if len(out) != len(heads.heads):
            raise ModelOutputError(
                f"fn returned a {type(out).__name__} of {len(out)} arrays; out_channels "
                f"declares {len(heads.heads)} heads {heads.describe()}",
                expected=len(heads.heads), got=len(out))
        values = list(out)
    return values


def _what(out: Any) -> str:
    shape = getattr(out, "shape", None)
    if shape is not None:
        return f"a {type(out).__name__} of shape {tuple(shape)}"
    if isinstance(out, Mapping):
        return f"a dict with keys {list(out)}"
    return _describe(out)
