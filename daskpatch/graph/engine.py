"""The overlap-add engine's tasks: the accumulate, halo and chunk tasks of every block, made on
demand (see :class:`daskpatch._graph.LazyLayer`), and the tasks adding into an in-memory result.

Which block owns which patches comes from :meth:`daskpatch.grid.PatchGrid.block_plan`; how its
graph is built, renamed and found again is :mod:`daskpatch._graph`'s job.
"""

from __future__ import annotations

import copy
import itertools
import math
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import dask.array as da
import numpy as np

from daskpatch.graph.layers import LazyLayer, layers, new_array, rename_task
from daskpatch.graph.order import BiggestFirst, then
from daskpatch.engine.halo import add, halo, spilled_keys
from daskpatch.engine.sink import Sink, finish_into, write_through
from daskpatch.engine.spec import ChunkSum
from daskpatch.graph.plan import Blending
from daskpatch.storage.spill import Spill


class Engine:
    """The accumulate/halo/add tasks of one overlap-add, made on demand (see :class:`LazyLayer`).

    ``accumulate(bidx, ext_lo, ext_hi) -> (task, dependencies)`` makes the accumulate task of a
    block; it is what differs between :func:`reconstruct` and :func:`apply_patches`.
    """

    def __init__(self, blending: Blending, name: str, accumulate: Callable) -> None:
        plan, window = blending.plan, blending.window
        self.plan, self.name, self.accumulate = plan, name, accumulate
        #: what determines the result besides the model and the input data (JSON-ready): the
        #: fingerprint :func:`daskpatch.to_zarr` stores and ``resume=True`` checks
        self.params = dict(blending.params)
        spill = blending.spill
        #: ``None``: halos in memory, but :func:`spill_into` may still send them to a store
        self.auto = spill is None
        self.spill: Spill | None = spill if isinstance(spill, Spill) else None
        self.acc_name, self.halo_name = "acc-" + name, "halo-" + name
        self.names: dict[str, str] = {}  # input key names -> new names (see renamed)
        #: ``writer(chunk, location, region)``: each chunk task writes its chunk and returns
        #: what ``writer`` returns (see :meth:`written`); ``None``: chunk tasks return chunks
        self.writer: Callable | None = None
        self.chain: dict[tuple[int, ...], tuple] = {}  # block -> the chunk key it waits for
        channels, acc_dtype = blending.channels, blending.acc_dtype
        self.args = (channels, 0 if window.separable else 1)
        self.copy = window.blend == "crop"  # crop: voxels are copied, not summed
        self.dtypes = (blending.fill_value, acc_dtype, blending.out_dtype)
        self.ch = blending.layout.channel_axis
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
        task, deps = self.accumulate(bidx, ext_lo, ext_hi)
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

    def renamed(self, name: str, spill: Spill | None, names: dict[str, str]) -> Engine:
        """A new engine computing the same result under the new output name ``name`` (its block
        and halo tasks renamed with it), with its parts sent to ``spill`` (``None``: in memory),
        and reading its inputs under the key names ``names`` maps them to (old -> new).

        ``self`` is left as it is: keys of the two engines never meet, so both can be computed
        at once, on one scheduler (see :func:`spill_into`).
        """
        engine = copy.copy(self)
        engine.name, engine.acc_name, engine.halo_name = name, "acc-" + name, "halo-" + name
        engine.spill, engine.auto = spill, False
        engine.names = dict(names)
        return engine

    def written(self, name: str, writer: Callable, todo: list[tuple[int, ...]], lag: int = 2
                ) -> Engine:
        """A new engine (named ``name``) whose chunk tasks write their chunk with
        ``writer(chunk, location, region)`` and return what it returns, and whose blocks run
        in the C order of the chunks ``todo``: the accumulate task of ``todo[k]``'s block waits
        for chunk ``todo[k - lag]`` to be written.

        A chunk's sources are its own block and blocks before it in C order, so each chunk can
        be summed, written and its halo parts deleted as soon as its own block is done: at most
        about ``lag`` blocks' own parts wait in memory and the halo parts on disk are those of a
        wave of blocks, whatever order the scheduler would otherwise pick (dask's order can run
        most blocks before any chunk). Used by :func:`daskpatch.to_zarr` for a spilled result
        written as it is; only the chunks ``todo`` are chained (the others are not written).
        """
        engine = self.renamed(name, self.spill, self.names)
        engine.writer = writer
        todo = sorted(todo)
        engine.chain = {todo[k]: engine._out_key(todo[k - lag])
                        for k in range(lag, len(todo)) if self.plan.has_patches(todo[k])}
        return engine

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
            if self.spill:  # the halo faces are written, in parts; their keys and the own part
                task = (halo, task, self._pieces(idx, True), self.spill, self.name, idx)
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
        task = (add, spec, parts, after)
        if self.writer is not None:
            region = [slice(lo, hi) for lo, hi in bounds]
            if self.ch is not None:
                region.insert(self.ch, slice(0, self.args[0]))
            task = (write_through, self.writer, self._out_key(idx)[1:], tuple(region), task)
        return task, set(parts) | ({after} if after else set())

    def into(self, out: np.ndarray, workers: int) -> tuple[dict, tuple, Sink] | None:
        """Tasks that accumulate straight into the in-memory result ``out`` (zeroed; shared
        memory: the local scheduler only), with no halo or chunk tasks; ``None`` where that path
        does not apply (a non-separable window needs a division, another dtype a cast, one axis
        no slabs)."""
        fill_value, acc_dtype, out_dtype = self.dtypes
        if self.args[1] or out_dtype != acc_dtype or self.plan.grid.ndim < 2:
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


def engine_array(engine: Engine, collections: list, extra: dict | None) -> da.Array:
    """The result of ``engine`` as a Dask array over its inputs ``collections`` (and a
    materialised layer of ``extra`` values its tasks read)."""
    meta = np.empty((0,) * (engine.plan.grid.ndim + (engine.ch is not None)),
                    dtype=engine.dtypes[2])
    return new_array(engine.name, EngineLayer(engine), engine.chunks(), meta, collections,
                     extra)


def find_engines(x: da.Array) -> dict[str, Engine]:
    """The engines of ``x``'s graph, by layer name."""
    return {n: layer.engine for n, layer in layers(x).items()
            if isinstance(layer, EngineLayer)}
