"""Blend windows: per-axis sigma_scale (as MONAI and nnU-Net take it) in apply_patches,
reconstruct and window(), and its errors."""

from __future__ import annotations

import numpy as np
import pytest

import daskpatch as dp
from daskpatch import PatchGrid
from daskpatch.geometry.windows import profile

from ..conftest import naive_blend


def mixed(batch: np.ndarray) -> np.ndarray:
    """Data plus a per-patch offset, so the blend weights decide the result."""
    return (batch + batch.mean(axis=tuple(range(1, batch.ndim)), keepdims=True)).astype(
        np.float32)


def test_per_axis_sigma_scale_matches_the_oracle():
    vol = np.random.default_rng(2).random((30, 26), dtype=np.float32)
    sigmas = (0.08, 0.4)
    size = (12, 10)
    out = dp.apply_patches(vol, mixed, size, (5, 4), sigma_scale=sigmas, batch_size=3)
    grid = PatchGrid(vol.shape, size, (5, 4))
    w = np.multiply.outer(profile("gaussian", 12, 0.08), profile("gaussian", 10, 0.4))
    outputs = np.stack([mixed(vol[sl][None])[0] for sl in grid])[:, None]
    np.testing.assert_allclose(out.compute(), naive_blend(outputs, grid, w)[0], rtol=1e-5)
    scalar = dp.apply_patches(vol, mixed, size, (5, 4), sigma_scale=0.08).compute()
    assert not np.allclose(out.compute(), scalar, rtol=1e-6)
    # reconstruct takes it too
    p = dp.extract_patches(vol, size, (5, 4))
    back = dp.reconstruct(p, vol.shape, size, (5, 4), sigma_scale=sigmas)
    np.testing.assert_allclose(back.compute(), vol, rtol=1e-5)


def test_per_axis_sigma_scale_with_batch_axes():
    vol = np.random.default_rng(3).random((2, 20, 18), dtype=np.float32)
    out = dp.apply_patches(vol, mixed, (8, 6), (4, 3), sigma_scale=(0.1, 0.3))
    for b in range(2):
        single = dp.apply_patches(vol[b], mixed, (8, 6), (4, 3), sigma_scale=(0.1, 0.3))
        np.testing.assert_allclose(out[b].compute(), single.compute(), rtol=1e-6)


@pytest.mark.parametrize(
    "sigma, exc, match",
    [
        ((0.1, 0.2, 0.3), ValueError,
         r"sigma_scale must be a number or a sequence of 2 numbers \(one per spatial axis\); got "
         r"\(0\.1, 0\.2, 0\.3\) with 3 entries"),
        ((0.1, "wide"), TypeError, r"sigma_scale\[1\] must be a positive number; got 'wide'"),
        ((0.1, 0), ValueError, r"sigma_scale\[1\] must be a positive finite number; got 0"),
        ("wide", TypeError, r"sigma_scale must be a positive number or a sequence of 2"),
    ],
)
def test_sigma_scale_errors(sigma, exc, match):
    with pytest.raises(exc, match=match):
        dp.apply_patches(np.zeros((16, 16)), lambda b: b, 8, sigma_scale=sigma)


def test_window_function_takes_per_axis_sigma_and_documents_its_parameters():
    w = dp.window("gaussian", (16, 16), sigma_scale=(0.1, 0.5))
    np.testing.assert_allclose(w, np.multiply.outer(profile("gaussian", 16, 0.1),
                                                    profile("gaussian", 16, 0.5)))
    doc = dp.window.__doc__
    assert "Parameters\n    ----------" in doc
    for name in ("blend :", "size :", "sigma_scale :"):
        assert name in doc
