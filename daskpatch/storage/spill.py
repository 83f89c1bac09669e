"""Spill storage: where the halo parts of a spilled engine wait between its tasks."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from typing import Any

import fsspec
import numpy as np
import zarr.storage
from zarr.abc.store import Store

from daskpatch.storage import targets as _targets
from daskpatch.storage import storeio as _storeio
from daskpatch.config import get_bytes
from daskpatch.errors import ParameterError
from daskpatch.geometry.parse import _describe


class Spill:
    """Where spilled block parts wait: raw bytes under ``prefix/<engine name>/`` of a Zarr store.

    Any Zarr store works (a local directory, an object store, the output array's own store), so
    a cluster's workers see the parts wherever they can see the output. The reader knows each
    part's shape and dtype from the geometry, so a part is stored as plain bytes.
    """

    def __init__(self, store: Any, prefix: str = "") -> None:
        self.store, self.prefix = store, prefix.strip("/")

    def __repr__(self) -> str:  # part of the graph's name: the same target gives the same name
        return f"_Spill({self.store!r}, {self.prefix!r})"

    def __dask_tokenize__(self) -> str:
        return repr(self)

    def key(self, name: str, block: tuple[int, ...], target: tuple[int, ...]) -> str:
        part = f"{'.'.join(map(str, block))}-{'.'.join(map(str, target))}"
        return "/".join(p for p in (self.prefix, name, part) if p)

    def put(self, key: str, data: np.ndarray) -> None:
        _storeio.put(self.store, key, np.ascontiguousarray(data).tobytes())

    def get(self, key: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        raw = _storeio.get(self.store, key)
        if raw is None:
            raise FileNotFoundError(f"spilled block part {key!r} is missing from {self.store!r}")
        return np.frombuffer(raw, dtype=dtype).reshape(shape)

    def exists(self, key: str) -> bool:
        """Whether the part ``key`` is stored (a resumed write reuses it)."""
        return _storeio.exists(self.store, key)

    def delete(self, key: str) -> None:
        """Delete one part (once its chunk has read it)."""
        _storeio.delete(self.store, key)

    def clear(self, name: str) -> None:
        """Delete the parts of one engine (after its result is written)."""
        _storeio.delete_dir(self.store, "/".join(p for p in (self.prefix, name) if p))

def check_spill_dir(spill: str | os.PathLike) -> None:
    """Refuse a ``spill`` directory that cannot be written, while the graph is built (the tasks
    would fail much later). Creates nothing: a file is created and removed in the directory, or
    in its nearest existing parent."""
    path = os.path.abspath(os.fspath(spill))
    probe = path
    while not os.path.lexists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ValueError(
            f"spill must be a directory this process can create or write; got {path!r}, but "
            f"{probe!r} is {'a file' if os.path.exists(probe) else 'not a directory'}"
        )
    try:
        _targets.probe_writable(probe)
    except OSError as err:
        raise ValueError(
            f"spill must be a directory this process can create or write; got {path!r}, but "
            f"{probe!r} cannot be written ({err.strerror or err})"
        ) from err


def parse_spill(spill: Any) -> Spill | bool | None:
    """``None``: automatic; ``False``: in memory; ``True``: a temporary directory; a directory
    or a Zarr store: there."""
    if spill is None or spill is False:
        return spill
    if spill is True:
        path = tempfile.mkdtemp(prefix="daskpatch-spill-")
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        return Spill(zarr.storage.LocalStore(path))
    if isinstance(spill, str) and "://" in spill:  # a store every worker reaches
        protocol = spill.split("://", 1)[0]
        try:
            fsspec.get_filesystem_class(protocol)
        except (ValueError, ImportError) as err:
            raise ParameterError(f"spill={spill!r} names no filesystem fsspec knows ({err}); "
                                 "pass a directory, a URL such as 's3://bucket/spill', or a zarr "
                                 "store", param="spill", value=spill) from err
        return Spill(zarr.storage.FsspecStore.from_url(spill))
    if isinstance(spill, (str, os.PathLike)):
        check_spill_dir(spill)
        return Spill(zarr.storage.LocalStore(os.path.abspath(os.fspath(spill))))
    if isinstance(spill, Store):
        return Spill(spill)
    raise TypeError(
        "spill must be None, False, True, a directory path (str or os.PathLike) or a zarr store; "
        f"got {_describe(spill)}"
    )



def spill_bytes() -> float:
    """The halo size above which :func:`daskpatch.to_zarr` spills an engine's halos: the
    ``daskpatch.spill-bytes`` setting of :mod:`dask.config` (bytes, or a string such as
    ``"64 MiB"``; default 128 MiB, see :mod:`daskpatch._config`).

    Examples
    --------
    >>> import dask
    >>> with dask.config.set({"daskpatch.spill-bytes": "1 MiB"}):
    ...     spill_bytes()
    1048576
    """
    return get_bytes("spill-bytes")
