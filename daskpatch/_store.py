"""What keeps daskpatch outputs safe: done-markers, fingerprints, and checks before writing.

:func:`daskpatch.to_zarr` keeps three things under the output array's key prefix:

- the array's *fingerprint*, in ``attrs["daskpatch"]``: everything that determines the result
  except the model (shape, dtype, chunks, the overlap-add parameters of every
  :func:`~daskpatch.apply_patches` / :func:`~daskpatch.reconstruct` in the graph, the input
  stores, and a user-given ``run_id``); ``resume=True`` refuses an array whose fingerprint
  differs;
- *done-markers*: ``.daskpatch-done/chunks/<i>.<j>...`` per finished chunk, and
  ``.daskpatch-done/complete`` once every chunk is written (see :mod:`daskpatch.io`);
- *spilled halo parts*, under ``.daskpatch-spill/`` while an overlap-add result is written; the
  whole area is deleted when the array is complete.

Before anything is created or deleted, :func:`daskpatch.to_zarr` checks here that the target does
not overlap a store the graph reads, that it holds nothing but a Zarr array (or daskpatch's own
leftovers), and, for ``overwrite=True``, that every part of it can be written and deleted.

Only zarr's public API is used. zarr offers no public synchronous call for the async ``Store``
methods, so stores with the public ``get_sync``/``set_sync`` methods (local and in-memory stores)
are called directly and the others through a small private event loop (:func:`_run`).
"""

from __future__ import annotations

import asyncio
import atexit
import hashlib
import json
import math
import os
import re
import shutil
import threading
import uuid
import warnings
from collections.abc import Coroutine, Iterable
from typing import Any

import dask.array as da
import numpy as np
import zarr
import zarr.errors
import zarr.storage
from dask.highlevelgraph import MaterializedLayer
from zarr.abc.store import Store, SupportsGetSync, SupportsSetSync
from zarr.buffer import default_buffer_prototype

__all__ = ["IncompleteWarning"]

MARKER_DIR = ".daskpatch-done"
SPILL_DIR = ".daskpatch-spill"
#: Key of the daskpatch record in an output array's attributes.
ATTR = "daskpatch"
#: Version of the fingerprint layout (a different version never matches).
FORMAT = 1


class IncompleteWarning(UserWarning):
    """An output of :func:`daskpatch.to_zarr` was opened before its write finished.

    Its missing chunks read as the fill value. Finish it with ``to_zarr(..., resume=True)`` and
    the same array and parameters.
    """


