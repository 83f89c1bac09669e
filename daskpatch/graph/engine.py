"""The overlap-add engine's tasks: the accumulate, halo and chunk tasks of every block of a
frozen plan (:class:`~daskpatch.graph.plan.OverlapAdd`) executed as a :class:`Target`, made on
demand (see :class:`~daskpatch.graph.layers.LazyLayer`), and the tasks adding into an in-memory
result.

Which block owns which patches comes from :meth:`daskpatch.geometry.grid.PatchGrid.block_plan`;
what a block reads and runs, from the plan's reader; lowering a plan for a target is
:mod:`daskpatch.graph.lowering`'s job.
"""

from __future__ import annotations

import itertools
import math
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np

from daskpatch.graph.layers import LazyLayer, layers, new_array, rename_task
from daskpatch.graph.order import BiggestFirst, then
from daskpatch.engine.halo import (Done, add, defer, halo, resumable_halo, spilled_keys,
                                   write_through)
from daskpatch.engine.sink import Sink, finish_into
from daskpatch.engine.spec import ChunkSum
from daskpatch.graph.plan import OverlapAdd
from daskpatch.storage.spill import Spill


@dataclass(frozen=True)
class Target:
    """One execution of an :class:`~daskpatch.graph.plan.OverlapAdd`: the name its tasks go by,
    where its halos go and what its chunk tasks do. The same plan lowered for another target
    (:mod:`daskpatch.graph.lowering`) is another graph, with names of its own.

    ``spill``: the store its halo faces go to (``None``: in memory); ``names``: input key names
    its blocks read under other names (old, new), when an input was itself lowered anew;
    ``writer(chunk, location, region)``: chunk tasks write their chunk and return what it
    returns (``None``: chunk tasks return chunks); ``chain``: (block, chunk key) pairs, the
    block's accumulate task waiting for that chunk to be written; ``done(location)``: whether
    the writer has written that chunk already (then a spilled block whose other chunks are
    written or hold its parts skips its model, and the chunk task its sum: see
    :func:`~daskpatch.engine.halo.resumable_halo`).
    """

    name: str
    spill: Spill | None = None
    names: tuple[tuple[str, str], ...] = ()
    writer: Callable | None = None
    chain: tuple[tuple[tuple[int, ...], tuple], ...] = ()
    done: Done | None = None


