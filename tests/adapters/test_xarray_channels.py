"""apply_patches on a DataArray without a channel dim, one channel in and K out."""

from __future__ import annotations

import numpy as np
import pytest

import daskpatch as dp

xr = pytest.importorskip("xarray")


def _three(batch):  # (B, 1, *size) -> (B, 3, *size)
    return np.concatenate([batch, 2 * batch, batch ** 2], axis=1)


@pytest.mark.needs_dask("Array.__array__ (xarray .values)")
def test_one_channel_in_k_out_gets_a_channel_dim_in_front():
    data = np.random.default_rng(0).random((16, 12), dtype=np.float32)
    vol = xr.DataArray(data, dims=("y", "x"), name="img", attrs={"units": "mm"},
                       coords={"y": np.arange(16) * 0.5, "x": np.arange(12) * 0.25,
                               "label": "t1"})
    out = dp.apply_patches(vol, _three, 8, 4, out_channels=3)
    assert isinstance(out, xr.DataArray)
    assert out.dims == ("channel", "y", "x") and out.shape == (3, 16, 12)
    assert list(out.coords["channel"].values) == [0, 1, 2]
    np.testing.assert_array_equal(out.coords["y"].values, vol.coords["y"].values)
    np.testing.assert_array_equal(out.coords["x"].values, vol.coords["x"].values)
    assert out.coords["label"].item() == "t1"
    assert out.attrs == {"units": "mm"} and out.name == "img"
    expected = dp.apply_patches(data, _three, 8, 4, out_channels=3).compute()
    np.testing.assert_array_equal(out.values, expected)


def test_a_taken_channel_name_gets_a_fresh_one():
    vol = xr.DataArray(np.zeros((2, 8, 8), np.float32), dims=("channel", "y", "x"))
    out = dp.apply_patches(vol, _three, (4, 4), 4, out_channels=3)  # channel: a batch axis
    assert out.dims == ("channel_1", "channel", "y", "x") and out.shape == (3, 2, 8, 8)
