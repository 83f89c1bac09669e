"""Zarr stores for daskpatch: naming them, done-markers, and checks before writing.

Under the output array's key prefix :func:`daskpatch.to_zarr` keeps its *fingerprint*
(``attrs["daskpatch"]``, see :mod:`daskpatch._fingerprint`), *done-markers* (below) and, while
an overlap-add result is written, *spilled halo parts* under ``.daskpatch-spill/`` (deleted once
the array is complete).

Here: what the user names (a path, URL, store, group or mapping, and a node path in it) turned into
a store and a path, opened for metadata only; and the checks made before anything is created or
deleted: the target holds nothing but a Zarr array (or daskpatch's leftovers) and, for
``overwrite=True``, every part of it can be deleted.

Done-markers
------------
In Zarr 3 a chunk equal to the fill value is not written at all, so a missing or all-fill chunk
proves nothing about completion. :func:`daskpatch.to_zarr` therefore keeps its own record under the output
array's key prefix (``<path>/`` in the store, the store root for a root array):

- ``.daskpatch-done/chunks/<i>.<j>...`` -- one tiny object per finished chunk, written by the task
  that wrote the chunk, right after the chunk;
- ``.daskpatch-done/complete`` -- written once every chunk is done; the per-chunk objects are then
  deleted (where the store supports deletes).

Zarr ignores keys it does not know, and they cannot collide with chunk keys (chunk keys start
with ``c`` or a digit). Deleting or overwriting the array removes them with it. (A Zarr array
cannot have child nodes, and a root array has no siblings, so the record is raw keys rather than a
Zarr array.) The array's attributes hold a fingerprint of the parameters that made it, which
``resume=True`` checks (:mod:`daskpatch._fingerprint`); the markers and the checks made before
anything is written or deleted live in this module.

Only zarr's public API is used; key-level reads, writes and deletes are :mod:`daskpatch._storeio`'s.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any, Literal, TypeAlias

import numpy as np
import zarr
import zarr.errors
import zarr.storage
from zarr.abc.store import Store

from daskpatch.errors import (IncompleteWarning, ParameterError, ParameterTypeError,
                              TargetExistsError, TargetNotDeletableError, UnsafeTargetError)
from daskpatch.storage.storeio import collect, delete_dir, exists, get, list_prefix, put, run
from daskpatch.geometry.parse import _describe

__all__ = ["IncompleteWarning"]

MARKER_DIR = ".daskpatch-done"
SPILL_DIR = ".daskpatch-spill"
#: Where an overwritten local array waits until its replacement is complete (one folder per
#: overwrite), so that no failure of an overwrite loses it (:func:`clear`).
REPLACED_DIR = ".daskpatch-replaced"
#: The writer lease of an array (:mod:`daskpatch.storage.lease`).
LEASE_KEY = ".daskpatch-lease"
#: Key of the daskpatch record in an output array's attributes.
ATTR = "daskpatch"
#: Version of the fingerprint layout (a different version never matches).
FORMAT = 1


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
# what the user names: a store (path, URL, store, group, mapping) and a node path in it
# --------------------------------------------------------------------------------------------

STORE_TYPES = "a path or URL string, an os.PathLike, a zarr store, a zarr.Group or a mapping"

#: Anything :func:`zarr.open` accepts as a store, plus an open :class:`zarr.Group`.
StoreLike: TypeAlias = (
    "str | os.PathLike[str] | Store | zarr.storage.StorePath | zarr.Group"
    " | MutableMapping[str, Any]"
)


def parse_path(value: Any, name: str = "path") -> str | None:
    """``None`` or a node path inside the store, without leading/trailing slashes."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ParameterTypeError(f"{name} must be None or a string naming a node in the store; "
                                 f"got {_describe(value)}", param=name, value=value)
    value = value.strip("/")
    return value or None


def node_path(*parts: str | None) -> str | None:
    """The parts joined with ``/``; ``None`` (the root) when they are all empty."""
    return _join(*parts) or None