# --------------------------------------------------------------------------------------------
# synchronous store access
# --------------------------------------------------------------------------------------------

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


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run an async ``Store`` call to completion from synchronous code (any thread)."""
    return asyncio.run_coroutine_threadsafe(coro, _loop()).result()


async def _collect(keys: Any) -> list[str]:
    return [k async for k in keys]


def get(store: Store, key: str) -> bytes | None:
    proto = default_buffer_prototype()
    if isinstance(store, SupportsGetSync):
        buf = store.get_sync(key, prototype=proto)
    else:
        buf = _run(store.get(key, prototype=proto))
    return None if buf is None else buf.to_bytes()


def put(store: Store, key: str, data: bytes = b"1") -> None:
    buf = default_buffer_prototype().buffer.from_bytes(data)
    if isinstance(store, SupportsSetSync):
        store.set_sync(key, buf)
    else:
        _run(store.set(key, buf))


def exists(store: Store, key: str) -> bool:
    return bool(_run(store.exists(key)))


def list_prefix(store: Store, prefix: str) -> list[str]:
    return _run(_collect(store.list_prefix(prefix)))


def delete_dir(store: Store, prefix: str) -> None:
    if store.supports_deletes:
        _run(store.delete_dir(prefix))


def _join(*parts: str | None) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


# --------------------------------------------------------------------------------------------
# stores and locations
# --------------------------------------------------------------------------------------------


def as_store(store: Any, *, read_only: bool = False) -> tuple[Store, str]:
    """A zarr ``Store`` for what :func:`zarr.open` accepts (path, URL, mapping, store, StorePath),
    and the key prefix it adds (a ``StorePath``'s path). Opens nothing."""
    if isinstance(store, zarr.storage.StorePath):
        base, prefix = store.store, store.path
    elif isinstance(store, Store):
        base, prefix = store, ""
    elif isinstance(store, (str, os.PathLike)):
        text = os.fspath(store)
        if "://" in text:
            base = zarr.storage.FsspecStore.from_url(text, read_only=read_only)
        else:
            base = zarr.storage.LocalStore(text, read_only=read_only)
        prefix = ""
    else:  # a mapping: what zarr itself does with a dict
        base, prefix = zarr.storage.MemoryStore(store), ""
    if read_only and not base.read_only:
        try:
            base = base.with_read_only(True)
        except (NotImplementedError, TypeError):  # a store that cannot make a read-only copy
            pass
    return base, prefix


def _local_root(store: Store) -> str | None:
    """The directory a store keeps its keys in, for stores on the local file system."""
    if isinstance(store, zarr.storage.LocalStore):
        return os.path.realpath(store.root)
    if isinstance(store, zarr.storage.FsspecStore):
        protocol = store.fs.protocol
        protocols = (protocol,) if isinstance(protocol, str) else tuple(protocol)
        if {"file", "local"} & set(protocols):
            return os.path.realpath(store.path)
    text = re.sub(r"^(?:[a-z]+-)+(?=file://)", "", str(store))  # wrapping-, logging-, ...
    if text.startswith("file://"):
        return os.path.realpath(text[len("file://"):])
    return None


def location(store: Store, path: str | None) -> tuple[str, str]:
    """``(kind, where)`` of a node, comparable by path containment: a local directory's real
    path, a URL, or an opaque identity for a store that names itself no better."""
    root = _local_root(store)
    if root is not None:
        return "file", os.path.join(root, *([path] if path else [])).rstrip("/")
    if isinstance(store, zarr.storage.FsspecStore):
        protocol = store.fs.protocol
        scheme = protocol if isinstance(protocol, str) else protocol[0]
        return scheme, _join(store.path, path)
    text = re.sub(r"^(?:[a-z]+-)+(?=[a-zA-Z][\w+.-]*://)", "", str(store))
    match = re.match(r"^([a-zA-Z][\w+.-]*)://(.*)$", text)
    if match:
        return match.group(1), _join(match.group(2), path)
    return "object", _join(f"{id(store):x}", path)


def overlaps(a: tuple[str, str], b: tuple[str, str]) -> bool:
    """Whether one location contains the other (or they are the same)."""
    if a[0] != b[0]:
        return False
    x, y = a[1].rstrip("/"), b[1].rstrip("/")
    return x == y or x.startswith(y + "/") or y.startswith(x + "/") or not x or not y


def _url(store: Store, key: str) -> str:
    root = _local_root(store)
    if root is not None:
        return os.path.join(root, key)
    kind, where = location(store, key)
    return f"{kind}://{where}"


# --------------------------------------------------------------------------------------------
# what a graph reads
# --------------------------------------------------------------------------------------------


def _scan(value: Any, found: dict[int, Any], depth: int = 0) -> None:
    if isinstance(value, (np.ndarray, zarr.Array)):
        found.setdefault(id(value), value)
    elif isinstance(value, (tuple, list)) and depth < 2:
        for v in value:
            _scan(v, found, depth + 1)
    elif type(value).__name__ == "DataNode":  # dask's task spec wrapper of a literal
        _scan(getattr(value, "value", None), found, depth + 1)


def graph_arrays(x: da.Array, *, sources_only: bool = False) -> list[Any]:
    """The NumPy and Zarr arrays a Dask array's graph holds (not the ones it computes).

    That is what ``from_array``/``from_zarr`` (``original-`` layers, or the arrays of an inline
    ``from_zarr``), daskpatch's readers (``source-of-`` layers of :func:`~daskpatch.apply_patches`,
    :func:`~daskpatch.extract_patches` and :func:`~daskpatch.reconstruct`) and any other
    materialised layer hold; the on-demand layers of daskpatch hold no data. With
    ``sources_only`` the NumPy chunks that small ``from_array`` calls copy into the graph are
    left out (they are data, not an input that could be named).
    """
    found: dict[int, Any] = {}
    for name, layer in x.dask.layers.items():
        source = name.startswith(("original-", "source-of-"))
        if isinstance(layer, MaterializedLayer):
            if sources_only and not source:
                part: dict[int, Any] = {}
                for value in layer.mapping.values():
                    _scan(value, part)
                found.update((k, v) for k, v in part.items() if isinstance(v, zarr.Array))
            else:
                for value in layer.mapping.values():
                    _scan(value, found)
        else:
            for value, index in getattr(layer, "indices", ()) or ():
                if index is None:
                    _scan(value, found)
    return list(found.values())


def check_not_read(x: da.Array, store: Store, path: str | None, where: str) -> None:
    """Refuse a target that contains, or lies inside, a Zarr array the graph reads."""
    target = location(store, path)
    for source in graph_arrays(x, sources_only=True):
        if not isinstance(source, zarr.Array):
            continue
        loc = location(source.store, source.path or None)
        if not overlaps(loc, target):
            continue
        if loc == target:
            what = where
        else:
            inside = loc[1].startswith(target[1].rstrip("/") + "/")
            what = f"the Zarr array {loc[0]}://{loc[1]}, {'inside' if inside else 'which holds'}"
            what += f" {where}"
        raise ValueError(
            f"to_zarr: the input array reads from {what}, which this call would write (and "
            "overwrite or delete what it reads); write to a location that neither contains "
            "that array nor lies inside it (rechunk_to_stride copies an array to new chunks)"
        )


def check_not_aliased(x: da.Array, out: np.ndarray) -> None:
    """Refuse an ``out`` sharing memory with a NumPy array the graph reads."""
    for source in graph_arrays(x):
        if isinstance(source, np.ndarray) and np.may_share_memory(out, source):
            raise ValueError(
                "out shares memory with a NumPy array the computation reads (shape "
                f"{source.shape}, dtype {source.dtype}): writing the result there would change "
                "the input while it is read; pass out=None or a separate array"
            )


# --------------------------------------------------------------------------------------------
# what may be deleted
# --------------------------------------------------------------------------------------------

_ARRAY_KEY = re.compile(r"^(zarr\.json|\.zarray|\.zattrs|(c|\d+)([./]\d+)*)$")
_PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial$")  # a LocalStore write in flight at a crash
_OURS = (MARKER_DIR, SPILL_DIR)


def _allowed_key(rel: str, is_array: bool) -> bool:
    if rel.split("/", 1)[0] in _OURS or _PARTIAL.search(rel):
        return True
    return is_array and bool(_ARRAY_KEY.match(rel))


def _allowed_dir(rel: str, is_array: bool) -> bool:
    parts = rel.split("/")
    if parts[0] in _OURS:
        return True
    return is_array and all(p == "c" or p.isdigit() for p in parts)


def _entries(store: Store, path: str | None) -> tuple[list[str], list[str]] | None:
    """``(keys, directories)`` under ``path`` relative to it; ``None`` when the local directory
    is a file."""
    root = _local_root(store) if isinstance(store, zarr.storage.LocalStore) else None
    if root is None:
        prefix = _join(path)
        found = list_prefix(store, prefix + "/" if prefix else "")
        return [k[len(prefix) + 1:] if prefix else k for k in found], []
    base = os.path.join(root, path or "")
    if os.path.isfile(base):
        return None
    keys: list[str] = []
    dirs: list[str] = []

    def fail(err: OSError) -> None:
        raise err

    for dirpath, dirnames, filenames in os.walk(base, onerror=fail):
        rel = os.path.relpath(dirpath, base)
        rel = "" if rel == "." else rel.replace(os.sep, "/")
        dirs.extend(_join(rel, d) for d in dirnames)
        keys.extend(_join(rel, f) for f in filenames)
    return keys, dirs


def check_contents(store: Store, path: str | None, is_array: bool, where: str) -> None:
    """Refuse a target holding anything but a Zarr array (``is_array``) and daskpatch's own
    markers and spilled parts: to_zarr never deletes or writes among other files."""
    try:
        entries = _entries(store, path)
    except FileNotFoundError:
        return
    if entries is None:
        raise FileExistsError(f"to_zarr: {where} is a file, not a directory; nothing was written")
    keys, dirs = entries
    foreign = [k for k in keys if not _allowed_key(k, is_array)]
    foreign += [d + "/" for d in dirs if not _allowed_dir(d, is_array)
                and not any(k.startswith(d + "/") for k in foreign)]
    if foreign:
        shown = ", ".join(repr(f) for f in sorted(foreign)[:5])
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        what = "a Zarr array, which also holds" if is_array else "no Zarr array but holds"
        raise FileExistsError(
            f"to_zarr: {where} is {what} {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'}"
            f" that {'is' if len(foreign) == 1 else 'are'} not part of a Zarr array ({shown}"
            f"{more}); to_zarr only ever replaces a Zarr array and never deletes anything else, "
            "so nothing was written. Choose another location, or move them away yourself"
        )


def _probe_dir(directory: str, rel: str, where: str) -> None:
    name = os.path.join(directory, f".daskpatch-probe-{uuid.uuid4().hex}")
    try:
        fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        raise PermissionError(
            f"to_zarr: cannot overwrite {where}: its directory {rel or '(the array itself)'!r} "
            f"({directory}) is not writable ({err.strerror}), so its old files could not be "
            "deleted; nothing was deleted or written. Make it writable, or write elsewhere"
        ) from err


def check_deletable(store: Store, path: str | None, where: str) -> None:
    """Check that every part of the target can be written and deleted, before deleting any."""
    if store.read_only:
        raise PermissionError(f"to_zarr: cannot overwrite {where}: the store is read-only; "
                              "nothing was deleted or written")
    if not store.supports_deletes:
        raise ValueError(f"to_zarr: cannot overwrite {where}: the store does not support "
                         "deletes; nothing was deleted or written. Write to a new location")
    root = _local_root(store) if isinstance(store, zarr.storage.LocalStore) else None
    if root is not None:
        base = os.path.join(root, path or "")

        def fail(err: OSError) -> None:
            raise PermissionError(
                f"to_zarr: cannot overwrite {where}: {err.filename} cannot be listed "
                f"({err.strerror}); nothing was deleted or written"
            ) from err

        for dirpath, _, _ in os.walk(base, onerror=fail):
            rel = os.path.relpath(dirpath, base)
            _probe_dir(dirpath, "" if rel == "." else rel.replace(os.sep, "/"), where)
        return
    key = _join(path, f".daskpatch-probe-{uuid.uuid4().hex}")
    try:
        put(store, key, b"")
        _run(store.delete(key))
    except Exception as err:
        raise PermissionError(
            f"to_zarr: cannot overwrite {where}: writing and deleting {key!r} there failed "
            f"({type(err).__name__}: {err}); nothing was deleted or written"
        ) from err


def clear(store: Store, path: str | None) -> None:
    """Delete everything under ``path`` (checked first by :func:`check_contents` and
    :func:`check_deletable`); a local directory itself stays."""
    root = _local_root(store) if isinstance(store, zarr.storage.LocalStore) else None
    if root is None:
        delete_dir(store, _join(path))
        return
    base = os.path.join(root, path or "")
    if not os.path.isdir(base):
        return
    for entry in os.scandir(base):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)


