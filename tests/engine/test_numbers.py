"""Numbers: integer casts, tiny gaussians, crop copies, complex data, and
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


# -- integer results round to nearest and saturate; NaN is an error --------------------------
VALUES = np.array([255.6, -0.6, 1000.0, -1000.0, 100.4, 100.6, 3.0, -3.4, 1e30, -1e30],
                  dtype=np.float32)


def _valued_volume(shape=(16, 16, 16)):
    idx = np.random.default_rng(0).integers(0, len(VALUES), shape)
    return VALUES[idx]


def _oracle_cast(x, dtype):
    """Round to nearest, saturate: in Python integers, exactly."""
    info = np.iinfo(dtype)
    flat = [min(max(int(np.rint(v)), info.min), info.max) for v in x.astype(np.float64).flat]
    return np.array(flat, dtype=dtype).reshape(x.shape)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "uint16", "int32", "uint32",
                                   "int64", "uint64"])
def test_integer_dtype_rounds_to_nearest_and_saturates(path, dtype, tmp_path):
    vol = _valued_volume()
    out = run(dp.apply_patches(vol, identity, 8, 4, dtype=dtype), path, tmp_path)
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, _oracle_cast(vol, dtype))


@pytest.mark.parametrize("path", PATHS)
def test_integer_casts_saturate_after_rounding(path, tmp_path):
    vol = np.full((8, 8), 255.6, np.float32)
    vol[:, 4:] = -0.6
    out = run(dp.apply_patches(vol, identity, 4, 2, dtype="uint8"), path, tmp_path)
    assert (out[:, :4] == 255).all() and (out[:, 4:] == 0).all()
    big = run(dp.apply_patches(np.full((8, 8), 1000.0), identity, 4, 2, dtype="int8"), path,
              tmp_path)
    assert (big == 127).all()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("blend", ["gaussian", "crop"])
def test_bool_results_are_true_above_one_half(path, blend, tmp_path):
    # a blended mask is True where most of the weight says so; a plain astype(bool) made every
    # voxel any patch touched with a nonzero value (0.3 here, or NaN) True
    values = np.array([0.0, 0.3, 0.49, 0.51, 0.9, 1.0, -2.0, 7.0], np.float32)
    vol = values[np.random.default_rng(1).integers(0, len(values), (16, 16, 16))]
    out = run(dp.apply_patches(vol, identity, 8, 4, blend=blend, dtype=bool), path, tmp_path)
    assert out.dtype == np.bool_
    np.testing.assert_array_equal(out, vol > 0.5)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("blend", ["gaussian", "crop"])
@pytest.mark.parametrize("dtype", ["uint8", "bool"])
def test_nan_into_an_integer_type_names_the_chunk(path, blend, dtype, tmp_path):
    vol = np.ones((16, 16, 16), np.float32)
    vol[10, 3, 5] = np.nan
    # stride = size: the NaN stays in its voxel, which is in chunk (1, 0, 0) of 8^3 chunks
    arr = dp.apply_patches(vol, identity, 8, 8, blend=blend, dtype=dtype, block_shape=8)
    with pytest.raises(ValueError, match=rf"NaN .* {dtype} .* output chunk \(1, 0, 0\) "
                                         r"\(voxels \[8:16, 0:8, 0:8\]\).* voxel \(10, 3, 5\)"):
        run(arr, path, tmp_path)


@pytest.mark.parametrize("path", PATHS)
def test_nan_into_an_integer_type_with_a_channel_axis(path, tmp_path):
    vol = np.ones((2, 12, 12), np.float32)
    vol[1, 7, 2] = np.nan
    arr = dp.apply_patches(vol, identity, 4, 4, channel_axis=0, dtype="int16", block_shape=4)
    with pytest.raises(ValueError, match=r"output chunk \(0, 1, 0\) \(voxels \[0:2, 4:8, 0:4\]\)"
                                         r".* voxel \(1, 7, 2\)"):
        run(arr, path, tmp_path)


@pytest.mark.parametrize(("call", "match"), [
    (lambda: dp.apply_patches(np.zeros((20, 20)), identity, 8, 8, border="drop", dtype=bool,
                              fill_value=0.5),
     r"fill_value=0.5 does not fit the result dtype bool \(False, True, 0 or 1\)"),
    (lambda: dp.apply_patches(np.zeros((20, 20)), identity, 8, 8, border="drop", dtype="uint8",
                              fill_value=300),
     r"fill_value=300 does not fit the result dtype uint8 \(whole numbers from 0 to 255\)"),
    (lambda: dp.apply_patches(np.zeros((20, 20)), identity, 8, 8, border="drop", dtype="int8",
                              fill_value=float("nan")),
     r"fill_value=nan does not fit the result dtype int8 \(whole numbers from -128 to 127\)"),
    (lambda: dp.apply_patches(np.zeros((20, 20)), identity, 8, 8, border="drop", dtype="int8",
                              fill_value=2.5),
     r"fill_value=2.5 does not fit the result dtype int8"),
    (lambda: dp.apply_patches(np.zeros((20, 20), np.float32), identity, 8, 8, border="drop",
                              fill_value=1e300),
     r"fill_value=1e\+300 does not fit the result dtype float32 \(finite values from "
     r"-3.40282\d*e\+38 to 3.40282\d*e\+38, inf or nan\)"),
    (lambda: dp.reconstruct(np.zeros((4, 8, 8), np.uint8), (20, 20), 8, 8, border="drop",
                            blend="crop", fill_value=-1),
     r"fill_value=-1 does not fit the result dtype uint8 \(whole numbers from 0 to 255\)"),
])
def test_fill_value_must_fit_the_result_dtype(call, match, no_compute):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("path", PATHS)
def test_fill_value_is_exact_in_integer_results(path, tmp_path):
    vol = (np.arange(20 * 20).reshape(20, 20) + 2**60).astype(np.int64)
    p = dp.extract_patches(vol, 8, 8, border="drop")
    out = run(dp.reconstruct(p, vol.shape, 8, 8, border="drop", blend="crop",
                             fill_value=2**62 + 1), path, tmp_path)
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out[:16, :16], vol[:16, :16])
    assert (out[16:] == 2**62 + 1).all() and (out[:, 16:] == 2**62 + 1).all()
    u8 = run(dp.apply_patches(np.zeros((20, 20)), identity, 8, 8, border="drop", dtype="uint8",
                              fill_value=255), path, tmp_path)
    assert (u8[16:] == 255).all() and (u8[:16, :16] == 0).all()


# -- small sigma_scale: exact, strictly positive normalisation -------------------------------
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


@pytest.mark.parametrize("path", PATHS)
def test_tiny_per_axis_sigma(path, tmp_path):
    vol = np.random.default_rng(3).random((20, 22, 18)).astype(np.float32)
    arr = dp.apply_patches(vol, identity, 8, 3, sigma_scale=(1e-3, 0.125, 2e-3), block_shape=6)
    out = run(arr, path, tmp_path)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, vol, rtol=1e-6, atol=1e-7)


def test_tiny_sigma_weights_are_a_partition_of_one():
    from daskpatch.geometry.windows import Window

    starts = np.array([0, 3, 6, 9, 12, 13])  # a shifted last patch
    for sigma in (0.125, 0.01, 1e-3, 1e-6, 1e-160, 5e-324):  # any positive value
        q = Window("gaussian", sigma).axis_weights(starts, 8, 21)
        total = np.zeros(21)
        np.add.at(total, starts[:, None] + np.arange(8), q)
        assert np.isfinite(q).all() and (q >= 0).all()
        np.testing.assert_allclose(total, 1.0, rtol=1e-15)


@pytest.mark.parametrize("path", PATHS)
def test_a_vanishing_sigma_gives_the_nearest_patch_not_nan(path, tmp_path):
    vol = np.random.default_rng(3).random((40, 40), np.float32)
    out = dp.apply_patches(vol, lambda b: b, 16, 8, sigma_scale=3e-155)
    np.testing.assert_array_equal(run(out, path, tmp_path), vol)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("value, dtype, expected", [
    (2.5, np.uint8, 2), (3.5, np.int16, 4), (-2.5, np.int32, -2), (254.5, np.uint8, 254),
    (0.5, bool, False), (1.5, bool, True)])
@pytest.mark.parametrize("blend", ["gaussian", "hann", "triangular", "constant"])
def test_a_constant_prediction_gives_a_constant_result_in_every_dtype(path, tmp_path, value,
                                                                       dtype, expected, blend):
    """An exact half rounds to even, wherever the window weights' float rounding put it."""
    vol = np.zeros((40, 36, 30), np.float32)
    out = dp.apply_patches(vol, lambda b: np.full_like(b, value), 16, 6, dtype=dtype,
                           blend=blend)
    got = run(out, path, tmp_path)
    assert got.dtype == np.dtype(dtype) and np.unique(got).tolist() == [expected]


