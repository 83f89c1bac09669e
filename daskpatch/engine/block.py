"""The accumulate tasks: a block's patches (read and run through the model, or taken from the
patch array) added into its buffer, and the checks of what the model returned."""

from __future__ import annotations

import contextvars
import functools
import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import dask.system
import numpy as np

from daskpatch.errors import ModelOutputError, ModelOutputTypeError
from daskpatch.engine.batches import BatchPool
from daskpatch.engine.kernel import Accumulator
from daskpatch.engine.spec import ApplyBlock, ReconstructBlock

if TYPE_CHECKING:
    from daskpatch.engine.sink import Sink


def _describe_output(out: Any) -> str:
    """A model output's type and shape (or length); its values only when they are a few
    scalars (a list of arrays would print megabytes)."""
    kind = type(out).__name__
    shape = getattr(out, "shape", None)
    if shape is not None:
        return f"a {kind} of shape {tuple(shape)}"
    try:
        n = len(out)
    except TypeError:
        text = repr(out)
        return f"{text} of type {kind}" if len(text) <= 80 else f"a {kind}"
    if n <= 8 and isinstance(out, (list, tuple)) and all(
            isinstance(v, (bool, int, float, complex, str)) and len(repr(v)) <= 20 for v in out):
        return f"{out!r} of type {kind} (length {n})"
    return f"a {kind} of length {n}"


def _check_output(out: Any, batch_shape: tuple[int, ...], expected: tuple[int, ...],
                  why: str | None = None) -> np.ndarray:
    """Check a model's output against the shape the engine expects back (``why``: how the
    volume's axes were read, which explains ``expected``)."""
    if not (hasattr(out, "shape") and hasattr(out, "dtype")):
        hint = " (stack it with numpy.stack)" if isinstance(out, (list, tuple)) else ""
        raise ModelOutputTypeError(
            f"fn must return an array of shape {expected} for a batch of shape {batch_shape}; "
            f"got {_describe_output(out)}{hint}", expected=expected, got=type(out).__name__
        )
    arr = np.asarray(out)
    if arr.dtype.kind not in "biufc":
        raise ModelOutputTypeError(
            f"fn must return numbers (a numeric dtype) for a batch of shape {batch_shape}; "
            f"got an array of dtype {arr.dtype} ({arr.dtype.name}) and shape {arr.shape}",
            expected="a numeric dtype", got=arr.dtype
        )
    if arr.shape != expected:
        axis = ""
        if arr.ndim == len(expected):
            bad = [a for a in range(arr.ndim) if arr.shape[a] != expected[a]]
            axis = f"; axis {bad[0]} has {arr.shape[bad[0]]} where {expected[bad[0]]} was expected"
        raise ModelOutputError(
            f"fn returned shape {arr.shape} for a batch of shape {batch_shape}; expected "
            f"{expected}" + (f": {why}" if why else " (the batch's patch shape, with "
                             "out_channels channels where the volume has a channel axis)")
            + axis,
            expected=expected, got=arr.shape
        )
    return arr


def _batch_note(block: tuple[int, ...], gidxs: list[tuple[int, ...]], starts: list[np.ndarray],
                grid_shape: tuple[int, ...], region_lo: np.ndarray,
                region_shape: tuple[int, ...]) -> str:
    """Where a failing batch of ``fn`` was: its work block, its patches, the region read."""
    flat = [int(np.ravel_multi_index(g, grid_shape)) for g in gidxs]
    shown = 8
    st = ", ".join(str(tuple(int(v) for v in x)) for x in starts[:shown])
    more = f", ... ({len(starts)} patches)" if len(starts) > shown else ""
    ids = ", ".join(map(str, flat[:shown])) + (", ..." if len(flat) > shown else "")
    region = ", ".join(f"{int(lo)}:{int(lo) + n}" for lo, n in zip(region_lo, region_shape))
    return (
        f"daskpatch: raised for fn's batch of {len(starts)} "
        f"patch{'es' if len(starts) != 1 else ''} (indices {ids} in the order of "
        f"extract_patches) starting at {st}{more}, in apply_patches work block {tuple(block)}, "
        f"which reads the input region [{region}] (non-channel axes, padded coordinates)"
    )


