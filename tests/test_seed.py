"""The seed article's two worked examples, reproduced exactly, and where the seed went wrong."""

from __future__ import annotations

import numpy as np
import pytest

import daskpatch as dp


def seed_get_patches(img_arr, size=128, stride=128):
    """The seed's own loop (cubic volumes, divisible shapes), as the reference."""
    overlapping = size // stride - 1 if stride != size else 0
    vols = [img_arr] if img_arr.ndim == 3 else list(img_arr)
    out = []
    for im in vols:
        i_max = im.shape[0] // stride - overlapping
        for i in range(i_max):
            for j in range(i_max):
                for k in range(i_max):
                    out.append(im[i * stride:i * stride + size, j * stride:j * stride + size,
                                  k * stride:k * stride + size])
    return np.stack(out)


def test_seed_example_one_volume_full_size():
    vol = np.random.default_rng(0).random((256, 256, 256), dtype=np.float32)
    patches = dp.get_patches(vol, size=128, stride=128)
    assert patches.shape == (8, 128, 128, 128)
    np.testing.assert_array_equal(patches, seed_get_patches(vol))
    back = dp.reconstruct_patch(patches[..., None], (256, 256, 256), stride=128, size=128)
    assert back.shape == (1, 256, 256, 256, 1)
    np.testing.assert_array_equal(back[0, ..., 0], vol)


def test_seed_example_four_volumes_full_size():
    vols = np.random.default_rng(1).integers(0, 255, (4, 256, 256, 256), dtype=np.uint8)
    patches = dp.get_patches(vols, size=128, stride=128)
    assert patches.shape == (32, 128, 128, 128)
    np.testing.assert_array_equal(patches, seed_get_patches(vols))
    back = dp.reconstruct_patch(patches[..., None], (256, 256, 256), stride=128, size=128)
    assert back.shape == (4, 256, 256, 256, 1) and back.dtype == np.uint8
    np.testing.assert_array_equal(back[..., 0], vols)
    # the same as one call of the new API (leading axis = batch of volumes)
    one_call = dp.extract_patches(vols, (128, 128, 128), 128)
    assert one_call.shape == (32, 128, 128, 128)
    np.testing.assert_array_equal(one_call.compute(), patches)
    np.testing.assert_array_equal(dp.reconstruct(one_call, vols.shape, (128,) * 3).compute(), vols)


@pytest.mark.parametrize("batch", [None, 4])
def test_seed_examples_scaled_down(batch):
    """Both examples at 1/4 scale (64^3, patch 32), for the fast suite."""
    shape = (64, 64, 64) if batch is None else (batch, 64, 64, 64)
    vols = np.random.default_rng(2).random(shape, dtype=np.float32)
    patches = dp.get_patches(vols, size=32, stride=32)
    assert patches.shape == ((8 if batch is None else 32), 32, 32, 32)
    np.testing.assert_array_equal(patches, seed_get_patches(vols, 32, 32))
    back = dp.reconstruct_patch(patches[..., None], (64, 64, 64), stride=32, size=32)
    expected = vols[None] if batch is None else vols
    np.testing.assert_array_equal(back[..., 0], expected)


def test_seed_overlap_divisible_matches_seed_grid_and_blends():
    vol = np.random.default_rng(3).random((64, 64, 64), dtype=np.float32)
    patches = dp.get_patches(vol, size=32, stride=16)
    np.testing.assert_array_equal(patches, seed_get_patches(vol, 32, 16))
    back = dp.reconstruct_patch(patches[..., None] * 2, (64, 64, 64), stride=16, size=32)
    np.testing.assert_allclose(back[0, ..., 0], 2 * vol, atol=1e-5)


def test_non_cubic_non_divisible_shapes_are_right_where_the_seed_was_wrong():
    vol = np.random.default_rng(4).random((70, 50, 40), dtype=np.float32)
    patches = dp.get_patches(vol, size=32, stride=32)
    assert patches.shape == (3 * 2 * 2, 32, 32, 32)  # per-axis counts; the end is covered
    back = dp.reconstruct_patch(patches[..., None], vol.shape, stride=32, size=32)
    np.testing.assert_allclose(back[0, ..., 0], vol, atol=1e-6)
    # the seed would use the first axis's count (2) on every axis and drop the remainders
    with pytest.raises(ValueError):
        seed_get_patches(vol, 32, 32)  # ragged slices cannot even be stacked


def test_multichannel_predictions_come_back_channel_last():
    vol = np.random.default_rng(5).random((32, 32, 32), dtype=np.float32)
    patches = dp.get_patches(vol, size=16, stride=16)
    preds = np.stack([patches, 1 - patches], axis=-1)
    back = dp.reconstruct_patch(preds, (32, 32, 32), stride=16, size=16)
    assert back.shape == (1, 32, 32, 32, 2)
    np.testing.assert_allclose(back[0], np.stack([vol, 1 - vol], -1), atol=1e-6)


def test_reconstruct_patch_takes_stride_none_as_the_size():
    vols = np.random.default_rng(4).random((2, 32, 32, 32), dtype=np.float32)
    patches = dp.get_patches(vols, size=16, stride=16)
    back = dp.reconstruct_patch(patches, (32, 32, 32), stride=None, size=16)
    np.testing.assert_array_equal(back, vols)
