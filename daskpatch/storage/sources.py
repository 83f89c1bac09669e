"""Reading regions of stored arrays: padding past the end, slab-by-slab regions, chunk pieces.

- :func:`pad_axis` and :func:`_apply_maps`: the one padding (``numpy.pad`` modes, or a constant
  ``pad_value``) of a region that runs past the end of a volume, shared by the engine's reads
  and the training loaders;
- :func:`_read_direct`, :class:`Region` (read slab by slab as a block's accumulation reaches
  it) and :func:`_read_chunks` (a region assembled from Dask chunks): what the read tasks of
  :class:`daskpatch.graph.inputs.Volume` run; chunks that several regions of a job read are
  taken from :mod:`daskpatch.storage.chunkcache` (:func:`_read_shared`);
- :func:`open_zarr`: a Zarr array opened by path, with errors naming the parameter.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import socket
from typing import Any

import numpy as np
import zarr
from zarr.buffer import default_buffer_prototype

from daskpatch.engine import memory as _memory
from daskpatch.config import get_bytes
from daskpatch.storage.chunkcache import SharedChunks, read_chunks
from daskpatch.storage.storeio import exists, run


def _pad_map(n: int, total: int, mode: str) -> np.ndarray:
    """Source index for each padded position along an axis (-1 for a constant fill)."""
    if mode == "constant":
        return np.concatenate([np.arange(n), np.full(total - n, -1)])
    return np.pad(np.arange(n), (0, total - n), mode=mode)  # type: ignore[call-overload]


def pad_axis(n: int, lo: int, hi: int, mode: str) -> tuple[np.ndarray | None, int, int]:
    """How to read ``[lo, hi)`` of an axis of length ``n`` padded past its end with ``mode``:
    ``(map, s0, s1)``: read ``[s0, s1)``, then take ``map`` (indices into that read, -1 for the
    constant fill; ``None`` when nothing is padded) with :func:`_apply_maps`.

    Examples
    --------
    >>> pad_axis(5, 1, 4, "reflect")
    (None, 1, 4)
    >>> m, s0, s1 = pad_axis(5, 3, 8, "reflect")
    >>> m.tolist(), s0, s1
    ([2, 3, 2, 1, 0], 1, 5)
    >>> m, s0, s1 = pad_axis(5, 3, 8, "constant")
    >>> m.tolist(), s0, s1
    ([0, 1, -1, -1, -1], 3, 5)
    """
    if hi <= n:
        return None, lo, hi
    full = _pad_map(n, hi, mode)[lo:hi]
    valid = full[full >= 0]
    s0, s1 = (int(valid.min()), int(valid.max()) + 1) if valid.size else (0, 0)
    return np.where(full >= 0, full - s0, -1), s0, s1


def _apply_maps(a: np.ndarray, maps: list, pad_value: Any = 0) -> np.ndarray:
    """Expand the source read ``a`` (C, *src) to the padded region with the per-axis maps
    (``-1`` in a map: ``pad_value``)."""
    if all(m is None for m in maps):
        return a
    for ax, m in enumerate(maps):
        if m is None:
            continue
        if a.shape[ax + 1] == 0:  # nothing of the volume on this axis: all fill
            a = np.full(a.shape[: ax + 1] + (len(m),) + a.shape[ax + 2:], pad_value, a.dtype)
            continue
        fill = m < 0
        a = np.take(a, np.where(fill, 0, m), axis=ax + 1)
        if fill.any():
            index = [slice(None)] * a.ndim
            index[ax + 1] = fill
            a[tuple(index)] = pad_value
    return a


#: The Zarr arrays this process has seen are there (process id, store, path).
_PRESENT: set[tuple[int, str, str]] = set()


def check_present(arr: Any) -> None:
    """Refuse to read a Zarr array whose metadata this process cannot see: a worker started
    where the input store is missing (another machine, another mount) would otherwise read
    every chunk as the fill value. Checked once per process and array (one small read)."""
    if not isinstance(arr, zarr.Array):
        return
    key = (os.getpid(), str(arr.store), arr.path or "")
    if key in _PRESENT:
        return
    names = ("zarr.json", ".zarray")
    if not any(exists(arr.store, "/".join(p for p in (arr.path, n) if p)) for n in names):
        raise FileNotFoundError(
            f"the input Zarr array {arr.path or '(root)'!r} of store {str(arr.store)!r} is not "
            f"there for this process (host {socket.gethostname()!r}, pid {os.getpid()}); every "
            "worker must reach the input stores (the same path on a shared filesystem, or a URL)")
    _PRESENT.add(key)


def _read_direct(arr: Any, lo: tuple, hi: tuple, channel_axis: int | None, maps: list,
                 pad_value: Any = 0, epoch: Any = None, shared: SharedChunks | None = None,
                 out: np.ndarray | None = None) -> np.ndarray:
    """The region ``[lo, hi)`` of ``arr``, canonical ``(C, *region)`` and padded by ``maps``;
    into ``out`` when given (unpadded, it is decoded straight there, no array beside it).
    ``shared``: how many regions of the job ``epoch`` read each chunk (those read by several
    go through the chunk cache)."""
    check_present(arr)
    index = [slice(l, h) for l, h in zip(lo, hi)]
    if channel_axis is not None:
        index.insert(channel_axis, slice(0, arr.shape[channel_axis]))
    padded = any(m is not None for m in maps)
    into = None
    if out is not None and not padded:
        into = out[0] if channel_axis is None else np.moveaxis(out, 0, channel_axis)
    try:
        region = _read_region(arr, tuple(index), out=into, epoch=epoch, shared=shared)
    except Exception as err:  # a corrupt chunk, a lost store: say which array and where
        err.add_note(_read_note(arr, tuple(index)))
        raise
    if into is None:
        region = _apply_maps(_canonical(region, channel_axis), maps, pad_value)
        if out is not None:
            out[...] = region
    return region if out is None else out


class Region:
    """A region of a Zarr array, read in slabs of whole chunks along its first grid axis as the
    consumer asks for them (:meth:`upto`), each chunk once: a block task's model starts on its
    first patches while the rest of the region is still to be read. ``data`` is the whole region
    ``(C, *region)``, valid from the rows given back (:meth:`drop`) up to the rows read."""

    def __init__(self, arr: Any, lo: tuple, hi: tuple, channel_axis: int | None,
                 maps: list, pad_value: Any = 0, epoch: Any = None,
                 shared: SharedChunks | None = None) -> None:
        self.arr, self.lo, self.hi, self.channel_axis, self.maps = arr, lo, hi, channel_axis, maps
        self.pad_value, self.epoch, self.shared = pad_value, epoch, shared
        channels = 1 if channel_axis is None else arr.shape[channel_axis]
        self.shape = (channels,) + tuple(h - l if m is None else len(m)
                                         for l, h, m in zip(lo, hi, maps))
        self.data = _memory.zeros(self.shape, arr.dtype, populate=False)
        step = arr.chunks[1 if channel_axis == 0 else 0]  # the first grid axis's chunks
        self.cuts = [lo[0]] + list(range((lo[0] // step + 1) * step, hi[0], step)) + [hi[0]]
        self.done = 0  # slabs read
        self.dropped = 0  # rows given back

    def drop(self, stop: int) -> None:
        """Give back the region's rows ``[0, stop)`` on its first grid axis: the consumer has
        copied out every patch that starts there (they read as zeros afterwards)."""
        if stop > self.dropped:
            _memory.drop(self.data, self.dropped, stop)
            self.dropped = stop

    def upto(self, stop: int) -> None:
        """Read the slabs holding the region's rows ``[0, stop)`` on its first grid axis."""
        lo0 = self.lo[0]
        while self.done < len(self.cuts) - 1 and self.cuts[self.done] - lo0 < stop:
            a, b = self.cuts[self.done], self.cuts[self.done + 1]
            self.done += 1
            _memory.reach(self.data, a - lo0, b - lo0)  # mapped in at once, not page by page
            # decoded straight into the region: no slab array beside it (a 256-row slab of a
            # 320^2 region is 100 MiB of float32)
            _read_direct(self.arr, (a,) + tuple(self.lo[1:]), (b,) + tuple(self.hi[1:]),
                         self.channel_axis, [None] + list(self.maps[1:]), self.pad_value,
                         self.epoch, self.shared, out=self.data[:, a - lo0:b - lo0])


