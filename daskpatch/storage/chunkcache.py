"""A bounded per-process cache of decoded input chunks that several block regions read.

A work block reads its region plus a ``size - stride`` halo that reaches into its neighbours'
chunks, so a chunk at a block edge is read by up to ``2 ** ndim`` blocks. From an object store
every such read is a GET of the whole chunk (a 384^3 job fetched 4.6x its input's bytes), and
every read decodes it again. The read tasks of :class:`daskpatch.graph.inputs.Volume` know, from
the block geometry, how many regions read each chunk (:class:`SharedChunks`); a chunk read by
more than one is decoded once and kept here (:data:`CACHE`) until its last expected reader has
taken it, within the ``daskpatch.chunk-cache-bytes`` setting (least recently used first out).
A chunk read by one region only never enters, so it cannot push a useful entry out.

Entries are keyed by a job's *epoch* (a value made once per compute by a task of the graph,
:func:`new_epoch`), the store, the array's path and the chunk's index: two computes never share
an entry, so an input rewritten between two computes, even of the same lazy array, is read
afresh; what an unfinished compute leaves behind is never read again, and is the first to go.
"""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def new_epoch() -> str:
    """A fresh identity for one compute's cached chunks (a graph task runs it once per compute).

    Examples
    --------
    >>> new_epoch() != new_epoch()
    True
    """
    return uuid.uuid4().hex


@dataclass(frozen=True)
class SharedChunks:
    """How many block regions of a job read each chunk of one region, per array axis.

    ``first[a]`` is the index of the region's first chunk along array axis ``a`` and
    ``readers[a][k]`` how many regions read chunk ``first[a] + k`` along that axis (``None``:
    one, as for a channel axis every region reads whole). A chunk is read by the product of
    its per-axis counts. ``limit`` is the cache's byte bound for this job.

    Examples
    --------
    >>> s = SharedChunks(1 << 20, (2, 0), ((1, 2), None))
    >>> s.count((2, 0)), s.count((3, 5))
    (1, 2)
    >>> s.shared(0, 3), s.shared(1, 7)
    (True, False)
    """

    limit: int
    first: tuple[int, ...]
    readers: tuple[tuple[int, ...] | None, ...]

    def shared(self, axis: int, k: int) -> bool:
        """Whether more than one region reads chunk ``k`` along ``axis``."""
        r = self.readers[axis]
        return r is not None and r[k - self.first[axis]] > 1

    def count(self, index: tuple[int, ...]) -> int:
        """How many regions read the chunk at ``index``."""
        n = 1
        for a, k in enumerate(index):
            r = self.readers[a]
            if r is not None:
                n *= r[k - self.first[a]]
        return n


#: Most pushed-out entries whose readers still expected are remembered.
GONE_KEYS = 1 << 16


@dataclass
class _Entry:
    data: np.ndarray
    epoch: Hashable
    left: int  #: readers still to take it


@dataclass
class _Pending:
    done: threading.Event = field(default_factory=threading.Event)
    data: np.ndarray | None = None


