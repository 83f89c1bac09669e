"""extract_patches / reconstruct / apply_patches against the naive NumPy loops of conftest."""

from __future__ import annotations

import itertools

import dask.array as da
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import daskpatch as dp
from daskpatch.graph import layers as _graph
from daskpatch import PatchGrid
from daskpatch.geometry.windows import window

from .conftest import naive_blend, naive_patches

BLENDS = ["constant", "gaussian", "hann", "triangular", "crop"]
CASES = [  # shape, size, stride
    ((37, 29, 18), (8, 8, 6), (4, 5, 3)),  # anisotropic, non-divisible
    ((24, 24, 24), 8, 4),
    ((20, 21), (7, 5), (7, 5)),  # no overlap, non-divisible
    ((50,), 12, 5),
    ((9, 9, 9), 4, 2),
    ((6, 5, 4, 7), (3, 2, 4, 3), (2, 2, 1, 3)),  # 4-D
]


def _rand(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).random(shape).astype(dtype)


@pytest.mark.parametrize(("shape", "size", "stride"), CASES)
@pytest.mark.parametrize("border", ["shift", "pad", "drop"])
@pytest.mark.parametrize("pad_mode", ["reflect", "constant"])
def test_extract_matches_naive(shape, size, stride, border, pad_mode):
    vol = _rand(shape)
    grid = PatchGrid(shape, size, stride, border=border)
    got = dp.extract_patches(vol, size, stride, border=border, pad_mode=pad_mode)
    assert got.shape == (len(grid), *grid.size)
    np.testing.assert_array_equal(got.compute(), naive_patches(vol, grid, pad_mode))


@pytest.mark.parametrize("pad_mode", ["reflect", "symmetric", "edge", "wrap", "constant"])
def test_pad_modes_match_numpy_even_past_the_whole_axis(pad_mode):
    vol = _rand((5, 3))
    grid = PatchGrid((5, 3), 8, 4, border="pad")  # pads far wider than the volume
    got = dp.extract_patches(vol, 8, 4, border="pad", pad_mode=pad_mode).compute()
    np.testing.assert_array_equal(got, naive_patches(vol, grid, pad_mode))


@pytest.mark.parametrize(("shape", "size", "stride"), CASES)
@pytest.mark.parametrize("border", ["shift", "pad"])
@pytest.mark.parametrize("blend", BLENDS + ["user"])
def test_round_trip_every_blend(shape, size, stride, border, blend):
    vol = _rand(shape, 1)
    if blend == "user":
        grid = PatchGrid(shape, size, stride)
        blend = 1.0 + np.random.default_rng(2).random(grid.size)
    patches = dp.extract_patches(vol, size, stride, border=border)
    out = dp.reconstruct(patches, shape, size, stride, border=border, blend=blend)
    assert out.dtype == vol.dtype
    np.testing.assert_allclose(out.compute(), vol, rtol=0, atol=2e-6)


@pytest.mark.parametrize(("shape", "size", "stride"), CASES[:4])
@pytest.mark.parametrize("blend", BLENDS + ["user"])
@pytest.mark.parametrize("border", ["shift", "pad"])
def test_blend_of_distinct_patches_matches_naive(shape, size, stride, blend, border):
    """Patches that disagree: the weighting itself is checked, not just the round trip."""
    grid = PatchGrid(shape, size, stride, border=border)
    rng = np.random.default_rng(3)
    patches = rng.random((len(grid), *grid.size)).astype(np.float64)
    if blend == "user":
        blend = 0.5 + rng.random(grid.size)
    expected = naive_blend(patches[:, None], grid, blend)[0]
    for block in (None, tuple(2 * s for s in grid.stride)):
        arr = dp.reconstruct(patches, shape, size, stride, border=border, blend=blend,
                             block_shape=block)
        np.testing.assert_allclose(arr.compute(), expected, rtol=1e-10, atol=1e-12)
        # straight into one array (blocks add in place, in any order)
        np.testing.assert_allclose(dp.to_numpy(arr), expected, rtol=1e-10, atol=1e-12)


