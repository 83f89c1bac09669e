"""Numbers (issue 8, items 10-14): integer casts, tiny gaussians, crop copies, complex data, and
accumulation that never leaves the range of its inputs — on every way a result is computed.

Each test is a user-level reproducer that gave a silent wrong answer (or a warning only) before.
"""

from __future__ import annotations

import numpy as np
import pytest
import daskpatch as dp

PATHS = ["compute", "to_zarr", "to_numpy"]
F32_MAX = float(np.finfo(np.float32).max)


def run(arr, path, tmp_path):
    """The result of ``arr`` computed one way: dask's compute, written to Zarr, or to_numpy."""
    if path == "compute":
        return arr.compute()
    if path == "to_zarr":
        return dp.to_zarr(arr, tmp_path / f"out-{len(list(tmp_path.iterdir()))}.zarr")[...]
    return dp.to_numpy(arr)


def identity(b):
    return b


def spread_nan(b):
    """A model where one NaN input voxel makes its whole output patch NaN (as a conv net does)."""
    axes = tuple(range(1, b.ndim))
    return b + 0 * b.sum(axis=axes, keepdims=True)


# -- 11. small sigma_scale: exact, strictly positive normalisation -------------------------------
@pytest.mark.parametrize("sigma_scale", [0.02, 0.01, 3e-3, 1e-3])
@pytest.mark.parametrize("border", ["shift", "pad"])
@pytest.mark.parametrize(("size", "stride"), [(8, 4), (8, 3), (8, 7), (8, 1), (9, 5), (6, 6)])
def test_tiny_sigma_round_trip(sigma_scale, border, size, stride):
    vol = np.random.default_rng(1).random((21, 26)).astype(np.float32) + 1
    p = dp.extract_patches(vol, size, stride, border=border)
    out = dp.reconstruct(p, vol.shape, size, stride, border=border,
                         sigma_scale=sigma_scale).compute()
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, vol, rtol=1e-6)


@pytest.mark.parametrize("path", PATHS)
def test_tiny_sigma_on_every_path(path, tmp_path):
    vol = np.random.default_rng(2).random((20, 22, 18)).astype(np.float32)
    arr = dp.apply_patches(vol, lambda b: 2 * b, 8, 3, sigma_scale=1e-3, block_shape=6)
    out = run(arr, path, tmp_path)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, 2 * vol, rtol=1e-6, atol=1e-7)


def test_tiny_sigma_weights_are_a_partition_of_one():
    from daskpatch.windows import Window

    starts = np.array([0, 3, 6, 9, 12, 13])  # a shifted last patch
    for sigma in (0.125, 0.01, 1e-3, 1e-6):
        q = Window("gaussian", sigma).axis_weights(starts, 8, 21)
        total = np.zeros(21)
        np.add.at(total, starts[:, None] + np.arange(8), q)
        assert np.isfinite(q).all() and (q >= 0).all()
        np.testing.assert_allclose(total, 1.0, rtol=1e-15)
