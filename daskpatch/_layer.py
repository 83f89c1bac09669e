"""Moved to :mod:`daskpatch._graph` (kept importable while other modules are re-pointed)."""

from ._graph import LazyLayer, key_names, lazy_graph, rename_task, renamed_layer

__all__ = ["LazyLayer", "key_names", "lazy_graph", "rename_task", "renamed_layer"]
