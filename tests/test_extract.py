"""extract_patches and apply_patches pad with pad_value (MONAI's cval) under pad_mode='constant'."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

import daskpatch as dp
from daskpatch import PatchGrid

from .conftest import naive_blend


@pytest.mark.parametrize("as_dask", [False, pytest.param(True, marks=pytest.mark.needs_dask(
    "NumPy scalar promotion (int16 + 0 stays int16)"))], ids=["direct", "dask-chunks"])
def test_extract_patches_pads_with_pad_value(as_dask):
    vol = np.random.default_rng(0).integers(-1000, 1000, (10, 13)).astype(np.int16)
    src = (da.from_array(vol, chunks=(4, 5)) + 0) if as_dask else vol  # + 0: a real graph
    p = dp.extract_patches(src, 4, 3, border="pad", pad_mode="constant", pad_value=-1024)
    grid = PatchGrid(vol.shape, 4, 3, border="pad")
    padded = np.pad(vol, grid.pad_width, constant_values=-1024)
    np.testing.assert_array_equal(p.compute(), np.stack([padded[sl] for sl in grid]))
    assert p.dtype == np.int16


def test_apply_patches_pads_with_pad_value():
    vol = np.random.default_rng(1).random((1, 18, 21), dtype=np.float32)
    grid = PatchGrid(vol.shape[1:], 8, 6, border="pad")
    out = dp.apply_patches(vol, patch_mean, 8, 6, border="pad", pad_mode="constant",
                           pad_value=-3.0, channel_axis=0, blend="hann")
    padded = np.pad(vol[0], grid.pad_width, constant_values=-3.0)
    outputs = np.stack([patch_mean(padded[sl][None])[0] for sl in grid])[:, None]
    expected = naive_blend(outputs, grid, "hann")
    np.testing.assert_allclose(out.compute(), expected, rtol=1e-5)
    zero = dp.apply_patches(vol, patch_mean, 8, 6, border="pad", pad_mode="constant",
                            channel_axis=0, blend="hann")
    assert not np.allclose(zero.compute(), expected)  # the fill reaches the model
    assert out.name != zero.name


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(pad_value=-1), ValueError,
         r"pad_value=-1 is the fill of pad_mode='constant'; got pad_mode='reflect'"),
        (dict(pad_mode="constant", pad_value="min"), TypeError,
         r"pad_value must be a number; got 'min' of type str"),
        (dict(pad_mode="constant", pad_value=300), ValueError,
         r"pad_value=300 does not fit the volume's dtype uint8 \(an integer from 0 to 255\)"),
        (dict(pad_mode="constant", pad_value=0.5), ValueError,
         r"pad_value=0\.5 does not fit the volume's dtype uint8"),
        (dict(pad_mode="constant", pad_value=np.nan), ValueError,
         r"pad_value=nan does not fit the volume's dtype uint8"),
    ],
)
def test_pad_value_errors(kwargs, exc, match):
    vol = np.zeros((10, 10), np.uint8)
    with pytest.raises(exc, match=match):
        dp.extract_patches(vol, 4, border="pad", **kwargs)
    with pytest.raises(exc, match=match):
        dp.apply_patches(vol, lambda b: b, 4, border="pad", **kwargs)


def patch_mean(batch: np.ndarray) -> np.ndarray:
    """Each patch's mean everywhere in it: sees the padding and makes patches differ."""
    axes = tuple(range(1, batch.ndim))
    return np.broadcast_to(batch.mean(axis=axes, keepdims=True, dtype=np.float64),
                           batch.shape).astype(np.float32)