class Engine:
    """The accumulate/halo/add tasks of one overlap-add ``plan`` executed as ``target``, made on
    demand (see :class:`~daskpatch.graph.layers.LazyLayer`). Both are values: an engine is never
    changed, and another execution is another engine."""

    def __init__(self, overlap: OverlapAdd, target: Target | None = None) -> None:
        blending = overlap.blending
        spill = blending.spill
        if target is None:  # the plan as built: its own name, its own spill choice
            target = Target(overlap.name, spill if isinstance(spill, Spill) else None)
        self.overlap, self.target = overlap, target
        self.plan, window = blending.plan, blending.window
        self.name = target.name
        #: what determines the result besides the model and the input data (JSON-ready): the
        #: fingerprint :func:`daskpatch.to_zarr` stores and ``resume=True`` checks
        self.params = dict(blending.params)
        #: the plan as built, with ``spill=None``: :func:`~daskpatch.graph.lowering.lower` may
        #: send its halos to the output store
        self.auto = spill is None and target.name == overlap.name
        self.spill = target.spill
        self.acc_name, self.halo_name = "acc-" + self.name, "halo-" + self.name
        self.names = dict(target.names)
        self.writer, self.done = target.writer, target.done
        self.chain = dict(target.chain)
        channels, acc_dtype = blending.channels, blending.acc_dtype
        self.args = (channels, 0 if window.separable else 1)
        self.copy = window.blend == "crop"  # crop: voxels are copied, not summed
        self.dtypes = (blending.fill_value, acc_dtype, blending.out_dtype)
        self.ch = blending.layout.channel_axis
        plan = blending.plan
        ndim = plan.grid.ndim
        self.halo_ax: list = []  # [a][b] -> [(c, buffer slice)]
        self.src_ax: list = []  # [a][c] -> [(b, buffer slice, chunk slice)]
        for a in range(ndim):
            ov = {}
            for c, blocks in enumerate(plan.sources[a]):
                cl, ch = plan.chunk(a, c)
                for b in blocks:
                    lo, hi = plan.ext[a][b]
                    ov[b, c] = (slice(max(cl, lo) - lo, min(ch, hi) - lo),
                                slice(max(cl, lo) - cl, min(ch, hi) - cl))
            self.halo_ax.append([[(c, ov[b, c][0]) for c in plan.targets[a][b]]
                                 for b in range(plan.nblocks[a])])
            self.src_ax.append([[(b, *ov[b, c]) for b in plan.sources[a][c]]
                                for c in range(plan.nblocks[a])])
        self.owning = [[b for b in range(n) if plan.owned[a][b][1] > plan.owned[a][b][0]]
                       for a, n in enumerate(plan.nblocks)]
        self.self_only = [[b for b in own if plan.targets[a][b] == (b,)]
                          for a, own in enumerate(self.owning)]
        self.cov_needed = plan.grid.uncovered > 0
        self.coverage = [plan.grid.axis_coverage(a) for a in range(ndim)]
        # bytes the blocks hand to other chunks: what waits in memory without spilling
        ext = math.prod(sum(hi - lo for lo, hi in e) for e in plan.ext)
        self.halo_bytes = (ext - math.prod(plan.grid.shape)) * (channels + self.args[1]) \
            * np.dtype(acc_dtype).itemsize

    def _accumulate(self, bidx: tuple[int, ...], ext_lo: tuple[int, ...],
                    ext_hi: tuple[int, ...]) -> tuple[Any, set]:
        """The accumulate task of a block (inputs under their current names) and its inputs."""
        task, deps = self.overlap.reader.accumulate(self.overlap.blending, bidx, ext_lo, ext_hi)
        if self.names:
            task = rename_task(task, self.names)
            deps = {rename_task(d, self.names) for d in deps}
        return task, deps

    @property
    def count(self) -> int:
        n_acc = math.prod(len(o) for o in self.owning)
        n_halo = n_acc - math.prod(len(o) for o in self.self_only)
        return n_acc + n_halo + math.prod(self.plan.nblocks)

    def block_patches(self) -> tuple[tuple[int, ...], ...]:
        """Per axis, per block: how many patch starts the block owns along the axis (a
        block's patch count is their product)."""
        return tuple(tuple(i1 - i0 for i0, i1 in owned) for owned in self.plan.owned)

    # -- keys ------------------------------------------------------------------------------------
    def keys(self) -> Iterator[tuple]:
        for bidx in itertools.product(*self.owning):
            yield (self.acc_name, *bidx)
        for bidx in itertools.product(*self.owning):
            if self._has_halo(bidx):
                yield (self.halo_name, *bidx)
        for cidx in itertools.product(*[range(n) for n in self.plan.nblocks]):
            yield self._out_key(cidx)

    def _has_halo(self, bidx: tuple[int, ...]) -> bool:
        return any(self.plan.targets[a][b] != (b,) for a, b in enumerate(bidx))

    def _out_key(self, cidx: tuple[int, ...]) -> tuple:
        if self.ch is None:
            return (self.name, *cidx)
        key = list(cidx)
        key.insert(self.ch, 0)
        return (self.name, *key)

    def _index(self, key: Any) -> tuple[str, tuple[int, ...]] | None:
        if not isinstance(key, tuple) or not key or key[0] not in (
                self.acc_name, self.halo_name, self.name):
            return None
        idx = key[1:]
        if key[0] == self.name and self.ch is not None:
            if len(idx) != len(self.plan.nblocks) + 1 or idx[self.ch] != 0:
                return None
            idx = idx[:self.ch] + idx[self.ch + 1:]
        if len(idx) != len(self.plan.nblocks) or not all(
                isinstance(i, int) and 0 <= i < n for i, n in zip(idx, self.plan.nblocks)):
            return None
        if key[0] != self.name and not self.plan.has_patches(idx):
            return None
        if key[0] == self.halo_name and not self._has_halo(idx):
            return None
        return key[0], idx

    def contains(self, key: Any) -> bool:
        return self._index(key) is not None

    def _pieces(self, bidx: tuple[int, ...], with_own: bool) -> list:
        """(target chunk, buffer slices) for the chunks block ``bidx`` reaches."""
        return [
            (target, tuple(p[1] for p in combo))
            for combo in itertools.product(*[self.halo_ax[a][b] for a, b in enumerate(bidx)])
            for target in [tuple(p[0] for p in combo)]
            if with_own or target != bidx
        ]

    # -- tasks -----------------------------------------------------------------------------------
    def task(self, key: tuple) -> tuple[tuple, set]:
        kind, idx = self._index(key)  # type: ignore[misc]
        if kind == self.acc_name:
            ext_lo = tuple(self.plan.ext[a][b][0] for a, b in enumerate(idx))
            ext_hi = tuple(self.plan.ext[a][b][1] for a, b in enumerate(idx))
            task, deps = self._accumulate(idx, ext_lo, ext_hi)
            pieces = self._pieces(idx, True)
            if self.spill and self.done is not None:  # as below, unless its work is in place
                task = (resumable_halo, self.done, self._out_key(idx)[1:], defer(task), pieces,
                        self.spill, self.name, idx, [self._out_key(t)[1:] for t, _ in pieces])
            elif self.spill:  # the halo faces are written, in parts; their keys and the own part
                task = (halo, task, pieces, self.spill, self.name, idx)
            gate = self.chain.get(idx)
            if gate is not None:  # waits for an earlier chunk (see written)
                task, deps = (then, gate, task), set(deps) | {gate}
            return task, deps
        if kind == self.halo_name:
            acc = (self.acc_name, *idx)
            if self.spill:  # the keys of the parts the accumulate task wrote, not its own part
                return (spilled_keys, acc), {acc}
            return (halo, acc, self._pieces(idx, False)), {acc}
        parts, sels, dsts = [], [], []
        for combo in itertools.product(*[self.src_ax[a][c] for a, c in enumerate(idx)]):
            bidx = tuple(p[0] for p in combo)
            dsts.append(tuple(p[2] for p in combo))
            if self.spill:  # the own part (in memory) or the keys of a neighbour's halo
                parts.append(((self.acc_name if bidx == idx else self.halo_name), *bidx))
                sels.append(idx)
            elif bidx == idx:
                parts.append((self.acc_name, *bidx))
                sels.append(tuple(p[1] for p in combo))
            else:
                parts.append((self.halo_name, *bidx))
                sels.append(idx)
        bounds = [self.plan.chunk(a, c) for a, c in enumerate(idx)]
        cov = None
        if self.cov_needed:
            cov = [self.coverage[a][lo:hi] for a, (lo, hi) in enumerate(bounds)]
            if all(c.all() for c in cov):
                cov = None
        shape = tuple(hi - lo for lo, hi in bounds)
        # Depending on this block's own halo task (unused here) makes the scheduler copy the
        # halo out before the chunk is summed, so the block buffer is freed right after.
        after = (self.halo_name, *idx) if self.plan.has_patches(idx) and self._has_halo(idx) \
            else None
        fill_value, acc_dtype, out_dtype = self.dtypes
        spec = ChunkSum(tuple(dsts), tuple(sels), shape, self.args[0], self.args[1], cov,
                        fill_value, acc_dtype, out_dtype, self.ch,
                        (self._out_key(idx)[1:], tuple(bounds)), self.copy)
        if self.writer is not None:
            region = [slice(lo, hi) for lo, hi in bounds]
            if self.ch is not None:
                region.insert(self.ch, slice(0, self.args[0]))
            task = (write_through, self.writer, self.done, self._out_key(idx)[1:],
                    tuple(region), spec, parts, after)
        else:
            task = (add, spec, parts, after)
        return task, set(parts) | ({after} if after else set())

    def into(self, out: np.ndarray, workers: int) -> tuple[dict, tuple, Sink] | None:
        """Tasks that accumulate straight into the in-memory result ``out`` (zeroed; shared
        memory: the local scheduler only), with no halo or chunk tasks; ``None`` where that path
        does not apply (a non-separable window needs a division, another dtype a cast, one axis
        no slabs, a block task shared with other outputs a buffer of its own)."""
        fill_value, acc_dtype, out_dtype = self.dtypes
        if self.args[1] or out_dtype != acc_dtype or self.plan.grid.ndim < 2 or \
                not getattr(self.overlap.reader, "sinks", True):
            return None
        canon = out[None] if self.ch is None else np.moveaxis(out, self.ch, 0)
        sink = Sink(canon, workers)
        # each job writes into its own array: keys of their own, never another job's
        tag = f"{self.name}-{uuid.uuid4().hex}"
        dsk: dict = {}
        previous = None
        for bidx in itertools.product(*self.owning):
            ext_lo = tuple(self.plan.ext[a][b][0] for a, b in enumerate(bidx))
            ext_hi = tuple(self.plan.ext[a][b][1] for a, b in enumerate(bidx))
            task, _ = self._accumulate(bidx, ext_lo, ext_hi)
            key = ("into-" + tag, *bidx)
            dsk[key] = (then, previous, task + (sink,))  # blocks in C order, one at a time
            previous = key
        cov = self.coverage if self.cov_needed else None
        key = ("into-done-" + tag,)
        dsk[key] = (finish_into, canon, cov, fill_value, list(dsk))
        return dsk, key, sink

    def chunks(self) -> tuple[tuple[int, ...], ...]:
        """The chunks of the result (one per block; the channel axis whole)."""
        plan = self.plan
        chunks = [tuple(plan.chunk(a, c)[1] - plan.chunk(a, c)[0] for c in range(n))
                  for a, n in enumerate(plan.nblocks)]
        if self.ch is not None:
            chunks.insert(self.ch, (self.args[0],))
        return tuple(chunks)


