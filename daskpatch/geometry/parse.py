"""Normalise user arguments once, at the boundary, into plain per-axis tuples of ints.

Every public function calls these helpers before it builds a graph or touches a store, so a bad
argument fails early with a message naming the parameter, the expectation and the value given.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from daskpatch.errors import ParameterError, ParameterTypeError

BorderMode = Literal["shift", "pad", "drop"]
BORDERS: tuple[str, ...] = ("shift", "pad", "drop")

PadMode = Literal["reflect", "symmetric", "edge", "wrap", "constant"]
PAD_MODES: tuple[str, ...] = ("reflect", "symmetric", "edge", "wrap", "constant")


def _describe(value: Any) -> str:
    """``value`` and its type for an error message; an array or a long container is summarised
    (its type, shape or length and dtype), never printed whole.

    Examples
    --------
    >>> _describe(2.5)
    '2.5 of type float'
    >>> import numpy as np
    >>> _describe(np.zeros((64, 64), np.float32))
    'an array of shape (64, 64) and dtype float32 of type ndarray'
    """
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if isinstance(shape, tuple) and dtype is not None and not isinstance(value, np.generic):
        return f"an array of shape {shape} and dtype {dtype} of type {type(value).__name__}"
    text = repr(value)
    if len(text) > 200:
        size = f" of length {len(value)}" if hasattr(value, "__len__") else ""
        return f"a {type(value).__name__}{size} (not shown: its repr has {len(text)} characters)"
    return f"{text} of type {type(value).__name__}"


def _shown(value: tuple[Any, ...], limit: int = 8) -> str:
    """``value``'s repr, its middle elided past ``limit`` entries (messages stay one line).

    Examples
    --------
    >>> _shown(tuple(range(100)))
    '(0, 1, 2, 3, ..., 96, 97, 98, 99)'
    """
    if len(value) <= limit:
        return repr(value)
    half = limit // 2
    return "(" + ", ".join(map(repr, value[:half])) + ", ..., " + ", ".join(
        map(repr, value[-half:])) + ")"


def parse_int(value: Any, name: str, *, minimum: int | None = None) -> int:
    """Return ``value`` as a plain ``int``, rejecting bools, floats and strings."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ParameterTypeError(f"{name} must be an integer; got {_describe(value)}",
                                 param=name, value=value, expected="an integer")
    number = int(value)
    if minimum is not None and number < minimum:
        raise ParameterError(f"{name} must be >= {minimum}; got {number}", param=name,
                             value=number, expected=f">= {minimum}")
    return number


def parse_bool(value: Any, name: str) -> bool:
    """Return ``value`` as a plain ``bool``, rejecting anything but ``True``, ``False`` (and
    NumPy booleans)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ParameterTypeError(f"{name} must be True or False; got {_describe(value)}",
                                 param=name, value=value, expected="True or False")
    return bool(value)


def parse_shape(value: Any, name: str = "shape", *, minimum: int = 1) -> tuple[int, ...]:
    """Return a shape as a tuple of ints >= ``minimum``."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ParameterTypeError(f"{name} must be a sequence of integers; got {_describe(value)}",
                                 param=name, value=value, expected="a sequence of integers")
    if len(value) == 0:
        raise ParameterError(f"{name} must have at least one axis; got {tuple(value)!r}",
                             param=name, value=value)
    out = tuple(parse_int(v, f"{name}[{i}]") for i, v in enumerate(value))
    bad = [i for i, v in enumerate(out) if v < minimum]
    if bad:
        raise ParameterError(
            f"{name} must be >= {minimum} on every axis; got {_shown(out)} (axis {bad[0]})",
            param=name, value=out, expected=f">= {minimum}")
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
            raise ParameterError(
                f"{name} must be an integer or a sequence of {ndim} integers (one per spatial "
                f"axis); got {_shown(tuple(value))} with {len(value)} entries",
                param=name, value=value, expected=f"{ndim} entries",
            )
        out = tuple(parse_int(v, f"{name}[{i}]") for i, v in enumerate(value))
    else:
        raise ParameterTypeError(
            f"{name} must be an integer or a sequence of integers; got {_describe(value)}",
            param=name, value=value, expected="an integer or a sequence of integers",
        )
    bad = [i for i, v in enumerate(out) if v < minimum]
    if bad:
        raise ParameterError(
            f"{name} must be >= {minimum} on every axis; got {_shown(out)} (axis {bad[0]} "
            f"is {out[bad[0]]})",
            param=name, value=value, expected=f">= {minimum}",
        )
    return out


def parse_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    """Check that ``value`` is one of the accepted mode names."""
    if not isinstance(value, str):
        raise ParameterTypeError(f"{name} must be one of {choices}; got {_describe(value)}",
                                 param=name, value=value, expected=choices)
    if value not in choices:
        raise ParameterError(f"{name} must be one of {choices}; got {value!r}", param=name,
                             value=value, expected=choices)
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
        raise ParameterTypeError(f"{name} must be a number; got {_describe(value)}", param=name,
                                 value=value, expected="a number")
    if value != 0 and pad_mode != "constant":
        raise ParameterError(
            f"{name}={value} is the fill of pad_mode='constant'; got pad_mode={pad_mode!r} "
            "(pass pad_mode='constant', or drop pad_value)",
            param=name, value=value, mentions=("pad_mode", "pad_value"),
        )
    dtype = np.dtype(dtype)
    v = float(value)
    if dtype.kind in "iub":
        info = np.iinfo(dtype) if dtype.kind != "b" else None
        lo, hi = (0, 1) if info is None else (int(info.min), int(info.max))
        if not (np.isfinite(v) and v.is_integer() and lo <= v <= hi):
            raise ParameterError(
                f"{name}={value} does not fit the volume's dtype {dtype} (an integer from {lo} "
                f"to {hi})", param=name, value=value, expected=(lo, hi),
            )
        return int(v)
    if dtype.kind == "f" and np.isfinite(v) and abs(v) > float(np.finfo(dtype).max):
        raise ParameterError(f"{name}={value} does not fit the volume's dtype {dtype}",
                             param=name, value=value)
    return value if isinstance(value, int) else v


def parse_result_dtype(dtype: Any, name: str = "dtype") -> np.dtype[Any] | None:
    """A result's ``dtype`` (``None`` stays ``None``): a numeric NumPy dtype, the result being a
    weighted mean of the model's numbers; ``name`` is how errors name it.

    Examples
    --------
    >>> parse_result_dtype("uint8")
    dtype('uint8')
    """
    if dtype is None:
        return None
    try:
        dt: np.dtype[Any] = np.dtype(dtype)
    except TypeError as err:
        raise ParameterTypeError(f"{name} must be a NumPy dtype; got {_describe(dtype)}",
                                 param="dtype", value=dtype) from err
    if dt.kind not in "biufc":
        raise ParameterTypeError(
            f"{name} must be a numeric dtype (bool, integer, floating or complex): the result "
            f"is a weighted mean of the model's numbers; got {dt}", param="dtype", value=dt,
            expected="a numeric dtype")
    return dt
