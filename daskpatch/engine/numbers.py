"""The engine's numeric rules: accumulation dtypes, casts to the result dtype, fill values.

- **Integer results** round to nearest (``np.rint``: halves to even) and saturate at the type's
  limits (255.6 -> 255 and -0.6 -> 0 as ``uint8``; 1000 -> 127 as ``int8``). NaN has no integer
  value: it is an error naming the output chunk (its index and voxel range) and the voxel.
- **Boolean results** are the integers 0 and 1 by the same rule: True where the blended value
  is above 0.5 (a blended mask is True where most of the weight said so, not wherever one patch
  did); NaN is the same error.
- **Floating results** never overflow: a finite value beyond the result type's largest finite
  value (by a rounding of the accumulation, or a model output a narrower ``dtype`` cannot hold)
  saturates at it; infinities and NaN pass through unchanged.
- ``fill_value`` must fit the result dtype; checked when the graph is built.

Overflow is detected, not prevented: the accumulation runs with ``np.errstate(over="raise")``,
which costs nothing (NumPy reads the floating-point flags after every ufunc anyway), and the rare
slab, patch or chunk that overflowed is computed again in float64 (complex128) at half scale (a
weighted sum of values at most the type's maximum, halved, cannot overflow even in float64), then
doubled (exact) and saturated (:func:`doubled`, :func:`saturate`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from daskpatch.errors import ParameterError

__all__ = ["Numbers", "acc_dtype", "cast", "check_fill", "doubled", "nan_error", "saturate",
           "wide_dtype"]


@dataclass(frozen=True)
class Numbers:
    """The numeric side of one overlap-add, handed to its block tasks.

    ``copy`` is ``blend="crop"``: each voxel is copied from the patch that owns it, in the result
    dtype. ``shape``, ``block``, ``channels`` and ``channel_axis`` locate an output chunk for
    error messages.
    """

    acc: np.dtype
    out: np.dtype
    copy: bool
    shape: tuple[int, ...]
    block: tuple[int, ...]
    channels: int
    channel_axis: int | None

    def nan_error(self, voxel: tuple[int, ...]) -> ValueError:
        """The error for a NaN at canonical ``voxel`` ``(c, *grid position)``."""
        cidx = tuple(int(v) // b for v, b in zip(voxel[1:], self.block))
        bounds = tuple((c * b, min((c + 1) * b, n))
                       for c, b, n in zip(cidx, self.block, self.shape))
        key = list(cidx)
        if self.channel_axis is not None:
            key.insert(self.channel_axis, 0)
        return nan_error(self.out, tuple(key), bounds, self.channels, self.channel_axis, voxel)


def acc_dtype(out: Any, copy: bool = False) -> np.dtype:
    """The dtype blocks accumulate in for a result of dtype ``out``.

    ``copy`` (crop): ``out`` itself, so voxels are copied exactly (int64 above 2^53 too).
    Otherwise float64 for float64 (or wider) and wide integer results, complex for complex ones,
    float32 for the rest.
    """
    dt: np.dtype[Any] = np.dtype(out)
    if copy:
        return dt
    if dt.kind == "c":
        return np.dtype(np.complex128 if dt.itemsize > 8 else np.complex64)
    if (dt.kind == "f" and dt.itemsize >= 8) or (dt.kind in "iu" and dt.itemsize > 2):
        return np.dtype(np.float64)
    return np.dtype(np.float32)


def wide_dtype(dtype: Any) -> np.dtype:
    """float64 (complex128 for complex): where an overflowed accumulation is redone."""
    return np.dtype(np.complex128 if np.dtype(dtype).kind == "c" else np.float64)


def _parts(x: np.ndarray) -> tuple[np.ndarray, ...]:
    return (x.real, x.imag) if x.dtype.kind == "c" else (x,)


def doubled(half: np.ndarray) -> np.ndarray:
    """``2 * half`` (exact), where a finite value overflows: the dtype's largest, signed."""
    with np.errstate(over="ignore"):
        y = half * 2
    top = float(np.finfo(y.dtype).max)
    for h, p in zip(_parts(half), _parts(y)):
        over = np.isfinite(h) & ~np.isfinite(p)
        p[over] = np.copysign(top, h[over])
    return y


