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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import dask
import dask.array as da
import numpy as np
import zarr
import zarr.storage
from dask.base import tokenize
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph
from zarr.abc.store import Store

from daskpatch.adapters.xarray import is_dataarray as _is_dataarray
from daskpatch.config import get_int
from daskpatch.errors import (ParameterError, ParameterTypeError, ResumeMismatchError,
                              TargetExistsError, UnsafeTargetError)
from daskpatch.geometry.parse import _describe, parse_bool, parse_choice, parse_int
from daskpatch.graph import jobs as _sched
from daskpatch.graph.inputs import as_dask, downsampled, write_chunks
from daskpatch.graph.inspect import check_not_read
from daskpatch.graph.layers import EXPR
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
    # under array expressions a later wave would run its neighbours' blocks again (their
    # halos are not read back from the store there): one graph
    if not w.compute or len(todo) <= size or EXPR:
        return [todo] if todo else []
    return [todo[i:i + size] for i in range(0, len(todo), size)]


def plan(w: Write, z: zarr.Array, fingerprint: dict[str, Any],
         done: set[tuple[int, ...]] | None, lease: _lease.Lease,
         todo: list[tuple[int, ...]], last: bool = True, waved: bool = False) -> Delayed:
    """The write graph: one task per chunk of ``todo`` (chunks not done: compute the block,
    write it, mark it done; computing only those keys culls the rest of the graph, their inputs
    included), then one that marks the array complete and drops the spilled parts (``last=False``,
    a wave before the last: one that checks the write is still this one's; ``waved``: one of
    several waves)."""
    # Engines built with spill=None send large halos (what blocks hand to neighbouring chunks)
    # into the output store: memory stays bounded, and the parts are deleted once all is written.
    # Not into a store in RAM, where the parts would stay until the end instead of being freed.
    # On a cluster they always spill there: a worker lost then costs only its blocks in flight
    # (a block whose chunks are written or whose parts wait in the store skips its model).
    # So do the halos of a write in waves: a block's parts for the next wave wait there.
    in_ram = isinstance(z.store, zarr.storage.MemoryStore)
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
        parts = _sched.to_delayed(_write_tasks(x, z, fingerprint, w.where, lease, token))
        parts_todo = [d for loc, d in np.ndenumerate(parts) if loc in wanted]
    return dask.delayed(finish, pure=False)(parts_todo, dask_key_name=name)


def _write_tasks(x: da.Array, z: zarr.Array, fingerprint: dict[str, Any], where: str,
                 lease: _lease.Lease | None, token: str) -> da.Array:
    """One task per chunk of ``x``: write it into ``z`` (one Zarr chunk each) and record it as
    done (:func:`daskpatch.storage.writes.write_block`); each returns a token of one byte."""
    return da.map_blocks(
        functools.partial(_writes.write_block, z=z, fingerprint=fingerprint, where=where,
                          lease=lease), x,
        chunks=tuple((1,) * n for n in x.numblocks), dtype=np.uint8,
        meta=np.empty((0,) * x.ndim, dtype=np.uint8), name=f"to-zarr-write-{token}")


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
        # nothing left (complete already): one job that records it so and drops leftovers
        parts = waves(w, done) or [[]]
        if not w.compute:
            return plan(w, z, fingerprint, done, lease, parts[0])
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


# -- a group of arrays: the heads of a model, in one pass ------------------------------------------
#: What ``attrs["daskpatch"]["group"]`` of a group :func:`write_group` wrote holds.
HEADS_GROUP = "heads"


def is_group_of_arrays(obj: Any) -> bool:
    """Whether :func:`daskpatch.to_zarr` writes ``obj`` as a group: a dict or a tuple (a
    named tuple too, such as ``apply_patches(..., uncertainty=True)``'s) of arrays, or of such
    dicts and tuples."""
    if isinstance(obj, Mapping):
        values = list(obj.values())
    elif isinstance(obj, tuple):
        values = list(obj)
    else:
        return False
    return bool(values) and all(
        (hasattr(v, "shape") and hasattr(v, "dtype")) or is_group_of_arrays(v) for v in values)


