"""The same graphs on a real dask.distributed LocalCluster (worker processes): same output.

Nothing here waits on the clock: a model that must still be running when the test acts waits at
a gate (a ``distributed.Event``) that the test opens; the loops that watch the cluster meanwhile
are bounds against a hang, not timed checks.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
import time
import uuid
from collections import Counter

import dask
import numpy as np
import pytest
import zarr

import daskpatch as dp
import daskpatch.graph.engine

from ..conftest import write_zarr

distributed = pytest.importorskip("distributed", reason="dask.distributed is not installed")

pytestmark = [
    pytest.mark.cluster,
    # a killed worker makes distributed log and warn while it recovers
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore:.*:UserWarning:distributed"),
]


#: model calls per gate in this process (a worker's), and their lock
_CALLS: Counter[str] = Counter()
_CALLS_LOCK = threading.Lock()


def _through(gate: tuple[str, int]) -> None:
    """Let the first ``free`` calls of this process through; later ones wait for the gate's
    Event to be set."""
    name, free = gate
    with _CALLS_LOCK:
        _CALLS[name] += 1
        n = _CALLS[name]
    if n > free:
        distributed.Event(name).wait()


def _calls(name: str) -> int:
    return _CALLS[name]


def _new_gate(free: int = 0) -> tuple[str, int]:
    return f"daskpatch-test-gate-{uuid.uuid4().hex}", free


def _open(client, gate: tuple[str, int]) -> None:
    distributed.Event(gate[0], client=client).set()


def _until(condition, bound: float = 120.0) -> None:
    """Poll ``condition`` until it holds (``bound`` seconds: against a hang, not a timing check)."""
    end = time.monotonic() + bound
    while not condition() and time.monotonic() < end:
        time.sleep(0.02)


class Model:
    """A callable with state (weights) that must travel to the workers; with a ``gate``, its
    calls beyond the gate's free ones wait until the test opens it."""

    def __init__(self, seed: int, gate: tuple[str, int] | None = None) -> None:
        self.weights = np.random.default_rng(seed).random(3).astype(np.float32)
        self.gate = gate

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self.gate:
            _through(self.gate)
        w = self.weights
        return w[0] * batch + w[1] * batch.mean(axis=(1, 2, 3), keepdims=True) + w[2]


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0", silence_logs=50) as cluster:
        with distributed.Client(cluster) as c:
            yield c


@pytest.fixture
def volume(tmp_path):
    data = np.random.default_rng(0).random((48, 40, 36)).astype(np.float32)
    return zarr.open_array(write_zarr(tmp_path / "in.zarr", data, (16, 16, 12)), mode="r")


def _graph(volume, model):
    return dp.apply_patches(volume, model, (16, 16, 12), (8, 8, 6), batch_size=4, blend="gaussian")


def test_identical_to_the_threaded_scheduler(client, volume):
    model = Model(1)
    local = _graph(volume, model).compute(scheduler="threads")
    remote = client.compute(_graph(volume, model)).result()
    np.testing.assert_array_equal(remote, local)


def test_closure_and_reconstruct_on_the_cluster(client, volume):
    scale = np.float32(3.0)
    out = dp.apply_patches(volume, lambda b: b * scale, 16, 8, blend="hann")  # a closure
    np.testing.assert_allclose(client.compute(out).result(), 3 * volume[...], atol=1e-5)
    p = dp.extract_patches(volume, 16, 8)
    back = dp.reconstruct(p, volume.shape, 16, 8, blend="crop")
    np.testing.assert_array_equal(client.compute(back).result(), volume[...])