def saturate(x: np.ndarray, dtype: Any) -> np.ndarray:
    """``x`` (floating or complex) as ``dtype``, finite values clipped to its finite range."""
    dtype = np.dtype(dtype)
    top = float(np.finfo(dtype).max)
    y = np.array(x, copy=True)
    for part in _parts(y):
        np.clip(part, -top, top, out=part, where=np.isfinite(part))
    with np.errstate(over="ignore"):
        return y.astype(dtype)


#: How far (in units of the accumulation dtype's epsilon, relative) a blended value may sit from
#: a half-integer and still count as that half-integer: the blend of a constant 2.5 comes out
#: a few ulps either side of it (the window weights sum to 1 only to float rounding).
HALF_ULPS = 64


def snap_halves(x: np.ndarray) -> np.ndarray:
    """``x`` with values within :data:`HALF_ULPS` ulps of a half-integer set to it exactly, so
    that rounding treats a constant prediction the same everywhere (2.5 blends to 2.4999998
    here and 2.5000002 there; both become 2.5, which rounds half to even: 2).

    Examples
    --------
    >>> snap_halves(np.array([2.4999998, 2.5000002, 2.4, 0.50000006], np.float32)).tolist()
    [2.5, 2.5, 2.4000000953674316, 0.5]
    """
    twice = x * 2
    nearest = np.rint(twice)
    eps = float(np.finfo(x.dtype).eps)
    near = np.abs(twice - nearest) <= HALF_ULPS * eps * np.maximum(np.abs(twice), 1)
    snapped: np.ndarray = np.where(near & (nearest % 2 != 0), nearest / 2, x).astype(x.dtype)
    return snapped


