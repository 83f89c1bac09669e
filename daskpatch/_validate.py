"""Normalise user arguments once, at the boundary, into plain per-axis tuples of ints.

Every public function calls these helpers before it builds a graph or touches a store, so a bad
argument fails early with a message naming the parameter, the expectation and the value given.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

BorderMode = Literal["shift", "pad", "drop"]
BORDERS: tuple[str, ...] = ("shift", "pad", "drop")

PadMode = Literal["reflect", "symmetric", "edge", "wrap", "constant"]
PAD_MODES: tuple[str, ...] = ("reflect", "symmetric", "edge", "wrap", "constant")


def _describe(value: Any) -> str:
    return f"{value!r} of type {type(value).__name__}"


def parse_int(value: Any, name: str, *, minimum: int | None = None) -> int:
    """Return ``value`` as a plain ``int``, rejecting bools, floats and strings."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer; got {_describe(value)}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    return value


def parse_bool(value: Any, name: str) -> bool:
    """Return ``value`` as a plain ``bool``, rejecting anything but ``True``, ``False`` (and
    NumPy booleans)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False; got {_describe(value)}")
    return bool(value)


def parse_shape(value: Any, name: str = "shape", *, minimum: int = 1) -> tuple[int, ...]:
    """Return a shape as a tuple of ints >= ``minimum``."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a sequence of integers; got {_describe(value)}")
    if len(value) == 0:
        raise ValueError(f"{name} must have at least one axis; got {tuple(value)!r}")
    out = tuple(parse_int(v, f"{name}[{i}]") for i, v in enumerate(value))
    bad = [i for i, v in enumerate(out) if v < minimum]
    if bad:
        raise ValueError(f"{name} must be >= {minimum} on every axis; got {out} (axis {bad[0]})")
    return out


def parse_per_axis(value: Any, ndim: int, name: str, *, minimum: int = 1) -> tuple[int, ...]:
    """Turn an int or a sequence of ``ndim`` ints into a per-axis tuple of ints >= ``minimum``.

    Examples
    --------
    >>> parse_per_axis(4, 3, "size")
    (4, 4, 4)
    >>> parse_per_axis((4, 2), 2, "stride")
    (4, 2)
    """
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        out = (int(value),) * ndim
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if len(value) != ndim:
            raise ValueError(
                f"{name} must be an integer or a sequence of {ndim} integers (one per spatial "
                f"axis); got {tuple(value)!r} with {len(value)} entries"
            )
        out = tuple(parse_int(v, f"{name}[{i}]") for i, v in enumerate(value))
    else:
        raise TypeError(
            f"{name} must be an integer or a sequence of integers; got {_describe(value)}"
        )
    bad = [i for i, v in enumerate(out) if v < minimum]
    if bad:
        raise ValueError(
            f"{name} must be >= {minimum} on every axis; got {out} (axis {bad[0]} is {out[bad[0]]})"
        )
    return out


def parse_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    """Check that ``value`` is one of the accepted mode names."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {choices}; got {_describe(value)}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}; got {value!r}")
    return value


def parse_pad_value(value: Any, pad_mode: str, dtype: Any, name: str = "pad_value") -> float:
    """Check a constant padding value: a number that ``dtype`` holds exactly, used only with
    ``pad_mode="constant"`` (any other mode with a non-zero value is an error).

    Examples
    --------
    >>> parse_pad_value(-1024, "constant", "int16")
    -1024
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number; got {_describe(value)}")
    if value != 0 and pad_mode != "constant":
        raise ValueError(
            f"{name}={value} is the fill of pad_mode='constant'; got pad_mode={pad_mode!r} "
            "(pass pad_mode='constant', or drop pad_value)"
        )
    dtype = np.dtype(dtype)
    v = float(value)
    if dtype.kind in "iub":
        info = np.iinfo(dtype) if dtype.kind != "b" else None
        lo, hi = (0, 1) if info is None else (int(info.min), int(info.max))
        if not (np.isfinite(v) and v.is_integer() and lo <= v <= hi):
            raise ValueError(
                f"{name}={value} does not fit the volume's dtype {dtype} (an integer from {lo} "
                f"to {hi})"
            )
        return int(v)
    if dtype.kind == "f" and np.isfinite(v) and abs(v) > float(np.finfo(dtype).max):
        raise ValueError(f"{name}={value} does not fit the volume's dtype {dtype}")
    return value if isinstance(value, int) else v


