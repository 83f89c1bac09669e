"""Trustworthy results (issue 8, items 9, 15, 16): no shared keys between a graph and its spilled
twin, and errors that say where they happened."""

from __future__ import annotations

import re

import dask
import numpy as np
import pytest
import zarr

import daskpatch as dp
from daskpatch.graph import layers as _graph

from ..conftest import write_zarr

VOL = np.random.default_rng(7).random((40, 36, 28)).astype(np.float32)


def _constant(key) -> bool:
    """A key of a scalar constant (``2`` of ``x * 2``): array expressions give it a 0-d array
    of its own; the legacy graph holds it inline."""
    return _graph.EXPR and isinstance(key, tuple) and len(key) == 1 \
        and key[0].startswith("fromarray-")


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


# -- item 15: a failing model says where ---------------------------------------------------------
SMALL = np.random.default_rng(3).random((16, 16, 16)).astype(np.float32)


def _fails_on(start):
    """A model that raises on the batch holding the patch at ``start`` (first axis value)."""

    def fn(batch):
        if np.array_equal(batch[0], SMALL[start[0]:start[0] + 8, start[1]:start[1] + 8,
                                          start[2]:start[2] + 8]):
            raise ZeroDivisionError("the model divided by zero")
        return batch

    return fn


@pytest.mark.parametrize("run", ["compute", "to_numpy"])
def test_a_failing_model_raises_its_error_with_a_note_naming_block_and_patches(run):
    out = dp.apply_patches(SMALL, _fails_on((8, 4, 0)), 8, 4, batch_size=2, block_shape=8)
    with pytest.raises(ZeroDivisionError, match="the model divided by zero") as info:
        out.compute(scheduler="sync") if run == "compute" else dp.to_numpy(out)
    (note,) = info.value.__notes__
    # patch (8, 4, 0) is patch 2*9 + 1*3 + 0 = 21 of the 3x3x3 grid, with (8, 4, 4) in its
    # batch; it belongs to work block (1, 0, 0), which owns the patches starting at 8 on the
    # first axis and at 0, 4 on the others, and so reads [8:16, 0:12, 0:12]
    assert "batch of 2 patches (indices 21, 22 in the order of extract_patches)" in note
    assert "starting at (8, 4, 0), (8, 4, 4)" in note
    assert "work block (1, 0, 0)" in note
    assert "input region [8:16, 0:12, 0:12]" in note


def test_a_wrong_output_shape_gets_the_same_note():
    out = dp.apply_patches(SMALL, lambda b: b[:, :4], 8, 4, batch_size=3, block_shape=16)
    with pytest.raises(ValueError, match=r"fn returned shape \(3, 4, 8, 8\)") as info:
        out.compute(scheduler="sync")
    (note,) = info.value.__notes__
    assert "work block (0, 0, 0)" in note
    assert "starting at (0, 0, 0), (0, 0, 4), (0, 0, 8)" in note


def test_the_note_lists_at_most_eight_patches():
    out = dp.apply_patches(SMALL, lambda b: 1 / 0, 8, 4, batch_size=20, block_shape=16)
    with pytest.raises(ZeroDivisionError) as info:
        out.compute(scheduler="sync")
    (note,) = info.value.__notes__
    assert "batch of 20 patches (indices 0, 1, 2, 3, 4, 5, 6, 7, ..." in note
    assert ", ... (20 patches), in apply_patches work block (0, 0, 0)" in note


# -- item 16: errors that do not bury the cause ---------------------------------------------------
def test_a_model_returning_a_list_gets_a_short_type_error():
    out = dp.apply_patches(SMALL, lambda b: list(b), 8, 4, batch_size=2)
    with pytest.raises(TypeError, match=r"got a list of length 2 \(stack it with numpy.stack\)"
                       ) as info:
        out.compute(scheduler="sync")
    assert len(str(info.value)) < 300  # the type and length, not the data
    assert "work block" in info.value.__notes__[0]


@pytest.mark.parametrize("dtype", ["U8", "O", "M8[s]"])
def test_a_model_returning_non_numbers_gets_a_type_error_naming_the_dtype(dtype):
    out = dp.apply_patches(SMALL, lambda b: b.astype(dtype), 8, 4, batch_size=2)
    with pytest.raises(TypeError, match=r"fn must return numbers .* got an array of dtype "
                                        + re.escape(str(np.dtype(dtype)))):
        out.compute(scheduler="sync")


