"""Key-level, synchronous access to a Zarr ``Store`` (get, put, exists, list, delete).

zarr 3.1 has no public synchronous call for the async ``Store`` methods (the public
``SupportsGetSync``/``SupportsSetSync`` protocols cover some stores only), so stores with
``get_sync``/``set_sync`` (local, in-memory) are called directly, a local store's deletes are
plain file deletes, and the rest runs on zarr's own event loop (:func:`run`): the loop zarr's own
reads and writes of the same store use. An fsspec store (S3, GCS, ...) binds its session to the
loop that first used it, so a second loop of our own would fail on every store zarr opened
("Future attached to a different loop").
"""

from __future__ import annotations

import os
from collections.abc import Coroutine
from typing import Any

import zarr.abc.store
import zarr.storage
from zarr.abc.store import Store, SupportsGetSync, SupportsSetSync
from zarr.buffer import default_buffer_prototype

#: zarr's own loop runner, as zarr's store module imports it: the loop
#: zarr's reads and writes of a store run on.
_zarr_sync = getattr(zarr.abc.store, "sync")

__all__ = ["collect", "delete", "delete_dir", "exists", "get", "list_prefix", "put", "run"]


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run an async ``Store`` call to completion from synchronous code (any thread but zarr's
    own loop), on zarr's event loop."""
    return _zarr_sync(coro)


async def collect(keys: Any) -> list[str]:
    return [k async for k in keys]


def get(store: Store, key: str) -> bytes | None:
    proto = default_buffer_prototype()
    if isinstance(store, SupportsGetSync):
        buf = store.get_sync(key, prototype=proto)
    else:
        buf = run(store.get(key, prototype=proto))
    return None if buf is None else buf.to_bytes()


def put(store: Store, key: str, data: bytes = b"1") -> None:
    buf = default_buffer_prototype().buffer.from_bytes(data)
    if isinstance(store, SupportsSetSync):
        store.set_sync(key, buf)
    else:
        run(store.set(key, buf))


def exists(store: Store, key: str) -> bool:
    return bool(run(store.exists(key)))


def list_prefix(store: Store, prefix: str) -> list[str]:
    return run(collect(store.list_prefix(prefix)))


def delete(store: Store, key: str) -> None:
    """Delete one key (nothing where the store does not support deletes)."""
    if not store.supports_deletes:
        return
    if isinstance(store, zarr.storage.LocalStore):  # no event loop round trip
        try:
            os.unlink(os.path.join(store.root, key))
        except FileNotFoundError:
            pass
        return
    run(store.delete(key))


def delete_dir(store: Store, prefix: str) -> None:
    if store.supports_deletes:
        run(store.delete_dir(prefix))