# -- the engine's layer ------------------------------------------------------------------------
class EngineLayer(LazyLayer):
    """The layer of an overlap-add engine's tasks; ``engine`` is kept, so that the engine is
    found again in a graph (:func:`find_engines`; :func:`daskpatch.to_zarr`'s fingerprint reads
    its ``params``). Its blocks start biggest first on a cluster (a ``priority`` annotation,
    :class:`~daskpatch._engine.order.BiggestFirst`, the one of a layer it replaces dropped) unless
    ``annotations`` has a priority of its own (``dask.annotate``)."""

    def __init__(self, engine: Engine, annotations: Mapping[str, Any] | None = None) -> None:
        theirs = {k: v for k, v in (annotations or {}).items() if not isinstance(v, BiggestFirst)}
        annotations = {"priority": BiggestFirst([engine]), **theirs}
        super().__init__(engine.keys, engine.count, engine.contains, engine.task,
                         annotations=annotations)
        self.engine = engine


def engine_array(plan: OverlapAdd, collections: list, extra: dict | None) -> da.Array:
    """The result of ``plan`` as a Dask array over its inputs ``collections`` (and a
    materialised layer of ``extra`` values its tasks read)."""
    engine = Engine(plan)
    meta = np.empty((0,) * (engine.plan.grid.ndim + (engine.ch is not None)),
                    dtype=engine.dtypes[2])
    return new_array(engine.name, EngineLayer(engine), engine.chunks(), meta, collections,
                     extra)


def find_engines(x: da.Array) -> dict[str, Engine]:
    """The engines of ``x``'s graph, by layer name."""
    return {n: layer.engine for n, layer in layers(x).items()
            if isinstance(layer, EngineLayer)}
