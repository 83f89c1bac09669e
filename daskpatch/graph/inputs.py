"""The one way in: user arrays (NumPy, Dask, Zarr) as the graphs read them.

:func:`take` checks a user array for every front door (the graph builders, the training
loaders, :func:`daskpatch.to_zarr`), and says how it is read:

- *directly*: an array-like (NumPy, Zarr, or a Dask array that is a bare ``from_array`` /
  ``from_zarr`` over one); a task slices it itself, so a Zarr-backed task reads exactly the
  chunks its region touches and no chunk stays in memory between tasks;
- *by chunks*: any other Dask array; a task depends on the chunks its region overlaps.

:class:`Volume` is a user array in the canonical layout ``(C, *grid_axes)`` with the tasks that
read its regions (padded past the end where a ``border="pad"`` grid needs it); :func:`as_dask`
is what :func:`daskpatch.to_zarr` writes.
"""

from __future__ import annotations

import functools
import itertools
import math
import uuid
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np
import zarr
from dask.array.core import normalize_chunks
from dask.base import tokenize

from daskpatch.errors import ParameterError, ParameterTypeError
from daskpatch.geometry.parse import _describe, parse_per_axis
from daskpatch.graph.layers import direct_source, from_zarr
from daskpatch.config import get_bytes
from daskpatch.storage.chunkcache import SharedChunks, new_epoch
from daskpatch.storage.ome import downsample_block
from daskpatch.storage.sources import _open_region, _read_chunks, _read_direct, pad_axis

#: Default chunk size target of a NumPy array written to Zarr (zarr advises 1-16 MB per chunk).
DEFAULT_TARGET_BYTES: int = 8 * 2**20


def take(obj: Any, param: str, *, paths: bool = False) -> tuple[Any, bool]:
    """The one way in: check a user array (``param`` names it in errors) and say how it is read.

    Returns ``(array, is_dask)``: the array-like under a bare ``from_array``/``from_zarr`` Dask
    array (read directly), any other Dask array as it is, or the array-like ``obj``. A Dask
    array must have a known shape; every array at least one axis. ``paths``: the caller also
    takes a Zarr store path (the message says so; the caller opens it).
    """
    if isinstance(obj, da.Array):
        if any(math.isnan(c) for c in obj.shape):
            raise ParameterError(f"{param} must have a known shape; got {obj.shape} (call "
                                 "compute_chunk_sizes() first)", param=param, value=obj.shape)
        src = direct_source(obj)
        out, is_dask = (obj, True) if src is None else (src, False)
    elif hasattr(obj, "shape") and hasattr(obj, "dtype") and hasattr(obj, "__getitem__"):
        out, is_dask = obj, False
    else:
        kinds = "a NumPy, Dask or Zarr array" + (" or a Zarr store path" if paths else "")
        raise ParameterTypeError(f"{param} must be {kinds}; got {_describe(obj)}", param=param,
                                 value=obj, expected=kinds)
    if len(out.shape) == 0:
        raise ParameterError(f"{param} must have at least one axis; got a 0-d array",
                             param=param, value=out.shape)
    return out, is_dask


def with_channel_axis(volume: Any) -> Any:
    """``volume`` with a channel axis of 1 in front, lazily (a Zarr array through dask): one
    channel in, K out.

    Examples
    --------
    >>> with_channel_axis(np.zeros((4, 5))).shape
    (1, 4, 5)
    """
    arr, is_dask = take(volume, "volume")
    if is_dask or isinstance(arr, np.ndarray):
        return arr[None]
    return (from_zarr(arr) if isinstance(arr, zarr.Array) else da.from_array(arr))[None]