def store_of(store: Any, storage_options: Any = None, name: str = "store", *,
             read_only: bool = False) -> Any:
    """``store`` as every process reads it the same: a local path made absolute (a worker
    started elsewhere would resolve a relative one in its own directory), an fsspec URL with
    ``storage_options`` (credentials, endpoint) made a :class:`zarr.storage.FsspecStore`;
    anything else as it is.

    Examples
    --------
    >>> import os
    >>> store_of("vol.zarr") == os.path.abspath("vol.zarr")
    True
    >>> store_of("s3://bucket/vol.zarr")
    's3://bucket/vol.zarr'
    """
    if storage_options is not None and not isinstance(storage_options, Mapping):
        raise ParameterTypeError(f"storage_options must be a dict of fsspec options (e.g. "
                                 f"{{'endpoint_url': ...}}) or None; got "
                                 f"{_describe(storage_options)}", param="storage_options",
                                 value=storage_options)
    if isinstance(store, os.PathLike):
        store = os.fspath(store)
    if isinstance(store, str) and "://" in store:
        if storage_options:
            return zarr.storage.FsspecStore.from_url(store, storage_options=dict(storage_options),
                                                     read_only=read_only)
        return store
    if storage_options:
        raise ParameterError(f"storage_options needs {name} to be an fsspec URL (such as "
                             f"'s3://bucket/vol.zarr'); got {_describe(store)}",
                             param="storage_options", value=storage_options)
    if isinstance(store, str):
        return os.path.abspath(os.path.expanduser(store))
    return store


def resolve_store(store: Any, path: str | None, name: str = "store") -> tuple[Any, str | None]:
    """Split ``store`` into something :func:`zarr.open` accepts and a path from its root."""
    if isinstance(store, zarr.Array):
        raise ParameterTypeError(
            f"{name} must be {STORE_TYPES}; got a zarr.Array ({store!r}); pass its store and "
            "path instead", param=name, value=store, expected=STORE_TYPES
        )
    if isinstance(store, zarr.Group):
        return store.store, node_path(store.path, path)
    if isinstance(store, os.PathLike):
        return os.fspath(store), path
    if isinstance(store, (str, Store, zarr.storage.StorePath, MutableMapping)):
        return store, path
    raise ParameterTypeError(f"{name} must be {STORE_TYPES}; got {_describe(store)}",
                             param=name, value=store, expected=STORE_TYPES)


def where(store: Any, path: str | None) -> str:
    """How messages name a node: ``path 'a/b' of store '...'`` or ``the root of store '...'``."""
    if isinstance(store, (str, Store, zarr.storage.StorePath)):
        name = f"store {str(store)!r}"  # a path, URL or "file://..." / "memory://..."
    else:  # a mapping: never print its content
        name = f"store <{type(store).__name__} at {id(store):#x}>"
    return f"path {path!r} of {name}" if path else f"the root of {name}"


def probe(store: Any, path: str | None, where_: str | None = None
          ) -> zarr.Array | zarr.Group | None:
    """The node at ``path`` (opened read-only, metadata only), or ``None`` if there is none;
    metadata zarr cannot parse is an error naming its file."""
    # "r" needs a read-only store; a writable one that cannot make a read-only copy of itself
    # (a ZipStore opened for writing) is opened "r+", which also creates nothing
    mode: Literal["r", "r+"] = "r+" if isinstance(store, Store) and not store.read_only else "r"
    try:
        if path is None:
            return zarr.open(store=store, mode=mode)
        return zarr.open(store=store, mode=mode, path=path)
    except FileNotFoundError:  # zarr's NodeNotFoundError and a missing local directory
        return None
    except METADATA_ERRORS as err:
        raise unreadable(store, path, where_ or where(store, path), err) from err


def open_array(store: Any, path: Any, name: str = "store") -> zarr.Array:
    """The Zarr array ``store``/``path`` names, or a clear error; reads metadata only."""
    path = parse_path(path)
    if isinstance(store, zarr.Array):
        if path is not None:
            raise ParameterError(
                f"path must be None when {name} is a zarr.Array (the array is already chosen); "
                f"got path={path!r}", param="path", value=path, expected=None
            )
        return store
    base, full = resolve_store(store, path, name)
    node = probe(base, full)
    if node is None:
        raise FileNotFoundError(f"no Zarr array or group at {where(base, full)}")
    if isinstance(node, zarr.Group):
        arrays = sorted(name for name, _ in node.arrays())
        hint = f"path= one of {arrays}" if arrays else "path= naming an array (it has no arrays)"
        raise ParameterError(
            f"{name}/path must name a Zarr array, but {where(base, full)} holds a group; pass "
            f"{hint}", param="path", value=path, expected=arrays, mentions=(f"{name}/path",)
        )
    return node


def check_parents(store: Any, path: str | None, where_: str, what: str = "an array", *,
                  name_parent: bool = False) -> None:
    """Refuse to create ``what`` at ``path`` when one of its parents is an array (metadata that
    cannot be read names ``where_``, or with ``name_parent`` the parent)."""
    if path is None:
        return
    parts = path.split("/")
    for i in range(len(parts)):
        parent = "/".join(parts[:i]) or None
        if isinstance(probe(store, parent, None if name_parent else where_), zarr.Array):
            raise UnsafeTargetError(
                f"to_zarr: cannot create {what} at {where_}: its parent "
                f"{parent or '(the root)'!r} is an array, and only groups have children",
                param="path", value=where_
            )


