"""xarray in and out of the patch functions: dims, coordinates and attributes kept."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

import daskpatch as dp

xr = pytest.importorskip("xarray")


def _labelled(channels: int = 2) -> xr.DataArray:
    data = np.random.default_rng(2).random((channels, 12, 20)).astype(np.float32)
    return xr.DataArray(
        da.from_array(data, chunks=(channels, 6, 10)), dims=("c", "y", "x"),
        coords={"c": ["red", "green"][:channels], "y": 0.5 * np.arange(12),
                "x": 10 + 0.25 * np.arange(20), "label": ("c", ["r", "g"][:channels])},
        attrs={"ome": {"axes": [{"name": "c", "type": "channel"}]}, "source": "test"},
        name="cells",
    )


@pytest.mark.needs_dask("Array.__array__ (xarray .values)")
def test_apply_patches_keeps_dims_coords_and_attrs():
    vol = _labelled()
    out = dp.apply_patches(vol, lambda b: 2 * b, 8, 4, channel_axis="c", batch_size=3)
    assert isinstance(out, xr.DataArray) and isinstance(out.data, da.Array)
    assert out.dims == vol.dims and out.name == "cells" and out.attrs == vol.attrs
    xr.testing.assert_identical(out.coords.to_dataset(), vol.coords.to_dataset())
    expected = dp.apply_patches(vol.data, lambda b: 2 * b, 8, 4, channel_axis=0, batch_size=3)
    np.testing.assert_array_equal(out.values, expected.compute())


def test_apply_patches_new_channel_count_gets_a_fresh_index():
    vol = _labelled()
    out = dp.apply_patches(vol, lambda b: b.sum(axis=1, keepdims=True).repeat(3, axis=1), 8, 4,
                           channel_axis="c", out_channels=3)
    assert out.dims == ("c", "y", "x") and out.shape == (3, 12, 20)
    np.testing.assert_array_equal(out.coords["c"].values, [0, 1, 2])
    assert "label" not in out.coords  # it lay along the old channel dim
    np.testing.assert_array_equal(out.coords["x"].values, vol.coords["x"].values)
    assert out.attrs == vol.attrs


@pytest.mark.needs_dask("Array.__array__ (xarray .values)")
def test_extract_and_reconstruct_dataarrays():
    vol = _labelled()
    patches = dp.extract_patches(vol, 8, 4, channel_axis="c")
    grid = dp.PatchGrid((12, 20), 8, 4)
    assert patches.dims == ("patch", "c", "y", "x") and patches.shape == (len(grid), 2, 8, 8)
    starts = np.array([grid.start(i) for i in range(len(grid))])
    np.testing.assert_array_equal(patches.coords["y_start"].values, starts[:, 0])
    np.testing.assert_array_equal(patches.coords["x_start"].values, starts[:, 1])
    np.testing.assert_array_equal(patches.coords["c"].values, ["red", "green"])
    np.testing.assert_array_equal(patches.values[5], vol.values[(slice(None), *grid[5])])
    assert patches.attrs == vol.attrs

    back = dp.reconstruct(patches, vol.shape, 8, 4, channel_axis="c", blend="hann")
    assert back.dims == vol.dims and back.attrs == vol.attrs
    np.testing.assert_array_equal(back.coords["c"].values, ["red", "green"])
    np.testing.assert_allclose(back.values, vol.values, atol=1e-6)
    placed = back.assign_coords(vol.coords)  # the documented way back to physical coordinates
    xr.testing.assert_allclose(placed, vol, atol=1e-6)


@pytest.mark.needs_dask("Array.__array__ (xarray .values)")
def test_extract_channel_last_and_batch_dims():
    data = np.arange(2 * 6 * 8 * 3, dtype=np.float32).reshape(2, 6, 8, 3)
    vol = xr.DataArray(data, dims=("volume", "y", "x", "rgb"))
    patches = dp.extract_patches(vol, (4, 4), 2, channel_axis="rgb")
    assert patches.dims == ("patch", "y", "x", "rgb")
    assert set(patches.coords) == {"volume_start", "y_start", "x_start"}
    back = dp.reconstruct(patches, data.shape, (4, 4), 2, channel_axis="rgb", blend="constant")
    assert back.dims == ("batch_0", "y", "x", "rgb")
    np.testing.assert_allclose(back.values, data)


def test_channel_axis_name_errors():
    vol = _labelled()
    with pytest.raises(ValueError, match=r"channel_axis must be an axis index or a dim of the "
                                         r"volume \('c', 'y', 'x'\); got 'z'"):
        dp.apply_patches(vol, lambda b: b, 8, channel_axis="z")
    with pytest.raises(TypeError, match=r"channel_axis must be an integer; got 'c' of type str "
                                        r"\(a dim name works only when volume is an "
                                        r"xarray.DataArray; it is a ndarray\)"):
        dp.extract_patches(vol.values, 8, channel_axis="c")