def _open_region(arr: Any, lo: tuple, hi: tuple, channel_axis: int | None, maps: list,
                 pad_value: Any = 0, epoch: Any = None,
                 shared: SharedChunks | None = None) -> Any:
    """A :class:`Region` of a Zarr array spanning several chunks on its first grid axis (not
    padded there), or else the region read at once as :func:`_read_direct` reads it."""
    check_present(arr)
    axis = 1 if channel_axis == 0 else 0
    chunks = getattr(arr, "chunks", None)
    if (isinstance(arr, zarr.Array) and isinstance(chunks, tuple) and maps[0] is None
            and lo[0] // chunks[axis] < (hi[0] - 1) // chunks[axis]):
        return Region(arr, lo, hi, channel_axis, maps, pad_value, epoch, shared)
    return _read_direct(arr, lo, hi, channel_axis, maps, pad_value, epoch, shared)


#: Most stored chunks (or shards) probed one by one to find the one a failed read tripped on.
PROBE_CHUNKS = 64


def _read_note(arr: Any, index: tuple[slice, ...]) -> str:
    """A note for an exception raised reading ``arr[index]``: the array, the region and, for a
    Zarr array, the first stored chunk (or shard) of the region that cannot be read alone."""
    region = "[" + ", ".join(f"{s.start}:{s.stop}" for s in index) + "]"
    if not isinstance(arr, zarr.Array):
        return (f"daskpatch: raised reading region {region} of a {type(arr).__name__} of shape "
                f"{tuple(arr.shape)}")
    where = f"the Zarr array at {arr.store_path}"
    grid = arr.shards or arr.chunks
    ranges = [range(s.start // c, -(-s.stop // c)) for s, c in zip(index, grid)]
    combos = list(itertools.islice(itertools.product(*ranges), PROBE_CHUNKS))
    for combo in combos:
        sel = tuple(slice(k * c, min((k + 1) * c, n)) for k, c, n in zip(combo, grid, arr.shape))
        try:
            arr[sel]
        except Exception as err:
            try:
                key = f" (stored as {arr.metadata.encode_chunk_key(combo)!r})"
            except Exception:
                key = ""
            what = "shard" if arr.shards else "chunk"
            return (f"daskpatch: raised reading region {region} of {where}: its {what} "
                    f"{combo}{key} cannot be read ({type(err).__name__}: {err})")
    span = ", ".join(f"{r.start}..{r.stop - 1}" for r in ranges)
    return f"daskpatch: raised reading region {region} (chunks {span}) of {where}"


def _read_region(arr: Any, index: tuple[slice, ...], out: np.ndarray | None = None,
                 epoch: Any = None, shared: SharedChunks | None = None) -> Any:
    """``arr[index]`` (read into ``out``, a NumPy array of its shape, when given); a Zarr read
    touching more than ``daskpatch.read-bytes`` of chunks is done in boxes of whole chunks that
    each touch at most that many bytes (at least one chunk): zarr decodes all the chunks of one
    read at once (8 chunks of 64 MiB for a block plus halo is half a GiB of transient memory),
    while reading small chunks one by one costs a round trip each (125 reads of 1 MiB take twice
    as long as 3 reads of 50). With ``shared``, the chunks other regions of the job also read
    go through the chunk cache (:func:`_read_shared`)."""
    chunks = getattr(arr, "chunks", None)
    if not isinstance(arr, zarr.Array) or not isinstance(chunks, tuple):
        if out is None:
            return arr[index]
        out[...] = arr[index]
        return out
    if shared is not None and shared.limit > 0:
        return _read_shared(arr, index, out, epoch, shared)
    ranges = [range(s.start // c, -(-s.stop // c)) for s, c in zip(index, chunks)]
    touched = math.prod(len(r) for r in ranges)
    chunk_bytes = math.prod(chunks) * arr.dtype.itemsize
    budget = get_bytes("read-bytes")
    if touched <= 1 or touched * chunk_bytes <= budget:
        return _get(arr, index, out)
    group = [len(r) for r in ranges]  # chunks per box along each axis, the first axes cut first
    for a in range(len(group)):
        if math.prod(group) * chunk_bytes <= budget:
            break
        group[a] = max(1, int(budget // (chunk_bytes * math.prod(group[a + 1:]))))
    if out is None:
        out = np.empty(tuple(s.stop - s.start for s in index), dtype=arr.dtype)
    for combo in itertools.product(*[range(r.start, r.stop, g) for r, g in zip(ranges, group)]):
        src = tuple(slice(max(s.start, k * c), min(s.stop, (k + g) * c))
                    for s, k, c, g in zip(index, combo, chunks, group))
        _get(arr, src, out[tuple(slice(a.start - s.start, a.stop - s.start)
                                 for a, s in zip(src, index))])
    return out


def _runs(r: range, axis: int, shared: SharedChunks) -> list[tuple[range, bool]]:
    """The chunk range ``r`` along ``axis`` cut into runs of chunks that one region reads
    (``False``) or several (``True``)."""
    out: list[tuple[range, bool]] = []
    for k in r:
        flag = shared.shared(axis, k)
        if out and out[-1][1] == flag:
            out[-1] = (range(out[-1][0].start, k + 1), flag)
        else:
            out.append((range(k, k + 1), flag))
    return out


#: Most bytes of shared chunks fetched in one call (at least one chunk): a few concurrent reads,
#: not a slab's worth of decoded chunks beside the region (1024^3 out of core, 1 MiB chunks,
#: peak RSS: 802 MiB at 4 MiB a call, 804 at one chunk, 850-869 at 16 MiB, 880 at 64 MiB).
SHARED_READ_BYTES = 4 * 2**20


def _read_shared(arr: zarr.Array, index: tuple[slice, ...], out: np.ndarray | None, epoch: Any,
                 shared: SharedChunks) -> np.ndarray:
    """``arr[index]`` (into ``out`` when given), the chunks that other regions of the job also
    read taken through the chunk cache (decoded whole, each once; those it lacks fetched
    together, within :data:`SHARED_READ_BYTES` a call), the boxes of the others read as
    :func:`_read_region` reads them."""
    chunks, shape = arr.chunks, arr.shape
    if out is None:
        out = np.empty(tuple(s.stop - s.start for s in index), dtype=arr.dtype)

    def at(box: tuple[slice, ...]) -> tuple[slice, ...]:
        return tuple(slice(b.start - s.start, b.stop - s.start) for b, s in zip(box, index))

    ranges = [range(s.start // c, -(-s.stop // c)) for s, c in zip(index, chunks)]
    wanted: list[tuple[int, ...]] = []
    for box in itertools.product(*[_runs(r, a, shared) for a, r in enumerate(ranges)]):
        if any(flag for _, flag in box):
            wanted.extend(itertools.product(*[r for r, _ in box]))
            continue
        span = tuple(slice(max(s.start, r.start * c), min(s.stop, r.stop * c))
                     for s, (r, _), c in zip(index, box, chunks))
        _read_region(arr, span, out[at(span)])  # read by this region only: not kept
    whole = [tuple(slice(k * c, min((k + 1) * c, n)) for k, c, n in zip(combo, chunks, shape))
             for combo in wanted]
    budget = min(get_bytes("read-bytes"), SHARED_READ_BYTES)
    per_call = max(1, int(budget // (math.prod(chunks) * arr.dtype.itemsize)))
    for first in range(0, len(wanted), per_call):
        batch = range(first, min(first + per_call, len(wanted)))

        def load(mine: list[int], batch: range = batch) -> list[np.ndarray]:
            sels = [whole[batch[i]] for i in mine]
            return run(_gather(arr, sels))  # on zarr's own loop, as zarr reads

        datas = read_chunks(arr, [wanted[j] for j in batch], shared, epoch, load)
        for j, data in zip(batch, datas):
            part = tuple(slice(max(s.start, w.start), min(s.stop, w.stop))
                         for s, w in zip(index, whole[j]))
            out[at(part)] = data[tuple(slice(p.start - w.start, p.stop - w.start)
                                       for p, w in zip(part, whole[j]))]
    return out


async def _gather(arr: zarr.Array, sels: list[tuple[slice, ...]]) -> list[np.ndarray]:
    """The selections ``sels`` of ``arr``, read concurrently (one round trip's wait, not one
    per chunk)."""
    got = await asyncio.gather(*(arr.async_array.getitem(sel) for sel in sels))
    return [np.asarray(g) for g in got]


def _get(arr: Any, index: tuple[slice, ...], out: np.ndarray | None) -> Any:
    """``arr[index]`` of a Zarr array, or decoded straight into ``out`` (any NumPy view of the
    index's shape), without an array of its own beside it."""
    if out is None:
        return arr[index]
    arr.get_basic_selection(index, out=default_buffer_prototype().nd_buffer.from_numpy_array(out))
    return out


def _canonical(block: Any, channel_axis: int | None) -> np.ndarray:
    block = np.asarray(block)
    return block[None] if channel_axis is None else np.moveaxis(block, channel_axis, 0)


def _read_chunks(shape: tuple, dtype: np.dtype, spec: list, maps: list,
                 channel_axis: int | None, blocks: list, pad_value: Any = 0) -> np.ndarray:
    if len(spec) == 1 and _canonical(blocks[0], channel_axis).shape == tuple(shape):
        a = _canonical(blocks[0], channel_axis)
    else:
        a = np.empty(shape, dtype=dtype)
        for (dst, src), b in zip(spec, blocks):
            a[(slice(None),) + dst] = _canonical(b, channel_axis)[(slice(None),) + src]
    return _apply_maps(a, maps, pad_value)


# ----------------------------------------------------------------------------------------------
# The loaders' arrays: one user array, opened lazily in each process
# ----------------------------------------------------------------------------------------------
def open_zarr(path: str, param: str, mode: str = "r",
              storage_options: dict[str, Any] | None = None) -> zarr.Array:
    try:
        return zarr.open_array(path, mode=mode, storage_options=storage_options)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{param}: no Zarr array at {path!r}") from e
    except zarr.errors.NodeTypeValidationError as e:
        raise ValueError(
            f"{param}: {path!r} is a Zarr group, not an array; pass the array itself, e.g. "
            "zarr.open_array(store, path='name', mode='r')"
        ) from e