# --------------------------------------------------------------------------------------------
# what may be deleted
# --------------------------------------------------------------------------------------------

_ARRAY_KEY = re.compile(r"^(zarr\.json|\.zarray|\.zattrs|(c|\d+)([./]\d+)*)$")
_PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial$")  # a LocalStore write in flight at a crash
_OURS = (MARKER_DIR, SPILL_DIR, REPLACED_DIR, LEASE_KEY)


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
        raise TargetExistsError(f"to_zarr: {where} is a file, not a directory; nothing was "
                                "written", value=where)
    keys, dirs = entries
    foreign = [k for k in keys if not _allowed_key(k, is_array)]
    foreign += [d + "/" for d in dirs if not _allowed_dir(d, is_array)
                and not any(k.startswith(d + "/") for k in foreign)]
    if foreign:
        shown = ", ".join(repr(f) for f in sorted(foreign)[:5])
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        what = "a Zarr array, which also holds" if is_array else "no Zarr array but holds"
        raise TargetExistsError(
            f"to_zarr: {where} is {what} {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'}"
            f" that {'is' if len(foreign) == 1 else 'are'} not part of a Zarr array ({shown}"
            f"{more}); to_zarr only ever replaces a Zarr array and never deletes anything else, "
            "so nothing was written. Choose another location, or move them away yourself",
            value=where, expected=sorted(foreign)
        )


def probe_writable(directory: str) -> None:
    """Create and delete a probe file in ``directory``; raises the ``OSError`` if either fails."""
    name = os.path.join(directory, f".daskpatch-probe-{uuid.uuid4().hex}")
    fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.close(fd)
    os.unlink(name)


def _probe_dir(directory: str, rel: str, where: str) -> None:
    try:
        probe_writable(directory)
    except OSError as err:
        raise TargetNotDeletableError(
            f"to_zarr: cannot overwrite {where}: its directory {rel or '(the array itself)'!r} "
            f"({directory}) is not writable ({err.strerror}), so its old files could not be "
            "deleted; nothing was deleted or written. Make it writable, or write elsewhere",
            param="overwrite", value=where
        ) from err


def check_deletable(store: Store, path: str | None, where: str) -> None:
    """Check that every part of the target can be written and deleted, before deleting any."""
    if store.read_only:
        raise TargetNotDeletableError(f"to_zarr: cannot overwrite {where}: the store is "
                                      "read-only; nothing was deleted or written",
                                      param="overwrite", value=where)
    if not store.supports_deletes:
        raise UnsafeTargetError(f"to_zarr: cannot overwrite {where}: the store does not "
                                "support deletes; nothing was deleted or written. Write to a new "
                                "location", param="overwrite", value=where)
    root = _local_root(store) if isinstance(store, zarr.storage.LocalStore) else None
    if root is not None:
        base = os.path.join(root, path or "")

        def fail(err: OSError) -> None:
            raise TargetNotDeletableError(
                f"to_zarr: cannot overwrite {where}: {err.filename} cannot be listed "
                f"({err.strerror}); nothing was deleted or written", param="overwrite",
                value=where
            ) from err

        for dirpath, _, _ in os.walk(base, onerror=fail):
            rel = os.path.relpath(dirpath, base)
            _probe_dir(dirpath, "" if rel == "." else rel.replace(os.sep, "/"), where)
        return
    key = _join(path, f".daskpatch-probe-{uuid.uuid4().hex}")
    try:
        put(store, key, b"")
        run(store.delete(key))
    except Exception as err:
        raise TargetNotDeletableError(
            f"to_zarr: cannot overwrite {where}: writing and deleting {key!r} there failed "
            f"({type(err).__name__}: {err}); nothing was deleted or written",
            param="overwrite", value=where
        ) from err


