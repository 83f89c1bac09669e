"""Torch's intra-op threads next to dask's: their product fits the cores the process has.

A model that runs in dask's tasks runs once per dask thread at a time, and PyTorch gives each of
those calls its own intra-op threads (by default, one per physical core): on 2 cores, 2 dask
threads x 2 torch threads oversubscribe them. So where a :class:`~daskpatch.TorchModel` runs in a task, and nobody chose torch's threads, each
dask thread sets them once to ``max(1, cores // dask_threads)``:

* ``cores``: the cores this process may use (:func:`dask.system.cpu_count`: its CPU affinity and
  cgroup quota);
* ``dask_threads``: how many of dask's threads may run the model at once: the ``nthreads`` of
  the ``dask.distributed`` worker running the task; 1 while :func:`daskpatch.to_numpy` runs
  its blocks one after another (:func:`one_model_call_at_a_time`: no two model calls overlap,
  so torch gets every core); else the threaded scheduler's ``num_workers`` setting, else its
  default pool (``cores`` threads).

Chosen means: the ``daskpatch.torch-threads`` setting is an integer (used as it is), or
``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` is set (as ``distributed``'s nanny sets it to 1 for its
worker processes), or ``torch.get_num_threads()`` is neither torch's default for this process nor
a value daskpatch set (the user called ``torch.set_num_threads``). A user value equal to torch's
default cannot be told apart from it: set ``daskpatch.torch-threads`` to pin it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

import dask.config
import dask.system

from daskpatch.geometry.parse import _describe

__all__ = ["available_cores", "dask_threads", "fit_torch_threads", "one_model_call_at_a_time",
           "thread_plan"]

_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
_local = threading.local()
_ours: dict[int, int] = {}  # pid -> the value daskpatch last set in that process
_serial = [0]  # jobs running in this process whose model calls never overlap
_serial_lock = threading.Lock()


@contextlib.contextmanager
def one_model_call_at_a_time() -> Iterator[None]:
    """While this is open, the model calls of this process's dask tasks run one at a time
    (:func:`daskpatch.to_numpy`'s chained blocks): :func:`dask_threads` is then 1.

    Examples
    --------
    >>> with one_model_call_at_a_time():
    ...     dask_threads()
    1
    """
    with _serial_lock:
        _serial[0] += 1
    try:
        yield
    finally:
        with _serial_lock:
            _serial[0] -= 1


def available_cores() -> int:
    """The cores this process may use: its CPU affinity and cgroup quota (dask's count).

    Examples
    --------
    >>> available_cores() >= 1
    True
    """
    return max(1, int(dask.system.cpu_count()))


def dask_threads() -> int:
    """The dask threads that may run a model at once in this process: the ``nthreads`` of the
    ``dask.distributed`` worker whose task calls this, else 1 within
    :func:`one_model_call_at_a_time`, else the threaded scheduler's ``num_workers`` setting,
    else its default pool's size (the available cores).

    Examples
    --------
    >>> import dask
    >>> with dask.config.set(num_workers=3):
    ...     dask_threads()
    3
    """
    if "distributed" in sys.modules:  # no worker without it
        try:
            from distributed import get_worker

            return max(1, int(get_worker().state.nthreads))
        except (ImportError, ValueError, AttributeError):
            pass
    if _serial[0]:
        return 1
    workers = dask.config.get("num_workers", None)
    if isinstance(workers, int) and not isinstance(workers, bool) and workers >= 1:
        return workers
    return available_cores()


def _setting() -> int | None:
    """The ``daskpatch.torch-threads`` setting: ``None`` for ``"auto"``, else an int >= 1."""
    value = dask.config.get("daskpatch.torch-threads", "auto")
    if value is None or value == "auto":
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"dask.config setting daskpatch.torch-threads must be 'auto' or an "
                         f"integer >= 1; got {_describe(value)}")
    return value


def _env() -> str | None:
    for name in _ENV:
        if os.environ.get(name):
            return f"{name}={os.environ[name]}"
    return None


def _torch_defaults() -> set[int]:
    """What ``torch.get_num_threads()`` is in a process where nobody set it: its physical
    cores, or its logical ones (OpenMP's count), within the CPU affinity."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return {os.cpu_count() or 1}
    cores = set()
    for cpu in cpus:
        topo = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
        try:
            with open(topo + "physical_package_id") as f, open(topo + "core_id") as g:
                cores.add((f.read().strip(), g.read().strip()))
        except OSError:
            cores.add(("", str(cpu)))
    return {len(cpus), len(cores), os.cpu_count() or 1}


def thread_plan(threads: int | None = None, torch: Any = None) -> dict[str, Any]:
    """The thread plan of a model's tasks in this process: ``dask_threads`` x ``torch_threads``
    against ``cores``, and ``by``: ``"auto"``, ``"setting"`` (``daskpatch.torch-threads``), or
    what chose torch's threads instead (``"OMP_NUM_THREADS=1"``, ``"torch.set_num_threads"``,
    with ``torch_threads`` then what torch has, or ``None`` when torch is not imported).

    ``threads`` is the dask threads (default :func:`dask_threads`); ``torch`` the imported torch
    module, to read its current value (default: ``sys.modules``, never importing it).

    Examples
    --------
    >>> import dask
    >>> with dask.config.set({"daskpatch.torch-threads": 2}):
    ...     thread_plan(threads=4)["torch_threads"]
    2
    >>> plan = thread_plan(threads=available_cores())
    >>> plan["torch_threads"] if plan["by"] == "auto" else 1
    1
    """
    cores = available_cores()
    threads = dask_threads() if threads is None else threads
    plan: dict[str, Any] = {"cores": cores, "dask_threads": threads}
    torch = sys.modules.get("torch") if torch is None else torch
    setting = _setting()
    if setting is not None:
        return plan | {"torch_threads": setting, "by": "setting"}
    env = _env()
    current = None if torch is None else int(torch.get_num_threads())
    if env is not None:
        return plan | {"torch_threads": current, "by": env}
    if current is not None and current not in _torch_defaults() \
            and current != _ours.get(os.getpid()):
        return plan | {"torch_threads": current, "by": "torch.set_num_threads"}
    return plan | {"torch_threads": max(1, cores // threads), "by": "auto"}


def fit_torch_threads(torch: Any) -> None:
    """Set torch's intra-op threads of the calling thread to the plan's (:func:`thread_plan`),
    unless someone else chose them; each thread checks once per plan.

    Called by :class:`~daskpatch.TorchModel` before each run of its module. Torch keeps the
    number per thread (OpenMP), so each dask thread sets its own.
    """
    key = (os.getpid(), dask_threads(), dask.config.get("daskpatch.torch-threads", "auto"))
    if getattr(_local, "key", None) == key:
        return
    plan = thread_plan(key[1], torch)
    n = plan["torch_threads"]
    if plan["by"] in ("auto", "setting") and n != torch.get_num_threads():
        torch.set_num_threads(n)
        _ours[os.getpid()] = n
    _local.key = key
