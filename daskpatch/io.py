"""Zarr I/O: open volumes lazily, write Dask arrays chunk by chunk, align chunks to the stride.

- :func:`open_volume` wraps a Zarr array (format 2 or 3, any store or URL zarr accepts) in a lazy
  Dask array whose chunks are the Zarr chunks. Building it reads metadata only.
- :func:`to_zarr` writes a Dask (or NumPy, or Zarr) array to a Zarr format 3 array. Every Zarr
  chunk is written by exactly one task, so no lock is needed, and each task records its chunk as
  done right after writing it, so an interrupted write can be finished with ``resume=True``
  without recomputing the chunks already written.
- :func:`aligned_chunks`, :func:`is_stride_aligned` and :func:`rechunk_to_stride` keep chunks on
  the patch-stride grid (the layout the blending engine writes without locks).

Done-markers
------------
In Zarr 3 a chunk equal to the fill value is not written at all, so a missing or all-fill chunk
proves nothing about completion. :func:`to_zarr` therefore keeps its own record under the output
array's key prefix (``<path>/`` in the store, the store root for a root array):

- ``.daskpatch-done/chunks/<i>.<j>...`` -- one tiny object per finished chunk, written by the task
  that wrote the chunk, right after the chunk;
- ``.daskpatch-done/complete`` -- written once every chunk is done; the per-chunk objects are then
  deleted (where the store supports deletes).

Zarr ignores keys it does not know, and they cannot collide with chunk keys (chunk keys start
with ``c`` or a digit). Deleting or overwriting the array removes them with it. (A Zarr array
cannot have child nodes, and a root array has no siblings, so the record is raw keys rather than a
Zarr array.)
"""

from __future__ import annotations

import functools
import logging
import math
import os
import sys
from collections.abc import Callable, MutableMapping, Sequence
from typing import Any, TypeAlias, cast

import dask
import dask.array as da
import dask.local
import dask.threaded
import numpy as np
import zarr
import zarr.storage
from dask.array.core import normalize_chunks
from dask.base import tokenize
from dask.delayed import Delayed
from zarr.abc.store import Store
from zarr.buffer import default_buffer_prototype
from zarr.core.sync import collect_aiterator
from zarr.core.sync import sync as _zarr_sync

from ._validate import _describe, parse_int, parse_per_axis, parse_shape, split_axes
from ._xarray import is_dataarray as _is_dataarray
from .blend import engine_into, spill_bytes, spill_into

__all__ = [
    "DEFAULT_TARGET_BYTES",
    "aligned_chunks",
    "is_stride_aligned",
    "open_volume",
    "rechunk_to_stride",
    "to_numpy",
    "to_zarr",
]

logger = logging.getLogger(__name__)

#: Default chunk size target for :func:`aligned_chunks` (zarr advises 1-16 MB per chunk).
DEFAULT_TARGET_BYTES: int = 8 * 2**20

#: Anything :func:`zarr.open` accepts as a store, plus an open :class:`zarr.Group`.
StoreLike: TypeAlias = (
    "str | os.PathLike[str] | Store | zarr.storage.StorePath | zarr.Group"
    " | MutableMapping[str, Any]"
)

_MARKER_DIR = ".daskpatch-done"
_SPILL_DIR = ".daskpatch-spill"
_STORE_TYPES = "a path or URL string, an os.PathLike, a zarr store, a zarr.Group or a mapping"


# --------------------------------------------------------------------------------------------
# argument helpers
# --------------------------------------------------------------------------------------------