class ChunkCache:
    """Decoded chunks by key, at most ``limit`` bytes (given with each :meth:`get`), each
    dropped once its expected readers have taken it; thread-safe, and a chunk two threads want
    at once is decoded by one while the other waits.

    Examples
    --------
    >>> cache = ChunkCache()
    >>> load = lambda: np.arange(4.0)
    >>> a = cache.get(("job", "store", "x", (0,)), 2, 1024, load, epoch="job")
    >>> cache.nbytes, cache.decodes
    (32, 1)
    >>> b = cache.get(("job", "store", "x", (0,)), 2, 1024, load, epoch="job")
    >>> a is b, cache.nbytes, cache.decodes, cache.hits  # its two readers took it: dropped
    (True, 0, 1, 1)
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._pending: dict[Hashable, _Pending] = {}
        #: readers still expected by entries pushed out before their last reader: a chunk read
        #: again is kept for those only (else it would wait for readers that have been)
        self._gone: OrderedDict[Hashable, int] = OrderedDict()
        self.nbytes = 0
        self.reset_stats()

    def reset_stats(self) -> None:
        """Zero the counters: ``decodes`` (chunks loaded through the cache), ``hits``,
        ``evicted`` (entries pushed out before their last reader) and ``peak`` (most bytes
        held)."""
        self.decodes = self.hits = self.evicted = 0
        self.peak = self.nbytes

    def clear(self) -> None:
        """Drop every entry (a load under way still completes)."""
        with self._lock:
            self._entries.clear()
            self._gone.clear()
            self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable, readers: int, limit: int, load: Callable[[], np.ndarray],
            epoch: Hashable = None) -> np.ndarray:
        """The chunk ``key`` (read-only), from the cache or from ``load()``, which is then kept
        for the other ``readers - 1`` readers if it fits within ``limit`` bytes."""
        return self.get_many([(key, readers)], limit, lambda mine: [load()], epoch)[0]

    def get_many(self, wanted: Sequence[tuple[Hashable, int]], limit: int,
                 load: Callable[[list[int]], list[np.ndarray]], epoch: Hashable = None
                 ) -> list[np.ndarray]:
        """The chunks ``wanted`` (``(key, readers)`` pairs), as :meth:`get` gives one: those
        neither kept nor being read by another thread are read at once by ``load(positions)``
        (their positions in ``wanted``; one call, so a store can fetch them concurrently)."""
        out: list[Any] = [None] * len(wanted)
        mine: list[tuple[int, _Pending]] = []
        waits: list[tuple[int, _Pending]] = []
        with self._lock:
            for i, (key, _) in enumerate(wanted):
                entry = self._entries.get(key)
                if entry is not None:
                    self.hits += 1
                    self._take(key, entry)
                    out[i] = entry.data
                elif key in self._pending:  # another thread is reading it
                    waits.append((i, self._pending[key]))
                else:
                    pending = self._pending[key] = _Pending()
                    mine.append((i, pending))
        if mine:
            try:
                datas = load([i for i, _ in mine])
                for data in datas:
                    data.flags.writeable = False  # shared between readers
            except BaseException:
                with self._lock:
                    for i, _ in mine:
                        del self._pending[wanted[i][0]]
                for _, pending in mine:
                    pending.done.set()
                raise
            with self._lock:
                for (i, pending), data in zip(mine, datas):
                    key, readers = wanted[i]
                    del self._pending[key]
                    pending.data = out[i] = data
                    self.decodes += 1
                    left = self._gone.pop(key, readers) - 1
                    if left > 0:
                        self._insert(key, _Entry(data, epoch, left), limit)
            for _, pending in mine:  # set only once all are in: no thread waits on another
                pending.done.set()
        for i, pending in waits:
            pending.done.wait()
            key, readers = wanted[i]
            if pending.data is None:  # its read failed: try it ourselves (and raise our own)
                out[i] = self.get_many([(key, readers)], limit, lambda _: load([i]), epoch)[0]
                continue
            with self._lock:
                self.hits += 1
                entry = self._entries.get(key)
                if entry is not None and entry.data is pending.data:
                    self._take(key, entry)
            out[i] = pending.data
        return out

    def _take(self, key: Hashable, entry: _Entry) -> None:
        entry.left -= 1
        if entry.left <= 0:
            del self._entries[key]
            self.nbytes -= entry.data.nbytes
        else:
            self._entries.move_to_end(key)

    def _insert(self, key: Hashable, entry: _Entry, limit: int) -> None:
        size = entry.data.nbytes
        if size > limit:
            return
        if self.nbytes + size > limit:  # what other computes left first, then the oldest
            for k in [k for k, e in self._entries.items() if e.epoch != entry.epoch]:
                self._drop(k)
                if self.nbytes + size <= limit:
                    break
        while self.nbytes + size > limit:
            self._drop(next(iter(self._entries)))
        self._entries[key] = entry
        self.nbytes += size
        self.peak = max(self.peak, self.nbytes)

    def _drop(self, key: Hashable) -> None:
        entry = self._entries.pop(key)
        self.nbytes -= entry.data.nbytes
        self.evicted += 1
        self._gone[key] = entry.left
        if len(self._gone) > GONE_KEYS:
            self._gone.popitem(last=False)


#: The process's cache of decoded input chunks.
CACHE = ChunkCache()


def read_chunks(arr: Any, indices: Sequence[tuple[int, ...]], shared: SharedChunks,
                epoch: Hashable, load: Callable[[list[int]], list[np.ndarray]]
                ) -> list[np.ndarray]:
    """The decoded chunks ``indices`` of the Zarr array ``arr`` through :data:`CACHE`:
    ``load(positions)`` reads those of ``indices`` that no other region of the job
    (``epoch``) has left there or is reading.

    Examples
    --------
    >>> import zarr
    >>> z = zarr.create_array(zarr.storage.MemoryStore(), shape=(8,), chunks=(4,), dtype="f4")
    >>> z[...] = np.arange(8)
    >>> shared = SharedChunks(1 << 20, (0,), ((1, 2),))  # chunk 1 is read by two regions
    >>> epoch = new_epoch()
    >>> read = lambda mine: [z[4 * k:4 * k + 4] for k in mine]
    >>> [c.tolist() for c in read_chunks(z, [(0,), (1,)], shared, epoch, read)]
    [[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]]
    >>> read_chunks(z, [(1,)], shared, epoch, lambda mine: 1 / 0)[0].tolist()  # kept
    [4.0, 5.0, 6.0, 7.0]
    """
    store, path = str(arr.store), arr.path or ""
    wanted = [((epoch, store, path, index), shared.count(index)) for index in indices]
    return CACHE.get_many(wanted, shared.limit, load, epoch)
