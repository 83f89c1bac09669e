"""Naming Zarr stores: what the user names (a path, URL, store, group or mapping, and a node path
in it) as a store every process reads the same, a location to compare, a node opened for its
metadata only, and the names of the keys daskpatch keeps beside an array.

Under an output array's key prefix :func:`daskpatch.to_zarr` keeps its *fingerprint* (in
``attrs["daskpatch"]``), its done-markers (:mod:`daskpatch.storage.markers`), its writer lease
(:mod:`daskpatch.storage.lease`), and while it runs, *spilled halo parts* under
``.daskpatch-spill/`` and an overwritten array under ``.daskpatch-replaced/``
(:mod:`daskpatch.storage.targets`). Zarr ignores keys it does not know, and they cannot collide
with chunk keys (chunk keys start with ``c`` or a digit).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, MutableMapping
from typing import Any, Literal, TypeAlias

import numpy as np
import zarr
import zarr.errors
import zarr.storage
from zarr.abc.store import Store

from daskpatch.errors import IncompleteWarning, ParameterError, ParameterTypeError
from daskpatch.storage.storeio import get
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
