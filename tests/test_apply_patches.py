"""apply_patches: every patch through the model exactly once, in batches, blended like the oracle."""

from __future__ import annotations

import math
import threading

import dask.array as da
import numpy as np
import pytest
import zarr

import daskpatch as dp
from daskpatch import PatchGrid
from daskpatch.graph import layers as _graph

from .conftest import naive_blend, write_zarr


class Recorder:
    """A model that records the start (via an encoded voxel) of every patch it sees."""

    def __init__(self, fn=lambda b: b):
        self.fn = fn
        self.batches: list[int] = []
        self.seen: list[tuple] = []
        self.lock = threading.Lock()

    def __call__(self, batch):
        with self.lock:
            self.batches.append(len(batch))
            for p in batch:
                self.seen.append(tuple(int(v) for v in p.reshape(p.shape[0], -1)[:, 0]))
        return self.fn(batch)


def _coords_volume(shape):
    """A channel-first volume whose channels hold each voxel's coordinates."""
    return np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")).astype(np.float32)


@pytest.mark.parametrize("border", ["shift", "pad"])
@pytest.mark.parametrize("block", [None, (8, 8, 8), (16, 8, 24)])
def test_every_patch_exactly_once_in_batches(border, block):
    shape, size, stride, batch_size = (30, 27, 33), (8, 8, 8), (4, 4, 4), 5
    vol = _coords_volume(shape)
    rec = Recorder()
    out = dp.apply_patches(vol, rec, size, stride, border=border, channel_axis=0,
                           batch_size=batch_size, block_shape=block)
    assert rec.seen == []  # nothing ran while building
    result = out.compute()
    grid = PatchGrid(shape, size, stride, border=border)
    assert sorted(rec.seen) == sorted(grid.start(i) for i in range(len(grid)))
    assert len(rec.seen) == len(grid)  # exactly once: no halo recomputation
    assert max(rec.batches) <= batch_size
    np.testing.assert_allclose(result, vol, atol=1e-4)


@pytest.mark.parametrize("blend", ["gaussian", "crop", "hann"])
def test_position_dependent_model_matches_oracle(blend):
    """A model whose output depends on the patch (its mean) makes overlaps disagree."""
    shape, size, stride = (21, 18, 13), (8, 6, 5), (4, 3, 4)
    vol = np.random.default_rng(0).random(shape)

    def fn(b):
        return b + b.mean(axis=(1, 2, 3), keepdims=True)

    grid = PatchGrid(shape, size, stride)
    outs = np.stack([fn(vol[sl][None])[0] for sl in grid])[:, None]
    expected = naive_blend(outs, grid, blend)[0]
    for block in (None, (4, 6, 8)):
        got = dp.apply_patches(vol, fn, size, stride, blend=blend, batch_size=7,
                               block_shape=block).compute()
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


def test_out_channels_and_dtype_like_a_segmentation_net():
    vol = np.random.default_rng(1).random((1, 24, 20, 16)).astype(np.float32)

    def logits(b):  # (B, 1, ...) -> (B, 3, ...) float16
        return np.concatenate([b, 2 * b, -b], axis=1).astype(np.float16)

    out = dp.apply_patches(vol, logits, 8, 4, channel_axis=0, out_channels=3, batch_size=4,
                           dtype=np.float32)
    assert out.shape == (3, 24, 20, 16) and out.dtype == np.float32
    res = out.compute()
    v = vol[0].astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(res, np.stack([v, 2 * v, -v]), atol=2e-3)


def test_channel_last_volume_keeps_channel_last():
    vol = np.random.default_rng(2).random((20, 20, 2)).astype(np.float32)
    out = dp.apply_patches(vol, lambda b: b[..., :1] * 3, (8, 8), 4, channel_axis=-1,
                           out_channels=1)
    assert out.shape == (20, 20, 1)
    np.testing.assert_allclose(out.compute()[..., 0], 3 * vol[..., 0], atol=1e-5)


def test_default_dtype_rules():
    ints = np.zeros((16, 16), dtype=np.int16)
    assert dp.apply_patches(ints, lambda b: b, 8).dtype == np.float32
    f64 = np.zeros((16, 16))
    assert dp.apply_patches(f64, lambda b: b, 8).dtype == np.float64
    assert dp.apply_patches(f64, lambda b: b, 8, dtype="uint8").dtype == np.uint8


