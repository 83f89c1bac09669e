"""What a graph reads: the Zarr and NumPy arrays under a Dask array, and the fingerprint made of
them and of its engines' parameters. The scan also keeps a write from overwriting what it reads
(:func:`check_not_read`) and :func:`daskpatch.to_numpy` from writing into its own input
(:func:`check_not_aliased`)."""

from __future__ import annotations

import hashlib
from typing import Any

import dask.array as da
import numpy as np
import zarr
from dask.highlevelgraph import MaterializedLayer
from dask.utils import key_split
from zarr.abc.store import Store

from daskpatch.errors import UnsafeTargetError
from daskpatch.adapters.models import model_fingerprint
from daskpatch.graph.engine import EngineLayer
from daskpatch.graph.layers import EXPR, layers
from daskpatch.storage.fingerprint import jsonable
from daskpatch.storage.storeio import get
from daskpatch.storage.stores import FORMAT, _join, location, overlaps


def _scan(value: Any, found: dict[int, Any], depth: int = 0) -> None:
    if isinstance(value, (np.ndarray, zarr.Array)):
        found.setdefault(id(value), value)
    elif isinstance(value, (tuple, list)) and depth < 2:
        for v in value:
            _scan(v, found, depth + 1)
    elif type(value).__name__ == "DataNode":  # dask's task spec wrapper of a literal
        _scan(getattr(value, "value", None), found, depth + 1)


def graph_arrays(x: da.Array, *, sources_only: bool = False) -> list[Any]:
    """The NumPy and Zarr arrays a Dask array's graph holds (not the ones it computes).

    That is what ``from_array``/``from_zarr`` (``original-`` layers, or the arrays of an inline
    ``from_zarr``), daskpatch's readers (``source-of-`` layers of :func:`~daskpatch.apply_patches`,
    :func:`~daskpatch.extract_patches` and :func:`~daskpatch.reconstruct`) and any other
    materialised layer hold; the on-demand layers of daskpatch hold no data. With
    ``sources_only`` the NumPy chunks that small ``from_array`` calls copy into the graph are
    left out (they are data, not an input that could be named).
    """
    found: dict[int, Any] = {}
    for name, layer in layers(x).items():
        source = name.startswith(("original-", "source-of-"))
        if isinstance(layer, MaterializedLayer):
            if sources_only and not source:
                part: dict[int, Any] = {}
                for value in layer.mapping.values():
                    _scan(value, part)
                found.update((k, v) for k, v in part.items() if isinstance(v, zarr.Array))
            else:
                for value in layer.mapping.values():
                    _scan(value, found)
        else:
            for value, index in getattr(layer, "indices", ()) or ():
                if index is None:
                    _scan(value, found)
    return list(found.values())


def check_not_read(x: da.Array, store: Store, path: str | None, where: str) -> None:
    """Refuse a target that contains, or lies inside, a Zarr array the graph reads."""
    target = location(store, path)
    for source in graph_arrays(x, sources_only=True):
        if not isinstance(source, zarr.Array):
            continue
        loc = location(source.store, source.path or None)
        if not overlaps(loc, target):
            continue
        if loc == target:
            what = where
        else:
            inside = loc[1].startswith(target[1].rstrip("/") + "/")
            what = f"the Zarr array {loc[0]}://{loc[1]}, {'inside' if inside else 'which holds'}"
            what += f" {where}"
        raise UnsafeTargetError(
            f"to_zarr: the input array reads from {what}, which this call would write (and "
            "overwrite or delete what it reads); write to a location that neither contains "
            "that array nor lies inside it (rechunk_to_stride copies an array to new chunks)",
            param="store", value=where
        )


def check_not_aliased(x: da.Array, out: np.ndarray) -> None:
    """Refuse an ``out`` sharing memory with a NumPy array the graph reads."""
    for source in graph_arrays(x):
        if isinstance(source, np.ndarray) and np.may_share_memory(out, source):
            raise ValueError(
                "out shares memory with a NumPy array the computation reads (shape "
                f"{source.shape}, dtype {source.dtype}): writing the result there would change "
                "the input while it is read; pass out=None or a separate array"
            )