def flatten_arrays(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """``(path, array)`` of every array of a dict/tuple tree (:func:`is_group_of_arrays`):
    dict keys, named tuple fields (``mean``, ``std``) and tuple positions name them."""
    if isinstance(obj, Mapping):
        items = list(obj.items())
    elif hasattr(obj, "_fields"):
        items = list(zip(obj._fields, obj))
    else:
        items = [(str(i), v) for i, v in enumerate(obj)]
    out: list[tuple[str, Any]] = []
    for key, value in items:
        if isinstance(key, bool) or not isinstance(key, (str, int)):
            raise ParameterTypeError(f"to_zarr: the keys of a dict of arrays name Zarr arrays "
                                     f"and must be strings (or ints); got {_describe(key)}",
                                     param="array", value=key)
        name = str(key)
        if not name or "/" in name or name.startswith(".") or name.startswith("__"):
            raise ParameterError(f"to_zarr: {name!r} cannot name a Zarr array of the group (no "
                                 "'/', not empty, not starting with '.' or '__')",
                                 param="array", value=name)
        path = f"{prefix}/{name}" if prefix else name
        out.extend(flatten_arrays(value, path) if is_group_of_arrays(value) else
                   [(path, value)])
    return out


def _check_group_target(base: Any, full: str | None, where: str, names: list[str],
                        overwrite: bool, resume: bool) -> Any:
    """The node at a group's target (``None``: nothing) after checking that this write may go
    there: a group only if daskpatch wrote it for the same arrays (``resume``), an existing
    one (or an array) only with ``overwrite`` or ``resume``."""
    node = _store.probe(base, full)
    marker: Any = node.attrs.get(_store.ATTR) if isinstance(node, zarr.Group) else None
    ours = isinstance(marker, Mapping) and marker.get("group") == HEADS_GROUP
    if isinstance(node, zarr.Group) and not ours:
        raise UnsafeTargetError(
            f"to_zarr: {where} is a group that daskpatch did not write for a dict or tuple of "
            "arrays; to_zarr never replaces it (with its children). Pass path= naming a new "
            "group inside it, or delete it", param="path", value=where)
    if node is not None and not (overwrite or resume):
        what = "a group of arrays" if ours else "an array"
        raise TargetExistsError(
            f"to_zarr: {what} already exists at {where}; pass overwrite=True to replace it, or "
            "resume=True to finish an interrupted write", param="overwrite", value=where,
            mentions=("resume",))
    if resume and node is not None:
        if not ours:
            raise ResumeMismatchError(
                f"resume=True with a dict or tuple of arrays needs the group to_zarr wrote at "
                f"{where}; it holds an array. Pass overwrite=True to replace it",
                param="array", stored="an array", value=names)
        stored = list(marker.get("arrays", []))
        if sorted(stored) != sorted(names):
            raise ResumeMismatchError(
                f"resume=True needs the same arrays as the interrupted write: the group at "
                f"{where} was started with {stored}, this write has {names}. Pass the same "
                "heads, or overwrite=True to start again", param="array", stored=stored,
                value=names)
    _targets.check_parents(base, full, where, "a group", name_parent=True)
    return node


def write_group(tree: Any, store: Any, path: Any, *, chunks: Any, compressors: Any,
                overwrite: Any, resume: Any, progress: Any, compute: Any, run_id: Any,
                started: Callable[[], None] | None = None) -> zarr.Group | Delayed:
    """:func:`daskpatch.to_zarr` of a dict or tuple of arrays (the heads of
    :func:`~daskpatch.apply_patches`): a Zarr group with one array per entry, each with its own
    fingerprint and done-markers, all written in ONE computation, so that arrays sharing a
    graph (one model run) compute it once. Engines spill their halos under the group's own
    ``.daskpatch-spill/``, the same place for every array, so that a spilled engine gets the
    same new names under each of them (one engine, not one per array). ``started()`` is
    called once the group exists (the command line's exit status turns on it)."""
    overwrite = parse_bool(overwrite, "overwrite")
    resume = parse_bool(resume, "resume")
    progress = parse_bool(progress, "progress")
    compute = parse_bool(compute, "compute")
    leaves = flatten_arrays(tree)
    names = [p for p, _ in leaves]
    path = _store.parse_path(path)
    base, full = _store.resolve_store(store, path)
    where = _store.where(base, full)
    # every argument of every array, then the targets: nothing is written before all pass
    writes = [parse(x, store, _store.node_path(path, p), chunks, compressors, overwrite, resume,
                    progress, compute, run_id, None) for p, x in leaves]
    node = _check_group_target(base, full, where, names, overwrite, resume)
    target, prefix = _store.as_store(base)
    gpath = _store.node_path(prefix, full)
    checked: list[tuple[Write, zarr.Array | None, dict[str, Any]]] = []
    for w in writes:
        check_not_read(w.x, target, gpath, where)
        if overwrite and node is not None:  # deleted with the group
            checked.append((replace(w, overwrite=False), None, fingerprint_of(w.x, w.chunks,
                                                                             w.run_id)))
        else:
            checked.append((w, *check_target(w)))
    if overwrite and node is not None:
        _targets.check_deletable(target, gpath, where)
    if compute:
        _sched.warm_up()
    info = {"group": HEADS_GROUP, "arrays": names, "complete": False}
    lease = _lease.acquire(target, gpath, where)  # one writer of the group at a time
    aside = None
    try:
        if node is not None and overwrite:  # the old group (or array) set aside, not deleted
            aside = _targets.clear(target, gpath, where)
            if aside is None:  # deleted with the old keys, the lease too
                _lease.rewrite(lease)
        if node is None or overwrite:
            group = zarr.create_group(store=base, path=full or "", zarr_format=3,
                                      attributes={_store.ATTR: info})  # the lease stays
        else:
            group = zarr.open_group(store=base, path=full or "", mode="r+")
        if started is not None:
            started()
        spill_prefix = _store.node_path(gpath, _store.SPILL_DIR) or ""
        spills: dict = {}
        arrays = []  # (write, array, fingerprint, chunks done, the lowered array)
        for w, leaf, fingerprint in checked:
            z, done, _ = create_or_reopen(w, leaf, fingerprint, lease)
            in_ram = isinstance(z.store, zarr.storage.MemoryStore)
            low = lower(w.x, IntoStore(None if in_ram else z.store,
                                       "" if in_ram else spill_prefix, w.threshold))
            assert low is not None and low.array is not None  # no writer: a lowered array
            spills.update({(repr(s), n): (s, n) for s, n in low.spills})
            arrays.append((w, z, fingerprint, done, low))
        finals = _group_writes(arrays, lease)
        job = dask.delayed(_finish_group, pure=False)(
            group, {**info, "complete": True}, list(spills.values()), target, spill_prefix,
            lease, where, finals,
            dask_key_name=f"to-zarr-group-{tokenize(where, names, finals)}")
        if not compute:
            return job
        _sched.compute(job, progress)
    except BaseException as err:
        if aside is not None:  # an overwrite that failed: the old group comes back
            _targets.restore(target, gpath, aside)
            err.add_note(f"to_zarr: what {where} held before this overwrite was put back "
                         "unchanged; run the overwrite again once the cause is fixed")
        _lease.release(lease)
        raise
    return group


def _group_writes(arrays: list, lease: _lease.Lease) -> list[Delayed]:
    """One finalize task per array of a group, after its chunks not done yet are written. The
    write graphs are merged as they are, NOT optimised (as ``to_delayed`` does for one array):
    dask optimises each array on its own, fusing the engine's chunk tasks into that array's
    write tasks under new keys, so that the engine would run once per array (and a spilled
    engine would read its halo parts twice)."""
    writes = []
    for w, z, fingerprint, done, low in arrays:
        writes.append(_write_tasks(low.array, z, fingerprint, w.where, lease, low.token))
    hlg = HighLevelGraph.merge(*[x.dask for x in writes])  # the engines' layers kept
    finals = []
    for (w, z, fingerprint, done, low), x in zip(arrays, writes):
        todo = [] if done is None else [
            Delayed((x.name, *idx), hlg, layer=x.name) for idx in np.ndindex(*x.numblocks)
            if idx not in done]
        # each array is marked complete once its chunks are; the lease is the group's
        finals.append(dask.delayed(_writes.finalize, pure=False)(
            z, fingerprint, w.where, [], todo,
            dask_key_name=f"to-zarr-finalize-{tokenize(low.token, sorted(done or ()))}"))
    return finals


def _finish_group(group: zarr.Group, marker: dict[str, Any], spills: list, store: Any,
                  spill_prefix: str, lease: _lease.Lease, where: str, _arrays: list
                  ) -> zarr.Group:
    """Runs after every array of a group is complete: drop the spilled parts, mark the group
    complete, drop what it replaced, give up the lease."""
    _lease.check(lease, renew=False)
    for spill, name in spills:
        spill.clear(name)
    if spill_prefix:
        _storeio.delete_dir(store, spill_prefix)
    group.attrs.update({_store.ATTR: marker})
    _targets.drop_replaced(group, where)  # type: ignore[arg-type]  # a store and a path
    _lease.release(lease)
    return group