# --------------------------------------------------------------------------------------------
# metadata that cannot be read
# --------------------------------------------------------------------------------------------

_META = ("zarr.json", ".zarray", ".zgroup", ".zattrs")


def unreadable(store: Any, path: str | None, where: str, err: Exception) -> ValueError:
    """A clear error for metadata zarr cannot parse, naming the file at fault."""
    try:
        base, prefix = as_store(store, read_only=True)
        for name in _META:
            key = _join(prefix, path, name)
            raw = get(base, key)
            if raw is None:
                continue
            try:
                json.loads(raw)
            except ValueError as bad:
                return ValueError(
                    f"cannot open {where}: its metadata file {_url(base, key)} is not valid JSON "
                    f"({bad}); restore it, or delete the node and write it again"
                )
    except Exception:  # naming the file is a courtesy: never hide the original error
        pass
    return ValueError(f"cannot open {where}: zarr cannot read its metadata "
                      f"({type(err).__name__}: {err})")


METADATA_ERRORS = (ValueError, KeyError, TypeError, zarr.errors.MetadataValidationError)


# --------------------------------------------------------------------------------------------
# fingerprints
# --------------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # NaN and inf are not JSON
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def window_digest(array: np.ndarray | None) -> str | None:
    """A short hash of a user window (its shape, dtype and values)."""
    if array is None:
        return None
    a = np.ascontiguousarray(array)
    h = hashlib.sha256(f"{a.shape}{a.dtype.str}".encode())
    h.update(a.tobytes())
    return "sha256:" + h.hexdigest()[:32]