def _mid_run_gate(volume) -> tuple[str, int]:
    """A gate whose free calls are those of the largest block: once a worker makes one more,
    it has finished a block and is inside another."""
    out = _graph(volume, Model(0))
    plan = dp.PatchGrid(volume.shape, (16, 16, 12), (8, 8, 6)).block_plan(
        tuple(c[0] for c in out.chunks))
    largest = max(math.prod(i1 - i0 for i0, i1 in owned)
                  for owned in itertools.product(*plan.owned))
    return _new_gate(free=-(-largest // 4))  # batch_size=4


def _kill_a_worker_mid_run(client, future, gate):
    """Wait until a worker has finished a block and waits at the gate inside another, kill it,
    open the gate."""
    try:
        waiting: list = []

        def some_worker_waits() -> bool:
            waiting[:] = [w for w, n in client.run(_calls, gate[0]).items() if n > gate[1]]
            return bool(waiting)

        _until(some_worker_waits)
        assert waiting, "no worker reached the gate"
        assert not future.done()  # really mid-run: the job waits at the gate
        victim = waiting[0]
        try:
            client.run(os._exit, 1, workers=[victim])
        except Exception:  # the worker dies before it can answer
            pass
    finally:
        _open(client, gate)
    return victim


def test_worker_killed_mid_run_gives_the_identical_result(client, volume):
    gate = _mid_run_gate(volume)
    expected = _graph(volume, Model(2)).compute(scheduler="threads")
    future = client.compute(_graph(volume, Model(2, gate)))
    victim = _kill_a_worker_mid_run(client, future, gate)
    result = future.result(timeout=120)
    np.testing.assert_array_equal(result, expected)
    assert victim not in client.scheduler_info()["workers"]  # it did die (the nanny restarts it)


def test_to_zarr_with_spilled_halos_survives_a_worker_loss(client, volume, tmp_path,
                                                           setting):
    setting("daskpatch.spill-bytes", 0)  # spill into the output store
    gate = _mid_run_gate(volume)
    expected = _graph(volume, Model(3)).compute(scheduler="threads")
    job = dp.to_zarr(_graph(volume, Model(3, gate)), tmp_path / "o.zarr", compute=False)
    future = client.compute(job)
    _kill_a_worker_mid_run(client, future, gate)
    z = future.result(timeout=120)
    np.testing.assert_array_equal(z[...], expected)
    spill = tmp_path / "o.zarr" / ".daskpatch-spill"
    assert spill.exists() and not [p for p in spill.rglob("*") if p.is_file()]


def test_to_numpy_under_a_client_gathers_the_chunks(client, volume):
    local = _graph(volume, Model(4)).compute(scheduler="threads")
    out = dp.to_numpy(_graph(volume, Model(4)))  # the Client is the default scheduler here
    np.testing.assert_array_equal(out, local)


_THREADS: list[str] = []  # the threads WorkerModel ran in, in this process


class WorkerModel:
    """A model that asks for its worker and records its thread."""

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        distributed.get_worker()  # raises ValueError outside a worker's task context
        _THREADS.append(threading.current_thread().name)
        return batch * 2


def _set_overlap(value: float) -> float:
    """Set the engine's slow-fn threshold in this process; the old value."""
    from daskpatch.engine import block

    old, block.OVERLAP = block.OVERLAP, value
    return old


def _threads() -> list[str]:
    return list(_THREADS)


def test_a_slow_model_in_the_helper_thread_sees_its_worker(client, volume):
    old = client.run(_set_overlap, 0.0)  # every fn counts as slow: it runs in the helper thread
    try:
        got = dp.apply_patches(volume, WorkerModel(), 16, 8, batch_size=2).compute()
    finally:
        client.run(_set_overlap, next(iter(old.values())))
    np.testing.assert_allclose(got, volume[:] * 2, rtol=1e-5)
    threads = [t for ts in client.run(_threads).values() for t in ts]
    assert any(t.startswith("daskpatch-fn") for t in threads)


class CountingModel(Model):
    """A model that counts, per process, how many times it was unpickled (its weights loaded)."""

    loads = 0

    def __setstate__(self, state: dict) -> None:
        type(self).loads += 1
        self.__dict__.update(state)


def _reset_loads() -> None:
    CountingModel.loads = 0


def _loads() -> int:
    return CountingModel.loads


def test_the_model_reaches_each_worker_once_not_once_per_block(client, volume):
    # 24 work blocks on 2 workers: the model used to travel inside every block task
    model = CountingModel(5)
    out = dp.apply_patches(volume, model, (16, 16, 12), (8, 8, 6), batch_size=4,
                           blend="gaussian", block_shape=(16, 16, 12))
    assert out.numblocks == (3, 3, 3)
    expected = out.compute(scheduler="threads")
    client.run(_reset_loads)
    np.testing.assert_array_equal(client.compute(out).result(), expected)
    loads = client.run(_loads)
    assert sum(loads.values()) >= 1 and all(n <= 1 for n in loads.values()), loads


def _block_priorities(name: str | tuple[str, ...], dask_scheduler=None) -> dict:
    """The priorities of the accumulate tasks named ``name`` (or starting with it)."""
    return {ts.key[1:]: ts.priority[0] for ts in dask_scheduler.tasks.values()
            if isinstance(ts.key, tuple) and ts.key[0].startswith(name)}


@pytest.mark.parametrize("job", [
    pytest.param("array", marks=pytest.mark.needs_dask("annotations on array expressions")),
    "to_zarr",
])
def test_the_biggest_blocks_start_first(client, volume, tmp_path, job):
    # blocks of (3 or 2) x (3 or 1) x (3 or 2) patch starts: 27 patches down to 4. By graph
    # shape alone dask.order may rank the biggest last, and one worker then waits at the end.
    gate = _new_gate()  # no block can finish before the priorities are read
    out = dp.apply_patches(volume, Model(6, gate), (16, 16, 12), (8, 8, 6),
                           batch_size=4, block_shape=(24, 24, 18))
    counts = [(3, 2), (3, 1), (3, 2)]
    (engine,) = daskpatch.graph.engine.find_engines(out).values()  # its block tasks, not an earlier test's
    expected = dp.apply_patches(volume, Model(6), (16, 16, 12), (8, 8, 6), batch_size=4,
                                block_shape=(24, 24, 18)).compute(scheduler="threads")
    # dask's array optimisation fuses an array's graph and drops its annotations unless fusion
    # is off (the scheduler optimises it: off until the tasks are there)
    with dask.config.set({"optimization.fuse.active": job != "array"}):
        if job == "array":
            future = client.compute(out)
        else:
            future = client.compute(dp.to_zarr(out, tmp_path / "o.zarr", compute=False))
        prio: dict = {}

        def read() -> bool:
            # to_zarr on a cluster spills its halos into the store: the engine's tasks renamed
            name = engine.acc_name if job == "array" else (
                "acc-to-zarr-written-", "acc-apply-patches-spilled-")
            prio.update(client.run_on_scheduler(_block_priorities, name))
            return len(prio) == 8

        try:
            _until(read)
        finally:
            _open(client, gate)
    result = future.result(timeout=120)
    np.testing.assert_array_equal(result if job == "array" else result[...], expected)
    # the scheduler's priority: -(patches - biggest); smaller first elements run first
    assert prio == {b: 27 - math.prod(c[i] for c, i in zip(counts, b))
                    for b in itertools.product(range(2), repeat=3)}


def _forbid_daskpatch() -> None:
    import sys

    sys.modules["daskpatch"] = None  # type: ignore[assignment]  # importing it now raises


def test_workers_without_daskpatch_get_a_clear_error_before_any_store(volume, tmp_path):
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                  dashboard_address=":0", silence_logs=50) as cluster:
        with distributed.Client(cluster) as c:
            c.run(_forbid_daskpatch)
            with pytest.raises(ImportError, match="cannot import daskpatch .*install it"):
                dp.to_zarr(_graph(volume, Model(7)), tmp_path / "o.zarr")
            with pytest.raises(ImportError, match="cannot import daskpatch"):
                dp.to_numpy(_graph(volume, Model(7)))
    assert not (tmp_path / "o.zarr").exists()


def test_relative_paths_mean_the_same_on_every_worker(client, tmp_path, monkeypatch):
    """Paths are made absolute where the call is made: a worker started in another directory
    reads and writes the same stores (it used to read fill values there)."""
    data = np.random.default_rng(5).random((32, 32, 32)).astype(np.float32)
    (tmp_path / "data").mkdir()
    write_zarr(tmp_path / "data" / "vol.zarr", data, (16, 16, 16))
    monkeypatch.chdir(tmp_path)
    before = client.run(os.getcwd)
    client.run(os.chdir, "/")  # the workers run elsewhere
    try:
        vol = dp.open_volume("data/vol.zarr")
        dp.to_zarr(dp.apply_patches(vol, Model(2), 16, 8), "out.zarr")
    finally:
        for worker, cwd in before.items():
            client.run(os.chdir, cwd, workers=[worker])
    expected = dp.apply_patches(data, Model(2), 16, 8).compute(scheduler="threads")
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "out.zarr"))[...], expected)


