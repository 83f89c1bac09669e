"""Every dask graph the engine builds or reads, in one place.

This is the file to port when dask's array query planning (``dask.array`` expressions) becomes
the default: the engine (:mod:`daskpatch._engine`) makes tasks, this module makes graphs of
them. Each function is small and named for what it does, so another implementation can sit
beside it.

A graph layer that makes its tasks on demand (:class:`LazyLayer`): a patch graph over a 8192^3
volume has ~10^5 tasks; writing them all into a dict costs seconds before anything runs.
:class:`LazyLayer` only knows how to enumerate its keys, how to make the task of a key and which
keys that task depends on; culling (what ``compute`` of one chunk does) makes just the tasks
needed, and building the array costs nothing.

No layer is changed once built: an engine's layer (:class:`EngineLayer`) receives its engine
when it is made, and a different execution of an engine (spilled, :func:`spill_into`; into an
in-memory result, :func:`engine_into`) is a different graph, with names of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import dask.array as da
import numpy as np
from dask._task_spec import GraphNode
from dask.base import clone_key, tokenize
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph, Layer, MaterializedLayer
from dask.typing import Key
from dask.utils import key_split

from ._engine.spill import Spill, spill_bytes

if TYPE_CHECKING:
    from ._engine.engine import Engine




class LazyLayer(Layer):
    """A layer of tasks made on demand.

    Parameters
    ----------
    keys : callable
        ``keys() -> iterator`` over every key of the layer.
    count : int
        Number of keys.
    contains : callable
        ``contains(key) -> bool``.
    task : callable
        ``task(key) -> (task, dependencies)``: a legacy tuple task and the set of keys it reads.
    """

    def __init__(
        self,
        keys: Callable[[], Iterator[Key]],
        count: int,
        contains: Callable[[Any], bool],
        task: Callable[[Any], tuple[Any, set]],
        annotations: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(annotations=annotations)
        self._keys, self._count, self._contains, self._task = keys, count, contains, task

    # Mapping protocol: materialises only what is asked for
    def __getitem__(self, key: Key) -> Any:
        if not self._contains(key):
            raise KeyError(key)
        return self._task(key)[0]

    def __contains__(self, key: object) -> bool:
        return self._contains(key)

    def __iter__(self) -> Iterator[Key]:
        return self._keys()

    def __len__(self) -> int:
        return self._count

    @property
    def has_legacy_tasks(self) -> bool:
        return True

    def is_materialized(self) -> bool:
        return False

    def get_output_keys(self) -> set:
        return set(self._keys())

    def get_dependencies(self, key: Key, all_hlg_keys: Collection[Key]) -> set[Key]:
        return set(self._task(key)[1])

    def cull(
        self, keys: set, all_hlg_keys: Collection[Key]
    ) -> tuple[Layer, Mapping[Key, set[Key]]]:
        out: dict = {}
        deps: dict = {}
        work = [k for k in keys if self._contains(k)]
        while work:
            k = work.pop()
            if k in out:
                continue
            task, kdeps = self._task(k)
            out[k] = task
            deps[k] = set(kdeps)
            work.extend(d for d in kdeps if d not in out and self._contains(d))
        return MaterializedLayer(out, annotations=self.annotations), deps


def lazy_graph(name: str, layer: Layer, collections: list, extra: dict | None = None
               ) -> HighLevelGraph:
    """A graph of ``layer`` over ``collections``, plus a materialised layer of ``extra`` values."""
    graph = HighLevelGraph.from_collections(name, layer, dependencies=collections)
    if not extra:
        return graph
    extra_name = "source-of-" + name
    layers = dict(graph.layers)
    layers[extra_name] = MaterializedLayer(extra)
    dependencies = {k: set(v) for k, v in graph.dependencies.items()}
    dependencies[name] = dependencies[name] | {extra_name}
    dependencies[extra_name] = set()
    return HighLevelGraph(layers, dependencies)


def _rename_key(key: Any, names: Mapping[str, str]) -> Any:
    if isinstance(key, tuple) and key and isinstance(key[0], str) and key[0] in names:
        return (names[key[0]],) + key[1:]
    if isinstance(key, str) and key in names:
        return names[key]
    return key


def rename_task(task: Any, names: Mapping[str, str], key: Any = None) -> Any:
    """``task`` with every reference to a key named in ``names`` (old name -> new name) renamed.

    Handles both task forms a layer may hold: :class:`dask._task_spec.GraphNode` (``key`` is
    then the node's new key) and legacy tuples (``(callable, *args)``, lists, dicts, key tuples
    and string keys), the way :meth:`dask.highlevelgraph.Layer.clone` walks them.
    """
    if isinstance(task, GraphNode):
        subs = {d: _rename_key(d, names) for d in task.dependencies}
        return task.substitute({d: n for d, n in subs.items() if n != d}, key=key)
    typ = type(task)
    if typ is tuple and task and callable(task[0]):
        return (task[0],) + tuple(rename_task(t, names) for t in task[1:])
    if typ is list:
        return [rename_task(t, names) for t in task]
    if typ is dict:
        return {k: rename_task(v, names) for k, v in task.items()}
    if typ is tuple or typ is str:
        return _rename_key(task, names)
    return task


def renamed_layer(layer: Layer, names: Mapping[str, str]) -> MaterializedLayer:
    """A new layer holding ``layer``'s tasks, keys and references renamed by ``names``.

    The original layer is not changed. Materialises the layer (as computing it would).
    """
    out = {}
    for key, task in dict(layer).items():
        new = _rename_key(key, names)
        out[new] = rename_task(task, names, new)
    return MaterializedLayer(out, annotations=layer.annotations)


def key_names(layer: Layer) -> set[str]:
    """The names (first elements) of the keys ``layer`` makes."""
    return {str(k[0] if isinstance(k, tuple) else k) for k in layer.get_output_keys()}


# -- the engine's graph ------------------------------------------------------------------------
class EngineLayer(LazyLayer):
    """The layer of an overlap-add engine's tasks; ``engine`` is kept, so that the engine is
    found again in a graph (:func:`find_engines`; :func:`daskpatch.to_zarr`'s fingerprint reads
    its ``params``)."""

    def __init__(self, engine: Engine, annotations: Mapping[str, Any] | None = None) -> None:
        super().__init__(engine.keys, engine.count, engine.contains, engine.task,
                         annotations=annotations)
        self.engine = engine


def engine_array(engine: Engine, collections: list, extra: dict | None) -> da.Array:
    """The result of ``engine`` as a Dask array over its inputs ``collections`` (and a
    materialised layer of ``extra`` values its tasks read)."""
    graph = lazy_graph(engine.name, EngineLayer(engine), collections, extra)
    meta = np.empty((0,) * (engine.plan.grid.ndim + (engine.ch is not None)),
                    dtype=engine.dtypes[2])
    return da.Array(graph, engine.name, engine.chunks(), meta=meta)


def find_engines(graph: HighLevelGraph) -> dict[str, Engine]:
    """The engines of a graph's layers, by layer name."""
    return {n: layer.engine for n, layer in graph.layers.items()
            if isinstance(layer, EngineLayer)}


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
    graph = x.dask
    engines = find_engines(graph)
    spilling = {n for n, e in engines.items() if e.auto and e.halo_bytes > threshold}
    if not spilling:
        return x, [(e.spill, e.name) for e in engines.values() if e.spill is not None]
    target = Spill(store, prefix)
    seed = tokenize("spilled", target, sorted(spilling))
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
    engine's result as it is. Used by :func:`daskpatch.to_zarr`."""
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
    layer = x.dask.layers.get(x.name)
    if not isinstance(layer, EngineLayer):
        return None
    engine = layer.engine
    made = engine.into(out, workers)
    if made is None:
        return None
    dsk, key, sink = made
    layers = {k: v for k, v in x.dask.layers.items() if k != x.name}
    deps = {k: set(v) for k, v in x.dask.dependencies.items() if k != x.name}
    name = key[0]
    layers[name] = MaterializedLayer(dsk)
    deps[name] = set(x.dask.dependencies[x.name])
    return Delayed(key, HighLevelGraph(layers, deps), layer=name), sink.close