def spatial_ndim(size: Any) -> int | None:
    """Number of spatial axes a ``size`` argument names, or ``None`` for a scalar size."""
    if isinstance(size, Sequence) and not isinstance(size, (str, bytes)):
        return len(size)
    return None


def _axis_list(axes: Sequence[int], shape: Sequence[int] | None) -> str:
    word = "axis" if len(axes) == 1 else "axes"
    where = ", ".join(str(a) for a in axes)
    if shape is None:
        return f"{word} {where}"
    return f"{word} {where} ({', '.join(str(int(shape[a])) for a in axes)})"


def describe_axes(ndim: int, channel_axis: int | None, n_batch: int,
                  shape: Sequence[int] | None = None, *, name: str = "volume") -> str:
    """What each axis of an array was taken to mean, for error messages.

    Examples
    --------
    >>> describe_axes(3, 0, 0, (64, 64, 64), name="image")
    'the 3-D image of shape (64, 64, 64) is read as channel axis 0 (64 channels) and spatial ...'
    >>> describe_axes(4, None, 1)
    'the 4-D volume is read as batch axis 0 and spatial axes 1, 2, 3 (no channel axis)'
    """
    ch = None if channel_axis is None else channel_axis % ndim
    rest = [a for a in range(ndim) if a != ch]
    parts = []
    if ch is not None:
        count = f" ({int(shape[ch])} channels)" if shape is not None else ""
        parts.append(f"channel axis {ch}{count}")
    if n_batch:
        parts.append("batch " + _axis_list(rest[:n_batch], shape))
    spatial = rest[n_batch:]
    if spatial:
        parts.append("spatial " + _axis_list(spatial, shape))
    what = f"the {ndim}-D {name}" + ("" if shape is None else f" of shape {tuple(shape)}")
    tail = " (no channel axis)" if ch is None else ""
    return f"{what} is read as {' and '.join(parts)}{tail}"


def split_axes(
    ndim: int, size: Any, channel_axis: Any, *, name: str = "volume", param: str = "size",
    shape: Sequence[int] | None = None,
) -> tuple[int | None, int, int]:
    """Split an array's axes into (channel axis, number of batch axes, number of spatial axes).

    The spatial axes are the last ``len(size)`` non-channel axes (all of them when ``size`` is a
    scalar); the non-channel axes before them are batch axes. The channel axis must come before
    the spatial axes or be the last axis. ``shape`` (the array's) makes messages name the axes'
    lengths.
    """
    if channel_axis is None:
        ch = None
    else:
        ch = parse_int(channel_axis, "channel_axis")
        if not -ndim <= ch < ndim:
            raise ValueError(
                f"channel_axis must be None or an axis of the {ndim}-D {name} "
                f"(from {-ndim} to {ndim - 1}); got {channel_axis}"
            )
        ch %= ndim
    n_nonchannel = ndim - (ch is not None)
    if n_nonchannel == 0:
        raise ValueError(
            f"the {ndim}-D {name} has no spatial axes besides channel_axis={channel_axis}"
        )
    k = spatial_ndim(size)
    if k is None:
        k = n_nonchannel
    if k == 0 or k > n_nonchannel:
        if ch is None:
            meant = f"with channel_axis=None all {ndim} axes are batch or spatial axes"
        else:
            rest = [a for a in range(ndim) if a != ch]
            length = "" if shape is None else f" (length {int(shape[ch])})"
            meant = (f"channel_axis={channel_axis} takes axis {ch}{length} as the channel axis, "
                     f"leaving {_axis_list(rest, shape)} for the spatial (and batch) axes")
        raise ValueError(
            f"{param} has {k} entries but the {ndim}-D {name} has {n_nonchannel} non-channel axes "
            f"(channel_axis={channel_axis}); {param} must name between 1 and {n_nonchannel} "
            f"spatial axes: {meant}"
        )
    n_batch = n_nonchannel - k
    if ch is not None and ch != ndim - 1 and ch > n_batch:
        raise ValueError(
            f"channel_axis must come before the spatial axes or be the last axis of the {ndim}-D "
            f"{name}; got channel_axis={channel_axis} between spatial axes ({param} names {k} "
            f"spatial axes: {_axis_list([a for a in range(ndim) if a != ch][n_batch:], shape)})"
        )
    return ch, n_batch, k
