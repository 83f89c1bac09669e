"""One axis layout: which axes of a user's array are channel, batch and spatial axes.

Every entry point (``extract_patches``, ``reconstruct``, ``apply_patches``, the loaders, the
chunk helpers of :mod:`daskpatch.io`, the CLI) reads a ``size`` (or ``stride``) and a
``channel_axis`` the same way: the spatial axes are the last ``len(size)`` non-channel axes, the
non-channel axes before them are batch axes (a stack of volumes), and the channel axis comes
before the spatial axes or is the last axis. :func:`parse_layout` checks that once and returns a
frozen :class:`Layout`, which knows the canonical ``(C, *batch, *spatial)`` moves, the user's
patch shape and how to describe the axes in an error message. :func:`full_grid` is the
:class:`~daskpatch.grid.PatchGrid` over the batch and spatial axes (batch axes are patches of
size 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from daskpatch.errors import ParameterError
from daskpatch.geometry.parse import parse_int, parse_per_axis
from daskpatch.geometry.grid import PatchGrid

__all__ = ["Layout", "describe_axes", "full_grid", "parse_layout", "spatial_ndim", "split_axes"]


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
            raise ParameterError(
                f"channel_axis must be None or an axis of the {ndim}-D {name} "
                f"(from {-ndim} to {ndim - 1}); got {channel_axis}", param="channel_axis",
                value=channel_axis, expected=(-ndim, ndim - 1)
            )
        ch %= ndim
    n_nonchannel = ndim - (ch is not None)
    if n_nonchannel == 0:
        raise ParameterError(
            f"the {ndim}-D {name} has no spatial axes besides channel_axis={channel_axis}",
            param="channel_axis", value=channel_axis
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
        raise ParameterError(
            f"{param} has {k} entries but the {ndim}-D {name} has {n_nonchannel} non-channel axes "
            f"(channel_axis={channel_axis}); {param} must name between 1 and {n_nonchannel} "
            f"spatial axes: {meant}", param=param, value=k, expected=(1, n_nonchannel),
            mentions=("channel_axis",)
        )
    n_batch = n_nonchannel - k
    if ch is not None and ch != ndim - 1 and ch > n_batch:
        raise ParameterError(
            f"channel_axis must come before the spatial axes or be the last axis of the {ndim}-D "
            f"{name}; got channel_axis={channel_axis} between spatial axes ({param} names {k} "
            f"spatial axes: {_axis_list([a for a in range(ndim) if a != ch][n_batch:], shape)})",
            param="channel_axis", value=channel_axis, mentions=(param,)
        )
    return ch, n_batch, k


@dataclass(frozen=True)
class Layout:
    """How a user's array maps onto the canonical ``(C, *batch, *spatial)`` layout.

    ``channel_axis`` is normalised (``0 <= channel_axis < ndim``) or ``None``; the non-channel
    axes are ``n_batch`` batch axes then the spatial axes. ``shape`` is the array's shape when
    it is known (the loaders' arrays); the shape properties need it.

    Examples
    --------
    >>> lay = parse_layout(4, (8, 8), -1, shape=(2, 30, 40, 3))
    >>> lay.channel_axis, lay.n_batch, lay.channels_first, lay.spatial_axes
    (3, 1, False, (1, 2))
    >>> lay.batch_shape, lay.spatial_shape, lay.channels, lay.patch_shape((8, 8), 3)
    ((2,), (30, 40), 3, (8, 8, 3))
    >>> lay.index((1,), [slice(0, 8), slice(4, 12)])
    (1, slice(0, 8, None), slice(4, 12, None), slice(None, None, None))
    """

    ndim: int
    channel_axis: int | None
    n_batch: int
    shape: tuple[int, ...] | None = None

    # -- axes ----------------------------------------------------------------------------------
    @property
    def channels_first(self) -> bool:
        """In patches: ``(N, C, ...)`` rather than ``(N, ..., C)`` (channel axis not last)."""
        return self.channel_axis is not None and self.channel_axis != self.ndim - 1

    @property
    def spatial_axes(self) -> tuple[int, ...]:
        """Axis numbers of the spatial axes in the full array."""
        axes = [a for a in range(self.ndim) if a != self.channel_axis]
        return tuple(axes[self.n_batch:])

    def describe(self, name: str = "volume") -> str:
        """What each axis was taken to mean (:func:`describe_axes`), for error messages."""
        return describe_axes(self.ndim, self.channel_axis, self.n_batch, self.shape, name=name)

    # -- shapes (need ``shape``) ---------------------------------------------------------------
    def _known(self) -> tuple[int, ...]:
        if self.shape is None:
            raise ValueError("this Layout was parsed without the array's shape")
        return self.shape

    @property
    def grid_shape(self) -> tuple[int, ...]:
        """The non-channel axes' lengths: batch then spatial."""
        shape, ch = self._known(), self.channel_axis
        return shape if ch is None else shape[:ch] + shape[ch + 1:]

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return self.grid_shape[:self.n_batch]

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return self.grid_shape[self.n_batch:]

    @property
    def channels(self) -> int:
        """Length of the channel axis; 1 without one."""
        return 1 if self.channel_axis is None else self._known()[self.channel_axis]

    def patch_shape(self, size: tuple[int, ...], channels: int) -> tuple[int, ...]:
        """A patch's shape in the user's layout: ``size`` with the channel axis where it goes."""
        if self.channel_axis is None:
            return size
        return (channels, *size) if self.channels_first else (*size, channels)

    # -- moves ---------------------------------------------------------------------------------
    def from_canonical(self, a: np.ndarray) -> np.ndarray:
        """``(k, C, *size)`` patches to the user's patch layout."""
        if self.channel_axis is None:
            return a[:, 0]
        return a if self.channels_first else np.moveaxis(a, 1, -1)

    def to_canonical(self, a: np.ndarray) -> np.ndarray:
        """User patch layout to ``(k, C, *size)``."""
        if self.channel_axis is None:
            return a[:, None]
        return a if self.channels_first else np.moveaxis(a, -1, 1)

    def index(self, batch: tuple[int, ...], spatial: Sequence[slice]) -> tuple[Any, ...]:
        """Full index tuple: batch ints, spatial slices, the whole channel axis."""
        idx: list[Any] = list(batch) + list(spatial)
        if self.channel_axis is not None:
            idx.insert(self.channel_axis, slice(None))
        return tuple(idx)

    def channel_first(self, a: np.ndarray) -> np.ndarray:
        """A region read with :meth:`index` (batch axes dropped) as ``(C, *spatial)``."""
        if self.channel_axis is None:
            return a[None]
        if self.channel_axis == self.ndim - 1:
            return np.moveaxis(a, -1, 0)
        return a


def parse_layout(ndim: int, size: Any, channel_axis: Any, name: str = "volume",
                 shape: Any = None, *, param: str = "size") -> Layout:
    """Check ``size``/``channel_axis`` against an ``ndim``-D array (:func:`split_axes`) and
    return its :class:`Layout` (keeping ``shape`` when given)."""
    ch, n_batch, _ = split_axes(ndim, size, channel_axis, name=name, param=param, shape=shape)
    return Layout(ndim, ch, n_batch, _known_shape(shape))


def _known_shape(shape: Any) -> tuple[int, ...] | None:
    """``shape`` as plain ints; ``None`` when not given or not known (a Dask NaN)."""
    if shape is None or any(isinstance(s, float) and math.isnan(s) for s in shape):
        return None
    return tuple(int(s) for s in shape)


def full_grid(
    shape: tuple[int, ...], n_batch: int, size: Any, stride: Any, border: str
) -> PatchGrid:
    """The grid over batch and spatial axes: batch axes are patches of size 1."""
    k = len(shape) - n_batch
    size = parse_per_axis(size, k, "size")
    stride = size if stride is None else parse_per_axis(stride, k, "stride")
    ones = (1,) * n_batch
    return PatchGrid(shape, ones + size, ones + stride, border=border)  # type: ignore[arg-type]
