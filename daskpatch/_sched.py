"""Which scheduler a ``compute()`` would use now, and computing with a progress bar.

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
from typing import Any

import dask
import dask.local
import dask.threaded
from dask.delayed import Delayed

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
    if not progress:
        return obj.compute(**kwargs)
    client = active_client()
    if client is not None:
        from distributed import progress as distributed_progress

        future = client.compute(obj)
        bar = distributed_progress(future)  # blocks in a console; a widget in a notebook
        if bar is not None:
            try:
                from IPython.display import display

                display(bar)
            except ImportError:  # pragma: no cover - a notebook always has IPython
                pass
        return future.result()
    from dask.diagnostics import ProgressBar

    with ProgressBar():
        return obj.compute(**kwargs)
