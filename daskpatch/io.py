"""Zarr I/O: open volumes lazily, write Dask arrays chunk by chunk, align chunks to the stride.

- :func:`open_volume` wraps a Zarr array (format 2 or 3, any store or URL zarr accepts) in a lazy
  Dask array whose chunks are the Zarr chunks. Building it reads metadata only.
- :func:`to_zarr` writes a Dask (or NumPy, or Zarr) array to a Zarr format 3 array. Every Zarr
  chunk is written by exactly one task, so no lock is needed, and each task records its chunk as
  done right after writing it, so an interrupted write can be finished with ``resume=True``
  without recomputing the chunks already written.
- :func:`to_numpy` computes a Dask array into one NumPy array, each chunk (or block) written in
  place as it finishes.

The steps of a write are :mod:`daskpatch.pipeline`'s; chunks on the patch-stride grid are
:mod:`daskpatch.rechunk`'s.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import dask
import dask.array as da
import dask.local
import numpy as np
import zarr
from dask.delayed import Delayed

from daskpatch.adapters.threads import one_model_call_at_a_time
from daskpatch.adapters.xarray import is_dataarray as _is_dataarray
from daskpatch.engine import memory as _memory
from daskpatch.errors import ParameterError, ParameterTypeError
from daskpatch.geometry.parse import _describe, parse_bool, parse_int
from daskpatch.graph import jobs as _sched
from daskpatch.graph.inputs import DEFAULT_TARGET_BYTES
from daskpatch.graph.inspect import check_not_aliased
from daskpatch.graph.layers import from_zarr
from daskpatch.graph.lowering import IntoArray, lower
from daskpatch.pipeline import is_group_of_arrays, write_array, write_group, write_image
from daskpatch.storage import ome as _ome
from daskpatch.storage.stores import IncompleteWarning, StoreLike, store_of

__all__ = [
    "DEFAULT_TARGET_BYTES",
    "IncompleteWarning",
    "open_volume",
    "to_numpy",
    "to_zarr",
]



# --------------------------------------------------------------------------------------------
# open_volume
# --------------------------------------------------------------------------------------------


def open_volume(store: StoreLike | zarr.Array, path: str | None = None, *, level: int = 0,
                xarray: bool = False, storage_options: dict[str, Any] | None = None) -> Any:
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
    storage_options : dict, optional
        fsspec options for a URL ``store`` (``"s3://bucket/vol.zarr"``): credentials,
        ``endpoint_url``, ... A local path is made absolute, so every worker reads the same.

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
        :class:`zarr.Array`, or its metadata cannot be read (the message names
        the file).

    Warns
    -----
    IncompleteWarning
        The array is an output of :func:`to_zarr` whose write has not finished (its missing
        chunks read as the fill value); the message counts the chunks written and says how to
        finish it (``to_zarr(..., resume=True)``).

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
    daskpatch.errors.ParameterError: store/path must name a Zarr array, but ... holds a group;
    pass path= one of ['raw']
    >>> tmp.cleanup()
    """
    level = parse_int(level, "level", minimum=0)
    xarray = parse_bool(xarray, "xarray")
    if not isinstance(store, zarr.Array):
        store = store_of(store, storage_options, read_only=True)
    z, image = _ome.locate(store, path, level)
    data = from_zarr(z)
    return _ome.as_dataarray(z, data, image, level) if xarray else data


# --------------------------------------------------------------------------------------------
# to_zarr
# --------------------------------------------------------------------------------------------


