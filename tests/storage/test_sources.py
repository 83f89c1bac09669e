"""Reading the input: Zarr arrays read inside the block tasks, a chunk at a time or in boxes
within the read budget, straight into the block's region, with the result of a NumPy input."""

from __future__ import annotations

import dask.array as da
from dask.core import flatten
import numpy as np
import pytest
import zarr

import daskpatch as dp

from ..conftest import write_zarr


def test_zarr_input_is_read_inside_the_tasks(counting_zarr):
    data = np.random.default_rng(3).random((32, 32, 32)).astype(np.float32)
    z, store = counting_zarr(data, (16, 16, 16))
    out = dp.apply_patches(z, lambda b: b, 16, 8, block_shape=16)
    assert store.chunk_reads == 0
    # the block tasks read the store themselves: the Zarr array is one key of the graph, as a
    # NumPy volume is, not a task per input chunk (as through a Dask array of its 8 chunks); one
    # more key: the task naming one compute's cached chunks (daskpatch.storage.chunkcache)
    in_memory = dp.apply_patches(data, lambda b: b, 16, 8, block_shape=16)
    chunked = dp.apply_patches(da.from_array(data, chunks=16), lambda b: b, 16, 8, block_shape=16)
    assert len(dict(out.dask)) == len(dict(in_memory.dask)) + 1 < len(dict(chunked.dask))
    np.testing.assert_allclose(out.compute(), data, atol=1e-6)
    assert store.chunk_reads > 0


@pytest.mark.needs_dask("dask.array.from_zarr")
def test_dask_over_zarr_is_unwrapped(counting_zarr):
    data = np.random.default_rng(4).random((32, 32)).astype(np.float32)
    z, _ = counting_zarr(data, (16, 16))
    x = da.from_zarr(z)
    out = dp.apply_patches(x, lambda b: b, 16, 8)
    # read directly, not through the chunk tasks of x
    assert not set(flatten(x.__dask_keys__())) & dict(out.dask).keys()
    np.testing.assert_allclose(out.compute(), data, atol=1e-6)


def test_large_zarr_region_reads_decode_one_chunk_at_a_time(counting_zarr, monkeypatch,
                                                             setting):
    import zarr

    data = np.random.default_rng(8).random((40, 36, 28)).astype(np.float32)
    z, store = counting_zarr(data, (8, 12, 7))
    expected = dp.apply_patches(data, np.sqrt, 16, 8, block_shape=16).compute()
    before = store.chunk_reads
    np.testing.assert_array_equal(dp.apply_patches(z, np.sqrt, 16, 8, block_shape=16).compute(),
                                  expected)
    reads_whole = store.chunk_reads - before  # one read per block region

    touched: list[int] = []
    get = zarr.Array.get_basic_selection  # what arr[...] and reads into a region call

    def recording(self, index, *args, **kwargs):
        if isinstance(index, tuple) and all(isinstance(s, slice) for s in index):
            touched.append(int(np.prod([-(-s.stop // c) - s.start // c
                                        for s, c in zip(index, self.chunks)])))
        return get(self, index, *args, **kwargs)

    monkeypatch.setattr(zarr.Array, "get_basic_selection", recording)
    setting("daskpatch.read-bytes", 0)
    before = store.chunk_reads
    out = dp.apply_patches(z, np.sqrt, 16, 8, block_shape=16).compute()
    np.testing.assert_array_equal(out, expected)
    assert touched and set(touched) == {1}  # every read is one chunk
    assert store.chunk_reads - before == reads_whole  # and no chunk is read twice more

    # a budget of 6 chunks: boxes of whole chunks within it, not one read per chunk
    touched.clear()
    setting("daskpatch.read-bytes", 6 * 8 * 12 * 7 * 4)
    before = store.chunk_reads
    out = dp.apply_patches(z, np.sqrt, 16, 8, block_shape=16).compute()
    np.testing.assert_array_equal(out, expected)
    assert max(touched) <= 6 and max(touched) > 1
    assert store.chunk_reads - before == reads_whole


@pytest.mark.parametrize("channel_axis", [None, 0, -1])
@pytest.mark.parametrize("border", ["shift", "pad"])
def test_zarr_regions_read_straight_into_the_block_match_numpy(tmp_path, channel_axis, border):
    """Block regions spanning several chunks are decoded into the region itself, for every
    channel layout; a region padded on another axis is read and padded as before."""
    shape = (37, 30, 26)
    if channel_axis is not None:
        shape = (2, *shape) if channel_axis == 0 else (*shape, 2)
    data = np.random.default_rng(3).random(shape).astype(np.float32)
    chunks = tuple(2 if n == 2 else 8 for n in shape)
    z = zarr.open_array(write_zarr(tmp_path / "v.zarr", data, chunks), mode="r")

    def model(b):
        return np.sqrt(b) + 1

    kw = dict(border=border, block_shape=16, channel_axis=channel_axis, batch_size=3)
    expected = dp.apply_patches(data, model, 12, 8, **kw).compute()
    np.testing.assert_array_equal(dp.apply_patches(z, model, 12, 8, **kw).compute(), expected)


def test_an_input_this_process_cannot_see_is_an_error_not_fill_values(tmp_path):
    """A worker started where the input store is missing read every chunk as the fill value;
    it now names the array, the host and the process."""
    import shutil

    data = np.random.default_rng(3).random((32, 32), dtype=np.float32)
    z = zarr.create_array(str(tmp_path / "in.zarr"), shape=data.shape, chunks=(16, 16),
                          dtype=data.dtype)
    z[...] = data
    res = dp.apply_patches(dp.open_volume(str(tmp_path / "in.zarr")), lambda b: b, 16, 8)
    shutil.move(str(tmp_path / "in.zarr"), str(tmp_path / "elsewhere.zarr"))  # not here now
    with pytest.raises(FileNotFoundError, match=r"the input Zarr array .* is not there for this "
                                                r"process \(host .*, pid \d+\)"):
        res.compute(scheduler="threads")
