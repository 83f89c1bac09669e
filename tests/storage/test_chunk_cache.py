"""The chunk cache: input chunks that several work blocks read are fetched and decoded once per
compute, bit for bit the same result as without it, within its byte bound, one decode when
threads want a chunk at once, and never a chunk of an input rewritten since."""

from __future__ import annotations

import threading
import time

import dask
import numpy as np
import pytest
import zarr
from zarr.storage import LocalStore

import daskpatch as dp
from daskpatch.storage.chunkcache import CACHE, ChunkCache

from ..conftest import CountingStore, write_zarr

DATA = np.random.default_rng(11).random((40, 36, 28), dtype=np.float32)


@pytest.fixture(autouse=True)
def _empty_cache():
    """Each test starts and ends with an empty process cache and zeroed counters."""
    CACHE.clear()
    CACHE.reset_stats()
    yield
    CACHE.clear()


def _off_and_on(run, setting):
    """``run()`` with the cache off, then on (256 MiB): both results; the cache's counters are
    the second run's."""
    setting("daskpatch.chunk-cache-bytes", 0)
    off = run()
    setting("daskpatch.chunk-cache-bytes", "256 MiB")
    CACHE.reset_stats()
    on = run()
    return off, on


@pytest.mark.parametrize("blend", ["gaussian", "constant", "hann", "crop"])
@pytest.mark.parametrize("border", ["shift", "pad"])
def test_results_are_the_same_bit_for_bit_with_the_cache_on_and_off(tmp_path, setting, blend,
                                                                     border):
    z = zarr.open_array(write_zarr(tmp_path / "v.zarr", DATA, (8, 12, 7)), mode="r")

    def run():
        return dp.apply_patches(z, np.sqrt, 12, 8, blend=blend, border=border,
                                block_shape=16, batch_size=3).compute()

    off, on = _off_and_on(run, setting)
    np.testing.assert_array_equal(on, off)
    assert CACHE.hits > 0 and len(CACHE) == 0  # shared, and every entry taken by its readers


@pytest.mark.parametrize("channel_axis", [0, -1])
def test_a_channel_axis_chunked_or_not(tmp_path, setting, channel_axis):
    data = np.stack([DATA, 2 * DATA], axis=channel_axis)
    for chunk_c in (1, 2):  # one chunk per channel, or the channels in one chunk
        chunks = (chunk_c, 8, 12, 7) if channel_axis == 0 else (8, 12, 7, chunk_c)
        z = zarr.open_array(write_zarr(tmp_path / f"c{chunk_c}.zarr", data, chunks), mode="r")

        def run():
            return dp.apply_patches(z, lambda b: b + 1, 12, 8, border="pad", block_shape=16,
                                    channel_axis=channel_axis).compute()

        off, on = _off_and_on(run, setting)
        np.testing.assert_array_equal(on, off)
        assert CACHE.hits > 0


def test_a_sharded_input_is_cached_by_its_inner_chunks(tmp_path, setting):
    z = zarr.create_array(str(tmp_path / "s.zarr"), shape=DATA.shape, chunks=(8, 12, 7),
                          shards=(16, 24, 14), dtype=DATA.dtype)
    z[...] = DATA
    store = CountingStore(LocalStore(str(tmp_path / "s.zarr"), read_only=True))
    z = zarr.open_array(store, mode="r")
    reads = []

    def run():
        before = store.chunk_reads
        out = dp.apply_patches(z, np.sqrt, 12, 8, block_shape=16).compute()
        reads.append(store.chunk_reads - before)
        return out

    off, on = _off_and_on(run, setting)
    np.testing.assert_array_equal(on, off)
    assert 0 < CACHE.decodes < 5 * 3 * 4  # the shared inner chunks, each decoded once
    assert reads[1] < reads[0]  # inner chunks and shard indexes: 112 reads against 174


@pytest.mark.parametrize("output", ["to_zarr", "to_numpy"])
def test_each_input_chunk_is_read_once_per_job(counting_zarr, setting, tmp_path, output):
    z, store = counting_zarr(DATA, (8, 12, 7))
    n_chunks = 5 * 3 * 4

    def job():
        before = store.chunk_reads
        y = dp.apply_patches(z, np.sqrt, 12, 8, block_shape=16)
        if output == "to_zarr":
            out = dp.to_zarr(y, tmp_path / "o.zarr", overwrite=True)[...]
        else:
            out = dp.to_numpy(y)
        return out, store.chunk_reads - before

    (off, reads_off), (on, reads_on) = _off_and_on(job, setting)
    np.testing.assert_array_equal(on, off)
    assert reads_on == n_chunks < reads_off
    assert 0 < CACHE.decodes < n_chunks and len(CACHE) == 0  # the shared ones through the cache


def test_the_cache_stays_within_its_bound(counting_zarr, setting):
    z, store = counting_zarr(DATA, (8, 12, 7))
    expected = dp.apply_patches(DATA, np.sqrt, 12, 8, block_shape=16).compute()
    limit = 3 * 8 * 12 * 7 * 4  # three chunks
    setting("daskpatch.chunk-cache-bytes", limit)
    CACHE.reset_stats()
    before = store.chunk_reads
    out = dp.apply_patches(z, np.sqrt, 12, 8, block_shape=16).compute()
    np.testing.assert_array_equal(out, expected)
    assert 0 < CACHE.peak <= limit and CACHE.evicted > 0
    assert CACHE.nbytes <= limit
    assert store.chunk_reads - before > 5 * 3 * 4  # some entries went before their readers