def _float_to_int(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Round to nearest (an exact half to even, after :func:`snap_halves`) and saturate; NaN
    stays NaN until the last cast, which then sets the floating-point "invalid" flag (IEEE 754
    requires it of a NaN-to-integer conversion)."""
    x = snap_halves(x)
    info = np.iinfo(dtype)
    if x.dtype.kind == "f" and info.max <= float(np.finfo(x.dtype).max) and \
            float(x.dtype.type(info.max)) == info.max:  # the limits are exact in x's dtype
        y: np.ndarray = np.rint(x)
        np.clip(y, info.min, info.max, out=y)
        with np.errstate(invalid="raise"):
            return y.astype(dtype)
    y = np.rint(x.astype(np.float64))
    top = float(info.max)
    exact = int(top) <= info.max  # not for (u)int64: float(2**63 - 1) is 2**63
    if not exact:
        top = float(np.nextafter(top, 0.0))
        over = y > top
    np.clip(y, float(info.min), top, out=y)
    with np.errstate(invalid="raise"):
        out = y.astype(dtype)
    if not exact:
        out[over] = info.max
    return out


def cast(x: np.ndarray, dtype: Any, nan_at: Callable[[tuple[int, ...]], Exception]
         ) -> np.ndarray:
    """``x`` as ``dtype`` by the rules above (``x`` itself when the dtype already matches).

    ``nan_at(index)`` makes the error for the first NaN (its index in ``x``) when ``dtype`` is
    an integer type. ``x`` must not be complex unless ``dtype`` is (the callers refuse that).
    """
    dtype = np.dtype(dtype)
    if x.dtype == dtype:
        return x
    if dtype.kind == "b":  # as an integer type 0..1: rounded to nearest, so True above 0.5
        x = x.real
        if x.dtype.kind == "f" and np.isnan(x).any():
            raise nan_at(tuple(int(i) for i in np.argwhere(np.isnan(x))[0]))
        if x.dtype.kind == "f":
            x = snap_halves(x)  # a blended constant 0.5 is False everywhere
        return x > 0.5
    if dtype.kind in "iu":
        if x.dtype.kind in "iu":
            src = np.iinfo(x.dtype)
            info = np.iinfo(dtype)
            clipped: np.ndarray = np.clip(x, max(info.min, src.min), min(info.max, src.max))
            return clipped.astype(dtype)
        if x.dtype.kind in "fc":
            x = x.real
            try:
                return _float_to_int(x, dtype)
            except FloatingPointError:  # the cast met NaN: find the first one
                nan = np.argwhere(np.isnan(x))
                if len(nan):
                    raise nan_at(tuple(int(i) for i in nan[0])) from None
                raise
        return x.astype(dtype)
    if dtype.kind in "fc":
        try:
            with np.errstate(over="raise"):
                return x.astype(dtype)
        except FloatingPointError:  # beyond the type's range: saturate
            return saturate(x.astype(wide_dtype(x.dtype)), dtype)
    return x.astype(dtype)


def nan_error(dtype: Any, key: tuple[int, ...], bounds: tuple[tuple[int, int], ...],
              channels: int, channel_axis: int | None, voxel: tuple[int, ...]) -> ValueError:
    """The error for NaN in an integer result: the output chunk ``key`` spanning ``bounds``
    (spatial; the channel axis is added) holds it, first at canonical ``voxel`` ``(c, *pos)``."""
    ranges = [f"{lo}:{hi}" for lo, hi in bounds]
    where = [str(int(v)) for v in voxel[1:]]
    if channel_axis is not None:
        ranges.insert(channel_axis, f"0:{channels}")
        where.insert(channel_axis, str(int(voxel[0])))
    return ValueError(
        f"NaN has no {np.dtype(dtype)} value: output chunk {tuple(key)} (voxels "
        f"[{', '.join(ranges)}]) holds NaN, first at voxel ({', '.join(where)}). Replace NaN "
        "before the cast (e.g. np.nan_to_num in fn) or keep a floating dtype"
    )


def check_fill(fill_value: Any, dtype: Any) -> None:
    """Refuse a ``fill_value`` the result dtype cannot hold (checked when the graph is built)."""
    if fill_value is None:
        return
    dtype = np.dtype(dtype)
    if isinstance(fill_value, (int, np.integer)):  # exact, however large
        parts: tuple[int | float, int | float] = (int(fill_value), 0)
    else:
        value = complex(fill_value)
        parts = (value.real, value.imag)
    finite = [isinstance(p, int) or math.isfinite(p) for p in parts]
    if dtype.kind == "b":
        if not (parts[0] in (0, 1) and parts[1] == 0):
            raise ParameterError(
                f"fill_value={fill_value} does not fit the result dtype bool (False, True, 0 or 1)",
                param="fill_value", value=fill_value, expected=dtype
            )
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        whole = isinstance(parts[0], int) or (finite[0] and float(parts[0]).is_integer())
        if not (whole and parts[1] == 0 and info.min <= int(parts[0]) <= info.max):
            raise ParameterError(
                f"fill_value={fill_value} does not fit the result dtype {dtype} (whole numbers "
                f"from {info.min} to {info.max})", param="fill_value", value=fill_value,
                expected=dtype
            )
    elif dtype.kind in "fc":
        top = float(np.finfo(dtype).max)
        if any(f and abs(p) > top for p, f in zip(parts, finite)) or (
                dtype.kind == "f" and parts[1] != 0):
            kind = "complex numbers with parts" if dtype.kind == "c" else "finite values"
            raise ParameterError(
                f"fill_value={fill_value} does not fit the result dtype {dtype} ({kind} from "
                f"{-top:.6g} to {top:.6g}, inf or nan)", param="fill_value", value=fill_value,
                expected=dtype
            )