# --------------------------------------------------------------------------------------------
# fingerprints
# --------------------------------------------------------------------------------------------


def _input(source: Any) -> str:
    if isinstance(source, zarr.Array):
        kind, where = location(source.store, None)
        meta = get(source.store, _join(source.path or None, "zarr.json")) or get(
            source.store, _join(source.path or None, ".zarray"))
        digest = f" metadata sha256:{hashlib.sha256(meta).hexdigest()[:16]}" if meta else ""
        return f"zarr {kind}://{where}" + (f" path {source.path!r}" if source.path else "") \
            + digest
    return (f"numpy (content not fingerprinted) shape {tuple(source.shape)} dtype "
            f"{source.dtype}")


#: Layers that hold inputs, models or daskpatch's own readers: fingerprinted apart.
_SOURCES = ("original-", "source-", "from-zarr-", "model-", "array-", "apply-fused-")


def _operations(x: da.Array, exact: bool) -> list[str]:
    """The operations of ``x``'s graph besides daskpatch's engines and the inputs: the user's
    own (``apply_patches(vol * 2, ...)``, a rechunk, ``result + 1``). Their dask names are
    tokens of the operation and its inputs, the same in every process when the inputs are
    Zarr arrays (``exact``), and they are recorded whole where they feed an engine; elsewhere
    (above an engine, whose name holds its model's token, or over NumPy inputs, whose names are
    random) only the operation's name is recorded."""
    if EXPR:  # array expressions: names only (no layer dependencies to walk here)
        return sorted(key_split(n) for n, layer in layers(x).items()
                      if not n.startswith(_SOURCES) and not isinstance(layer, EngineLayer))
    graph = x.dask  # a HighLevelGraph (legacy graphs)
    engines = {n for n, layer in graph.layers.items() if isinstance(layer, EngineLayer)}
    below: set[str] = set()
    todo = [d for e in engines for d in graph.dependencies.get(e, ())]
    while todo:
        n = todo.pop()
        if n not in below:
            below.add(n)
            todo.extend(graph.dependencies.get(n, ()))
    return sorted(n if exact and n in below else key_split(n) for n in graph.layers
                  if n not in engines and not n.startswith(_SOURCES))


def fingerprint(x: da.Array, chunks: tuple[int, ...], run_id: str | None) -> dict[str, Any]:
    """Everything that determines ``x`` written with Zarr ``chunks`` that can be known in any
    process.

    The overlap-add parameters come from the ``params`` of the engines in the graph, with the
    fingerprint of each engine's model (:func:`~daskpatch.adapters.models.model_fingerprint`:
    a torch module's class and parameters, a function's name and code; what cannot be
    fingerprinted is recorded as such, and ``run_id`` names its version); the inputs are the
    Zarr arrays the graph reads (by location) and the NumPy arrays it was given (by shape and
    dtype only: their content is not hashed).
    """
    engines = []
    for layer in layers(x).values():
        engine = getattr(layer, "engine", None)
        params = getattr(engine, "params", None)
        if engine is not None and isinstance(params, dict) and params:
            fn = getattr(engine.overlap.reader, "fn", None)
            engines.append(params if fn is None else {**params, "model": model_fingerprint(fn)})
    sources = graph_arrays(x, sources_only=True)
    inputs = sorted({_input(s) for s in sources})
    return jsonable({
        "format": FORMAT,
        "shape": x.shape,
        "dtype": str(x.dtype),
        "chunks": chunks,
        "pipeline": [e.get("kind", "?") for e in engines],
        "engines": engines,
        "inputs": inputs,
        "operations": _operations(x, exact=all(isinstance(s, zarr.Array) for s in sources)),
        "run_id": run_id,
    })