@pytest.fixture
def corrupt(tmp_path):
    """A Zarr volume whose chunk (0, 1, 0) holds garbage."""
    write_zarr(tmp_path / "in.zarr", SMALL, (8, 8, 8))
    (tmp_path / "in.zarr" / "c" / "0" / "1" / "0").write_bytes(b"not zstd" * 8)
    return tmp_path / "in.zarr"


@pytest.mark.parametrize("how", ["apply_patches", "extract_patches", "zarr.Array"])
def test_a_corrupt_chunk_is_named_with_its_array(corrupt, how):
    vol = zarr.open_array(str(corrupt), mode="r") if how == "zarr.Array" else \
        dp.open_volume(corrupt)
    if how == "extract_patches":
        out = dp.extract_patches(vol, 8, 4)
    else:
        out = dp.apply_patches(vol, np.sqrt, 8, 4, block_shape=8)
    with pytest.raises(RuntimeError, match="Zstd decompression error") as info:
        out.compute(scheduler="sync")
    note = info.value.__notes__[-1]
    assert f"of the Zarr array at file://{corrupt}" in note
    assert "its chunk (0, 1, 0) (stored as 'c/0/1/0') cannot be read" in note


def test_a_spill_directory_that_cannot_be_written_is_refused_when_the_graph_is_built(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"spill must be a directory .*got '.*/file/halos', but "
                                         r"'.*/file' is a file"):
        dp.apply_patches(SMALL, np.sqrt, 8, 4, spill=tmp_path / "file" / "halos")
    with pytest.raises(ValueError, match=r"spill must be a directory .*got '/proc/daskpatch', "
                                         r"but '/proc' cannot be written"):
        dp.reconstruct(dp.extract_patches(SMALL, 8, 4), SMALL.shape, 8, 4,
                       spill="/proc/daskpatch")
    out = dp.apply_patches(SMALL, np.sqrt, 8, 4, spill=tmp_path / "new" / "halos")
    assert not (tmp_path / "new").exists()  # a directory yet to be made is fine; nothing made
    np.testing.assert_allclose(out.compute(), np.sqrt(SMALL), rtol=1e-6)


# -- item 9: a spilled execution is a graph of its own -------------------------------------------
def test_spilled_graph_shares_no_key_with_the_users_graph(tmp_path):
    res = _res() * 2  # the engine under a downstream operation
    layers = dict(_graph.layers(res))
    before = dict(res.dask)
    with dask.config.set({"daskpatch.spill-bytes": 0}):
        job = dp.to_zarr(res, tmp_path / "o.zarr", chunks=(10, 12, 7), compute=False)
    assert dict(_graph.layers(res)) == layers  # the user's graph is not edited ...
    assert dict(res.dask).keys() == before.keys()
    shared = set(job.dask) & set(before)  # ... and the written graph has names of its own
    # only what both read: the input and the model, as they are (and constants, under query planning)
    assert shared and all(isinstance(k, str) and k.startswith(("source-", "model-")) or _constant(k)
                          for k in shared)
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
    assert not set(job.dask) & set(inner.dask) - {k for k in inner.dask
                                                  if str(k).startswith(("source-", "model-"))}
    np.testing.assert_array_equal(job.compute()[...], expected)
    engines = {k.split("/")[1] for k in Recording.written if k.startswith(".daskpatch-spill/")}
    assert len(engines) == 2  # both engines spilled


def test_to_numpy_jobs_have_keys_of_their_own_and_leave_the_array_as_it_is():
    from daskpatch.patches import engine_into

    res = _res()
    layers = dict(_graph.layers(res))
    a, b = np.zeros(res.shape, res.dtype), np.zeros(res.shape, res.dtype)
    (job_a, close_a), (job_b, close_b) = engine_into(res, a), engine_into(res, b)
    into_a = {k for k in job_a.dask if str(k[0]).startswith("into-")}
    into_b = {k for k in job_b.dask if str(k[0]).startswith("into-")}
    assert into_a and not into_a & into_b  # two jobs into two arrays: no key in common
    assert not into_a & set(res.dask)
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
