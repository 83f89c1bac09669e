"""Key-level, synchronous access to a Zarr ``Store`` (get, put, exists, list, delete).

zarr 3.1 has no public synchronous call for the async ``Store`` methods (zarr's own sync helper
is private; the public ``SupportsGetSync``/``SupportsSetSync`` protocols cover some stores only),
so stores with ``get_sync``/``set_sync`` (local, in-memory) are called directly, a local store's
deletes are plain file deletes, and the rest goes through a small private event loop
(:func:`run`): one daemon thread per process, made on first use (again in a forked child) and
stopped at exit. It is a resource, like zarr's own I/O thread, not state: no value of one compute
is kept there. fsspec's async sessions are bound to the loop that opened them, hence one loop.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import threading
from collections.abc import Coroutine
from typing import Any

import zarr.storage
from zarr.abc.store import Store, SupportsGetSync, SupportsSetSync
from zarr.buffer import default_buffer_prototype

__all__ = ["collect", "delete", "delete_dir", "exists", "get", "list_prefix", "put", "run"]


_LOOP_LOCK = threading.Lock()
_LOOP: dict[str, Any] = {}


def _loop() -> asyncio.AbstractEventLoop:
    """daskpatch's own event loop, in a daemon thread (made again in a forked child)."""
    with _LOOP_LOCK:
        loop = _LOOP.get("loop")
        if loop is None or _LOOP.get("pid") != os.getpid() or not _LOOP["thread"].is_alive():
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="daskpatch-store-io",
                                      daemon=True)
            thread.start()
            _LOOP.update(loop=loop, thread=thread, pid=os.getpid())
        return loop


@atexit.register
def _close_loop() -> None:
    loop = _LOOP.get("loop")
    if loop is not None and _LOOP.get("pid") == os.getpid():
        loop.call_soon_threadsafe(loop.stop)
        _LOOP["thread"].join(timeout=5)
        if not loop.is_running():
            loop.close()


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run an async ``Store`` call to completion from synchronous code (any thread)."""
    return asyncio.run_coroutine_threadsafe(coro, _loop()).result()


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