def apply_block(spec: ApplyBlock | tuple[ApplyBlock, ...], region: Any,
                batches: BatchPool | None, fn: Callable[[np.ndarray], Any],
                sink: Sink | None = None) -> np.ndarray | tuple[np.ndarray, ...] | None:
    """Accumulate task of ``apply_patches``: run ``fn`` on the block's patches in batches; the
    block's buffer (``None`` with a ``sink``: the patches went into it). ``fn`` is the value of
    the graph's model key, shared by every block task.

    ``spec`` may be a tuple of specs, one per output of a model whose outputs have different
    resolutions (the groups of a :class:`~daskpatch.adapters.heads.HeadsFn`): the same patches
    and region, each output with its own buffer, weights and output grid. ``fn`` then returns a
    tuple of one array per output, each is blended into its buffer, and the task returns the
    buffers as a tuple (no ``sink``).

    A model that blends on its device (``fn.on_device``: a torch model on a GPU, see
    :mod:`daskpatch.adapters.device`) gets the whole block there (``fn.device_block``) and
    returns the same buffer; the steps below are the host's.

    The first batch runs in this thread, timed. When ``fn`` took at least :data:`OVERLAP` of the
    task's own work on it (copying the batch in, checking and blending the output) and two or
    more batches are left, the others run through a pipeline: ``fn`` in one helper thread of this
    task (started here, joined before returning), while this thread copies the next batch in and
    blends the previous output. An accelerator (or anything ``fn`` waits on with the GIL
    released) then always has the next batch queued; a cheap ``fn`` stays in this thread, with
    one batch in memory, and so does one that kept :data:`CORES_BUSY` of the process's cores
    busy (a model on the CPU with threads of its own, which the pipeline would only slow).
    ``fn`` is called once at a time, in order, with this task's context variables; outputs are
    blended in the same order either way, so the result is the same.

    ``region`` is the region read ``(C, *region)``, or a :class:`daskpatch._source.Region` read
    slab by slab as the batches reach it (in the pipeline, while ``fn`` runs).

    An exception raised by ``fn``, or by the check of what it returned, is re-raised as it is
    with a note (PEP 678) naming the work ``block``, the batch's patches and the region read;
    no batch is handed to ``fn`` after it, and no thread of the task outlives it.
    """
    several = isinstance(spec, tuple)
    if not several and sink is None and getattr(fn, "on_device", False):
        assert isinstance(spec, ApplyBlock)
        buf = _on_device(spec, region, fn)
        if buf is not None:
            return buf
    specs = spec if isinstance(spec, tuple) else (spec,)
    spec = specs[0]  # what is read and run: the same for every output
    upto = getattr(region, "upto", None)  # a Region: read as the batches reach its rows
    drop = getattr(region, "drop", None)  # and given back once the batches have passed them
    if upto is not None:
        region = region.data
    layout, batch_size = spec.layout, spec.batch_size
    starts = spec.starts
    region_lo = np.asarray(spec.region_lo)
    items = [(g, np.array([s[i] for s, i in zip(starts, g)]))
             for g in itertools.product(*spec.owned)]
    groups = [items[b0:b0 + batch_size] for b0 in range(0, len(items), batch_size)]
    size = tuple(int(v) for v in spec.patch_shape)
    outputs = [_Output(s, sink, size) for s in specs]
    channels = region.shape[0]
    pool = sink.pool if sink is not None else None
    if sink is not None:
        batches = sink.batches
    elif batches is None:
        batches = BatchPool()
    shape = (min(batch_size, len(items)), channels) + size[spec.n_batch:]
    held = [batches.take(shape, region.dtype)]  # batch k goes into held[k % 2]

    def gather(k: int) -> np.ndarray:
        """Copy the patches of batch ``k`` in; the batch as ``fn`` takes it."""
        batch = held[k % len(held)][:len(groups[k])]
        if upto is not None:
            upto(int(groups[k][-1][1][0] - region_lo[0]) + size[0])

        def put(j: int, st: np.ndarray) -> None:
            rel = st - region_lo
            sl = tuple(slice(int(r), int(r) + z) for r, z in zip(rel, size))
            batch[j] = region[(slice(None),) + sl].reshape(batch.shape[1:])

        if pool is None:
            for j, (_, st) in enumerate(groups[k]):
                put(j, st)
        else:
            for f in [pool.submit(put, j, st) for j, (_, st) in enumerate(groups[k])]:
                f.result()
        if drop is not None:  # patches go in C order: no later one starts above the next's row
            drop(int(groups[k + 1][0][1][0] - region_lo[0]) if k + 1 < len(groups)
                 else region.shape[1])
        return layout.from_canonical(batch)

    def finish(k: int, user_batch: np.ndarray, result: Callable[[], Any]) -> None:
        """Check the output of batch ``k`` (``result()``) and blend it into the buffer."""
        chunk = groups[k]
        try:
            out = result()
            values = out if several else (out,)
            if several and not (isinstance(out, tuple) and len(out) == len(outputs)):
                raise ModelOutputTypeError(
                    f"fn must return a tuple of {len(outputs)} arrays, one per output; got "
                    f"{_describe_output(out)}", expected=len(outputs), got=type(out).__name__)
            checked = [_check_output(v, user_batch.shape, (len(chunk),) + o.expected,
                                     getattr(fn, "axes", None))
                       for v, o in zip(values, outputs)]
        except Exception as err:
            note = _batch_note(spec.block,
                               [tuple(i + o for i, o in zip(g, spec.origin)) for g, _ in chunk],
                               [st for _, st in chunk], spec.grid_shape, region_lo,
                               region.shape[1:])
            axes = getattr(fn, "axes", None)  # how the volume's axes were read
            if axes:
                note += f"; fn was called on a batch of shape {user_batch.shape}; {axes}"
            err.add_note(note)
            raise
        for o, arr in zip(outputs, checked):
            o.add(layout.to_canonical(arr), chunk)

    helper: _Helper | None = None
    try:
        clock = time.perf_counter
        if upto is not None:  # the first slabs: not part of the work timed per batch
            upto(int(groups[0][-1][1][0] - region_lo[0]) + size[0])
        t0 = clock()
        user_batch = gather(0)
        took = _timed(fn, user_batch)
        finish(0, user_batch, took)
        own = clock() - t0 - took.seconds
        if len(groups) > 2 and took.seconds >= OVERLAP * own and took.busy < CORES_BUSY:
            held.append(batches.take(shape, region.dtype))
            helper = _Helper(fn)
            pending: tuple[int, np.ndarray, Callable[[], Any]] | None = None
            for k in range(1, len(groups)):
                user_batch = gather(k)  # while fn runs on batch k - 1
                result = helper.submit(user_batch)
                if pending is not None:
                    finish(*pending)  # batch k - 1, while fn runs on batch k
                pending = (k, user_batch, result)
            assert pending is not None
            finish(*pending)
        else:
            for k in range(1, len(groups)):
                user_batch = gather(k)
                finish(k, user_batch, functools.partial(fn, user_batch))
    finally:
        if helper is not None:
            helper.close()
        for batch in held:
            batches.give(batch)
    if sink is not None:
        return None
    bufs = tuple(o.acc.buf for o in outputs)
    return bufs if several else bufs[0]


