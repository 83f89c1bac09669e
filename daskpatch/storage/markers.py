"""Done-markers: what says which chunks of an output are written, and that it is complete.

In Zarr 3 a chunk equal to the fill value is not written at all, so a missing or all-fill chunk
proves nothing about completion. :func:`daskpatch.to_zarr` therefore keeps its own record under
the output array's key prefix (``<path>/`` in the store, the store root for a root array):

- ``.daskpatch-done/chunks/<i>.<j>...`` -- one tiny object per finished chunk, written by the task
  that wrote the chunk, right after the chunk;
- ``.daskpatch-done/complete`` -- written once every chunk is done; the per-chunk objects are then
  deleted (where the store supports deletes).

A Zarr array cannot have child nodes, and a root array has no siblings, so the record is raw keys
rather than a Zarr array. Readers of an output that is not complete warn
(:func:`warn_if_incomplete`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np
import zarr

from daskpatch.errors import IncompleteWarning
from daskpatch.storage.storeio import collect, delete_dir, exists, list_prefix, put, run
from daskpatch.storage.stores import ATTR, MARKER_DIR, SPILL_DIR, _join


def stored_fingerprint(z: zarr.Array) -> dict[str, Any] | None:
    record = z.attrs.get(ATTR)
    if isinstance(record, dict) and isinstance(record.get("fingerprint"), dict):
        return record["fingerprint"]
    return None


def marker_dir(z: zarr.Array) -> str:
    return _join(z.path, MARKER_DIR)


def spill_dir(z: zarr.Array) -> str:
    return _join(z.path, SPILL_DIR)


def chunk_marker(z: zarr.Array, loc: Iterable[int]) -> str:
    return f"{marker_dir(z)}/chunks/{'.'.join(map(str, loc))}"


def complete_marker(z: zarr.Array) -> str:
    return f"{marker_dir(z)}/complete"


def is_done(z: zarr.Array, loc: Iterable[int]) -> bool:
    """Whether the chunk at ``loc`` is recorded as written (asked while the write runs, before
    the array is recorded complete)."""
    return exists(z.store, chunk_marker(z, loc))


def is_complete(z: zarr.Array) -> bool:
    return exists(z.store, complete_marker(z))


def done_chunks(z: zarr.Array, numblocks: tuple[int, ...]) -> set[tuple[int, ...]] | None:
    """Chunk locations recorded as done; ``None`` when the whole array is recorded complete."""
    store = z.store
    if is_complete(z):
        return None
    prefix = f"{marker_dir(z)}/chunks/"
    done: set[tuple[int, ...]] = set()
    if store.supports_listing:
        for key in list_prefix(store, prefix):
            try:
                loc = tuple(int(p) for p in key[len(prefix):].split("."))
            except ValueError:
                continue  # e.g. a LocalStore write in flight at a crash
            if len(loc) == len(numblocks) and all(0 <= i < n for i, n in zip(loc, numblocks)):
                done.add(loc)
    else:  # pragma: no cover - every writable zarr store lists
        for loc in np.ndindex(*numblocks):
            if exists(store, chunk_marker(z, loc)):
                done.add(loc)
    return done


def numblocks(z: zarr.Array) -> tuple[int, ...]:
    return tuple(-(-int(n) // int(c)) for n, c in zip(z.shape, z.chunks))


def mark_complete(z: zarr.Array) -> None:
    """Record the array complete; drop every spilled part under it (whichever graph spilled
    them: a resumed graph may have another name than the crashed one) and the per-chunk markers.

    In this order, a crash at any point leaves either an incomplete array with its markers
    (resumed as usual) or a complete one whose leftovers the next ``resume=True`` deletes.
    """
    clear_spill(z)
    put(z.store, complete_marker(z))
    delete_dir(z.store, f"{marker_dir(z)}/chunks")


def clear_spill(z: zarr.Array) -> None:
    """Delete everything in the array's spill area (each graph spills under its own name)."""
    store, prefix = z.store, spill_dir(z)
    if not store.supports_deletes:
        return
    for name in run(collect(store.list_dir(prefix))):
        key = f"{prefix}/{name.strip('/')}"
        try:
            run(store.delete_dir(key))
        except ValueError:  # a key rather than a directory
            run(store.delete(key))
        if exists(store, key):
            run(store.delete(key))


def warn_if_incomplete(z: zarr.Array, where: str) -> None:
    """Warn (:class:`IncompleteWarning`) when ``z`` is a daskpatch output not yet complete."""
    if stored_fingerprint(z) is None or is_complete(z):
        return
    blocks = numblocks(z)
    done = done_chunks(z, blocks)
    n_done = math.prod(blocks) if done is None else len(done)
    warnings.warn(
        f"{where} is an incomplete daskpatch output: {n_done} of {math.prod(blocks)} chunks "
        "were written before its write stopped, and the missing chunks read as the fill value. "
        "Finish it with daskpatch.to_zarr(<the same array>, <this store and path>, resume=True)",
        IncompleteWarning,
        stacklevel=3,
    )