def test_a_unit_cache_keeps_its_bound_and_drops_an_entry_after_its_readers():
    cache = ChunkCache()
    chunk = np.zeros(16, dtype=np.float32)  # 64 bytes
    for i in range(10):
        cache.get(("e", i), 3, 200, chunk.copy, epoch="e")
        assert cache.nbytes <= 200
    assert len(cache) == 3 and cache.evicted == 7
    assert cache.get(("e", 9), 3, 200, chunk.copy, epoch="e") is not None
    cache.get(("e", 9), 3, 200, chunk.copy, epoch="e")
    assert ("e", 9) not in cache._entries and len(cache) == 2  # its three readers took it
    cache.get(("big",), 2, 200, lambda: np.zeros(100), epoch="e")  # 800 bytes: not kept
    assert len(cache) == 2
    cache.get(("other", 0), 2, 200, chunk.copy, epoch="f")  # a new compute: the old go first
    cache.get(("other", 1), 2, 200, chunk.copy, epoch="f")
    assert {k[0] for k in cache._entries} == {"e", "other"} and cache.nbytes <= 200


def test_a_chunk_read_again_after_its_eviction_waits_only_for_the_readers_left():
    cache = ChunkCache()
    chunk = np.zeros(16, dtype=np.float32)  # 64 bytes, two fit
    cache.get("a", 3, 128, chunk.copy)  # a's first of three readers
    cache.get("b", 2, 128, chunk.copy)
    cache.get("c", 2, 128, chunk.copy)  # pushes a out: two of its readers to come
    cache.get("a", 3, 128, chunk.copy)  # read again: kept for the one reader left
    assert cache._entries["a"].left == 1
    cache.get("a", 3, 128, chunk.copy)
    assert "a" not in cache._entries and "a" not in cache._gone  # (b went for a)


def test_threads_wanting_one_chunk_decode_it_once():
    cache = ChunkCache()
    loads = []
    start = threading.Barrier(8)

    def load():
        loads.append(1)
        time.sleep(0.2)  # the others arrive while it decodes
        return np.arange(10.0)

    got = [None] * 8

    def reader(i):
        start.wait()
        got[i] = cache.get(("job", "chunk"), 8, 1 << 20, load, epoch="job")

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(loads) == 1 and cache.decodes == 1 and cache.hits == 7
    assert all(g is got[0] for g in got) and not got[0].flags.writeable
    assert len(cache) == 0  # all eight expected readers took it


def test_a_failed_decode_is_raised_by_every_reader_and_not_kept():
    cache = ChunkCache()
    start = threading.Barrier(3)
    errors = []

    def load():
        time.sleep(0.1)
        raise OSError("the store went away")

    def reader():
        start.wait()
        try:
            cache.get(("job", "chunk"), 3, 1 << 20, load, epoch="job")
        except OSError as err:
            errors.append(err)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 3 and len(cache) == 0 and not cache._pending


def test_the_threaded_scheduler_decodes_each_shared_chunk_once(counting_zarr, setting):
    """Blocks run on 4 threads at once: no chunk is read by two of them."""
    z, store = counting_zarr(DATA, (8, 12, 7))
    setting("scheduler", "threads")
    setting("num_workers", 4)
    CACHE.reset_stats()
    for _ in range(3):
        before = store.chunk_reads
        dp.apply_patches(z, np.sqrt, 12, 8, block_shape=8).compute()
        assert store.chunk_reads - before == 5 * 3 * 4


def test_an_input_rewritten_between_computes_is_read_afresh(tmp_path):
    path = write_zarr(tmp_path / "v.zarr", DATA, (8, 12, 7))
    z = zarr.open_array(path, mode="r")
    y = dp.apply_patches(z, np.sqrt, 12, 8, block_shape=16)
    y[:16].compute()  # a part of the job: entries left for blocks that did not run
    assert len(CACHE) > 0
    new = DATA[::-1].copy()
    zarr.open_array(path, mode="r+")[...] = new  # the careless user overwrites the input ...
    expected = dp.apply_patches(new, np.sqrt, 12, 8, block_shape=16).compute()
    np.testing.assert_array_equal(y.compute(), expected)  # ... and reads the same array again
    out = dp.to_zarr(dp.apply_patches(z, np.sqrt, 12, 8, block_shape=16), tmp_path / "o.zarr")
    np.testing.assert_array_equal(out[...], expected)


@pytest.mark.parametrize("bad, exc, says", [
    ("lots", ValueError, r"must be a number of bytes or a string such as '64 MiB'; got 'lots'"),
    (-1, ValueError, r"must be >= 0; got -1"),
    ([1], TypeError, r"must be a number of bytes or a string such as '64 MiB'; got \[1\]"),
])
def test_a_bad_cache_setting_names_itself_before_anything_is_written(tmp_path, bad, exc, says):
    z = zarr.open_array(write_zarr(tmp_path / "v.zarr", DATA, (8, 12, 7)), mode="r")
    with dask.config.set({"daskpatch.chunk-cache-bytes": bad}), pytest.raises(
            exc, match="daskpatch.chunk-cache-bytes " + says):
        dp.to_zarr(dp.apply_patches(z, np.sqrt, 12, 8, block_shape=16), tmp_path / "o.zarr")
    assert not (tmp_path / "o.zarr").exists()