def test_gaussian_sigma_scale_changes_weights():
    grid = PatchGrid((30,), 10, 5)
    patches = np.arange(len(grid), dtype=np.float64)[:, None] * np.ones((1, 10))
    a = dp.reconstruct(patches, (30,), 10, 5, sigma_scale=0.125).compute()
    b = dp.reconstruct(patches, (30,), 10, 5, sigma_scale=0.5).compute()
    np.testing.assert_allclose(a, naive_blend(patches[:, None], grid, "gaussian", sigma_scale=0.125)[0])
    np.testing.assert_allclose(b, naive_blend(patches[:, None], grid, "gaussian", sigma_scale=0.5)[0])
    assert not np.allclose(a, b)


def test_no_border_artefact_where_one_patch_covers():
    """tiler's hann window divides 0 by 0 at the volume's border; ours is exact there."""
    vol = 1.0 + _rand((64, 64), 4)
    for blend in ("hann", "triangular", "gaussian"):
        out = dp.reconstruct(dp.extract_patches(vol, 16, 8), vol.shape, 16, 8, blend=blend)
        err = np.abs(out.compute() - vol)
        assert err.max() < 1e-6, (blend, err.max())


def test_tiny_gaussian_sigma_does_not_underflow():
    """exp(-50) per axis cubed underflows float32; pre-normalised weights do not."""
    vol = _rand((24, 24, 24), 5)
    out = dp.reconstruct(dp.extract_patches(vol, 8, 4), vol.shape, 8, 4, sigma_scale=0.05)
    np.testing.assert_allclose(out.compute(), vol, atol=2e-6)


def test_user_window_callable():
    vol = _rand((20, 20), 6)
    out = dp.reconstruct(dp.extract_patches(vol, 8, 4), vol.shape, 8, 4,
                         blend=lambda size: window("hann", size) + 0.1)
    np.testing.assert_allclose(out.compute(), vol, atol=2e-6)


def test_crop_keeps_integer_dtype_and_values():
    labels = np.random.default_rng(7).integers(0, 5, (30, 31)).astype(np.int32)
    out = dp.reconstruct(dp.extract_patches(labels, 8, 5), labels.shape, 8, 5, blend="crop")
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out.compute(), labels)


def test_integer_patches_blend_to_float32():
    vol = np.random.default_rng(8).integers(0, 255, (16, 16)).astype(np.uint8)
    out = dp.reconstruct(dp.extract_patches(vol, 8, 4), vol.shape, 8, 4)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.compute(), vol, atol=1e-4)


def test_float64_stays_float64_and_exact():
    vol = _rand((20, 20), 9, np.float64)
    out = dp.reconstruct(dp.extract_patches(vol, 8, 4), vol.shape, 8, 4)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out.compute(), vol, rtol=0, atol=1e-13)


@pytest.mark.parametrize("channel_axis", [0, -1])
def test_channels(channel_axis):
    vol = _rand((3, 20, 17, 9), 10)
    if channel_axis == -1:
        vol = np.moveaxis(vol, 0, -1).copy()
    p = dp.extract_patches(vol, (8, 8, 4), (4, 4, 2), channel_axis=channel_axis)
    grid = PatchGrid((20, 17, 9), (8, 8, 4), (4, 4, 2))
    assert p.shape == ((len(grid), 3, 8, 8, 4) if channel_axis == 0 else (len(grid), 8, 8, 4, 3))
    back = dp.reconstruct(p, vol.shape, (8, 8, 4), (4, 4, 2), channel_axis=channel_axis)
    assert back.chunks[channel_axis] == (3,)
    np.testing.assert_allclose(back.compute(), vol, atol=2e-6)


def test_batch_of_volumes_is_one_grid_per_volume():
    vols = _rand((4, 16, 12), 11)
    p = dp.extract_patches(vols, (8, 8), (4, 4))
    grid = PatchGrid((16, 12), 8, 4)
    assert p.shape == (4 * len(grid), 8, 8)
    expected = np.concatenate([naive_patches(v, grid) for v in vols])
    np.testing.assert_array_equal(p.compute(), expected)
    back = dp.reconstruct(p, vols.shape, (8, 8), (4, 4))
    np.testing.assert_allclose(back.compute(), vols, atol=2e-6)


