"""Lowering an overlap-add for its output: one function, :func:`lower`, takes the target as a
value -- :class:`IntoArray` (:func:`daskpatch.to_numpy`) or :class:`IntoStore`
(:func:`daskpatch.to_zarr`, spilled or not) -- and builds that output's own graph from the frozen
plans the array's engine layers hold (:class:`~daskpatch.graph.plan.OverlapAdd`), in both of
dask's graph modes. The user's array and graph are left as they are.

A different execution of a plan (its halos spilled to a store, its chunks written as they are
summed, or accumulated straight into an in-memory result) is a different
:class:`~daskpatch.graph.engine.Target`, so its tasks have names of their own; the layers that
depend on a renamed engine (a downstream operation, a rechunk) are rebuilt over the new names
with dask's own :func:`~dask.base.clone_key`, so the two graphs share no key whose task differs
and both can run on one cluster at once (a kept ``client.compute`` future and a write).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import dask.array as da
import numpy as np
from dask.base import clone_key, tokenize
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph, Layer, MaterializedLayer
from dask.utils import key_split

from daskpatch.graph.engine import Engine, EngineLayer, Target, find_engines
from daskpatch.graph.layers import EXPR, _expr_of, _top_layer, key_names, renamed_layer, rename_task
from daskpatch.storage.spill import Spill, spill_bytes


@dataclass(frozen=True)
class IntoArray:
    """Lower for an in-memory result: block tasks add straight into ``out`` (zeroed by the
    caller; shared memory, so the local scheduler only), each with ``workers`` threads."""

    out: np.ndarray
    workers: int = 1


@dataclass(frozen=True)
class IntoStore:
    """Lower for a Zarr store: the halos of engines built with ``spill=None`` go to ``store``
    under ``prefix`` when they total more than ``threshold`` bytes (``store=None``: never).
    With ``writer(chunk, location, region)`` and the chunk indices ``todo``, a spilled result
    written as it is writes its chunks from its own chunk tasks, its blocks chained in C order
    of ``todo`` (see :func:`_written`), skipping the work ``done(location)`` says is in place.
    ``tag`` names the write (with the lowered array's name, it makes :attr:`Lowered.token`); a
    written result's tasks and spilled parts are named from ``tag`` alone, so it must identify
    what is written (the target and the fingerprint): a resumed write then finds the parts
    of the run it resumes, whatever its graph's names."""

    store: Any
    prefix: str
    threshold: float | None = None
    writer: Callable | None = None
    todo: tuple[tuple[int, ...], ...] = ()
    tag: Any = None
    done: Callable[[tuple[int, ...]], bool] | None = None
    lag: int = 2  #: blocks ahead of the last chunk written (:func:`_chain`)


@dataclass
class Lowered:
    """What :func:`lower` made: ``array`` (the result as a new array, for a generic write) or
    ``job`` (a graph or ``Delayed`` that writes on its own, ``keys`` its final tasks); the
    ``(spill, engine name)`` pairs to clear once the result is written; ``close`` to call after
    the job ran; ``token`` names what the caller adds to the job (a token of the lowered
    array and :attr:`IntoStore.tag`)."""

    token: str = ""
    array: da.Array | None = None
    job: Any = None
    keys: list = field(default_factory=list)
    spills: list[tuple[Spill, str]] = field(default_factory=list)
    close: Callable[[], None] = lambda: None


def lower(x: da.Array, target: IntoArray | IntoStore) -> Lowered | None:
    """``x``'s graph for ``target``: a new graph with names of its own where an execution
    differs; ``None`` where ``target`` has no direct path for ``x`` (:class:`IntoArray` of an
    array that is no engine's result as it is, or whose chunks need a cast or division)."""
    if isinstance(target, IntoArray):
        return _into(x, target.out, target.workers)
    threshold = spill_bytes() if target.threshold is None else target.threshold
    if target.store is None:
        threshold = float("inf")
    y, spills = _spilled(x, target.store, target.prefix, threshold)
    token = tokenize(y.name, target.tag)
    if target.writer is not None and target.todo:
        name = f"to-zarr-written-{tokenize(target.tag)}"
        made = _written(y, target.writer, list(target.todo), name, target.done, target.lag)
        if made is not None:
            graph, keys, spill = made
            spills = [(s, n) for s, n in spills if n != y.name] + [(spill, name)]
            return Lowered(token, job=graph, keys=keys, spills=spills)
    return Lowered(token, array=y, spills=spills)


def _spilled(x: da.Array, store: Any, prefix: str, threshold: float
             ) -> tuple[da.Array, list[tuple[Spill, str]]]:
    """``x`` computed with the halos of its overlap-add engines sent to ``store`` under
    ``prefix``, as a new array (a new graph with keys of its own); ``x`` is left as it is.

    Engines built with ``spill=None`` whose halos exceed ``threshold`` bytes spill there;
    engines built with an explicit ``spill`` keep it. A spilled engine's tasks return other
    things (part names, not buffers) than the in-memory engine's, so it gets new names -- its
    output chunks' too -- and so does every layer above it, rebuilt over the new names. The new
    names derive from the spill target (the same call gives the same names, so ``resume=True``
    finds the parts of an interrupted run).

    Returns the array and the ``(spill, engine name)`` pairs to :meth:`Spill.clear` once the
    result is written.
    """
    engines = find_engines(x)
    spilling = {n for n, e in engines.items() if e.auto and e.halo_bytes > threshold}
    if not spilling:
        return x, [(e.spill, e.name) for e in engines.values() if e.spill is not None]
    target = Spill(store, prefix)
    seed = tokenize("spilled", target, sorted(spilling))
    if EXPR:
        return _spill_expr(x, target, spilling, seed)
    graph = x.dask
    # the spilled engines and every layer that depends on them, directly or not
    dependents: dict[str, set[str]] = {}
    for n, deps in graph.dependencies.items():
        for d in deps:
            dependents.setdefault(d, set()).add(n)
    above, todo = set(), list(spilling)
    while todo:
        n = todo.pop()
        if n not in above:
            above.add(n)
            todo.extend(dependents.get(n, ()))
    names: dict[str, str] = {}  # old key name -> new, for every key of those layers
    for n in above:
        if n in engines:
            e = engines[n]
            tag = "-spilled" if n in spilling else ""
            new = f"{key_split(e.name)}{tag}-{tokenize(e.name, seed)}"
            names.update({e.name: new, e.acc_name: "acc-" + new, e.halo_name: "halo-" + new})
        else:
            names.update({k: clone_key(k, seed) for k in key_names(graph.layers[n])})
    rename = {n: names.get(n) or clone_key(n, seed) for n in above}  # layer names
    layers: dict[str, Layer] = {}
    used = []
    for n, layer in graph.layers.items():
        if n in engines:
            e = engines[n]
            if n in above:
                e = Engine(e.overlap, Target(names[e.name], target if n in spilling else e.spill,
                                             tuple(names.items())))
                layer = EngineLayer(e, annotations=graph.layers[n].annotations)
            if e.spill is not None:
                used.append((e.spill, e.name))
        elif n in above:
            layer = renamed_layer(layer, names)
        layers[rename.get(n, n)] = layer
    deps = {rename.get(n, n): {rename.get(d, d) for d in ds}
            for n, ds in graph.dependencies.items()}
    new_graph = HighLevelGraph(layers, deps)
    return da.Array(new_graph, names.get(x.name, x.name), x.chunks, meta=x._meta), used


def _chain(engine: Engine, name: str, todo: list[tuple[int, ...]], lag: int = 2
           ) -> tuple[tuple[tuple[int, ...], tuple], ...]:
    """The blocks of ``todo`` (spatial chunk indices) in C order, the accumulate task of
    ``todo[k]``'s block waiting for chunk ``todo[k - lag]`` (of the engine named ``name``).

    A chunk's sources are its own block and blocks before it in C order, so each chunk can be
    summed, written and its halo parts deleted as soon as its own block is done: at most about
    ``lag`` blocks' own parts wait in memory and the halo parts on disk are those of a wave of
    blocks, whatever order the scheduler would otherwise pick (dask's order can run most blocks
    before any chunk)."""
    todo = sorted(todo)
    key = Engine(engine.overlap, Target(name))._out_key
    return tuple((todo[k], key(todo[k - lag])) for k in range(lag, len(todo))
                 if engine.plan.has_patches(todo[k]))


def _written(x: da.Array, writer: Callable, todo: list[tuple[int, ...]], name: str,
             done: Callable[[tuple[int, ...]], bool] | None = None, lag: int = 2
             ) -> tuple[HighLevelGraph, list, Spill] | None:
    """The graph writing the chunks ``todo`` (block indices of ``x``) of a spilled engine's
    result ``x`` straight from its chunk tasks (``writer(chunk, location, region)``), its blocks
    chained in C order (:func:`_chain`), under the new name ``name``, skipping the work
    ``done`` says is in place (:class:`~daskpatch.graph.engine.Target`); the keys of those chunk
    tasks, and the spill the engine's parts go to. ``None`` when ``x`` is not a spilled
    engine's result as it is, or under array expressions (not ported: ``to_zarr`` then writes
    from a store task per chunk, unchained)."""
    if EXPR:
        return None
    layer = x.dask.layers.get(x.name)
    if not isinstance(layer, EngineLayer) or layer.engine.spill is None:
        return None
    engine = layer.engine
    ch = engine.ch
    spatial = [tuple(i for a, i in enumerate(loc) if a != ch) if ch is not None else tuple(loc)
               for loc in todo]
    t = engine.target
    new = Engine(engine.overlap, Target(name, t.spill, t.names, writer,
                                        _chain(engine, name, spatial, lag), done))
    layers = {k: v for k, v in x.dask.layers.items() if k != x.name}
    deps = {k: set(v) for k, v in x.dask.dependencies.items() if k != x.name}
    layers[name] = EngineLayer(new, annotations=layer.annotations)
    deps[name] = set(x.dask.dependencies[x.name])
    assert new.spill is not None  # checked above, kept from x's engine
    return HighLevelGraph(layers, deps), [new._out_key(i) for i in spatial], new.spill


def _into(x: da.Array, out: np.ndarray, workers: int) -> Lowered | None:
    """A job accumulating the overlap-add result ``x`` straight into ``out`` with ``workers``
    threads per block; ``None`` when ``x`` is not an engine's result or the direct path does
    not apply."""
    layer = _top_layer(x)
    if not isinstance(layer, EngineLayer):
        return None
    made = layer.engine.into(out, workers)
    if made is None:
        return None
    dsk, key, sink = made
    if EXPR:
        return Lowered(job=_into_expr(x, dsk, key), close=sink.close)
    layers = {k: v for k, v in x.dask.layers.items() if k != x.name}
    deps = {k: set(v) for k, v in x.dask.dependencies.items() if k != x.name}
    name = key[0]
    layers[name] = MaterializedLayer(dsk)
    deps[name] = set(x.dask.dependencies[x.name])
    return Lowered(job=Delayed(key, HighLevelGraph(layers, deps), layer=name), close=sink.close)


# -- array expressions ----------------------------------------------------------------------------
if EXPR:
    from dask._collections import new_collection
    from dask._expr import Expr

    from daskpatch.graph.layers import LayerArray

    def _spill_expr(x: da.Array, target: Spill, spilling: set[str], seed: str
                    ) -> tuple[da.Array, list[tuple[Spill, str]]]:
        """:func:`_spilled` for array expressions: the spilled engines, and every engine above
        them, rebuilt under new names; every other expression above them follows."""
        memo: dict[str, Any] = {}
        n_params = len(LayerArray._parameters)

        def rebuild(node: Any) -> Any:
            hit = memo.get(node._name)
            if hit is not None:
                return hit
            ops = [rebuild(o) if isinstance(o, Expr) else o for o in node.operands]
            changed = any(isinstance(o, Expr) and o._name != n._name
                          for o, n in zip(node.operands, ops))
            layer = node.operand("layer") if isinstance(node, LayerArray) else None
            if isinstance(layer, EngineLayer) and (changed or layer.engine.name in spilling):
                e = layer.engine
                inputs = ops[n_params:]
                tag = "-spilled" if e.name in spilling else ""
                new = f"{key_split(e.name)}{tag}-{tokenize(e.name, seed)}"
                names = {old: i._name for old, i in zip(node.operand("expected"), inputs)
                         if old != i._name}
                names.update({e.name: new, e.acc_name: "acc-" + new,
                              e.halo_name: "halo-" + new})
                e = Engine(e.overlap, Target(new, target if e.name in spilling else e.spill,
                                             tuple(names.items())))
                out = LayerArray(new, EngineLayer(e, annotations=layer.annotations), *ops[2:5],
                                 tuple(i._name for i in inputs), *inputs)
            elif changed:
                out = type(node)(*ops)
            else:
                out = node
            memo[node._name] = out
            return out

        y = new_collection(rebuild(_expr_of(x)))
        return y, [(e.spill, e.name) for e in find_engines(y).values() if e.spill is not None]

    def _into_expr(x: da.Array, dsk: Mapping, key: Any) -> Delayed:
        """:func:`_into`'s job for array expressions: the tasks ``dsk`` over ``x``'s
        inputs, lowered (tasks renamed to the inputs' lowered names)."""
        low = _expr_of(x).lower_completely()
        names = low._moved()
        graph: dict = {}
        for dep in low.dependencies():
            graph.update(dep.__dask_graph__())
        graph.update(low.operand("extra"))
        graph.update({k: rename_task(t, names, k) for k, t in dsk.items()})
        name = key[0] if isinstance(key, tuple) else key
        hlg = HighLevelGraph({name: MaterializedLayer(graph)}, {name: set()})
        return Delayed(key, hlg, layer=name)
