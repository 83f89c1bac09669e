"""Checks before anything is written or deleted, and the one way an old array is replaced.

Before :func:`daskpatch.to_zarr` creates or deletes anything it checks that the target holds
nothing but a Zarr array (or daskpatch's own leftovers), that no array is its parent, and, for
``overwrite=True``, that every part of the old array can be deleted. An overwritten local array
is set aside (:func:`clear`) until its replacement is complete (:func:`drop_replaced`), and put
back if the write fails (:func:`restore`).
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
import warnings
from typing import Any

import zarr
import zarr.storage
from zarr.abc.store import Store

from daskpatch.errors import TargetExistsError, TargetNotDeletableError, UnsafeTargetError
from daskpatch.storage.storeio import delete_dir, list_prefix, put, run
from daskpatch.storage.stores import (LEASE_KEY, MARKER_DIR, REPLACED_DIR, SPILL_DIR, _join,
                                      _local_root, probe)


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
