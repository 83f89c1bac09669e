"""Graph keys: a graph is never edited after it is built, and executions that compute different
things (a spilled write, a to_numpy job, the user's array) never share a key; on a cluster a kept
future and a spilled write of the same array run side by side."""

from __future__ import annotations

import dask
from dask.core import flatten
import numpy as np
import pytest
import zarr

import daskpatch as dp
from daskpatch.graph import layers as _graph

from ..conftest import same_task, shares_only_identical_tasks, write_zarr

VOL = np.random.default_rng(7).random((40, 36, 28)).astype(np.float32)


def _res(vol=VOL, fn=np.sqrt):
    return dp.apply_patches(vol, fn, 16, 8, block_shape=16)


class Recording(zarr.storage.WrapperStore):
    """Records every key written through it (class-level: zarr re-wraps stores)."""

    written: list[str] = []

    async def set(self, key, value, *args, **kwargs):
        Recording.written.append(key)
        return await self._store.set(key, value, *args, **kwargs)


def _spill_dir(path):
    return path / ".daskpatch-spill"


def test_spilled_graph_shares_no_key_with_the_users_graph(tmp_path):
    res = _res() * 2  # the engine under a downstream operation
    layers = dict(_graph.layers(res))
    before = dict(res.dask)
    with dask.config.set({"daskpatch.spill-bytes": 0}):
        job = dp.to_zarr(res, tmp_path / "o.zarr", chunks=(10, 12, 7), compute=False)
    assert dict(_graph.layers(res)) == layers  # the user's graph is not edited ...
    after = dict(res.dask)
    assert after.keys() == before.keys() and all(same_task(after[k], before[k]) for k in before)
    written = dict(job.dask)  # ... and the written graph has names of its own:
    assert not set(flatten(res.__dask_keys__())) & written.keys()  # none of the user's chunks
    # a key both hold is one task in both (what both read: the input and the model, as they are)
    assert written.keys() & before.keys()
    assert shares_only_identical_tasks(written, before)
    z = job.compute()
    assert _spill_dir(tmp_path / "o.zarr").exists()  # it did spill
    np.testing.assert_array_equal(z[...], res.compute())


def test_spill_bytes_setting_spills_and_is_checked_before_writing(tmp_path):
    expected = _res().compute()
    with dask.config.set({"daskpatch.spill-bytes": "1 KiB"}):
        z = dp.to_zarr(_res(), tmp_path / "a.zarr")
    assert _spill_dir(tmp_path / "a.zarr").exists()
    np.testing.assert_array_equal(z[...], expected)
    z = dp.to_zarr(_res(), tmp_path / "b.zarr")  # default: 128 MiB, no spill for 160 KB
    assert not _spill_dir(tmp_path / "b.zarr").exists()
    np.testing.assert_array_equal(z[...], expected)
    for bad, exc in [("lots", ValueError), (-1, ValueError), ([1], TypeError)]:
        with dask.config.set({"daskpatch.spill-bytes": bad}), pytest.raises(
                exc, match="daskpatch.spill-bytes must be"):
            dp.to_zarr(_res(), tmp_path / "c.zarr")
        assert not (tmp_path / "c.zarr").exists()


def test_spilled_engine_over_a_spilled_engine(tmp_path):
    inner = dp.apply_patches(VOL, np.sqrt, 16, 8, block_shape=16)
    outer = dp.apply_patches(inner, lambda b: b + 1, 12, 6, block_shape=12, blend="hann")
    expected = outer.compute()
    store = Recording(zarr.storage.LocalStore(str(tmp_path / "o.zarr")))
    with dask.config.set({"daskpatch.spill-bytes": 0}):
        job = dp.to_zarr(outer, store, compute=False)
    assert not set(flatten(inner.__dask_keys__())) & set(job.dask)
    assert not set(flatten(outer.__dask_keys__())) & set(job.dask)
    assert shares_only_identical_tasks(job.dask, outer.dask)  # outer's graph holds inner's
    np.testing.assert_array_equal(job.compute()[...], expected)
    spilled = [k.split("/") for k in Recording.written if k.startswith(".daskpatch-spill/")]
    assert len({parts[1] for parts in spilled}) == 2  # both engines spilled, each in its folder


