"""Which scheduler a ``compute()`` would use now, computing with a progress bar, and the jobs
computed (:func:`to_delayed`, :func:`store_job`, :func:`finishing`).

:func:`daskpatch.to_numpy` writes chunks straight into a NumPy array, which needs the local
(threaded or synchronous) scheduler; :func:`daskpatch.to_zarr` and :func:`daskpatch.to_numpy`
show :func:`distributed.progress` under a ``distributed.Client`` and
:class:`dask.diagnostics.ProgressBar` otherwise.

Why not :func:`dask.base.get_scheduler`: it answers the same question (and recognises a Client by
its class name too), but it imports ``distributed`` (0.3 s) whenever no scheduler is configured
or the configured one is a name such as ``"threads"``, and it returns ``Client.get`` rather than
the Client. Here ``distributed`` is only asked for a Client (:func:`distributed.get_client`, its
public API) when it is already imported: a Client cannot exist without it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, cast

import dask
import dask.array as da
import dask.local
import dask.threaded
import numpy as np
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

from daskpatch.graph.order import BiggestFirst
from daskpatch.graph.engine import find_engines
from daskpatch.graph.layers import EXPR, _expr_of
from daskpatch.storage.chunkcache import CACHE

#: The local schedulers by the names ``dask.config.set(scheduler=...)`` accepts.
_LOCAL = {"threads": dask.threaded.get, "threading": dask.threaded.get,
          "sync": dask.local.get_sync, "synchronous": dask.local.get_sync,
          "single-threaded": dask.local.get_sync}


def active_client() -> Any | None:
    """The distributed Client that ``compute()`` would use now, or ``None`` (local scheduler)."""
    if "distributed" not in sys.modules:  # no Client without it (and importing it costs 0.3 s)
        return None
    scheduler = dask.config.get("scheduler", None)
    if scheduler is not None:
        if "Client" in type(scheduler).__name__:  # as dask.base.get_scheduler recognises one
            return scheduler
        if not (isinstance(scheduler, str) and scheduler in ("distributed", "dask.distributed")):
            return None
    try:
        from distributed import get_client
    except ImportError:
        return None
    try:
        return get_client()
    except ValueError:
        return None


def local_get() -> Callable | None:
    """The local scheduler (threads or synchronous) that ``compute()`` would use now, else
    ``None`` (a distributed Client, processes)."""
    scheduler = dask.config.get("scheduler", None)
    if scheduler is None:
        return None if active_client() is not None else dask.threaded.get
    if isinstance(scheduler, str):
        return _LOCAL.get(scheduler.lower())
    if scheduler in (dask.threaded.get, dask.local.get_sync):
        return scheduler
    return None


def compute(obj: Delayed, progress: bool, **kwargs: Any) -> Any:
    """``obj.compute(**kwargs)``, with a progress bar when ``progress`` is true.

    The local scheduler is passed as a function (when no ``scheduler`` is given and one is in
    use): dask's own lookup imports ``distributed`` for any other answer, 0.3 s of a cold run
    before the first task starts."""
    if "scheduler" not in kwargs:
        get = local_get()
        if get is not None:
            kwargs["scheduler"] = get
    try:
        if not progress:
            return obj.compute(**kwargs)
        client = active_client()
        if client is not None:
            from distributed import progress as distributed_progress

            future = client.compute(obj)
            _show(distributed_progress(future))
            return future.result()
        from dask.diagnostics import ProgressBar

        with ProgressBar():
            return obj.compute(**kwargs)
    finally:
        release_chunks()


def _clear_chunks() -> None:
    CACHE.clear()


def release_chunks() -> None:
    """Drop the decoded input chunks this process (and, under a Client, each worker) keeps for
    the blocks of a job (:data:`daskpatch.storage.chunkcache.CACHE`), once the job is over: a
    worker may hold chunks whose other readers ran elsewhere."""
    _clear_chunks()
    client = active_client() if local_get() is None else None
    if client is not None:
        try:
            client.run(_clear_chunks)
        except Exception:  # noqa: BLE001 - a lost cluster: nothing left to release
            pass


def warm_up(client: Any = None) -> None:
    """Have every worker of the distributed ``client`` (default: the active one, if ``compute()``
    would use it) import daskpatch now, all at once.

    Otherwise each worker imports it (about 1 s here, most of it ``dask.array``'s own import)
    when its first block task arrives, on the thread that also hands the model to the other
    workers, so the workers wait for each other's imports one after another: a fresh 2-worker
    cluster started its first block 1.4-2.1 s after the job was sent, 0.05 s after this call
    (which took 0.9-1.1 s). Already imported, it costs a round trip."""
    import importlib

    if client is None:
        client = active_client() if local_get() is None else None
        if client is None:
            return
    try:
        client.run(importlib.import_module, "daskpatch")
    except ImportError as e:
        raise ImportError(
            "the workers of the active distributed Client cannot import daskpatch (install it "
            f"on every worker, the same version as here); a worker raised: {e}"
        ) from e


def _show(bar: Any) -> None:
    """Display what :func:`distributed.progress` returned: ``None`` in a console (where it
    blocks until done), a widget in a notebook."""
    if bar is not None:
        try:
            from IPython.display import display

            display(bar)
        except ImportError:  # pragma: no cover - a notebook always has IPython
            pass


def gather_into(x: da.Array, out: np.ndarray, progress: bool) -> None:
    """``out[...] = x.compute()`` where the chunks are computed in other processes. Under a
    ``distributed`` Client each chunk is written into ``out`` as it arrives and let go (no
    whole second result beside ``out``), from a job whose blocks start biggest first
    (:func:`to_delayed`); otherwise (``scheduler="processes"``) as ``compute`` gives it."""
    client = active_client()
    if client is None:
        out[...] = compute(cast(Delayed, x), progress)
        return
    from dask.array.core import slices_from_chunks
    from distributed import as_completed
    from distributed import progress as distributed_progress

    warm_up(client)
    futures = client.compute(list(to_delayed(x).flat))
    if progress:
        _show(distributed_progress(futures))
    where = dict(zip([f.key for f in futures], slices_from_chunks(x.chunks)))
    try:
        for future, chunk in as_completed(futures, with_results=True):
            out[where[future.key]] = chunk
            future.release()
    finally:
        release_chunks()


# -- jobs: graphs made ready to compute ------------------------------------------------------
def finishing(graph: HighLevelGraph, key: str, task: tuple) -> Delayed:
    """A job running ``task`` (its own key ``key``) after every layer of ``graph``."""
    layers = {**graph.layers, key: MaterializedLayer({key: task})}
    return Delayed(key, HighLevelGraph(layers, {**graph.dependencies, key: set(graph.layers)}))


def to_delayed(x: da.Array) -> np.ndarray:
    """``x.to_delayed(optimize_graph=True)`` in both graph modes: an object array (shape
    ``x.numblocks``) of one :class:`~dask.delayed.Delayed` per chunk, whose layer keeps the
    blocks of ``x``'s engines biggest first on a cluster (the annotation
    :class:`~daskpatch._engine.order.BiggestFirst`, which the optimisation would drop)."""
    engines = find_engines(x).values()
    first = {"priority": BiggestFirst(engines)} if engines else None
    if EXPR:
        low = _expr_of(x).optimize()
        base, graph, numblocks = low._name, low.__dask_graph__(), low.numblocks
    else:
        base, numblocks = x.name, x.numblocks
        graph = x.__dask_optimize__(x.__dask_graph__(), x.__dask_keys__())
    name = "delayed-" + base
    hlg = HighLevelGraph({name: MaterializedLayer(graph, annotations=first)}, {name: set()})
    out = np.empty(numblocks, dtype=object)
    for idx in np.ndindex(*numblocks):
        out[idx] = Delayed((base, *idx), hlg, layer=name)
    return out


def store_job(x: da.Array, out: np.ndarray) -> Any:
    """A job writing ``x`` into ``out`` chunk by chunk (``dask.array.store(x, out,
    compute=False)``), to compute later."""
    if not EXPR:
        return da.store(x, out, lock=False, compute=False)
    from dask.array.core import slices_from_chunks

    parts = to_delayed(x)
    put = dask.delayed(_put, pure=False)
    writes = [put(out, s, parts[i]) for i, s in zip(np.ndindex(*parts.shape),
                                                     slices_from_chunks(x.chunks))]
    return dask.delayed(_none, pure=False)(writes)


def _put(out: np.ndarray, where: tuple, block: np.ndarray) -> None:
    out[where] = block


def _none(_: Any) -> None:
    return None