def _input(source: Any) -> str:
    if isinstance(source, zarr.Array):
        kind, where = location(source.store, None)
        return f"zarr {kind}://{where}" + (f" path {source.path!r}" if source.path else "")
    return (f"numpy (content not fingerprinted) shape {tuple(source.shape)} dtype "
            f"{source.dtype}")


def fingerprint(x: da.Array, chunks: tuple[int, ...], run_id: str | None) -> dict[str, Any]:
    """Everything that determines ``x`` written with Zarr ``chunks``, except the model.

    The overlap-add parameters come from the ``params`` of the engines in the graph; the inputs
    are the Zarr arrays the graph reads (by location) and the NumPy arrays it was given (by
    shape and dtype only: their content is not hashed). A model cannot be fingerprinted
    reliably (a closure's token differs in every process); ``run_id`` names its version.
    """
    engines = []
    for layer in x.dask.layers.values():
        params = getattr(getattr(layer, "engine", None), "params", None)
        if isinstance(params, dict) and params:
            engines.append(params)
    inputs = sorted({_input(s) for s in graph_arrays(x, sources_only=True)})
    return _jsonable({
        "format": FORMAT,
        "shape": x.shape,
        "dtype": str(x.dtype),
        "chunks": chunks,
        "pipeline": [e.get("kind", "?") for e in engines],
        "engines": engines,
        "inputs": inputs,
        "run_id": run_id,
    })


