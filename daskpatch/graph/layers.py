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
from typing import Any

import dask.array as da
import numpy as np
from dask._task_spec import GraphNode
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph, Layer, MaterializedLayer
from dask.typing import Key
from dask.utils import key_split


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
