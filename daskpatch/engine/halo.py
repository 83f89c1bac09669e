"""Halo exchange and the output chunks: the parts of a block's buffer that fall into other
blocks' chunks, and the sum (and cast) of each output chunk from its parts."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any, Protocol, Union

import numpy as np

from daskpatch.engine import memory as _memory
from daskpatch.engine.numbers import cast, doubled, nan_error, wide_dtype
from daskpatch.engine.spec import ChunkSum



class PartStore(Protocol):
    """Where spilled halo parts go (:class:`daskpatch.storage.spill.Spill`): the engine is handed
    one and never opens a store itself."""

    def key(self, name: str, block: tuple[int, ...], target: tuple[int, ...]) -> str: ...

    def put(self, key: str, part: np.ndarray) -> None: ...

    def get(self, key: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray: ...

    def delete(self, key: str) -> None: ...

    def exists(self, key: str) -> bool: ...


#: A halo piece: the part itself, or where it was spilled ``(store, key)``.
HaloPiece = Union[np.ndarray, tuple[PartStore, str]]
#: A block's halo task result: its pieces keyed by the index of the chunk they belong to.
Halo = dict[tuple[int, ...], HaloPiece]
#: What a chunk sums: block buffers, or halo dicts holding its piece.
Part = Union[np.ndarray, Halo]


def halo(buf: np.ndarray, pieces: list[tuple[tuple[int, ...], tuple[slice, ...]]],
         spill: PartStore | None = None, name: str = "", bidx: tuple[int, ...] = ()) -> Halo:
    """Copy the parts of a block buffer that belong to other chunks, keyed by chunk index.

    With ``spill`` the parts that belong to other chunks (the halo faces) are written there and
    the dict holds their keys; the block's own part (``pieces`` may name the block ``bidx``
    itself) stays in memory, a copy, so the buffer is freed at once and the own part goes
    straight into its chunk (see :func:`add`). Only the halo ever reaches the disk.
    """
    if spill is None:
        return {target: buf[(slice(None),) + sl].copy() for target, sl in pieces}
    out: Halo = {}
    for target, sl in pieces:
        if target == bidx:
            out[target] = buf[(slice(None),) + sl].copy()
            continue
        key = spill.key(name, bidx, target)
        spill.put(key, buf[(slice(None),) + sl])
        out[target] = (spill, key)
    return out


def spilled_keys(parts: Halo) -> Halo:
    """The halo task of a spilled block: the keys of its spilled parts, without its own part
    (so that the block's own part is freed as soon as its own chunk is summed)."""
    return {target: part for target, part in parts.items() if isinstance(part, tuple)}


def _on_cluster() -> bool:
    """Whether this task runs on a ``distributed`` worker, where a result lost with a worker
    is computed again from its inputs (so spilled parts must stay until the write is done)."""
    distributed = sys.modules.get("distributed")
    if distributed is None:
        return False
    try:
        distributed.get_worker()
    except ValueError:
        return False
    return True


def _consumed(parts: list[Part], sels: Any) -> list[tuple[PartStore, str]]:
    """The spilled ``(spill, key)`` pieces a chunk reads (each is read by that chunk only)."""
    return [piece for part, sel in zip(parts, sels) if isinstance(part, dict)
            for piece in [part[sel]] if isinstance(piece, tuple)]


def add(spec: ChunkSum, parts: list[Part], after: Any = None, delete: bool = True
        ) -> np.ndarray:
    """Sum one output chunk from its own block buffer and its neighbours' halo pieces, and cast.

    ``parts[k]`` is a block buffer or a halo dict (see :class:`ChunkSum`); ``after`` (unused) is
    the block's own halo task, so that the scheduler copies the halo out first.
    Spilled pieces are deleted once the chunk is summed: each is read by this chunk alone, and
    the local schedulers run a task once per compute (a new compute runs the blocks again). On
    a ``distributed`` worker they stay until :func:`daskpatch.to_zarr` is done (a chunk lost
    with a worker is summed again from them). ``delete=False``: the caller deletes them
    (:func:`write_through`, once the chunk is written).
    The sum (and a cast to a narrower float) is redone in float64 and saturated if it overflows;
    the cast to an integer dtype rounds and saturates (:func:`daskpatch._numbers.cast`).
    """
    sels, dsts, user, copy = spec.sels, spec.dsts, spec.user, spec.copy
    acc_dtype, out_dtype = spec.acc_dtype, spec.out_dtype
    channels, channel_axis, cov = spec.channels, spec.channel_axis, spec.cov
    shape = (channels + user,) + tuple(spec.chunk_shape)

    def nan_at(idx: tuple[int, ...]) -> Exception:
        key, bounds = spec.where
        return nan_error(out_dtype, key, bounds, channels, channel_axis,
                         (idx[0],) + tuple(lo + i for (lo, _), i in zip(bounds, idx[1:])))

    try:
        with np.errstate(over="raise"):
            out = cast(chunk_sum(parts, sels, dsts, shape, user, acc_dtype, acc_dtype, copy),
                       out_dtype, nan_at)
    except FloatingPointError:  # the same sum in float64 at half scale, saturated
        with np.errstate(over="ignore"):
            half = chunk_sum(parts, sels, dsts, shape, user, acc_dtype, wide_dtype(acc_dtype),
                             copy, 0.5)
        out = cast(doubled(half), out_dtype, nan_at)
    if cov is not None:
        mask = np.ones((), dtype=bool)
        for c in cov:
            mask = np.logical_and.outer(mask, c)
        out[:, ~mask] = spec.fill_value
    if delete:
        drop_consumed(parts, sels)
    if channel_axis is None:
        single: np.ndarray = out[0]
        return single
    return np.moveaxis(out, 0, channel_axis)


def drop_consumed(parts: list[Part], sels: Any) -> None:
    """Delete the spilled pieces a chunk has read (each is read by that chunk only), except on a
    ``distributed`` worker, where they stay until the write is done (a chunk lost with a worker
    is summed again from them)."""
    spilled = _consumed(parts, sels)
    if spilled and not _on_cluster():
        for where, key in spilled:
            where.delete(key)


# -- work already done: blocks and chunks that a resumed or recovered write skips ------------
#: ``done(location) -> bool``: whether the output chunk at ``location`` is written and recorded
#: (:func:`daskpatch.storage.markers.is_done`).
Done = Callable[[tuple[int, ...]], bool]


class _Call:
    """Marks a deferred call in :func:`defer`'s lists."""

    def __repr__(self) -> str:
        return "<call>"


def _is_task(obj: Any) -> bool:
    return isinstance(obj, tuple) and bool(obj) and callable(obj[0])


def defer(task: tuple[Any, ...]) -> list[Any]:
    """``task`` (a tuple task ``(f, *args)``, its arguments tasks too) as a list that dask
    does not run: the keys it names are still given their values, but the calls are made by
    :func:`run_deferred`, only when the task that holds it decides to.

    Examples
    --------
    >>> d = defer((sum, [(abs, -2), 3]))
    >>> run_deferred(d)
    5
    """
    f, *args = task
    return [_Call(), f, [defer(a) if _is_task(a) else _deferred_list(a) for a in args]]


def _deferred_list(obj: Any) -> Any:
    if isinstance(obj, list):
        return [defer(a) if _is_task(a) else _deferred_list(a) for a in obj]
    return obj


def run_deferred(obj: Any) -> Any:
    """Make the calls :func:`defer` put off (innermost first) and return the value."""
    if isinstance(obj, list):
        if obj and isinstance(obj[0], _Call):
            _, f, args = obj
            return f(*[run_deferred(a) for a in args])
        return [run_deferred(a) for a in obj]
    return obj


def resumable_halo(done: Done, own: tuple[int, ...], block: list[Any],
                   pieces: list[tuple[tuple[int, ...], tuple[slice, ...]]], spill: PartStore,
                   name: str, bidx: tuple[int, ...], locations: Sequence[tuple[int, ...]]
                   ) -> Halo:
    """:func:`halo` of a spilled block whose chunks are written as they are summed, run only
    when its work is not already in place: when its own chunk (``own``) is written and each
    other chunk it reaches (``pieces``, at ``locations``) is written too or holds its spilled
    part, the model does not run and the keys of those parts are returned. ``block`` is the
    accumulate task (:func:`defer`-ed), run otherwise.

    A resumed write runs again only the blocks whose work was lost, and a block computed again
    on a cluster after a worker was lost (its result was in that worker's memory) costs a few
    existence checks instead of its model calls.
    """
    if done(own):
        kept: Halo = {}
        for (target, _), loc in zip(pieces, locations):
            if target == bidx or done(loc):
                continue
            key = spill.key(name, bidx, target)
            if not spill.exists(key):
                break
            kept[target] = (spill, key)
        else:
            return kept
    return halo(run_deferred(block), pieces, spill, name, bidx)


def write_through(writer: Callable[..., Any], done: Done | None, location: tuple[int, ...],
                  region: tuple[slice, ...], spec: ChunkSum, parts: list[Part],
                  after: Any = None) -> Any:
    """Sum one output chunk (:func:`add`) and write it where it belongs (``writer(chunk,
    location, region)``, e.g. :func:`daskpatch.to_zarr`'s), returning what the writer returns
    instead of the chunk; nothing when ``done(location)`` says it is written already (a chunk
    computed again after a worker was lost). Its spilled pieces are deleted after the write, so
    a write stopped between the two finds them again."""
    if done is not None and done(location):
        return None
    out = writer(add(spec, parts, after, delete=False), location, region)
    drop_consumed(parts, spec.sels)
    return out


def chunk_sum(parts: list[Part], sels: Any, dsts: Any, shape: tuple[int, ...], user: int,
              acc_dtype: np.dtype, dtype: np.dtype, copy: bool, scale: float | None = None
              ) -> np.ndarray:
    """The parts of a chunk summed in ``dtype`` (and divided by the user window's weights),
    times ``scale`` if given."""
    if copy and np.dtype(dtype).kind in "fc":
        out = np.full(shape, -0.0, dtype=dtype)
    else:
        out = _memory.zeros(shape, dtype)
    for part, sel, dst in zip(parts, sels, dsts):
        if isinstance(part, dict):
            piece = part[sel]
            if isinstance(piece, tuple):  # spilled: (where, key)
                piece_shape = (shape[0],) + tuple(d.stop - d.start for d in dst)
                piece = piece[0].get(piece[1], piece_shape, np.dtype(acc_dtype))
        else:
            piece = part[(slice(None),) + sel]
        if scale is not None:
            factor = np.full((shape[0],) + (1,) * (len(shape) - 1), scale)
            if user:
                factor[-1] = 1.0  # the weights: their ratio with the data is halved
            piece = piece * factor
        region = out[(slice(None),) + dst]
        np.add(region, piece, out=region)
    if user:
        w = out[-1]
        out = out[:-1]
        np.divide(out, w, out=out, where=w > 0)
    return out

