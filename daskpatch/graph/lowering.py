"""Lowering an overlap-add for its target: a different execution of the same engine (its halos
spilled to a store, its chunks written to Zarr as they are summed, or accumulated straight into
an in-memory result) is a different graph with names of its own."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import dask.array as da
import numpy as np
from dask.base import clone_key, tokenize
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph, Layer, MaterializedLayer
from dask.utils import key_split

from daskpatch.graph.engine import EngineLayer, find_engines
from daskpatch.graph.layers import EXPR, _expr_of, _top_layer, key_names, renamed_layer, rename_task
from daskpatch.storage.spill import Spill, spill_bytes


def spill_into(x: da.Array, store: Any, prefix: str, *, threshold: float | None = None
               ) -> tuple[da.Array, list[tuple[Spill, str]]]:
    """``x`` computed with the halos of its overlap-add engines sent to ``store`` under
    ``prefix``, as a new array (a new graph with keys of its own); ``x`` is left as it is.

    Engines built with ``spill=None`` whose halos exceed ``threshold`` bytes (default
    :func:`spill_bytes`) spill there; engines built with an explicit ``spill`` keep it. A
    spilled engine's tasks return other things (part names, not buffers) than the in-memory
    engine's, so it gets new names -- its output chunks' too -- and so does every layer above it
    (a downstream operation, a rechunk), rebuilt over the new names: the two graphs share no
    key whose task differs, and ``x`` computed on the same cluster at the same time (a kept
    future) is unaffected. The new names derive from the spill target (the same call gives the
    same names, so ``resume=True`` finds the parts of an interrupted run).

    Returns the array and the ``(spill, engine name)`` pairs to :meth:`Spill.clear` once the
    result is written. Used by :func:`daskpatch.to_zarr`, which spills into the output store
    (visible to every worker that writes the output).
    """
    threshold = spill_bytes() if threshold is None else threshold
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
                e = e.renamed(names[e.name], target if n in spilling else e.spill, names)
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


def written_engine(x: da.Array, writer: Callable, todo: list[tuple[int, ...]], name: str
                   ) -> tuple[HighLevelGraph, list, Spill] | None:
    """The graph writing the chunks ``todo`` (block indices of ``x``) of a spilled engine's
    result ``x`` straight from its chunk tasks (``writer(chunk, location, region)``), its blocks
    chained in C order (:meth:`Engine.written`), under the new name ``name``; the keys of those
    chunk tasks, and the spill the engine's parts go to. ``None`` when ``x`` is not a spilled
    engine's result as it is, or under array expressions (not ported: ``to_zarr`` then writes
    from a store task per chunk, unchained). Used by :func:`daskpatch.to_zarr`."""
    if EXPR:
        return None
    layer = x.dask.layers.get(x.name)
    if not isinstance(layer, EngineLayer) or layer.engine.spill is None:
        return None
    engine = layer.engine
    ch = engine.ch
    spatial = [tuple(i for a, i in enumerate(loc) if a != ch) if ch is not None else tuple(loc)
               for loc in todo]
    new = engine.written(name, writer, spatial)
    layers = {k: v for k, v in x.dask.layers.items() if k != x.name}
    deps = {k: set(v) for k, v in x.dask.dependencies.items() if k != x.name}
    layers[name] = EngineLayer(new, annotations=layer.annotations)
    deps[name] = set(x.dask.dependencies[x.name])
    assert new.spill is not None  # checked above, kept by written
    return HighLevelGraph(layers, deps), [new._out_key(i) for i in spatial], new.spill


def engine_into(x: da.Array, out: np.ndarray, workers: int = 1
                ) -> tuple[Delayed, Callable[[], None]] | None:
    """A job accumulating the overlap-add result ``x`` straight into ``out`` (zeroed by the
    caller) with ``workers`` threads per block, and what to call after it; ``None`` when ``x``
    is not an engine's result or the direct path does not apply. Used by
    :func:`daskpatch.to_numpy` on the local scheduler."""
    layer = _top_layer(x)
    if not isinstance(layer, EngineLayer):
        return None
    engine = layer.engine
    made = engine.into(out, workers)
    if made is None:
        return None
    dsk, key, sink = made
    if EXPR:
        return _into_expr(x, dsk, key), sink.close
    layers = {k: v for k, v in x.dask.layers.items() if k != x.name}
    deps = {k: set(v) for k, v in x.dask.dependencies.items() if k != x.name}
    name = key[0]
    layers[name] = MaterializedLayer(dsk)
    deps[name] = set(x.dask.dependencies[x.name])
    return Delayed(key, HighLevelGraph(layers, deps), layer=name), sink.close


# -- array expressions ----------------------------------------------------------------------------
if EXPR:
    from dask._collections import new_collection
    from dask._expr import Expr

    from daskpatch.graph.layers import LayerArray

    def _spill_expr(x: da.Array, target: Spill, spilling: set[str], seed: str
                    ) -> tuple[da.Array, list[tuple[Spill, str]]]:
        """:func:`spill_into` for array expressions: the spilled engines, and every engine above
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
                e = e.renamed(new, target if e.name in spilling else e.spill, names)
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
        """:func:`engine_into`'s job for array expressions: the tasks ``dsk`` over ``x``'s
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
