"""A graph layer that makes its tasks on demand.

A patch graph over a 8192^3 volume has ~10^5 tasks; writing them all into a dict costs seconds
before anything runs. :class:`LazyLayer` only knows how to enumerate its keys, how to make the task
of a key and which keys that task depends on; culling (what ``compute`` of one chunk does) makes
just the tasks needed, and building the array costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

from dask._task_spec import GraphNode
from dask.highlevelgraph import HighLevelGraph, Layer, MaterializedLayer

Key = tuple


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
        task: Callable[[Key], tuple[Any, set]],
    ) -> None:
        super().__init__()
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
    def has_legacy_tasks(self) -> bool:  # type: ignore[override]
        return True

    def is_materialized(self) -> bool:
        return False

    def get_output_keys(self) -> set:
        return set(self._keys())

    def get_dependencies(self, key: Key, all_hlg_keys: Collection[Key]) -> set:
        return set(self._task(key)[1])

    def cull(
        self, keys: set, all_hlg_keys: Collection[Key]
    ) -> tuple[Layer, Mapping[Key, set]]:
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