def to_zarr(
    array: Any,
    store: StoreLike,
    path: str | None = None,
    *,
    chunks: int | Sequence[int] | None = None,
    compressors: Any = "auto",
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
    run_id: str | None = None,
    storage_options: dict[str, Any] | None = None,
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
        translation and units). A dict or tuple of arrays (the heads of
        :func:`~daskpatch.apply_patches`, its ``(mean, std)``, or such dicts and tuples nested)
        is written as a Zarr group at ``store``/``path`` with one array per entry -- named by
        the dict keys, ``mean``/``std``, or ``0``, ``1``, ... -- in ONE computation (arrays
        sharing a graph compute it once: the model runs once per patch for every head), each
        array with its own fingerprint and done-markers; ``resume=True`` needs the same
        entries, ``overwrite=True`` replaces a group (or array) daskpatch wrote.
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
    compressors : "auto", None, a codec or a list of codecs, default "auto"
        How each chunk is compressed, as :func:`zarr.create_array` takes it: ``"auto"`` is
        zarr's default (zstd), ``None`` stores chunks uncompressed, and e.g.
        ``zarr.codecs.BloscCodec(cname="lz4", shuffle="shuffle")``. Checked before anything
        is written;
        ``resume=True`` needs the existing array's compressors.
    overwrite : bool, default False
        Replace an existing array at ``store``/``path``. With ``False`` an existing array raises
        :class:`FileExistsError` and nothing is written. Only a Zarr array is ever replaced:
        a *group*, a location holding anything else (other files, a non-Zarr directory), a
        location the input reads (or that contains it, or lies inside it) are refused, and so is
        an array some part of which cannot be deleted (checked before deleting anything).
    resume : bool, default False
        Finish an interrupted write: the existing array must have the same fingerprint (see
        Notes) -- shape, dtype, chunks and every parameter that determines the result except
        the model; only chunks not recorded as done are computed and written. The result is
        bit-identical to an uninterrupted write. A mismatch is refused, naming the first
        parameter that differs, also when the existing array is complete. With no existing
        array this is a fresh write. Excludes ``overwrite=True``.
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
    run_id : str, optional
        A name for what the fingerprint cannot see -- the model and its version (e.g.
        ``"unet-v3-epoch40"``). Stored in the fingerprint: ``resume=True`` with another
        ``run_id`` is refused.
    storage_options : dict, optional
        fsspec options for a URL ``store`` (``"s3://bucket/out.zarr"``): credentials,
        ``endpoint_url``, ... as :func:`zarr.open` takes them (fsspec also reads the usual
        environment variables, such as ``AWS_ACCESS_KEY_ID``). A local path is made absolute,
        so that every worker of a cluster writes the same place.

    Returns
    -------
    zarr.Array, zarr.Group or dask.delayed.Delayed
        With ``compute=True``, the written Zarr array (with ``ome=True``, the image group; for a
        dict or tuple, the group). With
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
        An array exists at the target and neither ``overwrite`` nor ``resume`` is set, or the
        target holds something that is not a Zarr array.
    PermissionError
        ``overwrite=True``, and some part of the existing array cannot be deleted (the
        message names it); nothing was deleted.

    Notes
    -----
    The new array's attributes hold, under ``"daskpatch"``, a *fingerprint* of everything that
    determines the result except the model: shape, dtype and chunks; for every
    :func:`~daskpatch.apply_patches` and :func:`~daskpatch.reconstruct` in the graph its size,
    stride, border, pad mode, blend (a hash of a user window), sigma scale, channels, channel
    axis, fill value, batch size, block shape and dtypes; the Zarr arrays the graph reads (store
    location and array path; NumPy inputs are recorded as "not fingerprinted" with their shape
    and dtype); and ``run_id``. A model cannot be fingerprinted reliably (a PyTorch closure's
    token differs in every process): name its version with ``run_id``. The array is recorded
    complete (``.daskpatch-done/complete``) only after every chunk is written; until then
    :func:`open_volume` warns (:class:`IncompleteWarning`) that it is incomplete.

    The result of :func:`~daskpatch.apply_patches` or :func:`~daskpatch.reconstruct` built with
    ``spill=None`` (the default) has its halos -- the parts of a block's buffer that belong to
    neighbouring chunks -- written under ``<array path>/.daskpatch-spill/`` of the output store
    while it runs, when they total more than the ``daskpatch.spill-bytes`` setting of
    :mod:`dask.config` (default 128 MiB; e.g. ``dask.config.set({"daskpatch.spill-bytes":
    "1 GiB"})``), so peak memory depends on the block size and threads, not on the volume. Only
    the halos are written (a block's own part goes straight into its chunk), its blocks run in
    the order of the chunks, and each chunk is written by the task that sums it, which deletes
    the parts it read (on a ``distributed`` cluster they stay until the end): the parts on disk
    are those of a wave of blocks, not of the whole volume. The whole ``.daskpatch-spill/`` area
    of the array is deleted once every chunk is written (and left for ``resume=True`` after an
    interruption). The spilled computation is a graph of its own (new task names for the engine
    and everything computed from it), so the same array computed at the same time on the same
    cluster (a kept ``client.compute`` future) is not disturbed.

    Every argument is checked, and the target probed, before anything is created in the store.
    An input that reads a Zarr array at the target, inside it or containing it (through
    :func:`open_volume`, ``dask.array.from_zarr``, :func:`~daskpatch.extract_patches`,
    :func:`~daskpatch.apply_patches`, :func:`~daskpatch.reconstruct`, rechunks) is refused.
    Two writers of one array at once are not supported: a second ``resume=True`` with other
    parameters is refused, and a writer whose array was replaced meanwhile (another call with
    ``overwrite=True``) stops before its next chunk, without marking the array complete.

    Examples
    --------
    >>> import tempfile, numpy as np, dask.array as da
    >>> tmp = tempfile.TemporaryDirectory()
    >>> x = da.from_array(np.arange(60, dtype="int32").reshape(6, 10), chunks=(3, 4))
    >>> z = to_zarr(x, f"{tmp.name}/out.zarr", path="pred")
    >>> z.chunks, int(z[5, 9])
    ((3, 4), 59)
    >>> to_zarr(x, f"{tmp.name}/out.zarr", path="pred")
    Traceback (most recent call last):
    ...
    daskpatch.errors.TargetExistsError: to_zarr: an array already exists at path 'pred' of
    store ...; pass
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
    store = store_of(store, storage_options)
    if is_group_of_arrays(array):  # the heads of a model: a group, in one pass
        extra = [k for k, v in (("ome", ome is not False), ("levels", levels != 1),
                                ("axes", axes is not None), ("scale", scale is not None),
                                ("units", units is not None), ("downsample", downsample != "auto"))
                 if v]
        if extra:
            raise ParameterError(f"{', '.join(extra)} apply to one array (an OME-Zarr image); "
                                 f"got a {type(array).__name__} of arrays",
                                 param=extra[0], value=True, mentions=tuple(extra[1:]))
        return write_group(array, store, path, chunks=chunks, compressors=compressors,
                           overwrite=overwrite, resume=resume, progress=progress,
                           compute=compute, run_id=run_id)
    if ome is not False or levels != 1 or axes is not None or scale is not None or \
            units is not None or downsample != "auto" or _is_dataarray(array):
        return write_image(array, store, path, chunks=chunks, compressors=compressors,
                           overwrite=overwrite, resume=resume, progress=progress,
                           compute=compute, ome=ome, levels=levels, axes=axes, scale=scale,
                           units=units, downsample=downsample, run_id=run_id)
    return write_array(array, store, path, chunks=chunks, compressors=compressors,
                       overwrite=overwrite, resume=resume, progress=progress, compute=compute,
                       run_id=run_id)


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
        replaced), sharing no memory with a NumPy array ``array`` reads (refused).
        ``None`` allocates one.
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
        raise ParameterTypeError(f"array must be a dask.array.Array; got {_describe(array)}",
                                 param="array", value=array, expected="a dask.array.Array")
    progress = parse_bool(progress, "progress")
    if any(math.isnan(n) for n in array.shape):
        raise ParameterError(f"array must have known chunk sizes; got shape {array.shape} "
                             "(call compute_chunk_sizes() first)", param="array",
                             value=array.shape)
    fresh = out is None
    get = _sched.local_get()
    workers = dask.config.get("num_workers", None) or os.cpu_count() or 1
    if get in (None, dask.local.get_sync):
        workers = 1
    if out is None:  # mapped in at once, by as many threads as the tasks will use
        out = _memory.zeros(array.shape, array.dtype, workers)
    elif not isinstance(out, np.ndarray) or out.shape != array.shape or out.dtype != array.dtype \
            or not out.flags.writeable:
        got = (f"a numpy.ndarray of shape {out.shape}, dtype {out.dtype}, writeable="
               f"{out.flags.writeable}" if isinstance(out, np.ndarray) else _describe(out))
        raise ParameterError(f"out must be a writable numpy.ndarray of shape {array.shape} and "
                             f"dtype {array.dtype}; got {got}", param="out", value=out,
                             expected=(array.shape, array.dtype))
    else:
        check_not_aliased(array, out)
    if get is None:  # no shared memory with the workers
        _sched.gather_into(array, out, progress)
        return out
    direct = lower(array, IntoArray(out, workers))
    if direct is not None:
        if not fresh:
            out[...] = 0
        try:
            with one_model_call_at_a_time():  # blocks chained: torch may use every core
                _sched.compute(direct.job, progress, scheduler=get)
        finally:
            direct.close()
        return out
    _sched.compute(_sched.store_job(array, out), progress, scheduler=get)
    return out