@pytest.mark.parametrize("dtype", ["U6", "datetime64[s]", "O", "S3", "m8[ns]"])
def test_non_numeric_result_dtypes_are_refused(dtype):
    with pytest.raises(TypeError, match=r"dtype must be a numeric dtype \(bool, integer, "
                                        r"floating or complex\).* got "):
        dp.apply_patches(np.zeros((8, 8), np.float32), lambda b: b, 4, dtype=dtype)


# -- crop copies ------------------------------------------------------------------------------
@pytest.mark.parametrize("path", PATHS)
def test_crop_nan_patch_stays_in_the_voxels_it_owns(path, tmp_path):
    vol = np.zeros((96, 96, 96), np.float32)
    vol[40, 40, 40] = np.nan  # in 2 patches per axis; the 8 NaN patches own 32^3 voxels
    out = run(dp.apply_patches(vol, spread_nan, 32, 16, blend="crop", batch_size=4), path,
              tmp_path)
    bad = np.isnan(out)
    assert bad.sum() == 32**3
    assert bad[24:56, 24:56, 24:56].all()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", ["int64", "uint64"])
def test_crop_keeps_wide_integers_exactly(path, dtype, tmp_path):
    info = np.iinfo(dtype)
    rng = np.random.default_rng(3)
    vol = info.max - rng.integers(0, 2**40, (20, 23, 17)).astype(dtype)
    p = dp.extract_patches(vol, 8, 5)
    back = dp.reconstruct(p, vol.shape, 8, 5, blend="crop")
    assert back.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(run(back, path, tmp_path), vol)
    applied = dp.apply_patches(vol, identity, 8, 5, blend="crop", dtype=dtype)
    assert applied.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(run(applied, path, tmp_path), vol)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("border", ["shift", "pad"])
