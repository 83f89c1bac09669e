"""The one write pipeline behind :func:`daskpatch.to_zarr`: parse every argument, check the
target, create or reopen the array, lower the array's graph for the store, compute.

:func:`write_array` writes one array (a bare one, or a level of an image); :func:`write_image`
writes a DataArray (its dims as Zarr v3 ``dimension_names``) or an OME-Zarr image, each level
through :func:`write_array`, level ``k`` computed from the written level ``k - 1``, the image's
metadata last. Done-markers, fingerprints and the checks made before anything is written or
deleted are :mod:`daskpatch.storage`'s; the graph of a write is
:func:`daskpatch.graph.lowering.lower`'s.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np
import zarr
import zarr.storage
from dask.base import tokenize
from dask.delayed import Delayed
from zarr.abc.store import Store

from daskpatch.adapters.xarray import is_dataarray as _is_dataarray
from daskpatch.errors import (ParameterError, ParameterTypeError, TargetExistsError,
                              UnsafeTargetError)
from daskpatch.config import get_int
from daskpatch.geometry.parse import _describe, parse_bool, parse_choice, parse_int
from daskpatch.graph import jobs as _sched
from daskpatch.graph.inputs import as_dask, downsampled, write_chunks
from daskpatch.graph.inspect import check_not_read
from daskpatch.graph.inspect import fingerprint as fingerprint_of
from daskpatch.graph.lowering import IntoStore, lower
from daskpatch.storage import fingerprint as _fingerprint
from daskpatch.storage import lease as _lease
from daskpatch.storage import ome as _ome
from daskpatch.storage import stores as _store
from daskpatch.storage import targets as _targets
from daskpatch.storage import markers as _markers
from daskpatch.storage import storeio as _storeio
from daskpatch.storage import writes as _writes
from daskpatch.storage.spill import spill_bytes

logger = logging.getLogger("daskpatch.io")  # the logger to_zarr documents


@dataclass(frozen=True)
class Write:
    """One parsed :func:`to_zarr` call of a bare array."""

    x: da.Array  #: what to write, its blocks exactly the Zarr chunks (``chunks``)
    chunks: tuple[int, ...]
    compressors: tuple  #: as zarr made them of the argument
    target: Store  #: the store written, and ``reader``, the same read-only
    reader: Store
    path: str | None  #: the array's path from the store root (None: a root array)
    where: str  #: how messages name the target
    overwrite: bool
    resume: bool
    progress: bool
    compute: bool
    run_id: str | None
    threshold: float  #: the halo size above which engines spill (``daskpatch.spill-bytes``)
    dimension_names: Sequence[str] | None


def parse(array: Any, store: Any, path: Any, chunks: Any, compressors: Any, overwrite: Any,
           resume: Any, progress: Any, compute: Any, run_id: Any, dimension_names: Any
           ) -> Write:
    """Check every argument (nothing is read or written yet)."""
    overwrite = parse_bool(overwrite, "overwrite")
    resume = parse_bool(resume, "resume")
    progress = parse_bool(progress, "progress")
    compute = parse_bool(compute, "compute")
    if overwrite and resume:
        raise ParameterError(
            "overwrite=True and resume=True exclude each other (overwrite starts again, resume "
            "keeps the chunks already written); got both", param="resume", value=True,
            mentions=("overwrite",)
        )
    if progress and not compute:
        raise ParameterError(
            "progress=True needs compute=True; with compute=False wrap your own compute in "
            "dask.diagnostics.ProgressBar or distributed.progress", param="progress", value=True,
            mentions=("compute",)
        )
    path = _store.parse_path(path)
    threshold = spill_bytes()  # the setting is checked before anything is written
    if run_id is not None and not isinstance(run_id, str):
        raise ParameterTypeError(f"run_id must be None or a string naming the model version; "
                                 f"got {_describe(run_id)}", param="run_id", value=run_id)
    x, zchunks = write_chunks(as_dask(array), chunks)
    codecs = _store.parse_compressors(compressors, x.dtype)
    base, full = _store.resolve_store(store, path)
    target, prefix = _store.as_store(base)
    reader, _ = _store.as_store(base, read_only=True)
    return Write(x, zchunks, codecs, target, reader, _store.node_path(prefix, full),
                  _store.where(base, full), overwrite, resume, progress, compute, run_id,
                  threshold, dimension_names)


def check_target(w: Write) -> tuple[zarr.Array | None, dict[str, Any]]:
    """The array at the target (``None``: nothing there) and this write's fingerprint, after
    checking the inputs, the target itself, its parents, what it holds, and (to replace it)
    that every part of it can be deleted -- before anything is created or deleted."""
    check_not_read(w.x, w.target, w.path, w.where)
    node = _store.probe(w.reader, w.path, w.where)
    if isinstance(node, zarr.Group):
        raise UnsafeTargetError(
            f"to_zarr: {w.where} is a group; to_zarr never replaces a group (with its children). "
            "Pass path= naming an array inside it", param="path", value=w.where
        )
    if node is not None and not (w.overwrite or w.resume):
        raise TargetExistsError(
            f"to_zarr: an array already exists at {w.where}; pass overwrite=True to replace it, "
            "or resume=True to finish an interrupted write", param="overwrite", value=w.where,
            mentions=("resume",)
        )
    _targets.check_parents(w.reader, w.path, w.where)
    fingerprint = fingerprint_of(w.x, w.chunks, w.run_id)
    if w.resume and node is not None:
        if _markers.stored_fingerprint(node) is not None:  # the cause first (a stride, a model)
            _fingerprint.check_fingerprint(node, fingerprint, w.where, causes_only=True)
        _fingerprint.check_resumable(node, w.x, w.chunks, w.compressors, w.where)
        _fingerprint.check_fingerprint(node, fingerprint, w.where)
    else:
        _targets.check_contents(w.target, w.path, node is not None, w.where)
        if node is not None:
            _targets.check_deletable(w.target, w.path, w.where)
    return node, fingerprint


def create_or_reopen(w: Write, node: zarr.Array | None, fingerprint: dict[str, Any],
                     lease: _lease.Lease) -> tuple[zarr.Array, set[tuple[int, ...]] | None,
                                                   str | None]:
    """The array opened for writing, the chunks already done (``None``: all of them), and where
    an array it replaces was set aside (``None``: nowhere)."""
    if w.resume and node is not None:
        z = zarr.open_array(store=w.target, path=w.path or "", mode="r+")
        done = _markers.done_chunks(z, w.x.numblocks)
        if done is None:
            logger.info("to_zarr: %s is already complete; nothing to compute", w.where)
        else:
            logger.info("to_zarr: resuming %s: %d of %d chunks already done", w.where, len(done),
                        math.prod(w.x.numblocks))
        return z, done, None
    aside = None
    if node is not None:
        aside = _targets.clear(w.target, w.path, w.where)  # the old array (checked above)
        if aside is None:  # deleted with the old array's keys
            _lease.rewrite(lease)
    else:  # stale markers and spilled parts of a hand-deleted array
        _storeio.delete_dir(w.target, _store.node_path(w.path, _store.MARKER_DIR) or "")
        _storeio.delete_dir(w.target, _store.node_path(w.path, _store.SPILL_DIR) or "")
    z = zarr.create_array(
        store=w.target, name=w.path, shape=w.x.shape, dtype=w.x.dtype, chunks=w.chunks,
        compressors=w.compressors, attributes={_store.ATTR: _fingerprint.record(fingerprint)},
        zarr_format=3, dimension_names=w.dimension_names,
    )
    _fingerprint.check_still_ours(z, fingerprint, w.where)  # another writer created it meanwhile
    return z, set(), aside


def waves(w: Write, done: set[tuple[int, ...]] | None) -> list[list[tuple[int, ...]]]:
    """The chunks still to write, in waves of at most ``daskpatch.wave-chunks`` chunks in C
    order (one wave with ``compute=False``: the caller gets one graph)."""
    if done is None:
        return []
    todo = [loc for loc in np.ndindex(*w.x.numblocks) if loc not in done]
    size = get_int("wave-chunks")
    if not w.compute or len(todo) <= size:
        return [todo] if todo else []
    return [todo[i:i + size] for i in range(0, len(todo), size)]


def plan(w: Write, z: zarr.Array, fingerprint: dict[str, Any],
         done: set[tuple[int, ...]] | None, lease: _lease.Lease,
         todo: list[tuple[int, ...]] | None = None, last: bool = True, waved: bool = False
         ) -> Delayed:
    """The write graph: one task per chunk of ``todo`` (default: every chunk not done; compute
    the block, write it, mark it done; computing only those keys culls the rest of the graph,
    their inputs included), then one that marks the array complete and drops the spilled parts
    (``last=False``, a wave before the last: one that checks the write is still this one's;
    ``waved``: one of several waves)."""
    # Engines built with spill=None send large halos (what blocks hand to neighbouring chunks)
    # into the output store: memory stays bounded, and the parts are deleted once all is written.
    # Not into a store in RAM, where the parts would stay until the end instead of being freed.
    # On a cluster they always spill there: a worker lost then costs only its blocks in flight
    # (a block whose chunks are written or whose parts wait in the store skips its model).
    # So do the halos of a write in waves: a block's parts for the next wave wait there.
    in_ram = isinstance(z.store, zarr.storage.MemoryStore)
    if todo is None:
        todo = [] if done is None else [loc for loc in np.ndindex(*w.x.numblocks)
                                        if loc not in done]
    writer = None
    if todo:  # a spilled result written as it is: its chunk tasks write, blocks in C order
        writer = functools.partial(_writes.write_task, z=z, fingerprint=fingerprint,
                                   where=w.where, lease=lease)
    client = _sched.active_client()
    threshold = 0.0 if client is not None or waved else w.threshold
    # the blocks that may run ahead of the chunks written: enough to keep every thread busy
    lag = 2 if client is None else max(2, 2 * sum(client.nthreads().values()))
    tag = (str(z.store), z.path, w.chunks, fingerprint)
    low = lower(w.x, IntoStore(None if in_ram else z.store, "" if in_ram else _markers.spill_dir(z),
                               threshold, writer, tuple(todo), tag,
                               functools.partial(_markers.is_done, z), lag))
    assert low is not None  # a store target always lowers
    token, spills = low.token, low.spills
    name = f"to-zarr-{'finalize' if last else 'wave'}-{tokenize(token, sorted(done or ()), todo)}"
    if last:
        finish = functools.partial(_writes.finalize, z, fingerprint, w.where, spills,
                                   lease=lease)
    else:
        finish = functools.partial(_writes.wave_done, z, fingerprint, w.where, lease=lease)
    if low.job is not None:
        return _sched.finishing(low.job, name, (finish, low.keys))
    x = low.array
    assert x is not None
    parts_todo = []
    if todo:
        wanted = set(todo)
        written = da.map_blocks(
            functools.partial(_writes.write_block, z=z, fingerprint=fingerprint,
                              where=w.where, lease=lease), x,
            chunks=tuple((1,) * n for n in x.numblocks),
            dtype=np.uint8,
            meta=np.empty((0,) * x.ndim, dtype=np.uint8),
            name=f"to-zarr-write-{token}",
        )
        parts = _sched.to_delayed(written)
        parts_todo = [d for loc, d in np.ndenumerate(parts) if loc in wanted]
    return dask.delayed(finish, pure=False)(parts_todo, dask_key_name=name)


def write_array(array: Any, store: Any, path: Any, *, chunks: Any, compressors: Any,
                 overwrite: Any, resume: Any, progress: Any, compute: Any, run_id: Any,
                 dimension_names: Sequence[str] | None = None,
                 started: Callable[[], None] | None = None) -> zarr.Array | Delayed:
    """The one write pipeline of an array (a bare one, or a level of an image): parse, check
    the target, create or reopen it, plan the writes, compute. ``started()`` is called once
    the target exists (the command line's exit status turns on it)."""
    w = parse(array, store, path, chunks, compressors, overwrite, resume, progress, compute,
               run_id, dimension_names)
    node, fingerprint = check_target(w)
    if w.compute:  # a cluster's workers import daskpatch at once, before any store is made
        _sched.warm_up()
    lease = _lease.acquire(w.target, w.path, w.where)  # one writer at a time, or none
    aside = None
    try:
        z, done, aside = create_or_reopen(w, node, fingerprint, lease)
        if started is not None:
            started()
        parts = waves(w, done)
        if not w.compute:
            return plan(w, z, fingerprint, done, lease)
        if not parts:  # complete already: record it so (and drop what a crash left)
            parts = [[]]
        for k, todo in enumerate(parts):
            job = plan(w, z, fingerprint, done, lease, todo, k == len(parts) - 1, len(parts) > 1)
            _sched.compute(job, w.progress)
    except BaseException as err:
        if aside is not None:  # an overwrite that failed: the old array comes back
            _targets.restore(w.target, w.path, aside)
            err.add_note(f"to_zarr: the array {w.where} held before this overwrite was put back "
                         "unchanged; run the overwrite again once the cause is fixed")
        elif type(err).__name__ in _LOST:  # a cluster lost the job (its scheduler, say)
            err.add_note(f"to_zarr: the cluster lost this write of {w.where}; the chunks already "
                         "written are kept: run the same to_zarr(..., resume=True) (daskpatch "
                         "apply --resume) to finish it")
        _lease.release(lease)
        raise
    return z


#: What dask.distributed raises when a job's scheduler (or every worker) goes away.
_LOST = ("CancelledError", "FutureCancelledError", "CommClosedError")


def write_image(array: Any, store: Any, path: Any, *, chunks: Any, compressors: Any,
                 overwrite: Any, resume: Any, progress: Any, compute: Any, ome: Any, levels: Any,
                 axes: Any, scale: Any, units: Any, downsample: Any, run_id: Any) -> Any:
    """:func:`to_zarr` of a DataArray (its dims as ``dimension_names``) or of an OME-Zarr image:
    each level goes through :func:`_write_array`, level ``k`` computed from the written level
    ``k - 1``, and the image's metadata is written last."""
    ome = parse_bool(ome, "ome")
    levels = parse_int(levels, "levels", minimum=1)
    downsample = parse_choice(downsample, "downsample", _ome.DOWNSAMPLE)
    plain = dict(chunks=chunks, compressors=compressors, overwrite=overwrite, resume=resume,
                 progress=progress, compute=compute, run_id=run_id)
    data = array.data if _is_dataarray(array) else array
    if not ome:
        extra = [k for k, v in (("levels", levels != 1), ("axes", axes is not None),
                                ("scale", scale is not None), ("units", units is not None),
                                ("downsample", downsample != "auto")) if v]
        if extra:
            raise ParameterError(f"{', '.join(extra)} need ome=True (an OME-Zarr image); got "
                                 "ome=False", param="ome", value=False, mentions=tuple(extra))
        names = [str(d) for d in array.dims] if _is_dataarray(array) else None
        return write_array(data, store, path, dimension_names=names, **plain)

    for name, value in (("overwrite", overwrite), ("resume", resume), ("progress", progress),
                        ("compute", compute)):
        parse_bool(value, name)
    if overwrite and resume:
        raise ParameterError("overwrite=True and resume=True exclude each other (overwrite "
                             "starts again, resume keeps the levels already written); got both",
                             param="resume", value=True, mentions=("overwrite",))
    if not compute and levels > 1:
        raise ParameterError(
            f"compute=False needs levels=1 with ome=True (each level is computed from the level "
            f"above once it is written); got levels={levels}", param="levels", value=levels,
            expected=1, mentions=("compute",)
        )
    x = as_dask(data)
    _store.parse_compressors(compressors, x.dtype)  # before the group is made
    ax, scale0, shift0 = _ome.write_geometry(array, x.ndim, axes, scale, units)
    names = [a["name"] for a in ax]
    space = [i for i, a in enumerate(ax) if a["type"] == "space"]
    shapes = _ome.level_shapes(x.shape, space, levels)
    method = downsample if downsample != "auto" else ("mean" if x.dtype.kind in "fc" else "mode")
    x, zchunks = write_chunks(x, chunks)

    path = _store.parse_path(path)
    base, full = _store.resolve_store(store, path)
    where = _store.where(base, full)
    node = _ome.check_target(base, full, where, overwrite=overwrite, resume=resume,
                             levels=levels, downsample=method)
    target, prefix = _store.as_store(base)
    check_not_read(x, target, _store.node_path(prefix, full), where)
    if node is not None and overwrite:
        _targets.check_deletable(target, _store.node_path(prefix, full), where)

    # Everything is checked: create the group (marked incomplete), the levels, then the metadata.
    group, marker = _ome.create_group(base, full, node, overwrite, levels, method)
    meta = _ome.metadata(ax, shapes, scale0, shift0, method,
                         getattr(array, "name", None) if _is_dataarray(array) else None, marker)
    level_paths = [_store.node_path(full, str(k)) for k in range(levels)]
    job = write_array(x, base, level_paths[0], dimension_names=names, **plain)
    if not compute:
        return dask.delayed(_ome.finish, pure=False)(group, meta, job)
    written: Any = job  # a zarr.Array: compute=True here
    for k in range(1, levels):
        factors = tuple(2 if p != n else 1 for p, n in zip(shapes[k - 1], shapes[k]))
        level_chunks = tuple(min(c, n) for c, n in zip(zchunks, shapes[k]))
        y = downsampled(written, factors, level_chunks, method)
        written = write_array(y, base, level_paths[k], chunks=level_chunks,
                               compressors=compressors, overwrite=overwrite, resume=resume,
                               progress=progress, compute=True, run_id=run_id,
                               dimension_names=names)
    return _ome.finish(group, meta, None)
