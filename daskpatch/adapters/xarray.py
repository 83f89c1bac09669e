"""xarray DataArrays in and out of the patch functions, with dims, coordinates and attrs kept.

xarray is optional: nothing here imports it unless the caller already holds a DataArray (then it
is in ``sys.modules``) or asks for one (``open_volume(..., xarray=True)``).

:func:`accepts_dataarray` wraps :func:`~daskpatch.extract_patches`,
:func:`~daskpatch.reconstruct` and :func:`~daskpatch.apply_patches`: a DataArray argument is
unwrapped to its (lazy) data, ``channel_axis`` may name a dim, the function runs on the data, and
the result is wrapped again:

- ``apply_patches``: the volume's dims, coordinates, attrs and name. A channel dim whose size
  changes (``out_channels``) gets a fresh integer index ``0..C-1``, and coordinates along it are
  dropped; a volume without a channel dim and ``out_channels > 1`` gets a ``"channel"`` dim in
  front (``channel_1``, ... if that name is taken), indexed ``0..K-1``. Spatial dims whose length
  changes (``out_scale``) keep their names and lose their coordinates.
- ``extract_patches``: dims ``("patch", *patch dims)`` -- the volume's channel dim (its
  coordinates kept) and spatial dims, in the order of the patch array; batch dims fold into
  ``patch``. A patch has no spatial coordinates of its own; instead ``patch`` carries one integer
  coordinate ``<dim>_start`` per batch and spatial dim: the index in the volume of the patch's
  first voxel. attrs and name are the volume's.
- ``reconstruct``: dims of the patches without ``patch`` (batch dims, which the patches do not
  name, become ``batch_0``, ``batch_1``, ...), the channel dim's coordinates when its size is
  unchanged, attrs and name. The spatial coordinates of the volume are not in the patches: put
  them back with ``result.assign_coords(volume.coords)``.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np

__all__ = ["accepts_dataarray", "import_xarray", "is_dataarray", "wrap"]


def is_dataarray(value: Any) -> bool:
    """Whether ``value`` is an ``xarray.DataArray`` (without importing xarray)."""
    xr = sys.modules.get("xarray")
    return xr is not None and isinstance(value, xr.DataArray)


def import_xarray(why: str) -> Any:
    """xarray, or an ImportError saying how to install it."""
    try:
        import xarray
    except ImportError as err:  # pragma: no cover - dev installs it
        raise ImportError(
            f"{why} needs xarray; install it with pip install 'daskpatch[xarray]'"
        ) from err
    return xarray


def wrap(data: Any, dims: Sequence[Hashable], coords: Any = None, attrs: dict | None = None,
         name: Hashable | None = None) -> Any:
    """A DataArray over ``data`` (kept lazy)."""
    xr = import_xarray("a DataArray result")
    return xr.DataArray(data, dims=tuple(dims), coords=coords, attrs=dict(attrs or {}), name=name)


def resolve_channel_axis(channel_axis: Any, dims: Sequence[Hashable], what: str) -> Any:
    """A channel dim name to its axis index (anything else is returned for the function to
    check)."""
    if isinstance(channel_axis, str):
        if channel_axis not in dims:
            raise ValueError(
                f"channel_axis must be an axis index or a dim of the {what} {tuple(dims)}; got "
                f"{channel_axis!r}"
            )
        return list(dims).index(channel_axis)
    return channel_axis


def _coords_along(x: Any, keep: set[Hashable]) -> dict:
    """The coordinates of ``x`` whose dims all lie in ``keep``."""
    return {k: v for k, v in x.coords.items() if set(v.dims) <= keep}


def _apply(func: Callable, volume: Any, args: dict) -> Any:
    ch = resolve_channel_axis(args.get("channel_axis"), volume.dims, "volume")
    result = func(**{**args, "volume": volume.data, "channel_axis": ch})
    return _each(result, lambda r: _applied(r, volume, ch))


def _each(result: Any, one: Callable) -> Any:
    """``one`` applied to each array of a model's heads (a dict, tuple or named tuple)."""
    if isinstance(result, dict):
        return {k: _each(v, one) for k, v in result.items()}
    if isinstance(result, tuple):
        items = [_each(v, one) for v in result]
        return type(result)(*items) if hasattr(result, "_fields") else tuple(items)
    return one(result)