def test_crop_copies_floats_bit_for_bit(path, border, tmp_path):
    rng = np.random.default_rng(4)
    vol = rng.standard_normal((3, 19, 21)).astype(np.float32)
    vol[rng.random(vol.shape) < 0.2] = -0.0
    vol[0, 5, 5], vol[1, 7, 3], vol[2, 0, 0] = np.inf, -np.inf, F32_MAX
    out = run(dp.apply_patches(vol, identity, 6, 4, border=border, blend="crop",
                               channel_axis=0), path, tmp_path)
    np.testing.assert_array_equal(out.view(np.uint32), vol.view(np.uint32))


def test_crop_and_the_cast_with_spilled_halos(tmp_path):
    vol = (2**62 + np.arange(20 * 21 * 19)).reshape(20, 21, 19).astype(np.int64)
    back = dp.reconstruct(dp.extract_patches(vol, 8, 5), vol.shape, 8, 5, blend="crop",
                          block_shape=5, spill=tmp_path / "spill")
    np.testing.assert_array_equal(back.compute(), vol)
    top = np.full((20, 21, 19), F32_MAX, np.float32)
    out = dp.apply_patches(top, identity, 8, 5, block_shape=5, spill=tmp_path / "spill2")
    res = out.compute()
    assert np.isfinite(res).all() and (res >= F32_MAX * (1 - 1e-6)).all()
    u8 = dp.apply_patches(top, identity, 8, 5, block_shape=5, dtype="uint8",
                          spill=tmp_path / "spill3")
    assert (u8.compute() == 255).all()


@pytest.mark.parametrize("path", PATHS)
def test_crop_rounds_a_float_model_into_an_integer_dtype(path, tmp_path):
    vol = _valued_volume((12, 12))
    out = run(dp.apply_patches(vol, identity, 4, 3, blend="crop", dtype="int8"), path, tmp_path)
    np.testing.assert_array_equal(out, _oracle_cast(vol, "int8"))


# -- complex data -----------------------------------------------------------------------------
def _complex(shape, dtype):
    rng = np.random.default_rng(5)
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", ["complex64", "complex128"])
@pytest.mark.parametrize("blend", ["gaussian", "crop", "hann"])
def test_complex_volumes_keep_their_imaginary_part(path, dtype, blend, tmp_path):
    vol = _complex((18, 20, 13), dtype)
    out = run(dp.apply_patches(vol, lambda b: b * (1 + 1j), 8, 4, blend=blend), path, tmp_path)
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_allclose(out, vol * (1 + 1j), rtol=1e-5 if dtype == "complex64" else 1e-12)
    back = dp.reconstruct(dp.extract_patches(vol, 8, 4), vol.shape, 8, 4, blend=blend)
    assert back.dtype == np.dtype(dtype)
    if blend == "crop":
        np.testing.assert_array_equal(run(back, path, tmp_path), vol)
    else:
        np.testing.assert_allclose(run(back, path, tmp_path), vol,
                                   rtol=1e-5 if dtype == "complex64" else 1e-12)


