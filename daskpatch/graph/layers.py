"""Every dask graph the engine builds or reads, in one place.

The engine (:mod:`daskpatch._engine`) makes tasks, this module makes graphs of them, in both of
dask's array modes (:data:`EXPR`): legacy graphs (``HighLevelGraph``) and, with dask's array
query planning (``DASK_ARRAY__QUERY_PLANNING=True``), array expressions. Other modules build
(:func:`new_array`, :func:`from_zarr`), read (:func:`layers`, :func:`find_engines`,
:func:`direct_source`) and rewrite (:func:`spill_into`, :func:`engine_into`) graphs only
through this module; :mod:`daskpatch._sched` makes jobs of them. Under array expressions an
array made here is a :class:`LayerArray` expression holding its layer; graph surgery rebuilds the
expression (``spill_into``), and jobs wrap the lowered graph. Array expressions do not cull (in
dask 2026.8): computing one chunk makes every task of the layer.

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

import math
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

from daskpatch.storage.spill import Spill, spill_bytes
from daskpatch.graph.order import BiggestFirst

if TYPE_CHECKING:
    from daskpatch.graph.engine import Engine

#: Whether dask's array query planning (``array.query-planning``, array expressions) is on; the
#: choice is fixed when ``dask.array`` is first imported. Every function below works in both
#: modes: the legacy graphs (``HighLevelGraph``) and, when this is true, array expressions.
EXPR: bool = bool(getattr(da, "array_expr_enabled", lambda: False)())


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


# -- building and reading arrays (both graph modes) ----------------------------------------------
def _expr_of(x: Any) -> Any:
    """The expression of an array (array-expression mode)."""
    return x.expr


def new_array(name: str, layer: Layer, chunks: tuple, meta: Any, collections: list,
              extra: dict | None = None) -> da.Array:
    """A Dask array named ``name`` whose chunks are the keys ``(name, i, j, ...)`` of ``layer``,
    over the input arrays ``collections`` (whose keys its tasks read) and the graph entries
    ``extra`` (values its tasks read by key)."""
    if EXPR:
        inputs = [c.expr for c in collections]
        expr = LayerArray(name, layer, tuple(chunks), meta, dict(extra or {}),
                          tuple(c.name for c in collections), *inputs)
        return new_collection(expr)
    return da.Array(lazy_graph(name, layer, collections, extra), name, chunks, meta=meta)


def layers(x: da.Array) -> Mapping[str, Layer]:
    """The layers of ``x``'s graph by name, inputs first. Under array expressions: one per
    :func:`new_array` (and a ``source-of-`` layer of its ``extra`` values), an ``original-``
    layer holding the array of a ``from_array``, and a layer of the NumPy arrays any other
    expression holds (none are materialised)."""
    if not EXPR:
        return x.dask.layers
    from dask.array._array_expr._io import FromArray

    out: dict[str, Layer] = {}
    for e in reversed(list(_expr_of(x).walk())):
        if isinstance(e, LayerArray):
            out[e._name] = e.operand("layer")
            if e.operand("extra"):
                out["source-of-" + e._name] = MaterializedLayer(dict(e.operand("extra")))
        elif isinstance(e, FromArray):
            out["original-" + e._name] = MaterializedLayer({e._name: e.operand("array")})
        else:
            held = {(e._name, i): o for i, o in enumerate(e.operands)
                    if isinstance(o, np.ndarray) and o.size}
            if held:
                out[e._name] = MaterializedLayer(held)
    return out


def _top_layer(x: da.Array) -> Layer | None:
    """The layer making ``x``'s own chunks, when :func:`new_array` made ``x``; else ``None``
    (or another layer, in the legacy mode)."""
    if EXPR:
        return _expr_of(x).operand("layer") if isinstance(_expr_of(x), LayerArray) else None
    return x.dask.layers.get(x.name)


class SourceLayer(LazyLayer):
    """The layer of :func:`from_zarr` (array-expression mode): one read task per chunk of
    ``array``, which it keeps (:func:`direct_source`)."""

    def __init__(self, array: Any, name: str, source: str, chunks: tuple) -> None:
        from dask._task_spec import Task, TaskRef
        from dask.array.core import getter, slices_from_chunks

        counts = [len(c) for c in chunks]
        slices = slices_from_chunks(chunks)

        def keys() -> Iterator[Key]:
            for idx in np.ndindex(*counts):
                yield (name, *(int(i) for i in idx))

        def contains(key: Any) -> bool:
            return (isinstance(key, tuple) and len(key) == 1 + len(counts) and key[0] == name
                    and all(isinstance(i, int) and 0 <= i < n for i, n in zip(key[1:], counts)))

        def task(key: Any) -> tuple[Any, set]:
            flat = int(np.ravel_multi_index(key[1:], counts)) if counts else 0
            return Task(key, getter, TaskRef(source), slices[flat]), {source}

        super().__init__(keys, math.prod(counts), contains, task)
        self.array = array


def from_zarr(z: Any, chunks: Any = None) -> da.Array:
    """``dask.array.from_zarr(z, chunks)`` in both graph modes (array expressions have no
    ``from_zarr``; their ``from_array`` would hash a NumPy copy of every chunk read)."""
    if not EXPR:
        return da.from_zarr(z) if chunks is None else da.from_zarr(z, chunks=chunks)
    from dask.array.core import normalize_chunks

    chunks = normalize_chunks(z.chunks if chunks is None else chunks, z.shape, dtype=z.dtype)
    name = "from-zarr-" + tokenize(z, chunks)
    source = "original-" + name
    meta = np.empty((0,) * len(z.shape), dtype=z.dtype)
    return new_array(name, SourceLayer(z, name, source, chunks), chunks, meta, [], {source: z})


def direct_source(x: da.Array) -> Any | None:
    """The array-like under a Dask array built by ``from_array``/``from_zarr`` (or
    :func:`from_zarr`), else ``None``."""
    if EXPR:
        from dask.array._array_expr._io import FromArray

        e = _expr_of(x)
        if isinstance(e, LayerArray) and isinstance(e.operand("layer"), SourceLayer):
            obj = e.operand("layer").array
        elif (isinstance(e, FromArray) and not isinstance(e.operand("array"), np.ndarray)
              and not e.operand("inline_array")):
            obj = e.operand("array")  # as the legacy graph's ``original-`` layer
        else:
            return None
    else:
        graph_layers = x.dask.layers
        if len(graph_layers) != 2:
            return None
        top = x.dask.dependencies.get(x.name, set())
        if len(top) != 1:
            return None
        (orig,) = top
        if not orig.startswith("original-"):
            return None
        values = list(dict(graph_layers[orig]).values())
        if len(values) != 1:
            return None
        obj = values[0]
    if getattr(obj, "shape", None) != x.shape or not hasattr(obj, "__getitem__"):
        return None
    return obj


# -- array expressions ----------------------------------------------------------------------------
if EXPR:
    import functools

    from dask._collections import new_collection
    from dask._expr import Expr
    from dask.array._array_expr._expr import ArrayExpr

    class LayerArray(ArrayExpr):
        """An array expression whose chunks a :class:`Layer` makes (:func:`new_array`).

        Operands: the name, the layer, the chunks, the meta, the ``extra`` graph entries, the
        names its tasks read its inputs under, then the inputs' expressions. When the
        optimiser replaces an input by another name (a rechunk lowered to its tasks), the array
        takes a new name of its own and its tasks are renamed to read the new keys.
        """

        _parameters = ["base", "layer", "chunks", "meta", "extra", "expected"]

        @property
        def inputs(self) -> list:
            return self.operands[len(self._parameters):]

        @functools.cached_property
        def _meta(self) -> Any:
            return self.operand("meta")

        def _moved(self) -> dict[str, str]:
            return {old: new._name for old, new in zip(self.operand("expected"), self.inputs)
                    if old != new._name}

        @functools.cached_property
        def _name(self) -> str:
            base = self.operand("base")
            moved = self._moved()
            if not moved:
                return base
            return f"{key_split(base)}-{tokenize(base, sorted(moved.items()))}"

        def __dask_tokenize__(self) -> str:
            return self._name

        def _layer(self) -> dict:
            names = self._moved()
            base = self.operand("base")
            if self._name != base:
                names[base] = self._name
            layer = self.operand("layer")
            out = dict(renamed_layer(layer, names)) if names else dict(layer)
            out.update(self.operand("extra"))
            return out

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