@dataclass
class Volume:
    """A user volume seen in the canonical layout ``(C, *grid_axes)``.

    ``grid_axes`` are the batch axes followed by the spatial axes (the non-channel axes in their
    order). ``channels`` is 1 when the volume has no channel axis.
    """

    array: Any  # array-like (direct) or dask array (chunks), in the user's layout
    direct: bool
    channel_axis: int | None  # in the user's array (direct reads)
    shape: tuple[int, ...]  # grid axes only
    channels: int
    dtype: np.dtype
    name: str

    @classmethod
    def from_user(cls, volume: Any, channel_axis: int | None, *, param: str = "volume") -> Volume:
        volume, is_dask = take(volume, param)
        if is_dask:
            x = volume
            if channel_axis is None:
                grid_shape, channels = x.shape, 1
            else:
                if len(x.chunks[channel_axis]) > 1:
                    x = x.rechunk({channel_axis: -1})
                grid_shape = x.shape[:channel_axis] + x.shape[channel_axis + 1:]
                channels = x.shape[channel_axis]
            return cls(x, False, channel_axis, tuple(grid_shape), channels, x.dtype, x.name)
        if isinstance(volume, np.ndarray) or not hasattr(volume, "ndim"):
            volume = np.asarray(volume)
        shape = tuple(int(s) for s in volume.shape)
        if channel_axis is None:
            grid_shape, channels = shape, 1
        else:
            grid_shape = shape[:channel_axis] + shape[channel_axis + 1:]
            channels = shape[channel_axis]
        if isinstance(volume, np.ndarray):
            # a random name, as dask's from_array(name=False): hashing the data costs ~0.7 s/GiB
            name = "source-" + uuid.uuid4().hex
        else:
            name = "source-" + tokenize(volume)
        return cls(volume, True, channel_axis, grid_shape, channels, np.dtype(volume.dtype), name)

    # -- graph pieces --------------------------------------------------------------------------
    @property
    def epoch(self) -> str:
        """The key of the graph task that names one compute's cached chunks of a Zarr input
        (:mod:`daskpatch.storage.chunkcache`)."""
        return "chunk-epoch-" + self.name

    def source_layer(self) -> tuple[list, dict]:
        """Collections the read tasks depend on, and graph entries they read (a Zarr input
        also its :attr:`epoch` task)."""
        if self.direct:
            if isinstance(self.array, zarr.Array):
                get_bytes("chunk-cache-bytes")  # a bad setting fails here, before any write
                return [], {self.name: self.array, self.epoch: (new_epoch,)}
            return [], {self.name: self.array}
        return [self.array], {}

    def _axis_read(self, a: int, lo: int, hi: int, pad_mode: str) -> tuple:
        """Per-axis part of a read: (pad map, source lo, source hi, chunk pieces)."""
        key = (a, lo, hi, pad_mode)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        m, s0, s1 = pad_axis(self.shape[a], lo, hi, pad_mode)
        pieces = []
        if not self.direct:
            bounds = self._bounds[a]
            i0 = int(np.searchsorted(bounds, s0, "right")) - 1
            i1 = int(np.searchsorted(bounds, s1, "left"))
            for i in range(i0, max(i1, i0 + 1)):
                p0, p1 = max(s0, int(bounds[i])), min(s1, int(bounds[i + 1]))
                if p0 < p1:
                    pieces.append((i, slice(p0 - s0, p1 - s0),
                                   slice(p0 - bounds[i], p1 - bounds[i])))
        out = self._cache[key] = (m, s0, s1, pieces)
        return out

    def _chunk_readers(self, a: int, regions: tuple[tuple[int, int], ...], pad_mode: str
                       ) -> np.ndarray:
        """How many of ``regions`` (padded coordinates along grid axis ``a``) read each
        stored chunk along that axis."""
        key = ("readers", a, regions, pad_mode)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        step = self._grid_chunks[a]
        counts = np.zeros(-(-self.shape[a] // step), dtype=np.int64)
        for lo, hi in regions:
            _, s0, s1, _ = self._axis_read(a, lo, hi, pad_mode)
            if s1 > s0:
                counts[s0 // step:-(-s1 // step)] += 1
        self._cache[key] = counts
        return counts

    def _shared(self, src_lo: tuple[int, ...], src_hi: tuple[int, ...],
                regions: tuple[tuple[tuple[int, int], ...], ...], pad_mode: str
                ) -> SharedChunks | None:
        """Per array axis, how many of the job's ``regions`` (per grid axis, every block's
        interval) read each chunk of the source region ``[src_lo, src_hi)``; ``None`` when the
        chunk cache is off (``daskpatch.chunk-cache-bytes`` 0) or the input not Zarr."""
        if not isinstance(self.array, zarr.Array):
            return None
        limit = int(get_bytes("chunk-cache-bytes"))
        if limit <= 0:
            return None
        first: list[int] = []
        readers: list[tuple[int, ...] | None] = []
        for a, (s0, s1) in enumerate(zip(src_lo, src_hi)):
            step = self._grid_chunks[a]
            k0, k1 = s0 // step, max(-(-s1 // step), s0 // step + 1)
            first.append(k0)
            readers.append(tuple(self._chunk_readers(a, regions[a], pad_mode)[k0:k1].tolist()))
        ch = self.channel_axis
        if ch is not None:
            first.insert(ch, 0)
            readers.insert(ch, None)
        return SharedChunks(limit, tuple(first), tuple(readers))

    def read_task(self, lo: tuple[int, ...], hi: tuple[int, ...], pad_mode: str,
                  pad_value: Any = 0, lazy: bool = False,
                  regions: tuple[tuple[tuple[int, int], ...], ...] | None = None) -> tuple:
        """A task reading ``[lo, hi)`` (padded coordinates) as ``(C, *region)``, and its inputs;
        ``pad_mode="constant"`` fills with ``pad_value``. ``lazy``: from a Zarr array, a
        :class:`Region` read slab by slab as the consumer asks (else the array itself).
        ``regions``: per grid axis, the intervals every region of the job reads along it (a
        product grid of regions); from a Zarr array, the chunks several of them read are then
        decoded once per compute and shared (:mod:`daskpatch.storage.chunkcache`)."""
        axes = [self._axis_read(a, l, h, pad_mode) for a, (l, h) in enumerate(zip(lo, hi))]
        maps = [ax[0] for ax in axes]
        src_lo = tuple(ax[1] for ax in axes)
        src_hi = tuple(ax[2] for ax in axes)
        if self.direct:
            read = (_open_region if lazy else _read_direct, self.name, src_lo, src_hi,
                    self.channel_axis, maps, pad_value)
            shared = None if regions is None else self._shared(src_lo, src_hi, regions, pad_mode)
            if shared is None:
                return read, {self.name}
            return read + (self.epoch, shared), {self.name, self.epoch}
        keys, spec = [], []
        ch = self.channel_axis
        for combo in itertools.product(*[ax[3] for ax in axes]):
            idx = [p[0] for p in combo]
            if ch is not None:
                idx.insert(ch, 0)
            keys.append((self.array.name, *idx))
            spec.append((tuple(p[1] for p in combo), tuple(p[2] for p in combo)))
        shape = (self.channels,) + tuple(h - l for l, h in zip(src_lo, src_hi))
        return (_read_chunks, shape, self.dtype, spec, maps, ch, keys, pad_value), set(keys)

    def __post_init__(self) -> None:
        self._cache: dict = {}
        if isinstance(self.array, zarr.Array):
            inner = [int(c) for c in self.array.chunks]  # a sharded array's inner chunks
            if self.channel_axis is not None:
                del inner[self.channel_axis]
            self._grid_chunks = inner
        if not self.direct:
            chunks = list(self.array.chunks)
            if self.channel_axis is not None:
                del chunks[self.channel_axis]
            self._bounds = [np.cumsum((0,) + c) for c in chunks]


def write_chunks(x: da.Array, chunks: Any) -> tuple[da.Array, tuple[int, ...]]:
    """The Zarr chunk shape, and ``x`` rechunked so its blocks are exactly the Zarr chunks.

    ``chunks=None`` keeps regular Dask chunks (all equal but a smaller last one, per axis), else
    takes the largest chunk per axis.
    """
    if chunks is None:
        if all(_is_regular(c) for c in x.chunks):
            return x, tuple(max(c[0], 1) for c in x.chunks)
        target = tuple(max(max(c), 1) for c in x.chunks)
    else:
        target = parse_per_axis(chunks, x.ndim, "chunks")
    return x.rechunk(target), target


def as_dask(array: Any) -> da.Array:
    """What :func:`daskpatch.to_zarr` writes, as a Dask array (checked by :func:`take`): a Dask
    array as it is, a Zarr array with its chunks, any other array split into chunks of about
    :data:`DEFAULT_TARGET_BYTES` (dask's ``"auto"``)."""
    arr, _ = take(array, "array")
    if isinstance(array, da.Array):
        return array
    if isinstance(arr, zarr.Array):
        return from_zarr(arr)
    chunks = normalize_chunks("auto", arr.shape, limit=DEFAULT_TARGET_BYTES, dtype=arr.dtype)
    return da.from_array(arr, chunks=chunks)


def _is_regular(c: tuple[int, ...]) -> bool:
    """Zarr-compatible: all chunks equal but the last, which is not larger."""
    return len(c) <= 1 or (all(v == c[0] for v in c[:-1]) and c[-1] <= c[0])


# --------------------------------------------------------------------------------------------
# stride alignment
# --------------------------------------------------------------------------------------------


def downsampled(z: zarr.Array, factors: tuple[int, ...], chunks: tuple[int, ...], method: str
                 ) -> da.Array:
    """Level ``k`` from the written level ``k - 1`` (lazy): each task reads the ``factors``
    boxes of one output chunk and reduces them."""
    src: Any = from_zarr(z, chunks=tuple(c * f for c, f in zip(chunks, factors)))
    out_chunks = tuple(tuple(-(-b // f) for b in bs) for bs, f in zip(src.chunks, factors))
    return src.map_blocks(
        functools.partial(downsample_block, factors=factors, method=method),
        chunks=out_chunks, dtype=src.dtype, meta=np.empty((0,) * src.ndim, dtype=src.dtype),
        name=f"ome-downsample-{method}-" + dask.base.tokenize(src.name, factors),
    )