@pytest.mark.parametrize("path", PATHS)
def test_complex_with_a_user_window(path, tmp_path):
    vol = _complex((16, 16), "complex64")
    w = dp.window("hann", (8, 8)) + 0.5
    out = run(dp.apply_patches(vol, identity, 8, 4, blend=w), path, tmp_path)
    np.testing.assert_allclose(out, vol, rtol=1e-5)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("blend", ["gaussian", "crop"])
def test_complex_model_output_into_a_real_dtype_is_refused(path, blend, tmp_path):
    vol = np.ones((12, 12), np.float32)
    arr = dp.apply_patches(vol, lambda b: b * 1j, 4, 2, blend=blend, dtype="float32")
    with pytest.raises(TypeError, match=r"fn returned complex64 values but the result dtype is "
                                        r"float32.*dtype=complex64"):
        run(arr, path, tmp_path)


# -- accumulation never leaves the range of its inputs ---------------------------------------
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("blend", ["gaussian", "hann", "triangular", "constant"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_data_at_the_dtype_maximum_stays_finite(path, blend, dtype, tmp_path):
    top = float(np.finfo(dtype).max)
    rng = np.random.default_rng(6)
    vol = (top * (1 - rng.random((20, 22, 18)) * 1e-6)).astype(dtype)
    vol[:, :, 9:] = top
    vol[::3] *= -1
    out = run(dp.apply_patches(vol, identity, 8, 3, blend=blend, block_shape=6), path,
              tmp_path)
    assert np.isfinite(out).all()
    assert (np.abs(out) <= top).all()
    np.testing.assert_allclose(out, vol, rtol=1e-5)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("blend", ["hann", "user"])
def test_one_axis_at_the_dtype_maximum_stays_finite(path, blend, tmp_path):
    vol = (F32_MAX * (1 - np.random.default_rng(8).random(60) * 1e-6)).astype(np.float32)
    vol[::2] = F32_MAX
    w = dp.window("hann", (7,)) + 0.5 if blend == "user" else blend
    out = run(dp.apply_patches(vol, identity, 7, 2, blend=w, block_shape=4), path, tmp_path)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, vol, rtol=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_model_output_beyond_the_dtype_saturates(path, tmp_path):
    vol = np.ones((12, 12), np.float32)
    out = run(dp.apply_patches(vol, lambda b: b.astype(np.float64) * 1e39, 4, 2), path,
              tmp_path)
    assert out.dtype == np.float32 and (out == F32_MAX).all()
    half = run(dp.apply_patches(vol, lambda b: b * 1e5, 4, 2, dtype="float16"), path, tmp_path)
    assert (half == np.finfo(np.float16).max).all()


@pytest.mark.parametrize("path", PATHS)
def test_infinite_inputs_stay_infinite(path, tmp_path):
    vol = np.full((12, 12), F32_MAX, np.float32)
    vol[5, 5] = np.inf

    def patch_max(b):  # every patch holding the inf voxel is all inf; the others all F32_MAX
        return np.maximum(b, b.max(axis=(1, 2), keepdims=True))

    out = run(dp.apply_patches(vol, patch_max, 4, 2), path, tmp_path)
    expected = np.zeros(vol.shape, bool)
    expected[2:8, 2:8] = True  # the patches starting at 2 and 4 on each axis
    np.testing.assert_array_equal(np.isposinf(out), expected)
    assert np.isfinite(out[~expected]).all() and (out[~expected] >= F32_MAX * (1 - 1e-6)).all()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("scale", [1e38, 1e-45, 1e-30, 1e300])
def test_user_windows_at_any_scale(path, scale, tmp_path):
    vol = np.random.default_rng(7).random((20, 18, 12)).astype(np.float32) * F32_MAX
    w = (dp.window("hann", (8, 8, 8)) + 0.25) * scale
    out = run(dp.apply_patches(vol, identity, 8, 4, blend=w), path, tmp_path)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, vol, rtol=1e-5)


def test_user_window_whose_range_underflows_is_refused(no_compute):
    w = np.ones((8, 8))
    w[0, 0] = 1e-300
    with pytest.raises(ValueError, match=r"blend has a smallest weight 1e-300 times its largest; "
                                         r"float32 accumulation needs at least 4.7\d*e-38"):
        dp.apply_patches(np.zeros((16, 16), np.float32), identity, 8, 4, blend=w)
    w[0, 0] = 1e-310
    with pytest.raises(ValueError, match=r"window returned by blend=.* has a smallest weight "
                                         r"1e-310 times its largest; float64 accumulation needs "
                                         r"at least 8.9\d*e-308"):
        dp.reconstruct(np.zeros((9, 8, 8)), (16, 16), 8, 4, blend=lambda size: w)
