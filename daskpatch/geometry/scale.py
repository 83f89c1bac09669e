"""Outputs at another resolution: a per-axis scale from the input grid to the output grid.

A model whose output patch is a scaled version of its input patch (a 2x super-resolution
network, a network predicting at half resolution) blends on the *output* grid: shape, patch size
and stride each times the scale. Every one of them must come to whole voxels, so that each
output patch starts exactly at its input patch's start times the scale (a ``border="shift"``
patch placed flush with the end included); :func:`scaled_grid` checks that once and says which
axis does not.

Scales are exact fractions (:class:`fractions.Fraction`): ``0.5`` and ``1/3`` as given in
floating point are read as the nearest fraction with a small denominator.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from numbers import Rational, Real
from typing import Any

import numpy as np

from daskpatch.errors import ParameterError, ParameterTypeError
from daskpatch.geometry.grid import PatchGrid
from daskpatch.geometry.parse import _describe

__all__ = ["INFER", "Scale", "parse_out_scale", "scale_text", "scaled_chunks", "scaled_grid",
           "scaled_length"]

#: Per spatial axis, the output length of one input voxel.
Scale = tuple[Fraction, ...]

#: The ``out_scale`` value that reads the scale off the model's output for one patch.
INFER = "infer"

#: Largest denominator a floating-point scale is read with (``1/3`` given as 0.333...).
_MAX_DENOMINATOR = 1000


def _fraction(value: Any, param: str, where: str) -> Fraction:
    if isinstance(value, bool) or not isinstance(value, (Real, Fraction, str)):
        raise ParameterTypeError(
            f"{param} must be a positive number, one per spatial axis or one for all, or "
            f"{INFER!r}; got {_describe(value)}{where}", param=param, value=value,
            expected="a positive number")
    try:
        if isinstance(value, Rational):
            f = Fraction(int(value.numerator), int(value.denominator))
        elif isinstance(value, str):
            f = Fraction(value)
        else:
            x = float(value)
            f = Fraction(x).limit_denominator(_MAX_DENOMINATOR)
            if not np.isfinite(x) or abs(float(f) - x) > 1e-9 * max(1.0, abs(x)):
                f = Fraction(x) if np.isfinite(x) else Fraction(0)
    except (ValueError, ZeroDivisionError, OverflowError) as err:
        raise ParameterError(f"{param} must be a positive number; got {value!r}{where}",
                             param=param, value=value, expected="a positive number") from err
    if f <= 0:
        raise ParameterError(f"{param} must be a positive number; got {value!r}{where}",
                             param=param, value=value, expected="a positive number")
    return f


def parse_out_scale(value: Any, ndim: int, param: str = "out_scale") -> Scale | None:
    """``out_scale`` as one exact fraction per spatial axis (``None`` stays ``None``).

    Examples
    --------
    >>> parse_out_scale(2, 3)
    (Fraction(2, 1), Fraction(2, 1), Fraction(2, 1))
    >>> [str(f) for f in parse_out_scale((1, 0.5, 0.5), 3)]
    ['1', '1/2', '1/2']
    """
    if value is None:
        return None
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != ndim:
            raise ParameterError(
                f"{param} must have one entry per spatial axis ({ndim}) or be one number; got "
                f"{len(value)} entries {tuple(value)!r}", param=param, value=tuple(value),
                expected=ndim)
        return tuple(_fraction(v, param, f" on axis {a}") for a, v in enumerate(value))
    return (_fraction(value, param, ""),) * ndim


def scale_text(scale: Scale) -> list[str]:
    """A scale as exact JSON-ready text, one entry per axis (``["1", "1/2"]``)."""
    return [str(f) for f in scale]


def scaled_length(n: int, f: Fraction) -> int | None:
    """``n * f`` when it is a whole number, else ``None``."""
    v = n * f
    return int(v) if v.denominator == 1 else None


def scaled_grid(grid: PatchGrid, n_batch: int, scale: Scale, *,
                param: str = "out_scale") -> PatchGrid:
    """The output grid of ``grid`` at ``scale`` (per spatial axis; batch axes keep theirs).

    Shape, size and stride must each scale to whole voxels on every spatial axis, so every
    output patch starts at its input patch's start times the scale; the error names the axis,
    the quantity, its value and what it would scale to.

    Examples
    --------
    >>> from fractions import Fraction
    >>> g = scaled_grid(PatchGrid((10,), 4, 2), 0, (Fraction(2),))
    >>> g.shape, g.size, g.stride, g.starts
    ((20,), (8,), (4,), ((0, 4, 8, 12),))
    >>> PatchGrid((10,), 4, 2).starts
    ((0, 2, 4, 6),)
    """
    shape, size, stride = list(grid.shape), list(grid.size), list(grid.stride)
    for i, f in enumerate(scale):
        a = n_batch + i
        for what, values in (("size", size), ("stride", stride), ("shape", shape)):
            v = scaled_length(values[a], f)
            if v is None or v == 0:
                name = "volume shape" if what == "shape" else f"patch {what}"
                raise ParameterError(
                    f"{param}={str(f)} on spatial axis {i} maps the {name} {values[a]} to "
                    f"{float(values[a] * f):g} voxels; it must map to a whole, positive number "
                    f"of voxels (choose a {what} that is a multiple of {f.denominator} on that "
                    f"axis{', or crop or pad the volume' if what == 'shape' else ''})",
                    param=param, value=str(f), expected=f"{what} * {param} whole",
                    mentions=() if what == "shape" else (what,))
            values[a] = v
    out = PatchGrid(tuple(shape), tuple(size), tuple(stride), border=grid.border)
    for a, f in enumerate((Fraction(1),) * n_batch + tuple(scale)):
        mapped = grid.axis_starts(a) * f.numerator // f.denominator
        if not np.array_equal(out.axis_starts(a), mapped):  # pragma: no cover - by construction
            raise AssertionError(f"output patch starts on axis {a} are not the input's scaled")
    return out


def scaled_chunks(chunks: tuple[tuple[int, ...], ...], n_batch: int, scale: Scale | None
                  ) -> tuple[tuple[int, ...], ...] | None:
    """An input's chunks (non-channel axes) on the output grid, or ``None`` where one does not
    map to whole voxels (the automatic work block then ignores them).

    Examples
    --------
    >>> from fractions import Fraction
    >>> scaled_chunks(((4, 4, 2),), 0, (Fraction(1, 2),))
    ((2, 2, 1),)
    >>> scaled_chunks(((3,),), 0, (Fraction(1, 2),)) is None
    True
    """
    if scale is None:
        return chunks
    out: list[tuple[int, ...]] = list(chunks[:n_batch])
    for c, f in zip(chunks[n_batch:], scale):
        mapped = [scaled_length(v, f) for v in c]
        if any(v is None or v == 0 for v in mapped):
            return None
        out.append(tuple(v for v in mapped if v is not None))
    return tuple(out)