def test_to_numpy_jobs_have_keys_of_their_own_and_leave_the_array_as_it_is():
    from daskpatch.graph.lowering import IntoArray, lower

    res = _res()
    layers = dict(_graph.layers(res))
    a, b = np.zeros(res.shape, res.dtype), np.zeros(res.shape, res.dtype)
    low_a, low_b = lower(res, IntoArray(a)), lower(res, IntoArray(b))
    (job_a, close_a), (job_b, close_b) = (low_a.job, low_a.close), (low_b.job, low_b.close)
    ga, gb, graph = dict(job_a.dask), dict(job_b.dask), dict(res.dask)
    assert ga.keys() - graph.keys() and gb.keys() - graph.keys()  # tasks of their own
    assert ga.keys() - graph.keys() != gb.keys() - graph.keys()  # two arrays: two sets of keys
    # a key two of the graphs hold is one task in both (what all read: the input, the model)
    assert shares_only_identical_tasks(ga, gb)
    assert shares_only_identical_tasks(ga, graph) and shares_only_identical_tasks(gb, graph)
    close_a(), close_b()
    np.testing.assert_allclose(dp.to_numpy(res), res.compute(), rtol=1e-6)
    assert dict(_graph.layers(res)) == layers


distributed = pytest.importorskip("distributed", reason="dask.distributed is not installed")


def _cluster(test):
    """Marks of a test that starts a LocalCluster (distributed logs and warns on shutdown)."""
    for mark in (pytest.mark.cluster, pytest.mark.filterwarnings("ignore::ResourceWarning"),
                 pytest.mark.filterwarnings("ignore:.*:UserWarning:distributed")):
        test = mark(test)
    return test


@pytest.fixture(scope="module")
def threads_client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=":0", silence_logs=50) as cluster:
        with distributed.Client(cluster, set_as_default=False) as c:
            yield c


@pytest.fixture
def zvol(tmp_path):
    write_zarr(tmp_path / "in.zarr", VOL, (16, 12, 14))
    return dp.open_volume(tmp_path / "in.zarr")


def _kept_future_then_to_zarr(client, res, tmp_path):
    expected = res.compute(scheduler="threads")
    fresh = dp.to_zarr(res, tmp_path / "fresh.zarr", compute=False).compute(scheduler="threads")
    with client.as_current(), dask.config.set({"daskpatch.spill-bytes": 0}):
        kept = client.compute(res)  # as in a notebook: kept, running or done
        z = dp.to_zarr(res, tmp_path / "p.zarr")
        np.testing.assert_array_equal(kept.result(), expected)
    np.testing.assert_array_equal(z[...], expected)
    np.testing.assert_array_equal(z[...], fresh[...])
    assert _spill_dir(tmp_path / "p.zarr").exists()  # the write spilled


def _to_zarr_then_client_compute(client, res, tmp_path):
    expected = res.compute(scheduler="threads")
    with client.as_current(), dask.config.set({"daskpatch.spill-bytes": 0}):
        job = dp.to_zarr(res, tmp_path / "q.zarr", compute=False)
        written = client.compute(job)  # kept
        z = written.result()
        np.testing.assert_array_equal(client.compute(res).result(), expected)
    np.testing.assert_array_equal(z[...], expected)
    assert _spill_dir(tmp_path / "q.zarr").exists()


@_cluster
@pytest.mark.parametrize("downstream", [False, True])
@pytest.mark.parametrize("order", [_kept_future_then_to_zarr, _to_zarr_then_client_compute])
def test_kept_future_and_spilled_write_on_a_cluster(threads_client, zvol, tmp_path, order,
                                                    downstream):
    res = _res(zvol)
    if downstream:
        res = (res * 2).rechunk((20, 18, 14))
    order(threads_client, res, tmp_path)


@_cluster
def test_kept_future_and_spilled_write_with_the_module_threshold(threads_client, zvol, tmp_path,
                                                                 setting):
    """The same, with spilling forced the older way (the module constant)."""
    setting("daskpatch.spill-bytes", 0)
    _kept_future_then_to_zarr(threads_client, _res(zvol), tmp_path)
    _to_zarr_then_client_compute(threads_client, _res(zvol), tmp_path)


@_cluster
def test_kept_future_and_spilled_write_with_worker_processes(zvol, tmp_path):
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0", silence_logs=50) as cluster:
        with distributed.Client(cluster, set_as_default=False) as client:
            _kept_future_then_to_zarr(client, _res(zvol), tmp_path)
            _to_zarr_then_client_compute(client, _res(zvol), tmp_path)