def _applied(result: Any, volume: Any, ch: Any) -> Any:
    """One result of :func:`daskpatch.apply_patches` as a DataArray like ``volume``."""
    dims = list(volume.dims)
    shape = list(volume.shape)
    if ch is None and result.ndim == volume.ndim + 1:  # one channel in, K out: a dim in front
        dims.insert(0, _fresh("channel", dims))
        shape.insert(0, -1)
    # coordinates along a dim whose length changed (the channel dim with out_channels, the
    # spatial dims with out_scale) no longer fit it: dropped; a channel dim gets 0..C-1
    changed = {d for d, n, m in zip(dims, shape, result.shape) if n != m}
    coords = _coords_along(volume, set(volume.dims) - changed)
    if ch is not None or result.ndim == volume.ndim + 1:
        dim = dims[0 if ch is None else int(ch) % volume.ndim]
        if dim in changed:
            coords[dim] = np.arange(result.shape[dims.index(dim)])
    return wrap(result, dims, coords, volume.attrs, volume.name)


def _fresh(name: str, dims: Sequence[Hashable]) -> str:
    """``name``, or ``name_1``, ``name_2``, ... : the first not among ``dims``."""
    k, out = 0, name
    while out in dims:
        k += 1
        out = f"{name}_{k}"
    return out


def _extract(func: Callable, volume: Any, args: dict) -> Any:
    from daskpatch.geometry.layout import full_grid, parse_layout

    ch = resolve_channel_axis(args.get("channel_axis"), volume.dims, "volume")
    result = func(**{**args, "volume": volume.data, "channel_axis": ch})
    layout = parse_layout(volume.ndim, args["size"], ch, shape=volume.shape)
    dims = list(volume.dims)
    ch_dim = None if layout.channel_axis is None else dims[layout.channel_axis]
    grid_dims = [d for d in dims if d != ch_dim]
    spatial = grid_dims[layout.n_batch:]
    if ch_dim is None:
        patch_dims = spatial
    elif layout.channels_first:
        patch_dims = [ch_dim, *spatial]
    else:
        patch_dims = [*spatial, ch_dim]
    grid = full_grid(layout.grid_shape, layout.n_batch, args["size"], args.get("stride"),
                     args.get("border", "shift"))
    starts = np.meshgrid(*[grid.axis_starts(a) for a in range(grid.ndim)], indexing="ij")
    coords: dict[Hashable, Any] = {
        f"{d}_start": ("patch", s.ravel()) for d, s in zip(grid_dims, starts)
    }
    if ch_dim is not None:
        coords.update(_coords_along(volume, {ch_dim}))
    return wrap(result, ["patch", *patch_dims], coords, volume.attrs, volume.name)


def _reconstruct(func: Callable, patches: Any, args: dict) -> Any:
    channel_axis = args.get("channel_axis")
    inner = list(patches.dims[1:])
    if isinstance(channel_axis, str):
        if channel_axis not in inner:
            raise ValueError(
                f"channel_axis must be an axis index or a dim of the patches {tuple(inner)} "
                f"(other than {patches.dims[0]!r}); got {channel_axis!r}"
            )
        channel_axis = -1 if inner[-1] == channel_axis else 0
    result = func(**{**args, "patches": patches.data, "channel_axis": channel_axis})
    ndim = result.ndim
    ch = None if channel_axis is None else int(channel_axis) % ndim
    ch_dim = None
    if ch is not None:  # patches are (N, C, ...) unless the channel is the volume's last axis
        ch_dim = inner.pop(-1 if ch == ndim - 1 else 0)
    n_batch = ndim - (ch is not None) - len(inner)
    names = iter([f"batch_{i}" for i in range(n_batch)] + inner)
    dims = [ch_dim if a == ch else next(names) for a in range(ndim)]
    coords = _coords_along(patches, {ch_dim}) if ch_dim is not None else {}
    return wrap(result, dims, coords, patches.attrs, patches.name)


_KINDS: dict[str, tuple[str, Callable]] = {
    "apply_patches": ("volume", _apply),
    "extract_patches": ("volume", _extract),
    "reconstruct": ("patches", _reconstruct),
}


def accepts_dataarray(func: Callable) -> Callable:
    """Let ``func`` (one of the patch functions) take and return DataArrays; see the module
    docstring. Other inputs go straight through (a dim name as ``channel_axis`` then raises)."""
    param, handler = _KINDS[func.__name__]
    signature = inspect.signature(func)

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return func(*args, **kwargs)  # let Python report the bad call
        first = bound.arguments.get(param)
        if is_dataarray(first):
            return handler(func, first, dict(bound.arguments))
        if isinstance(bound.arguments.get("channel_axis"), str):
            raise TypeError(
                f"channel_axis must be an integer; got {bound.arguments['channel_axis']!r} of "
                f"type str (a dim name works only when {param} is an xarray.DataArray; it is a "
                f"{type(first).__name__})"
            )
        return func(*args, **kwargs)

    return wrapper