def clear(store: Store, path: str | None, where: str = "the target") -> str | None:
    """Clear ``path`` for a new array (checked first by :func:`check_contents` and
    :func:`check_deletable`); a local directory itself stays.

    In a local directory the old array is set aside, not deleted: its entries move (each an
    atomic rename) into ``REPLACED_DIR/<generation>`` under it, and that folder is returned. It
    is deleted once the new array is complete (:func:`drop_replaced`), or moved back if the
    write fails (:func:`restore`); after a crash it stays (the next completed write of the
    array deletes it). If a move fails, the entries moved so far go back and nothing is lost.
    Other stores cannot move keys: the old array is deleted and ``None`` returned.
    """
    root = _local_root(store) if isinstance(store, zarr.storage.LocalStore) else None
    if root is None:
        delete_dir(store, _join(path))
        return None
    base = os.path.join(root, path or "")
    if not os.path.isdir(base):
        return None
    generation = os.path.join(base, REPLACED_DIR, uuid.uuid4().hex)
    moved: list[str] = []
    try:
        os.makedirs(generation)
        for entry in os.scandir(base):
            if entry.name not in (REPLACED_DIR, LEASE_KEY):  # the writer's lease stays
                os.rename(entry.path, os.path.join(generation, entry.name))
                moved.append(entry.name)
    except OSError as err:
        for name in moved:
            os.rename(os.path.join(generation, name), os.path.join(base, name))
        _remove_empty(generation)
        raise TargetNotDeletableError(
            f"to_zarr: cannot overwrite {where}: setting {err.filename!r} aside failed "
            f"({err.strerror}); nothing was deleted or written", param="overwrite", value=where
        ) from err
    return generation


def restore(store: Store, path: str | None, generation: str) -> None:
    """Undo :func:`clear` after a failed write: delete what the write made under ``path`` and
    move the old array's entries back from ``generation``."""
    base = os.path.join(_local_root(store) or "", path or "")
    for entry in os.scandir(base):
        if entry.name in (REPLACED_DIR, LEASE_KEY):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)
    for entry in os.scandir(generation):
        os.rename(entry.path, os.path.join(base, entry.name))
    _remove_empty(generation)


def drop_replaced(z: zarr.Array, where: str) -> None:
    """Delete the arrays :func:`clear` set aside under ``z`` (its write is complete); what
    cannot be deleted stays, with a warning naming it."""
    root = _local_root(z.store) if isinstance(z.store, zarr.storage.LocalStore) else None
    if root is None:
        return
    aside = os.path.join(root, z.path or "", REPLACED_DIR)
    if not os.path.isdir(aside):
        return
    failed: list[str] = []
    shutil.rmtree(aside, onerror=lambda _f, p, _e: failed.append(p))
    if failed:
        warnings.warn(f"to_zarr: {where} is complete, but {len(failed)} file(s) of the array it "
                      f"replaced could not be deleted (first: {failed[0]!r}); delete "
                      f"{aside!r} by hand", stacklevel=2)


def _remove_empty(generation: str) -> None:
    for folder in (generation, os.path.dirname(generation)):
        try:
            os.rmdir(folder)
        except OSError:
            return


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
# done-markers (and the record in attrs["daskpatch"]; the fingerprint: daskpatch._fingerprint)
# --------------------------------------------------------------------------------------------


def window_digest(array: np.ndarray | None) -> str | None:
    """A short hash of a user window (shape, dtype, values); here for blend's import."""
    if array is None:
        return None
    a = np.ascontiguousarray(array)
    h = hashlib.sha256(f"{a.shape}{a.dtype.str}".encode())
    h.update(a.tobytes())
    return "sha256:" + h.hexdigest()[:32]


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


def parse_compressors(value: Any, dtype: Any) -> tuple:
    """The compressors zarr makes of ``value`` for ``dtype`` (``"auto"``: zarr's default), or a
    ValueError naming the parameter: checked on an array in memory, before anything is written.

    Examples
    --------
    >>> parse_compressors(None, "f4")
    ()
    >>> parse_compressors("lz5", "f4")
    Traceback (most recent call last):
    ...
    ValueError: compressors='lz5' is not something zarr compresses with ...
    """
    try:
        zarr.create_array(store={}, shape=(1,), chunks=(1,), dtype=dtype, compressors=None,
                          zarr_format=3)
    except Exception as err:  # the dtype, not the codec
        raise ParameterTypeError(
            f"dtype {np.dtype(dtype)} cannot be stored in a Zarr array (zarr has no data type "
            f"for it: {err}); pass a dtype zarr stores, e.g. float64 or complex128",
            param="dtype", value=str(np.dtype(dtype))) from None
    try:
        probe = zarr.create_array(store={}, shape=(1,), chunks=(1,), dtype=dtype,
                                  compressors=value, zarr_format=3)
    except Exception as err:
        raise ValueError(
            f"compressors={value!r} is not something zarr compresses with ({type(err).__name__}: "
            f"{err}); pass \"auto\" (zarr's default), None (no compression), a codec such as "
            "zarr.codecs.BloscCodec(cname='lz4', shuffle='shuffle'), or a list of codecs"
        ) from None
    return tuple(probe.compressors)


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