class Logged(Model):
    """:class:`Model`, appending one byte per patch to the file ``log`` (a killed worker's
    patches are counted too)."""

    def __init__(self, seed: int, log: str, gate: tuple[str, int] | None = None) -> None:
        super().__init__(seed, gate)
        self.log = log

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, b"." * batch.shape[0])
        finally:
            os.close(fd)
        return super().__call__(batch)


@pytest.mark.needs_dask("chunk tasks writing their chunk (the written path)")
def test_a_worker_lost_late_costs_only_its_blocks_in_flight(client, tmp_path):
    """to_zarr on a cluster: a worker killed half way through costs only the blocks it held
    (in flight, or done with their chunk not yet written), not the finished chunks' work:
    <= 1.1x the patches of a clean run (it was 1.34-1.41x when the final task's inputs were
    the chunks' write results, recomputed through the model)."""
    data = np.random.default_rng(5).random((64, 64, 64)).astype(np.float32)
    volume = zarr.open_array(write_zarr(tmp_path / "in.zarr", data, (16, 16, 16)), mode="r")

    def graph(model):  # 64 blocks of up to 8 patches
        return dp.apply_patches(volume, model, 16, 8, batch_size=4, block_shape=16)

    clean_log = str(tmp_path / "clean.log")
    expected = dp.to_zarr(graph(Logged(8, clean_log)), tmp_path / "clean.zarr")[...]
    clean = os.path.getsize(clean_log)
    gate = _new_gate(free=clean // 4 // 4)  # calls: half the job over 2 workers, batches of 4
    log = str(tmp_path / "run.log")
    job = dp.to_zarr(graph(Logged(8, log, gate)), tmp_path / "o.zarr", compute=False)
    future = client.compute(job)
    _kill_a_worker_mid_run(client, future, gate)
    z = future.result(timeout=120)
    np.testing.assert_array_equal(z[...], expected)
    assert os.path.getsize(log) <= 1.1 * clean, (os.path.getsize(log), clean)


def _cached_bytes() -> int:
    from daskpatch.storage.chunkcache import CACHE

    return CACHE.nbytes


def test_workers_keep_no_decoded_chunks_after_a_job(client, volume, tmp_path):
    """A worker's cache of decoded input chunks may hold chunks whose other readers ran on
    another worker; to_zarr and to_numpy drop them once the job is over."""
    dp.to_zarr(_graph(volume, Model(9)), tmp_path / "o.zarr")
    assert set(client.run(_cached_bytes).values()) == {0}
    dp.to_numpy(_graph(volume, Model(9)))
    assert set(client.run(_cached_bytes).values()) == {0}


def _slow_twice(batch: np.ndarray) -> np.ndarray:
    time.sleep(0.05)
    return 2 * batch


@pytest.mark.slow
@pytest.mark.processes
def test_a_lost_scheduler_says_how_to_resume_and_resume_finishes(tmp_path):
    """A real ``dask scheduler`` process killed (SIGKILL) while ``to_zarr`` runs on it: the
    error carries the note saying to resume; on a new scheduler, ``resume=True`` keeps the
    chunks written and finishes the write."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    data = np.random.default_rng(6).random((48, 48, 48)).astype(np.float32)
    src = write_zarr(tmp_path / "in.zarr", data, (16, 16, 16))
    target = tmp_path / "o.zarr"

    # the scheduler unpickles the graph, so it imports the model's module too (this file's)
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))

    def cluster(tag: str):
        sfile = str(tmp_path / f"{tag}.json")
        sched = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler",
                                  "--scheduler-file", sfile, "--port", "0",
                                  "--dashboard-address", ":0"], cwd=tmp_path, env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _until(lambda: os.path.exists(sfile), 60)
        worker = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker",
                                   "--scheduler-file", sfile, "--nthreads", "1"],
                                  cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        return sfile, sched, worker

    def graph():
        return dp.apply_patches(dp.open_volume(src), _slow_twice, 16, 8, block_shape=16)

    sfile, sched, worker = cluster("first")
    try:
        with distributed.Client(scheduler_file=sfile, timeout=60) as c:
            c.wait_for_workers(1, timeout=60)
            markers = target / ".daskpatch-done" / "chunks"

            def kill_when_a_chunk_is_written() -> None:
                _until(lambda: markers.exists() and any(markers.iterdir()), 120)
                sched.send_signal(signal.SIGKILL)

            killer = threading.Thread(target=kill_when_a_chunk_is_written)
            killer.start()
            with pytest.raises(Exception) as info:
                dp.to_zarr(graph(), target)
            killer.join()
        assert any("resume=True" in n and "chunks already written are kept" in n
                   for n in getattr(info.value, "__notes__", [])), info.value
    finally:
        for p in (worker, sched):
            p.kill()
            p.wait()
    written = len(list(markers.iterdir()))
    assert 0 < written < 27
    sfile, sched, worker = cluster("second")
    try:
        with distributed.Client(scheduler_file=sfile, timeout=60) as c:
            c.wait_for_workers(1, timeout=60)
            z = dp.to_zarr(graph(), target, resume=True)
            np.testing.assert_allclose(z[...], 2 * data, rtol=1e-6)
    finally:
        for p in (worker, sched):
            p.kill()
            p.wait()