def test_batch_and_channel_first():
    vols = _rand((2, 3, 16, 12), 12)  # (B, C, X, Y)
    p = dp.extract_patches(vols, (8, 8), (4, 4), channel_axis=1)
    assert p.shape == (2 * 6, 3, 8, 8)
    back = dp.reconstruct(p, vols.shape, (8, 8), (4, 4), channel_axis=1, blend="crop")
    np.testing.assert_array_equal(back.compute(), vols)


@pytest.mark.parametrize("border", ["drop", "shift"])
def test_uncovered_voxels_need_an_explicit_fill(border):
    vol = _rand((10, 10), 13)
    stride = 4 if border == "drop" else 5
    size = 4 if border == "drop" else 3
    grid = PatchGrid((10, 10), size, stride, border=border)
    assert grid.uncovered > 0
    p = dp.extract_patches(vol, size, stride, border=border)
    with pytest.raises(ValueError, match=f"leaves {grid.uncovered} of 100 voxels uncovered"):
        dp.reconstruct(p, vol.shape, size, stride, border=border)
    out = dp.reconstruct(p, vol.shape, size, stride, border=border, fill_value=-1).compute()
    expected = naive_blend(p.compute()[:, None].astype(np.float64), grid, "gaussian", fill=-1)[0]
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert int((out == -1).sum()) == grid.uncovered


def test_patch_chunks_follow_the_grid_and_dask_input_reads_only_overlapping_chunks():
    vol = _rand((64, 64, 64), 14)
    x = da.from_array(vol, chunks=16) + 0  # a non-trivial Dask graph
    p = dp.extract_patches(x, 16, 16)
    key = (p.name, 0, 0, 0, 0)
    deps = _graph.layers(p)[p.name].get_dependencies(key, set())
    assert all(d[0] == x.name for d in deps)
    # group 0 = the first patches along the last axis; its region touches only their chunks
    n0 = p.chunks[0][0]
    assert len(deps) == n0
    np.testing.assert_array_equal(p.compute(), naive_patches(vol, PatchGrid(vol.shape, 16)))


# -- properties ------------------------------------------------------------------------------
@st.composite
def grids(draw):
    ndim = draw(st.integers(1, 3))
    shape, size, stride = [], [], []
    for _ in range(ndim):
        z = draw(st.integers(1, 7))
        size.append(z)
        stride.append(draw(st.integers(1, z)))
        shape.append(draw(st.integers(z, 16)))
    border = draw(st.sampled_from(["shift", "pad"]))
    blend = draw(st.sampled_from(BLENDS))
    block = tuple(s * draw(st.integers(1, 3)) for s in stride)
    return tuple(shape), tuple(size), tuple(stride), border, blend, block


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(grids())
def test_property_round_trip(params):
    shape, size, stride, border, blend, block = params
    vol = np.random.default_rng(0).random(shape)
    p = dp.extract_patches(vol, size, stride, border=border)
    out = dp.reconstruct(p, shape, size, stride, border=border, blend=blend, block_shape=block)
    np.testing.assert_allclose(out.compute(), vol, rtol=0, atol=1e-12)
    ap = dp.apply_patches(vol, lambda b: b, size, stride, border=border, blend=blend,
                          block_shape=block, batch_size=3)
    np.testing.assert_allclose(ap.compute(), vol, rtol=0, atol=1e-12)
    np.testing.assert_allclose(dp.to_numpy(ap), vol, rtol=0, atol=1e-12)
    np.testing.assert_allclose(dp.to_numpy(out), vol, rtol=0, atol=1e-12)