def _flat(fp: dict[str, Any], other: dict[str, Any]) -> list[tuple[str, Any]]:
    out = [(k, fp.get(k)) for k in ("format", "shape", "dtype", "chunks", "pipeline")]
    engines = fp.get("engines") or []
    if fp.get("pipeline") == other.get("pipeline"):
        for i, params in enumerate(engines):
            label = "" if len(engines) == 1 else f"{params.get('kind')} #{i + 1} "
            keys = list(params) + [k for k in (other.get("engines") or [{}] * len(engines))[i]
                                   if k not in params]
            out.extend((label + k, params.get(k)) for k in keys if k != "kind")
    out += [("input", fp.get("inputs")), ("run_id", fp.get("run_id"))]
    return out


def _show(value: Any) -> str:
    if isinstance(value, list):
        if value and all(isinstance(v, dict) for v in value):
            return "[" + ", ".join(_show(v) for v in value) + "]"
        return "(" + ", ".join(_show(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    return repr(value)


def first_difference(old: dict[str, Any], new: dict[str, Any]) -> tuple[str, Any, Any] | None:
    a, b = _flat(old, new), dict(_flat(new, old))
    for name, value in a:
        if value != b.get(name):
            return name, value, b.get(name)
    for name, value in b.items():  # a parameter only the new fingerprint has
        if name not in dict(a):
            return name, None, value
    return None


def stored_fingerprint(z: zarr.Array) -> dict[str, Any] | None:
    record = z.attrs.get(ATTR)
    if isinstance(record, dict) and isinstance(record.get("fingerprint"), dict):
        return record["fingerprint"]
    return None


def record(fp: dict[str, Any]) -> dict[str, Any]:
    """The ``attrs["daskpatch"]`` value of a new output."""
    return {"fingerprint": fp,
            "note": "written by daskpatch.to_zarr; resume=True checks this fingerprint"}


def check_fingerprint(z: zarr.Array, fp: dict[str, Any], where: str) -> None:
    """Refuse to resume an array written with other parameters, naming the first difference."""
    old = stored_fingerprint(z)
    if old is None:
        raise ValueError(
            f"resume=True needs an array written by daskpatch.to_zarr, which records its "
            f"parameters in attrs[{ATTR!r}]; {where} has no such record (written by another "
            "tool, or by an older daskpatch), so its chunks cannot be trusted to match. Pass "
            "overwrite=True to start again"
        )
    diff = first_difference(old, fp)
    if diff is not None:
        name, was, now = diff
        raise ValueError(
            f"resume=True: {where} was written with {name}={_show(was)}, but this call has "
            f"{name}={_show(now)} (the first parameter that differs); resuming would mix "
            "chunks of two different results. Resume with the same parameters (and run_id), or "
            "pass overwrite=True to start again"
        )


def current_fingerprint(z: zarr.Array) -> dict[str, Any] | None:
    """The fingerprint in the store now (one small read of the array's ``zarr.json``)."""
    raw = get(z.store, _join(z.path, "zarr.json"))
    try:
        attrs = json.loads(raw or b"null")["attributes"]
        return attrs[ATTR]["fingerprint"]
    except (ValueError, TypeError, KeyError):
        return None


def check_still_ours(z: zarr.Array, fp: dict[str, Any], where: str) -> None:
    """Refuse to go on when another writer replaced the array (and its fingerprint) since this
    write began: checked before each chunk is written and before the array is marked complete."""
    now = current_fingerprint(z)
    if now != fp:
        diff = first_difference(fp, now) if now is not None else ("fingerprint", fp, None)
        name, mine, theirs = diff or ("fingerprint", fp, now)
        raise ValueError(
            f"to_zarr: {where} was rewritten by another writer while this one ran (its {name} "
            f"is now {_show(theirs)}, this call's is {_show(mine)}); this write stops here and "
            "does not touch it further. Run one writer at a time per array"
        )


# --------------------------------------------------------------------------------------------
# done-markers
# --------------------------------------------------------------------------------------------


def marker_dir(z: zarr.Array) -> str:
    return _join(z.path, MARKER_DIR)


def spill_dir(z: zarr.Array) -> str:
    return _join(z.path, SPILL_DIR)


def chunk_marker(z: zarr.Array, loc: Iterable[int]) -> str:
    return f"{marker_dir(z)}/chunks/{'.'.join(map(str, loc))}"


def complete_marker(z: zarr.Array) -> str:
    return f"{marker_dir(z)}/complete"


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
    for name in _run(_collect(store.list_dir(prefix))):
        key = f"{prefix}/{name.strip('/')}"
        try:
            _run(store.delete_dir(key))
        except ValueError:  # a key rather than a directory
            _run(store.delete(key))
        if exists(store, key):
            _run(store.delete(key))


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