class _Output:
    """One output of a block task: its buffer, and where its predictions go (the output grid:
    another resolution with ``out_scale``)."""

    def __init__(self, spec: ApplyBlock, sink: Sink | None, size: tuple[int, ...]) -> None:
        self.acc = Accumulator(spec.ext_lo, spec.ext_shape, spec.out_channels, spec.numbers,
                               spec.weights, sink)
        self.channels = spec.out_channels
        self.size = tuple(int(v) for v in spec.out_patch_shape) or size
        self.starts = spec.out_starts or spec.starts
        #: the output patch as fn returns it (no batch axis)
        self.expected = spec.layout.patch_shape(self.size[spec.n_batch:], spec.out_channels)

    def add(self, out: np.ndarray, chunk: list[tuple[tuple[int, ...], np.ndarray]]) -> None:
        out = out.reshape((len(chunk), self.channels) + self.size)
        self.acc.add_batch([g for g, _ in chunk],
                           [np.array([s[i] for s, i in zip(self.starts, g)]) for g, _ in chunk],
                           list(out))


def _on_device(spec: ApplyBlock, region: Any, fn: Any) -> np.ndarray | None:
    """The block blended on the model's device (``fn.device_block``), or ``None`` where the
    host must do it; an error is noted with the block and the region read, as on the host."""
    axes = getattr(fn, "axes", None)

    def check(out: Any, batch_shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
        _check_output(out, batch_shape, expected, axes)

    try:
        return fn.device_block(spec, region, check)  # type: ignore[no-any-return]
    except Exception as err:
        lo = np.asarray(spec.region_lo)
        shape = getattr(region, "shape", (0,))[1:]
        where = ", ".join(f"{int(a)}:{int(a) + n}" for a, n in zip(lo, shape))
        err.add_note(f"daskpatch: raised while blending on the model's device, in "
                     f"apply_patches work block {tuple(spec.block)}, which reads the input "
                     f"region [{where}] (non-channel axes, padded coordinates)"
                     + (f"; {axes}" if axes else ""))
        raise


#: Share of the process's cores that, busy during the first call of ``fn`` (a model on the
#: CPU with threads of its own: torch's intra-op threads), make a block task keep ``fn`` in its
#: own thread: the pipeline's helper thread would only take cores from ``fn`` (see
#: :func:`apply_block`).
CORES_BUSY = 0.75

#: Share of a block task's own work on a batch (copying it in, checking and blending the output)
#: that one call of ``fn`` must take for the task to run ``fn`` in a helper thread, overlapped
#: with that work (see :func:`apply_block`).
OVERLAP = 0.25


class _timed:
    """``fn(batch)`` as a thunk that records how long the call took, and how much of the
    process's cores were busy meanwhile (its CPU time, every thread's, over the wall time of
    the call and the cores: 1.0 is every core busy throughout)."""

    def __init__(self, fn: Callable[[np.ndarray], Any], batch: np.ndarray) -> None:
        self.fn, self.batch, self.seconds, self.busy = fn, batch, 0.0, 0.0

    def __call__(self) -> Any:
        t, c = time.perf_counter(), time.process_time()
        try:
            return self.fn(self.batch)
        finally:
            self.seconds = time.perf_counter() - t
            cpu = time.process_time() - c
            self.busy = cpu / max(self.seconds * dask.system.cpu_count(), 1e-9)


class _Helper:
    """One thread of one block task that calls ``fn`` on the batches submitted, in order, in a
    copy of the task's context (a distributed worker's ``get_worker()`` works there too).

    Once a call raised, the batches queued behind it are not handed to ``fn``; :meth:`close`
    skips the queued ones and joins the thread (after the call in progress, if any).
    """

    def __init__(self, fn: Callable[[np.ndarray], Any]) -> None:
        self.fn = fn
        self.stop = threading.Event()
        self.context = contextvars.copy_context()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="daskpatch-fn")

    def _call(self, batch: np.ndarray) -> Any:
        if self.stop.is_set():
            return None
        try:
            return self.fn(batch)
        except BaseException:
            self.stop.set()
            raise

    def submit(self, batch: np.ndarray) -> Callable[[], Any]:
        """Queue ``fn(batch)``; a thunk that waits for its output (or raises its exception)."""
        return self.executor.submit(self.context.run, self._call, batch).result

    def close(self) -> None:
        self.stop.set()
        self.executor.shutdown(wait=True, cancel_futures=True)


def reconstruct_block(spec: ReconstructBlock, chunks: list[Any], sink: Sink | None = None
                      ) -> np.ndarray | None:
    """Accumulate task of ``reconstruct``: the block's patches come from the patch array."""
    channels, size = spec.channels, spec.patch_shape
    acc = Accumulator(spec.ext_lo, spec.ext_shape, channels, spec.numbers, spec.weights, sink)
    ys = [spec.layout.to_canonical(np.asarray(chunks[c][i:i + 1]))[0]
          .reshape((channels,) + size) for c, i in spec.where]
    acc.add_batch(list(spec.gidxs), [np.asarray(st) for st in spec.starts], ys)
    return acc.buf if sink is None else None