def _monai_sliding_window(vol, f, roi, overlap, mode="gaussian", sigma_scale=0.125):
    """MONAI 1.6's ``sliding_window_inference`` in NumPy, for a volume at least ``roi`` in size
    (no padding): windows from ``monai.inferers.utils._get_scan_interval`` and
    ``monai.data.utils.dense_patch_slices``, the importance map of
    ``monai.data.utils.compute_importance_map`` (an unnormalised float32 gaussian centred at
    ``(n - 1) / 2``, sigma ``sigma_scale * n``, clamped below at ``max(its min, 1e-3)``), and the
    float32 weighted sum divided by the summed map."""
    starts = []
    for n, r in zip(vol.shape, roi):
        step = r if r == n else max(int(r * (1 - overlap)), 1)
        num = next(d for d in range(-(-n // step)) if d * step + r >= n) + 1
        starts.append([i * step - max(i * step + r - n, 0) for i in range(num)])
    imp = np.ones((), np.float32)
    if mode == "gaussian":
        for r in roi:
            x = np.arange(-(r - 1) / 2, (r - 1) / 2 + 1, dtype=np.float32)
            imp = np.multiply.outer(imp, np.exp(x ** 2 / np.float32(-2 * (r * sigma_scale) ** 2)))
        imp = np.maximum(imp, max(float(imp.min()), 1e-3)).astype(np.float32)
    else:
        imp = np.ones(roi, np.float32)
    out = np.zeros(vol.shape, np.float32)
    count = np.zeros(vol.shape, np.float32)
    for corner in itertools.product(*starts):
        sl = tuple(slice(c, c + r) for c, r in zip(corner, roi))
        out[sl] += f(vol[sl][None])[0] * imp
        count[sl] += imp
    return out / count


def _patch_dependent(b):  # overlapping patches predict different values for a voxel
    return np.sin(5 * b) + 10 * b.mean(axis=tuple(range(1, b.ndim)), keepdims=True)


@pytest.mark.parametrize("shape, roi, overlap", [
    ((40, 36), (16, 16), 0.5), ((40, 37), (16, 15), 0.25),       # even and odd sizes
    ((24, 21, 19), (12, 8, 8), 0.5), ((30, 29, 26), (16, 16, 16), 0.25)])
@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_reproduces_monais_sliding_window(shape, roi, overlap, mode):
    # on MONAI's own networks the same recipe agrees to 5e-7 of the output's range
    # (benchmarks/monai_agreement.py)
    vol = np.random.default_rng(9).random(shape, dtype=np.float32)
    stride = tuple(r if r == n else max(int(r * (1 - overlap)), 1) for n, r in zip(shape, roi))
    kw = dict(blend="gaussian", sigma_scale=0.125, min_weight=1e-3) if mode == "gaussian" \
        else dict(blend="constant")
    got = dp.apply_patches(vol, _patch_dependent, roi, stride, border="shift", **kw).compute()
    expected = _monai_sliding_window(vol, _patch_dependent, roi, overlap, mode)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6 * scale)
    if mode == "gaussian":
        plain = dp.apply_patches(vol, _patch_dependent, roi, stride).compute()
        assert np.abs(plain - expected).max() > 1e-3 * scale  # the clamp matters


def test_min_weight_on_reconstruct_and_window():
    vol = np.random.default_rng(2).random((32, 32), dtype=np.float32)
    p = dp.extract_patches(vol, 16, 8)
    back = dp.reconstruct(p, vol.shape, 16, 8, min_weight=1e-3).compute()
    np.testing.assert_allclose(back, vol, rtol=1e-6)  # still a partition of one
    w = dp.window("gaussian", (16, 16), sigma_scale=0.05, min_weight=1e-3)
    peak = np.exp(-0.5 * (0.5 / 0.8) ** 2) ** 2  # the continuous gaussian's 1, sampled off centre
    assert w.max() == 1.0 and w.min() == pytest.approx(1e-3 / peak, rel=1e-12)
    w = dp.window("gaussian", (15, 15), sigma_scale=0.05, min_weight=1e-3)
    assert w.max() == 1.0 and w.min() == 1e-3  # an odd size samples the peak
    w = dp.window("hann", (16, 16), min_weight=0.5)
    assert w.max() == 1.0 and w.min() == 0.5
    with pytest.raises(ValueError, match=r"min_weight must be a number in \(0, 1\]"):
        dp.apply_patches(vol, lambda b: b, 16, 8, min_weight=2)
    with pytest.raises(ValueError, match="min_weight does not apply to blend='crop'"):
        dp.apply_patches(vol, lambda b: b, 16, 8, blend="crop", min_weight=1e-3)
