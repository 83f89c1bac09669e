"""dp.to_nifti: a volume read from NIfTI (the user guide's recipe) written back with its affine."""

from __future__ import annotations

import os

import dask.array as da
import numpy as np
import pytest

import daskpatch as dp
from daskpatch.errors import ParameterError, ParameterTypeError, TargetExistsError

nib = pytest.importorskip("nibabel")

AFFINE = np.array([[-0.8, 0, 0, 90.0], [0, 0.8, 0, -126.0], [0, 0, 2.5, -72.0], [0, 0, 0, 1]])


@pytest.fixture
def ct(tmp_path):
    vol = np.random.default_rng(0).random((40, 32, 20)).astype(np.float32)  # x, y, z
    img = nib.Nifti1Image(vol, AFFINE)
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = b"test ct"
    nib.save(img, tmp_path / "ct.nii")
    return tmp_path / "ct.nii", vol


@pytest.mark.needs_dask("Array.transpose(*axes)")
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_round_trip_keeps_affine_header_and_voxels(ct, tmp_path, suffix):
    path, vol = ct
    img = nib.load(path)  # the recipe: lazy x, y, z -> z, y, x
    volume = da.from_array(img.dataobj, chunks=(20, 16, 10)).transpose(2, 1, 0)
    pred = dp.apply_patches(volume, lambda b: 2 * b, 16, 8)
    out = dp.to_nifti(pred, tmp_path / f"pred{suffix}", img.affine, header=img.header)
    assert out == str(tmp_path / f"pred{suffix}")
    back = nib.load(out)
    np.testing.assert_allclose(back.get_fdata(dtype=np.float32), 2 * vol, rtol=1e-6)
    np.testing.assert_allclose(back.affine, AFFINE)
    assert back.header.get_xyzt_units() == ("mm", "sec")
    assert back.header["descrip"] == b"test ct"
    assert back.get_data_dtype() == np.float32
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []


def test_xyz_order_channels_and_integer_dtypes(tmp_path):
    labels = np.random.default_rng(1).integers(0, 5, (2, 6, 5, 4), dtype=np.uint8)  # c, z, y, x
    out = dp.to_nifti(labels, tmp_path / "labels.nii", channel_axis=0)
    back = nib.load(out)
    assert back.shape == (4, 5, 6, 2) and back.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(back.dataobj), labels.transpose(3, 2, 1, 0))
    np.testing.assert_allclose(back.affine, np.eye(4))
    xyz = np.arange(24, dtype=np.int16).reshape(4, 3, 2)
    back = nib.load(dp.to_nifti(xyz, tmp_path / "xyz.nii", axes="xyz"))
    np.testing.assert_array_equal(np.asarray(back.dataobj), xyz)


def test_a_dataarray_and_a_zarr_volume(tmp_path):
    xr = pytest.importorskip("xarray")
    zarr = pytest.importorskip("zarr")
    data = np.random.default_rng(2).random((6, 8, 10), dtype=np.float32)
    arr = xr.DataArray(data, dims=("z", "y", "x"))
    back = nib.load(dp.to_nifti(arr, tmp_path / "a.nii"))
    np.testing.assert_allclose(back.get_fdata(dtype=np.float32), data.transpose(2, 1, 0))
    z = zarr.create_array(str(tmp_path / "v.zarr"), shape=data.shape, chunks=(3, 4, 5),
                          dtype=data.dtype)
    z[...] = data
    back = nib.load(dp.to_nifti(dp.open_volume(z), tmp_path / "z.nii"))
    np.testing.assert_allclose(back.get_fdata(dtype=np.float32), data.transpose(2, 1, 0))


ERRORS = [
    (dict(path="out.zarr"), ParameterError, r"path must end in \.nii .* or \.nii\.gz; got "),
    (dict(affine=np.eye(3)), ParameterError, r"affine must be a finite 4 x 4 array .*got shape "
     r"\(3, 3\)"),
    (dict(affine="eye"), ParameterTypeError, r"affine must be a 4 x 4 array of numbers"),
    (dict(array=np.zeros((2, 3, 4, 5), np.float32)), ParameterError,
     r"array must have 2 or 3 spatial axes \(plus channel_axis\); got a 4-D array"),
    (dict(axes="yxz"), ParameterError, r"axes must be one of \('zyx', 'xyz'\)"),
    (dict(array=np.zeros((4, 4, 4), np.float16)), ParameterTypeError,
     r"NIfTI-1 cannot store dtype float16"),
    (dict(header="hdr"), ParameterTypeError, r"header must be a nibabel.Nifti1Header or None"),
]


@pytest.mark.parametrize("kwargs, exc, match", ERRORS)
def test_bad_arguments_write_nothing(tmp_path, kwargs, exc, match):
    kwargs = {"array": np.zeros((4, 4, 4), np.float32), "path": "out.nii", **kwargs}
    kwargs["path"] = tmp_path / kwargs["path"]
    with pytest.raises(exc, match=match):
        dp.to_nifti(**kwargs)
    assert os.listdir(tmp_path) == []


@pytest.mark.needs_dask("map_blocks of a function that raises")
def test_an_existing_file_needs_overwrite_and_a_failed_write_leaves_it(ct, tmp_path):
    path, vol = ct
    with pytest.raises(TargetExistsError, match="already exists; pass overwrite=True"):
        dp.to_nifti(np.zeros((4, 4, 4), np.float32), path)

    def boom(block):
        raise RuntimeError("model failed")

    failing = da.zeros((20, 32, 40), chunks=10, dtype=np.float32).map_blocks(boom, dtype=np.float32)
    with pytest.raises(RuntimeError, match="model failed"):
        dp.to_nifti(failing, path, overwrite=True)
    np.testing.assert_array_equal(nib.load(path).get_fdata(dtype=np.float32), vol)
    assert sorted(os.listdir(tmp_path)) == ["ct.nii"]
    dp.to_nifti(np.ones((20, 32, 40), np.float32), path, overwrite=True)
    assert nib.load(path).get_fdata().min() == 1
