"""Chunk shapes on the patch-stride grid: :func:`aligned_chunks` (Zarr chunks near
:data:`~daskpatch.graph.inputs.DEFAULT_TARGET_BYTES`, by the one chunk-size policy
:func:`~daskpatch.geometry.blocks.stride_multiples`), and :func:`is_stride_aligned` and
:func:`rechunk_to_stride`, which check and fix the chunks of an existing array.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import zarr

from daskpatch.errors import IncompleteOutputError, UnsafeTargetError
from daskpatch.geometry.blocks import _isotropic_start, stride_multiples
from daskpatch.graph.inputs import DEFAULT_TARGET_BYTES
from daskpatch.graph.layers import from_zarr
from daskpatch.storage import stores as _store
from daskpatch.storage import markers as _markers
from daskpatch.storage.stores import StoreLike
from daskpatch.geometry.layout import split_axes
from daskpatch.io import to_zarr
from daskpatch.geometry.parse import _describe, parse_bool, parse_int, parse_per_axis, parse_shape


__all__ = [
    "aligned_chunks",
    "is_stride_aligned",
    "rechunk_to_stride",
]

logger = logging.getLogger("daskpatch.io")  # the logger rechunk_to_stride documents



# --------------------------------------------------------------------------------------------
# the chunk-size policy
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

    # An isotropic start (closed form), then one stride at a time up to the target.
    k = stride_multiples(lengths, strides, budget,
                         start=_isotropic_start(lengths, strides, budget))
    for i, a in enumerate(spatial):
        out[a] = min(k[i] * strides[i], lengths[i])
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



def rechunk_to_stride(
    source: StoreLike | zarr.Array,
    stride: int | Sequence[int],
    target: StoreLike,
    *,
    path: str | None = None,
    target_path: str | None = None,
    channel_axis: int | None = None,
    target_bytes: int = DEFAULT_TARGET_BYTES,
    compressors: Any = "auto",
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = False,
    storage_options: dict[str, Any] | None = None,
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
    compressors : "auto", None, a codec or a list of codecs, default "auto"
        The copy's codec, as in :func:`to_zarr`.
    overwrite, resume, progress : bool, default False
        As in :func:`to_zarr`.
    storage_options : dict, optional
        fsspec options for URL ``source`` and ``target`` (credentials, ``endpoint_url``).

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
    overwrite = parse_bool(overwrite, "overwrite")
    resume = parse_bool(resume, "resume")
    progress = parse_bool(progress, "progress")
    if not isinstance(source, zarr.Array):
        source = _store.store_of(source, storage_options, "source", read_only=True)
    target = _store.store_of(target, storage_options, "target")
    src = _store.open_array(source, path, name="source")
    if _markers.stored_fingerprint(src) is not None and not _markers.is_complete(src):
        src_at = _store.where(src.store, src.path or None)
        raise IncompleteOutputError(
            f"source is an incomplete daskpatch output ({src_at}): its missing chunks would be "
            "copied as the fill value into an array marked complete. Finish it first with "
            "daskpatch.to_zarr(..., resume=True)", param="source", value=src_at)
    target_path = _store.parse_path(target_path, "target_path")
    base, full = _store.resolve_store(target, target_path, "target")
    chunks = aligned_chunks(
        src.shape, stride, np.dtype(src.dtype).itemsize, target_bytes=target_bytes,
        channel_axis=channel_axis,
    )
    src_where = _store.where(src.store, src.path or None)
    if is_stride_aligned(src.chunks, stride, shape=src.shape, channel_axis=channel_axis):
        logger.info(
            "rechunk_to_stride: %s already has stride-aligned chunks %s (stride %s); nothing "
            "written, returning the source", src_where, tuple(src.chunks), stride,
        )
        return src
    written, prefix = _store.as_store(base, read_only=True)
    if _store.overlaps(_store.location(written, _store.node_path(prefix, full)),
                       _store.location(src.store, src.path or None)):
        raise UnsafeTargetError(
            f"target/target_path must differ from the source array; both are {src_where}",
            param="target_path", value=src_where, mentions=("target/target_path",)
        )

    out = cast(zarr.Array, to_zarr(
        from_zarr(src), base, full, chunks=chunks, compressors=compressors,
        overwrite=overwrite, resume=resume, progress=progress,
    ))
    logger.info(
        "rechunk_to_stride: rechunked %s from chunks %s to stride-aligned chunks %s (stride %s) "
        "into %s", src_where, tuple(src.chunks), chunks, stride, _store.where(base, full),
    )
    return out
