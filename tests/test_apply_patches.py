"""apply_patches: every patch through the model exactly once, in batches, blended like the oracle."""

from __future__ import annotations

import threading

import dask.array as da
import numpy as np
import pytest
import zarr

import daskpatch as dp
from daskpatch import PatchGrid

from .conftest import naive_blend


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





@pytest.mark.parametrize("kind", ["numpy", "zarr", "dask"])
def test_one_channel_in_k_classes_out(tmp_path, kind):
    """A scan without a channel axis and a model returning K classes: the model gets
    (B, 1, *size), the result is (K, *scan.shape)."""
    scan = np.random.default_rng(6).random((20, 24, 28), dtype=np.float32)
    if kind == "zarr":
        z = zarr.create_array(str(tmp_path / "s.zarr"), shape=scan.shape, chunks=(8, 8, 8),
                              dtype=scan.dtype)
        z[...] = scan
        vol = z
    else:
        vol = scan if kind == "numpy" else da.from_array(scan, chunks=10) + 0
    seen = []

    def classes(batch):
        seen.append(batch.shape[1:])
        return np.concatenate([batch, 2 * batch, -batch], axis=1)

    out = dp.apply_patches(vol, classes, 8, 4, out_channels=3)
    assert out.shape == (3, 20, 24, 28)
    got = out.compute(scheduler="threads")
    assert set(seen) == {(1, 8, 8, 8)}
    np.testing.assert_allclose(got, np.stack([scan, 2 * scan, -scan]), rtol=1e-5, atol=1e-6)