def _parse_bool(value: Any, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False; got {_describe(value)}")
    return bool(value)


def _parse_path(value: Any, name: str = "path") -> str | None:
    """``None`` or a node path inside the store, without leading/trailing slashes."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{name} must be None or a string naming a node in the store; got "
                        f"{_describe(value)}")
    value = value.strip("/")
    return value or None


def _join(*parts: str | None) -> str | None:
    out = "/".join(p.strip("/") for p in parts if p and p.strip("/"))
    return out or None


def _resolve_store(store: Any, path: str | None, name: str = "store") -> tuple[Any, str | None]:
    """Split ``store`` into something :func:`zarr.open` accepts and a path from its root."""
    if isinstance(store, zarr.Array):
        raise TypeError(
            f"{name} must be {_STORE_TYPES}; got a zarr.Array ({store!r}); pass its store and "
            "path instead"
        )
    if isinstance(store, zarr.Group):
        return store.store, _join(store.path, path)
    if isinstance(store, os.PathLike):
        return os.fspath(store), path
    if isinstance(store, (str, Store, zarr.storage.StorePath, MutableMapping)):
        return store, path
    raise TypeError(f"{name} must be {_STORE_TYPES}; got {_describe(store)}")


def _store_name(store: Any) -> str:
    if isinstance(store, (str, Store, zarr.storage.StorePath)):
        return repr(str(store))  # a path, URL or "file://..." / "memory://..."
    return f"<{type(store).__name__} at {id(store):#x}>"  # a mapping: never print its content


def _where(store: Any, path: str | None) -> str:
    where = f"store {_store_name(store)}"
    return f"path {path!r} of {where}" if path else f"the root of {where}"


def _probe(store: Any, path: str | None) -> zarr.Array | zarr.Group | None:
    """The node at ``path`` (opened read-only, metadata only), or ``None`` if there is none."""
    kwargs = {} if path is None else {"path": path}
    try:
        return zarr.open(store=store, mode="r", **kwargs)
    except FileNotFoundError:  # zarr's NodeNotFoundError and a missing local directory
        return None


def _array_names(group: zarr.Group) -> list[str]:
    return sorted(name for name, _ in group.arrays())


def _open_array(store: Any, path: Any, name: str = "store") -> zarr.Array:
    """The Zarr array ``store``/``path`` names, or a clear error; reads metadata only."""
    path = _parse_path(path)
    if isinstance(store, zarr.Array):
        if path is not None:
            raise ValueError(
                f"path must be None when {name} is a zarr.Array (the array is already chosen); "
                f"got path={path!r}"
            )
        return store
    base, full = _resolve_store(store, path, name)
    node = _probe(base, full)
    if node is None:
        raise FileNotFoundError(f"no Zarr array or group at {_where(base, full)}")
    if isinstance(node, zarr.Group):
        arrays = _array_names(node)
        hint = f"path= one of {arrays}" if arrays else "path= naming an array (it has no arrays)"
        raise ValueError(
            f"{name}/path must name a Zarr array, but {_where(base, full)} holds a group; pass "
            f"{hint}"
        )
    return node


# --------------------------------------------------------------------------------------------
# open_volume
# --------------------------------------------------------------------------------------------


def open_volume(store: StoreLike | zarr.Array, path: str | None = None, *, level: int = 0,
                xarray: bool = False) -> Any:
    """Open a Zarr array or an OME-Zarr image as a lazy Dask array whose chunks are the Zarr chunks.

    Only metadata is read here; chunks are read by the tasks that need them. An OME-Zarr image
    group (NGFF 0.4 on Zarr v2, 0.5 on Zarr v3, or a ``bioformats2raw`` layout) opens its
    multiscale level ``level``, at the dataset path its metadata names (``0``, ``s0``, ...).

    Parameters
    ----------
    store : str, os.PathLike, zarr store, mapping, zarr.Group or zarr.Array
        A local directory, an fsspec URL (``"s3://bucket/vol.zarr"``), any store
        :func:`zarr.open` accepts, an open group (then ``path`` picks the array inside it), or an
        open array. Zarr format 2 and 3 both read.
    path : str, optional
        Path of the array (or OME-Zarr image group) inside the store or group; ``None`` for the
        root. Must be ``None`` when ``store`` is a :class:`zarr.Array`.
    level : int, default 0
        Multiscale level of an OME-Zarr image (0 is full resolution). Must be 0 for an array.
    xarray : bool, default False
        Return an ``xarray.DataArray`` over the same lazy Dask array (needs ``xarray``). For an
        OME-Zarr image: dims named after the axes; coordinates ``translation + scale * index``
        per axis (the dataset's and the multiscale's transformations combined; a channel axis
        gets its integer index), each with its unit in ``attrs["units"]``; the OME axes (names,
        types, units), version, level and path in ``attrs["ome"]``. For a plain array: dims
        from Zarr v3 ``dimension_names`` (or xarray's ``_ARRAY_DIMENSIONS`` in Zarr v2),
        ``dim_0``, ``dim_1``, ... otherwise, no coordinates, the array's attributes as attrs.

    Returns
    -------
    dask.array.Array or xarray.DataArray
        Lazy, with ``chunks`` equal to the Zarr chunks (inner chunks for a sharded array).

    Raises
    ------
    TypeError
        ``store`` or ``path`` is of an unsupported type.
    FileNotFoundError
        Nothing exists at ``store``/``path``.
    ValueError
        ``store``/``path`` names a group that is no OME-Zarr image (the message lists its
        arrays), an OME-Zarr image that daskpatch has not finished writing, a ``level`` the
        image does not have (the message lists its levels), or ``path`` is given with a
        :class:`zarr.Array`.

    Examples
    --------
    >>> import tempfile, numpy as np, zarr
    >>> tmp = tempfile.TemporaryDirectory()
    >>> z = zarr.create_array(f"{tmp.name}/vol.zarr", name="raw", shape=(6, 8), chunks=(3, 4),
    ...                       dtype="uint8")
    >>> z[:] = np.arange(48).reshape(6, 8)
    >>> vol = open_volume(f"{tmp.name}/vol.zarr", path="raw")
    >>> vol.chunks
    ((3, 3), (4, 4))
    >>> int(vol.sum().compute())
    1128
    >>> open_volume(f"{tmp.name}/vol.zarr")
    Traceback (most recent call last):
    ...
    ValueError: store/path must name a Zarr array, but ... holds a group; pass path= one of ['raw']
    >>> tmp.cleanup()
    """
    from ._ome import open_volume as _open_ome_or_array

    return _open_ome_or_array(store, path, level=level, xarray=xarray)


# --------------------------------------------------------------------------------------------
# done-markers (raw keys under the output array's prefix; see the module docstring)
# --------------------------------------------------------------------------------------------


def _marker_dir(z: zarr.Array) -> str:
    return _join(z.path, _MARKER_DIR)  # type: ignore[return-value]


def _chunk_marker(z: zarr.Array, loc: Sequence[int]) -> str:
    return f"{_marker_dir(z)}/chunks/{'.'.join(map(str, loc))}"


def _complete_marker(z: zarr.Array) -> str:
    return f"{_marker_dir(z)}/complete"


def _put(store: Store, key: str) -> None:
    _zarr_sync(store.set(key, default_buffer_prototype().buffer.from_bytes(b"1")))


def _exists(store: Store, key: str) -> bool:
    return bool(_zarr_sync(store.exists(key)))


def _delete_dir(store: Store, prefix: str) -> None:
    if store.supports_deletes:
        _zarr_sync(store.delete_dir(prefix))


def _done_chunks(z: zarr.Array, numblocks: tuple[int, ...]) -> set[tuple[int, ...]] | None:
    """Chunk locations recorded as done; ``None`` when the whole array is recorded complete."""
    store = z.store
    if _exists(store, _complete_marker(z)):
        return None
    prefix = f"{_marker_dir(z)}/chunks/"
    done: set[tuple[int, ...]] = set()
    if store.supports_listing:
        for key in collect_aiterator(store.list_prefix(prefix)):
            try:
                loc = tuple(int(p) for p in key[len(prefix):].split("."))
            except ValueError:
                continue
            if len(loc) == len(numblocks) and all(0 <= i < n for i, n in zip(loc, numblocks)):
                done.add(loc)
    else:  # pragma: no cover - every writable zarr store lists
        for loc in np.ndindex(*numblocks):
            if _exists(store, _chunk_marker(z, loc)):
                done.add(loc)
    return done


def _write_block(block: np.ndarray, z: zarr.Array, block_info: Any = None) -> np.ndarray:
    """Write one block (exactly one Zarr chunk) and then record it as done."""
    info = block_info[0]
    region = tuple(slice(start, stop) for start, stop in info["array-location"])
    z[region] = block
    _put(z.store, _chunk_marker(z, info["chunk-location"]))
    return np.ones((1,) * block.ndim, dtype=np.uint8)


def _finalize(z: zarr.Array, spills: list, written: list[Any]) -> zarr.Array:
    """Runs after every write task: record the array as complete, drop per-chunk markers and
    the spilled block parts of the engines that made the array."""
    _put(z.store, _complete_marker(z))
    _delete_dir(z.store, f"{_marker_dir(z)}/chunks")
    for spill, name in spills:
        spill.clear(name)
    return z


# --------------------------------------------------------------------------------------------
# to_zarr
# --------------------------------------------------------------------------------------------


def _as_dask(array: Any) -> da.Array:
    if isinstance(array, da.Array):
        x = array
    elif isinstance(array, zarr.Array):
        x = da.from_zarr(array)
    elif isinstance(array, np.ndarray):
        chunks = normalize_chunks(
            "auto", array.shape, limit=DEFAULT_TARGET_BYTES, dtype=array.dtype
        )
        x = da.from_array(array, chunks=chunks)
    else:
        raise TypeError(
            f"array must be a dask array, a NumPy array or a zarr.Array; got {type(array).__name__}"
        )
    if x.ndim == 0:
        raise ValueError("array must have at least one axis; got a 0-d array")
    if any(math.isnan(s) for s in x.shape):
        raise ValueError(
            f"array must have known chunk sizes to be written to Zarr; got shape {x.shape} "
            "(call array.compute_chunk_sizes() first)"
        )
    return x


def _zarr_sources(x: da.Array) -> list[zarr.Array]:
    """The Zarr arrays ``x`` reads directly (``from_zarr``/``from_array`` layers)."""
    found = []
    for name, layer in x.dask.layers.items():
        if name.startswith("original-") and len(layer) == 1:
            found.extend(v for v in dict(layer).values() if isinstance(v, zarr.Array))
    return found


def _is_regular(c: tuple[int, ...]) -> bool:
    """Zarr-compatible: all chunks equal but the last, which is not larger."""
    return len(c) <= 1 or (all(v == c[0] for v in c[:-1]) and c[-1] <= c[0])


def _write_chunks(x: da.Array, chunks: Any) -> tuple[da.Array, tuple[int, ...]]:
    """The Zarr chunk shape, and ``x`` rechunked so its blocks are exactly the Zarr chunks."""
    if chunks is None:
        if all(_is_regular(c) for c in x.chunks):
            return x, tuple(max(c[0], 1) for c in x.chunks)
        target = tuple(max(max(c), 1) for c in x.chunks)
    else:
        target = parse_per_axis(chunks, x.ndim, "chunks")
    return x.rechunk(target), target


def _check_resumable(z: zarr.Array, x: da.Array, chunks: tuple[int, ...], where: str) -> None:
    problems = []
    if tuple(z.shape) != tuple(x.shape):
        problems.append(f"shape {tuple(z.shape)} (this write: {tuple(x.shape)})")
    if np.dtype(z.dtype) != x.dtype:
        problems.append(f"dtype {np.dtype(z.dtype)} (this write: {x.dtype})")
    if tuple(z.chunks) != chunks:
        problems.append(f"chunks {tuple(z.chunks)} (this write: {chunks}; pass chunks= to match)")
    if getattr(z, "shards", None) is not None:
        problems.append(f"shards {z.shards} (to_zarr writes unsharded arrays)")
    if problems:
        raise ValueError(
            f"resume=True needs the existing array at {where} to match this write, but it has "
            + "; ".join(problems)
            + ". Pass overwrite=True to start again."
        )


def _active_client() -> Any | None:
    """The distributed Client that ``compute()`` would use now, or ``None`` (local scheduler)."""
    if "distributed" not in sys.modules:  # no Client without it (and importing it costs 0.3 s)
        return None
    scheduler = dask.config.get("scheduler", None)
    if scheduler is not None:
        if "Client" in type(scheduler).__name__:
            return scheduler
        if not (isinstance(scheduler, str) and scheduler in ("distributed", "dask.distributed")):
            return None
    try:
        from distributed import get_client
    except ImportError:
        return None
    try:
        return get_client()
    except ValueError:
        return None


def _local_get() -> Callable | None:
    """The local scheduler (threads or synchronous) that ``compute()`` would use now, else
    ``None`` (a distributed Client, processes)."""
    scheduler = dask.config.get("scheduler", None)
    if scheduler is None:
        return None if _active_client() is not None else dask.threaded.get
    if isinstance(scheduler, str):
        return {"threads": dask.threaded.get, "threading": dask.threaded.get,
                "sync": dask.local.get_sync, "synchronous": dask.local.get_sync,
                "single-threaded": dask.local.get_sync}.get(scheduler.lower())
    if scheduler in (dask.threaded.get, dask.local.get_sync):
        return scheduler
    return None


def _compute(obj: Delayed, progress: bool, **kwargs: Any) -> Any:
    if not progress:
        return obj.compute(**kwargs)
    client = _active_client()
    if client is not None:
        from distributed import progress as distributed_progress

        future = client.compute(obj)
        bar = distributed_progress(future)  # blocks in a console; a widget in a notebook
        if bar is not None:
            try:
                from IPython.display import display

                display(bar)
            except ImportError:  # pragma: no cover - a notebook always has IPython
                pass
        return future.result()
    from dask.diagnostics import ProgressBar

    with ProgressBar():
        return obj.compute(**kwargs)


def to_zarr(
    array: Any,
    store: StoreLike,
    path: str | None = None,
    *,
    chunks: int | Sequence[int] | None = None,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = False,
    compute: bool = True,
    ome: bool = False,
    levels: int = 1,
    axes: Any = None,
    scale: Any = None,
    units: Any = None,
    downsample: str = "auto",
    _dimension_names: Sequence[str] | None = None,
) -> zarr.Array | zarr.Group | Delayed:
    """Write an array to a Zarr (format 3) array, one task per Zarr chunk, resumably.

    Every Zarr chunk is written by exactly one task, so writes need no lock; each task records its
    chunk as done right after writing it (see *Done-markers* in the module docstring), so an
    interrupted write can be finished with ``resume=True``.

    Parameters
    ----------
    array : dask.array.Array, numpy.ndarray, zarr.Array or xarray.DataArray
        Data to write (at least 1-D, known shape). A NumPy array is split into chunks of about
        :data:`DEFAULT_TARGET_BYTES`. A DataArray's dims become the Zarr v3
        ``dimension_names`` (and, with ``ome=True``, its coordinates the axes' scale,
        translation and units).
    store : str, os.PathLike, zarr store, mapping or zarr.Group
        Where to write: a local directory, an fsspec URL, any store :func:`zarr.create_array`
        accepts, or an open group (then ``path`` is relative to it).
    path : str, optional
        Path of the array inside the store; ``None`` writes a root array.
    chunks : int or sequence of int, optional
        Zarr chunk shape (an int applies to every axis); the Dask array is rechunked to it.
        ``None`` keeps the Dask chunks when they are regular (all equal but a smaller last one,
        per axis), otherwise uses the largest chunk per axis and rechunks to it, so that each Zarr
        chunk is written by one task.
    overwrite : bool, default False
        Replace an existing array at ``store``/``path``. With ``False`` an existing array raises
        :class:`FileExistsError` and nothing is written. An existing *group* is never replaced.
    resume : bool, default False
        Finish an interrupted write: the existing array must have the same shape, dtype and
        chunks; only chunks not recorded as done are computed and written. The result is
        bit-identical to an uninterrupted write. With no existing array this is a fresh write.
        Excludes ``overwrite=True``.
    progress : bool, default False
        Show a progress bar: :func:`distributed.progress` when a ``distributed.Client`` is the
        active scheduler, else :class:`dask.diagnostics.ProgressBar`. Needs ``compute=True``.
    compute : bool, default True
        ``False`` returns a :class:`dask.delayed.Delayed` to compute later (``.compute()``,
        ``dask.compute`` or ``Client.compute``); the array's metadata is created now, but no
        chunk is computed or written until then.
    ome : bool, default False
        Write an OME-Zarr 0.5 image instead of a bare array: a Zarr v3 group at
        ``store``/``path`` with the array as level ``0`` and its ``multiscales`` metadata (axes
        with names, types and units; scale and translation per level). Each level is written
        like a bare array (done-markers, ``resume``); the metadata is written last, so an
        interrupted image is recognisably incomplete and ``resume=True`` finishes it.
        ``overwrite=True`` replaces an array or an image daskpatch wrote, never another group.
    levels : int, default 1
        With ``ome=True``, the number of pyramid levels: level ``k`` halves (rounding up) every
        space axis of level ``k - 1`` that has at least 2 voxels, and is computed lazily, chunk
        by chunk, from the written level above, so memory stays bounded. Every level covers the
        same physical extent (``shape * scale``).
    axes : str or sequence, optional
        With ``ome=True``, the axis names (``"czyx"``, or a sequence of names, or of dicts with
        ``name``, ``type`` -- ``"space"``, ``"channel"`` or ``"time"`` -- and ``unit``). Default:
        a DataArray's dims, else the NGFF default names (``"zyx"`` for 3-D, ...). Types not given
        are inferred from names (``t``/``time``: time, ``c``/``channel``: channel, else space).
        NGFF 0.5 needs 2 to 5 axes: 2 or 3 space axes last, at most one channel axis before
        them and at most one time axis first.
    scale : sequence or mapping of float, optional
        With ``ome=True``, the voxel size of level 0 per axis (or ``{name: size}``). Default:
        the spacing of a DataArray's evenly spaced coordinates (their first value becomes the
        translation), else 1.
    units : sequence or mapping of str, optional
        With ``ome=True``, the unit per axis (or ``{name: unit}``; NGFF names such as
        ``"micrometer"``, ``"millisecond"``). Default: a DataArray's coordinate
        ``attrs["units"]``, or its ``attrs["ome"]`` axes.
    downsample : {"auto", "mean", "mode"}, default "auto"
        How a level reduces each 2x box of the level above: ``"mean"`` (rounded for integers),
        ``"mode"`` (the most frequent value, the smallest on a tie: keeps label ids), or
        ``"auto"``: mean for floating dtypes, mode for integer and boolean ones (labels; pass
        ``"mean"`` for integer intensity images).

    Returns
    -------
    zarr.Array, zarr.Group or dask.delayed.Delayed
        With ``compute=True``, the written Zarr array (with ``ome=True``, the image group). With
        ``compute=False``, a ``Delayed`` whose result is that array or group (``ome=True`` then
        needs ``levels=1``: a level is computed from the level above once it is written).

    Raises
    ------
    TypeError
        An argument is of the wrong type.
    ValueError
        A bad value: ``overwrite`` and ``resume`` both set, ``progress`` without ``compute``,
        bad ``chunks``, an array with unknown chunk sizes, a group at the target, an array as
        the target's parent, or (``resume=True``) an existing array that does not match.
    FileExistsError
        An array exists at the target and neither ``overwrite`` nor ``resume`` is set.

    Notes
    -----
    The result of :func:`~daskpatch.apply_patches` or :func:`~daskpatch.reconstruct` built with
    ``spill=None`` (the default) has its halos -- the parts of a block's buffer that belong to
    neighbouring chunks -- written under ``<array path>/.daskpatch-spill/`` of the output store
    while it runs, when they total more than the ``daskpatch.spill-bytes`` setting of
    :mod:`dask.config` (default 128 MiB; e.g. ``dask.config.set({"daskpatch.spill-bytes":
    "1 GiB"})``), so peak memory depends on the block size and threads, not on the volume; the
    parts are deleted once every chunk is written (and left for ``resume=True`` after an
    interruption). The spilled computation is a graph of its own (new task names for the engine
    and everything computed from it), so the same array computed at the same time on the same
    cluster (a kept ``client.compute`` future) is not disturbed.

    Every argument is checked, and the target probed, before anything is created in the store.
    An input that reads the target array directly (``open_volume`` of the same array) is
    refused; one that reads it through some other path is not detected -- do not do that.

    Examples
    --------
    >>> import tempfile, numpy as np, dask.array as da
    >>> tmp = tempfile.TemporaryDirectory()
    >>> x = da.arange(60, dtype="int32").reshape(6, 10).rechunk((3, 4))
    >>> z = to_zarr(x, f"{tmp.name}/out.zarr", path="pred")
    >>> z.chunks, int(z[5, 9])
    ((3, 4), 59)
    >>> to_zarr(x, f"{tmp.name}/out.zarr", path="pred")
    Traceback (most recent call last):
    ...
    FileExistsError: to_zarr: an array already exists at path 'pred' of store ...; pass
    overwrite=True to replace it, or resume=True to finish an interrupted write
    >>> job = to_zarr(x + 1, f"{tmp.name}/out.zarr", path="pred", overwrite=True, compute=False)
    >>> int(job.compute()[5, 9])
    60
    >>> img = to_zarr(da.ones((16, 40, 40), chunks=8), f"{tmp.name}/img.zarr", ome=True,
    ...               levels=3, scale=(2.0, 0.5, 0.5), units={"z": "micrometer"})
    >>> [img[k].shape for k in ("0", "1", "2")]
    [(16, 40, 40), (8, 20, 20), (4, 10, 10)]
    >>> open_volume(img, level=2, xarray=True).coords["z"].values
    array([ 3., 11., 19., 27.])
    >>> tmp.cleanup()
    """
    if ome is not False or levels != 1 or axes is not None or scale is not None or \
            units is not None or downsample != "auto" or _is_dataarray(array):
        from ._ome import write as _write_ome

        return _write_ome(
            to_zarr, array, store, path, chunks=chunks, overwrite=overwrite, resume=resume,
            progress=progress, compute=compute, ome=ome, levels=levels, axes=axes,
            scale=scale, units=units, downsample=downsample,
        )
    overwrite = _parse_bool(overwrite, "overwrite")
    resume = _parse_bool(resume, "resume")
    progress = _parse_bool(progress, "progress")
    compute = _parse_bool(compute, "compute")
    if overwrite and resume:
        raise ValueError(
            "overwrite=True and resume=True exclude each other (overwrite starts again, resume "
            "keeps the chunks already written); got both"
        )
    if progress and not compute:
        raise ValueError(
            "progress=True needs compute=True; with compute=False wrap your own compute in "
            "dask.diagnostics.ProgressBar or distributed.progress"
        )
    path = _parse_path(path)
    threshold = spill_bytes()  # the setting is checked before anything is written
    x = _as_dask(array)
    x, zchunks = _write_chunks(x, chunks)
    base, full = _resolve_store(store, path)
    where = _where(base, full)

    # Probe before creating anything: the target itself, then its parents.
    node = _probe(base, full)
    if isinstance(node, zarr.Group):
        raise ValueError(
            f"to_zarr: {where} is a group; to_zarr never replaces a group (with its children). "
            "Pass path= naming an array inside it"
        )
    if node is not None and not (overwrite or resume):
        raise FileExistsError(
            f"to_zarr: an array already exists at {where}; pass overwrite=True to replace it, or "
            "resume=True to finish an interrupted write"
        )
    if full is not None:
        parts = full.split("/")
        for i in range(len(parts)):
            parent = "/".join(parts[:i]) or None
            if isinstance(_probe(base, parent), zarr.Array):
                raise ValueError(
                    f"to_zarr: cannot create an array at {where}: its parent "
                    f"{parent or '(the root)'!r} is an array, and only groups have children"
                )
    if resume and node is not None:
        _check_resumable(node, x, zchunks, where)
    target_location = _location(base, full)
    for source in _zarr_sources(x):
        if _location(source.store, source.path or None) == target_location:
            raise ValueError(
                f"to_zarr: the input array reads from {where}, which this call would write; "
                "write to another path (rechunk_to_stride copies an array to new chunks)"
            )

    # Create (or reopen for writing).
    if resume and node is not None:
        z = zarr.open_array(store=base, path=full or "", mode="r+")
        done = _done_chunks(z, x.numblocks)
    else:
        z = zarr.create_array(
            store=base, name=full, shape=x.shape, dtype=x.dtype, chunks=zchunks,
            overwrite=overwrite, zarr_format=3, dimension_names=_dimension_names,
        )
        _delete_dir(z.store, _marker_dir(z))  # stale markers of a hand-deleted array
        _delete_dir(z.store, _join(z.path, _SPILL_DIR) or _SPILL_DIR)  # and stale spilled parts
        done = set()
    n_total = math.prod(x.numblocks)
    if done is None:
        logger.info("to_zarr: %s is already complete; nothing to compute", where)
    elif resume and node is not None:
        logger.info("to_zarr: resuming %s: %d of %d chunks already done", where, len(done),
                    n_total)

    # Overlap-add engines (apply_patches, reconstruct) built with spill=None send the halos
    # their blocks hand to neighbouring chunks into the output store when they are large, so
    # memory stays bounded whatever the volume; the parts are deleted once all is written.
    # (Not into a store in RAM: parts would stay there until the end instead of being freed.)
    if not isinstance(z.store, zarr.storage.MemoryStore):
        x, spills = spill_into(x, z.store, _join(z.path, _SPILL_DIR) or _SPILL_DIR,
                               threshold=threshold)
    else:
        x, spills = spill_into(x, None, "", threshold=math.inf)
    token = tokenize(x.name, str(z.store), z.path, zchunks)
    todo = []
    if done is not None and len(done) < n_total:
        # One task per chunk: compute the block, write it, mark it done. Computing only the
        # keys of the chunks not done culls the rest of the graph (their inputs included).
        written = x.map_blocks(
            functools.partial(_write_block, z=z),
            chunks=tuple((1,) * n for n in x.numblocks),
            dtype=np.uint8,
            meta=np.empty((0,) * x.ndim, dtype=np.uint8),
            name=f"to-zarr-write-{token}",
        )
        parts = written.to_delayed(optimize_graph=True)
        todo = [d for loc, d in np.ndenumerate(parts) if loc not in done]
    job = dask.delayed(functools.partial(_finalize, z, spills), pure=False)(
        todo, dask_key_name=f"to-zarr-finalize-{tokenize(token, sorted(done or ()))}"
    )
    if not compute:
        return job
    _compute(job, progress)
    return z


def to_numpy(array: da.Array, out: np.ndarray | None = None, *, progress: bool = False
             ) -> np.ndarray:
    """Compute a Dask array into one NumPy array, each chunk written in place as it finishes.

    ``array.compute()`` keeps every chunk until the last one is done and then concatenates them:
    twice the result in memory. Here chunks go into the result as they finish, so the peak is the
    result plus what the running tasks hold. The result of :func:`~daskpatch.apply_patches` or
    :func:`~daskpatch.reconstruct` (float results with a built-in window) is accumulated straight
    into it, with no halo or chunk tasks: blocks run one after another in C order (the same sums
    on every run), each splitting its batch copies and accumulation across the scheduler's
    threads, so one batch is in memory at a time. Overlaps are summed in another order than
    ``compute()``'s: results agree to the last bits of float rounding.

    Parameters
    ----------
    array : dask.array.Array
        What to compute.
    out : numpy.ndarray, optional
        Where to write: a writable array of ``array``'s shape and dtype (its content is
        replaced). ``None`` allocates one.
    progress : bool, default False
        Show a progress bar (as :func:`to_zarr`).

    Returns
    -------
    numpy.ndarray
        ``out``, or the new array.

    Notes
    -----
    Shared memory needs the local (threaded or synchronous) scheduler; under a
    ``distributed.Client`` the chunks travel back to this process and this is ``compute()``.

    Examples
    --------
    >>> import numpy as np, daskpatch as dp
    >>> vol = np.random.default_rng(0).random((40, 30), dtype=np.float32)
    >>> res = to_numpy(dp.apply_patches(vol, lambda b: 2 * b, 16, 8, batch_size=4))
    >>> bool(np.allclose(res, 2 * vol, atol=1e-5))
    True
    """
    if not isinstance(array, da.Array):
        raise TypeError(f"array must be a dask.array.Array; got {_describe(array)}")
    progress = _parse_bool(progress, "progress")
    if any(math.isnan(n) for n in array.shape):
        raise ValueError(f"array must have known chunk sizes; got shape {array.shape} (call "
                         "compute_chunk_sizes() first)")
    fresh = out is None
    if out is None:
        out = np.zeros(array.shape, dtype=array.dtype)  # pages are touched by the tasks
    elif not isinstance(out, np.ndarray) or out.shape != array.shape or out.dtype != array.dtype \
            or not out.flags.writeable:
        got = (f"a numpy.ndarray of shape {out.shape}, dtype {out.dtype}, writeable="
               f"{out.flags.writeable}" if isinstance(out, np.ndarray) else _describe(out))
        raise ValueError(f"out must be a writable numpy.ndarray of shape {array.shape} and dtype "
                         f"{array.dtype}; got {got}")
    get = _local_get()
    if get is None:  # no shared memory with the workers
        out[...] = _compute(cast(Delayed, array), progress)
        return out
    workers = dask.config.get("num_workers", None) or os.cpu_count() or 1
    direct = engine_into(array, out, 1 if get is dask.local.get_sync else workers)
    if direct is not None:
        job, close = direct
        if not fresh:
            out[...] = 0
        try:
            _compute(job, progress, scheduler=get)
        finally:
            close()
        return out
    _compute(da.store(array, out, lock=False, compute=False), progress, scheduler=get)
    return out


# --------------------------------------------------------------------------------------------
# stride alignment
# --------------------------------------------------------------------------------------------


def _spatial_layout(
    ndim: int, stride: Any, channel_axis: Any
) -> tuple[int | None, tuple[int, ...], tuple[int, ...]]:
    """(channel axis, spatial axes, per-spatial-axis stride) of an ``ndim``-D array.

    The spatial axes are the last ``len(stride)`` non-channel axes (all of them for an int);
    earlier non-channel axes are batch axes.
    """
    ch, _, k = split_axes(ndim, stride, channel_axis, name="array", param="stride")
    nonchannel = [i for i in range(ndim) if i != ch]
    strides = parse_per_axis(stride, k, "stride")
    return ch, tuple(nonchannel[len(nonchannel) - k:]), strides


def aligned_chunks(
    shape: Sequence[int],
    stride: int | Sequence[int],
    itemsize: int,
    *,
    target_bytes: int = DEFAULT_TARGET_BYTES,
    channel_axis: int | None = None,
) -> tuple[int, ...]:
    """A chunk shape on the stride grid, roughly isotropic, near a byte target.

    On each spatial axis the chunk is a multiple of the stride, capped at the axis length (a
    chunk that covers the whole axis has no interior boundary, so it is aligned whatever its
    length). Chunks grow as evenly as they can (in voxels) while the chunk stays within
    ``target_bytes``; one stride per axis is the minimum even when it exceeds the target.
    The channel axis is kept whole; batch axes (non-channel axes before the spatial ones, when
    ``stride`` has fewer entries) get chunk 1.

    Parameters
    ----------
    shape : sequence of int
        Full array shape, channel and batch axes included.
    stride : int or sequence of int
        Patch stride, an int (every spatial axis) or one per spatial axis (the last
        ``len(stride)`` non-channel axes).
    itemsize : int
        Bytes per element (``dtype.itemsize``).
    target_bytes : int, default 8 MiB
        Byte budget per chunk (zarr advises 1-16 MB).
    channel_axis : int, optional
        Channel axis, kept whole in every chunk.

    Returns
    -------
    tuple of int
        The chunk shape, one entry per axis of ``shape``.

    Examples
    --------
    >>> aligned_chunks((512, 512, 512), 64, 4)
    (128, 128, 128)
    >>> aligned_chunks((3, 1000, 1000), (48, 48), 1, target_bytes=2**20, channel_axis=0)
    (3, 576, 576)
    >>> aligned_chunks((100, 40), 64, 2)
    (100, 40)
    """
    shape = parse_shape(shape, "shape")
    itemsize = parse_int(itemsize, "itemsize", minimum=1)
    target_bytes = parse_int(target_bytes, "target_bytes", minimum=1)
    ch, spatial, strides = _spatial_layout(len(shape), stride, channel_axis)

    out = [1] * len(shape)
    if ch is not None:
        out[ch] = shape[ch]
    budget = target_bytes / (itemsize * (shape[ch] if ch is not None else 1))  # elements
    lengths = [shape[a] for a in spatial]
    kmax = [-(-n // s) for n, s in zip(lengths, strides)]

    def size(i: int, k: int) -> int:
        return min(k * strides[i], lengths[i])

    # Closed form first: an isotropic cube of side L, with axes that hit a bound fixed there and
    # the budget redistributed over the others. Axes whose single stride exceeds L are fixed
    # first (that shrinks L); only then axes shorter than L are taken whole (that grows L, so
    # it never forces another axis below one stride and the chunk stays within the budget).
    m = len(spatial)
    k = [1] * m
    fixed: dict[int, int] = {}
    while len(fixed) < m:
        free = [i for i in range(m) if i not in fixed]
        side = (budget / math.prod(size(i, fixed[i]) for i in fixed)) ** (1 / len(free))
        hit = {i: 1 for i in free if side <= strides[i]}
        if not hit:
            hit = {i: kmax[i] for i in free if side >= lengths[i]}
        if not hit:
            for i in free:
                k[i] = min(kmax[i], max(1, int(side // strides[i])))
            break
        fixed.update(hit)
    for i, ki in fixed.items():
        k[i] = ki
    # Then grow the smallest chunk by one stride while the budget allows (near the target).
    for _ in range(sum(kmax)):
        total = math.prod(size(i, k[i]) for i in range(m))
        grow = [
            i for i in range(m)
            if k[i] < kmax[i] and total // size(i, k[i]) * size(i, k[i] + 1) <= budget
        ]
        if not grow:
            break
        i = min(grow, key=lambda i: (size(i, k[i]), -i))
        k[i] += 1
    for i, a in enumerate(spatial):
        out[a] = size(i, k[i])
    return tuple(out)


def is_stride_aligned(
    chunks: Sequence[int | Sequence[int]],
    stride: int | Sequence[int],
    *,
    shape: Sequence[int] | None = None,
    channel_axis: int | None = None,
) -> bool:
    """Whether every chunk boundary on every spatial axis falls on the stride grid.

    Parameters
    ----------
    chunks : array, or sequence of int or of sequences of int
        An array (Dask, Zarr or NumPy: its ``chunks`` and ``shape`` are used; a NumPy array is one
        chunk), a Zarr chunk shape (one int per axis), or Dask ``chunks`` (one tuple of block
        lengths per axis); both may be mixed.
    stride : int or sequence of int
        Patch stride, as in :func:`aligned_chunks`.
    shape : sequence of int, optional
        The array shape. With it, a Zarr chunk at least as long as its axis counts as aligned
        (it has no interior boundary). Dask chunks carry their own shape.
    channel_axis : int, optional
        Channel axis (ignored, like batch axes).

    Returns
    -------
    bool

    Examples
    --------
    >>> is_stride_aligned((128, 128), 64)
    True
    >>> is_stride_aligned((100, 128), 64)
    False
    >>> is_stride_aligned((100, 128), 64, shape=(100, 512))
    True
    >>> is_stride_aligned(((64, 64, 20), (96, 4)), (32, 32))
    True
    >>> import dask.array as da
    >>> is_stride_aligned(da.zeros((200, 200), chunks=96), 48)
    True
    """
    if hasattr(chunks, "shape") and hasattr(chunks, "ndim"):  # an array: its chunks and shape
        array = chunks
        if shape is None:
            shape = tuple(int(n) for n in array.shape)
        # NumPy (no chunks): a single chunk
        chunks = getattr(array, "chunks", None) or tuple(int(n) for n in array.shape)
    if isinstance(chunks, (str, bytes)) or not isinstance(chunks, Sequence):
        raise TypeError(f"chunks must be a sequence (one entry per axis) or an array; got "
                        f"{_describe(chunks)}")
    if len(chunks) == 0:
        raise ValueError(f"chunks must have at least one axis; got {tuple(chunks)!r}")
    ndim = len(chunks)
    if shape is not None:
        shape = parse_shape(shape, "shape", minimum=0)
        if len(shape) != ndim:
            raise ValueError(
                f"shape must have one entry per axis of chunks ({ndim}); got {shape}"
            )
    _, spatial, strides = _spatial_layout(ndim, stride, channel_axis)
    for a, s in zip(spatial, strides):
        c = chunks[a]
        if isinstance(c, Sequence) and not isinstance(c, (str, bytes)):
            blocks = [parse_int(v, f"chunks[{a}][{j}]", minimum=0) for j, v in enumerate(c)]
            if any(b % s for b in np.cumsum(blocks[:-1])):
                return False
        else:
            c = parse_int(c, f"chunks[{a}]", minimum=1)
            if shape is not None and c >= shape[a]:
                continue
            if c % s:
                return False
    return True


def _location(store: Any, path: str | None) -> tuple[Any, str | None] | None:
    """A comparable identity of a node location, where one can be worked out."""
    if isinstance(store, str) and "://" not in store:
        return ("file", os.path.realpath(store)), path
    if isinstance(store, zarr.storage.LocalStore):
        return ("file", os.path.realpath(store.root)), path
    if isinstance(store, str):
        return ("url", store.rstrip("/")), path
    return ("object", id(store)), path


def rechunk_to_stride(
    source: StoreLike | zarr.Array,
    stride: int | Sequence[int],
    target: StoreLike,
    *,
    path: str | None = None,
    target_path: str | None = None,
    channel_axis: int | None = None,
    target_bytes: int = DEFAULT_TARGET_BYTES,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = False,
) -> zarr.Array:
    """Copy a Zarr array whose chunks are not on the stride grid into stride-aligned chunks.

    The new chunk shape comes from :func:`aligned_chunks` (with ``target_bytes``); the data is
    rechunked with :meth:`dask.array.Array.rechunk` and written with :func:`to_zarr`. What was
    done (old chunks -> new chunks, or that nothing was needed) is logged at ``INFO`` level on the
    ``daskpatch.io`` logger.

    Parameters
    ----------
    source : str, os.PathLike, zarr store, mapping, zarr.Group or zarr.Array
        The unaligned array, as for :func:`open_volume`.
    stride : int or sequence of int
        Patch stride, as in :func:`aligned_chunks`.
    target : str, os.PathLike, zarr store, mapping or zarr.Group
        Where to write the aligned copy (Zarr format 3), as for :func:`to_zarr`. Must not be
        the source array itself.
    path : str, optional
        Path of the source array inside ``source``.
    target_path : str, optional
        Path of the new array inside ``target``.
    channel_axis : int, optional
        Channel axis, kept whole in every chunk.
    target_bytes : int, default 8 MiB
        Chunk byte budget passed to :func:`aligned_chunks`.
    overwrite, resume, progress : bool, default False
        As in :func:`to_zarr`.

    Returns
    -------
    zarr.Array
        The new aligned array, or the *source* array unchanged (nothing written, ``target``
        untouched) when its chunks are already stride-aligned.

    Examples
    --------
    >>> import tempfile, numpy as np, zarr
    >>> tmp = tempfile.TemporaryDirectory()
    >>> src = zarr.create_array(f"{tmp.name}/src.zarr", shape=(100, 100), chunks=(30, 30),
    ...                         dtype="float32")
    >>> src[:] = np.random.default_rng(0).random((100, 100))
    >>> new = rechunk_to_stride(f"{tmp.name}/src.zarr", 16, f"{tmp.name}/aligned.zarr",
    ...                         target_bytes=4096)
    >>> new.chunks, is_stride_aligned(new.chunks, 16, shape=new.shape)
    ((32, 32), True)
    >>> bool((new[:] == src[:]).all())
    True
    >>> rechunk_to_stride(new, 16, f"{tmp.name}/unused.zarr") is new
    True
    >>> tmp.cleanup()
    """
    overwrite = _parse_bool(overwrite, "overwrite")
    resume = _parse_bool(resume, "resume")
    progress = _parse_bool(progress, "progress")
    src = _open_array(source, path, name="source")
    target_path = _parse_path(target_path, "target_path")
    base, full = _resolve_store(target, target_path, "target")
    chunks = aligned_chunks(
        src.shape, stride, np.dtype(src.dtype).itemsize, target_bytes=target_bytes,
        channel_axis=channel_axis,
    )
    src_where = _where(src.store, src.path or None)
    if is_stride_aligned(src.chunks, stride, shape=src.shape, channel_axis=channel_axis):
        logger.info(
            "rechunk_to_stride: %s already has stride-aligned chunks %s (stride %s); nothing "
            "written, returning the source", src_where, tuple(src.chunks), stride,
        )
        return src
    if _location(base, full) == _location(src.store, src.path or None):
        raise ValueError(
            f"target/target_path must differ from the source array; both are {src_where}"
        )
    out = cast(zarr.Array, to_zarr(
        da.from_zarr(src), base, full, chunks=chunks, overwrite=overwrite, resume=resume,
        progress=progress,
    ))
    logger.info(
        "rechunk_to_stride: rechunked %s from chunks %s to stride-aligned chunks %s (stride %s) "
        "into %s", src_where, tuple(src.chunks), chunks, stride, _where(base, full),
    )
    return out