@pytest.mark.parametrize(
    ("fn", "exc", "match"),
    [
        (lambda b: b[:, :4], ValueError,
         r"fn returned shape \(\d+, 4, 8\) for a batch of shape \(\d+, 8, 8\); expected \(\d+, 8, 8\)"),
        (lambda b: b.sum(), ValueError, r"fn returned shape \(\) for a batch"),
        (lambda b: [1, 2], TypeError, r"fn must return an array of shape .* got \[1, 2\] of type list"),
    ],
)
def test_model_returning_the_wrong_shape(fn, exc, match):
    out = dp.apply_patches(np.zeros((16, 16), np.float32), fn, 8, batch_size=2)
    with pytest.raises(exc, match=match):
        out.compute()


def test_wrong_channel_count_is_reported():
    vol = np.zeros((2, 16, 16), np.float32)
    out = dp.apply_patches(vol, lambda b: b, 8, channel_axis=0, out_channels=3)
    with pytest.raises(ValueError, match=r"expected \(1, 3, 8, 8\)"):
        out.compute()


def test_zarr_input_is_read_inside_the_tasks(counting_zarr):
    data = np.random.default_rng(3).random((32, 32, 32)).astype(np.float32)
    z, store = counting_zarr(data, (16, 16, 16))
    out = dp.apply_patches(z, lambda b: b, 16, 8, block_shape=16)
    assert store.chunk_reads == 0
    # the accumulate tasks read the store themselves: no per-chunk input tasks in the graph
    assert not any(isinstance(k, tuple) and str(k[0]).startswith("from-zarr")
                   for k in dict(out.dask))
    np.testing.assert_allclose(out.compute(), data, atol=1e-6)
    assert store.chunk_reads > 0


@pytest.mark.needs_dask("dask.array.from_zarr")
def test_dask_over_zarr_is_unwrapped(counting_zarr):
    data = np.random.default_rng(4).random((32, 32)).astype(np.float32)
    z, _ = counting_zarr(data, (16, 16))
    x = da.from_zarr(z)
    out = dp.apply_patches(x, lambda b: b, 16, 8)
    assert x.name not in _graph.layers(out)  # read directly, not through the chunk tasks
    np.testing.assert_allclose(out.compute(), data, atol=1e-6)


def test_tasks_per_output_chunk():
    vol = da.zeros((64, 64, 64), chunks=16, dtype=np.float32)
    out = dp.apply_patches(vol, lambda b: b, 16, 8, block_shape=16)
    keys = list(dict(_graph.layers(out)[out.name]))
    per_chunk = len(keys) / math.prod(out.numblocks)
    assert per_chunk <= 3


def test_spilled_halos_give_the_same_result(tmp_path):
    vol = np.random.default_rng(5).random((40, 36, 28)).astype(np.float32)
    in_memory = dp.apply_patches(vol, np.sqrt, 16, 8, block_shape=16).compute()
    spill = tmp_path / "halos"
    out = dp.apply_patches(vol, np.sqrt, 16, 8, block_shape=16, spill=spill)
    assert not spill.exists()  # nothing written while building
    np.testing.assert_array_equal(out.compute(), in_memory)
    (engine_dir,) = spill.iterdir()
    assert not list(engine_dir.iterdir())  # each halo part deleted once its chunk read it
    p = dp.extract_patches(vol, 16, 8)
    back = dp.reconstruct(p, vol.shape, 16, 8, block_shape=16, spill=True)
    np.testing.assert_allclose(back.compute(), vol, atol=1e-6)


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


class _MarkedModel:
    """A model whose pickle carries a marker: the graph keys that ship it can be counted."""

    marker = b"daskpatch-test-model-weights-0xC0FFEE"

    def __init__(self) -> None:
        self.weights = self.marker

    def __call__(self, batch):
        return batch * 2


def test_the_model_is_one_graph_key_that_every_block_task_reads(tmp_path):
    import pickle

    data = np.random.default_rng(3).random((48, 40), dtype=np.float32)
    z = zarr.create_array(tmp_path / "in.zarr", shape=data.shape, chunks=(16, 16), dtype="f4")
    z[...] = data
    model = _MarkedModel()
    out = dp.apply_patches(dp.open_volume(tmp_path / "in.zarr"), model, 16, 8, block_shape=16,
                           batch_size=3)
    graph = dict(out.__dask_graph__())
    holding = [k for k, task in graph.items() if _MarkedModel.marker in pickle.dumps(task)]
    assert len(holding) == 1, holding  # once, not once per block (6 blocks here)
    assert sum(1 for k in graph if isinstance(k, tuple) and str(k[0]).startswith("acc-")) == 6
    np.testing.assert_allclose(out.compute(), 2 * data, rtol=1e-6)
    np.testing.assert_allclose(dp.to_numpy(out), 2 * data, rtol=1e-6)
