"""apply_patches(out_scale=...): models whose output patch is a scaled version of the input's.

Every result is compared with a NumPy oracle that knows nothing of the engine: the input patches
cut by a plain loop, the model run on each, and the outputs blended with full N-D windows of the
scaled size on the scaled grid (``tests.conftest.naive_blend``).
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import zarr

import daskpatch as dp
from daskpatch.errors import ModelOutputError, ParameterError, ResumeMismatchError
from daskpatch.storage.markers import stored_fingerprint

from .conftest import naive_blend, naive_patches, write_zarr


def _scale_axes(b: np.ndarray, scale: tuple[Fraction, ...]) -> np.ndarray:
    """A patch batch ``(B, *size)`` at ``scale``: nearest-neighbour repeats for factors > 1,
    block means for factors < 1, times a patch-dependent factor (so overlapping predictions
    differ and the blend weights matter)."""
    out = b.astype(np.float64)
    for a, f in enumerate(scale, start=1):
        if f < 1 and f.numerator == 1:  # block means
            k = f.denominator
            shape = out.shape[:a] + (out.shape[a] // k, k) + out.shape[a + 1:]
            out = out.reshape(shape).mean(axis=a + 1)
        elif f != 1:  # nearest neighbour (3/2: voxels 0, 0, 1, 2, 2, 3, ...)
            n = int(out.shape[a] * f)
            out = np.take(out, (np.arange(n) / f).astype(int), axis=a)
    spatial = tuple(range(1, b.ndim))
    return (out * (1 + b.mean(axis=spatial, keepdims=True))).astype(np.float32)


class Scaled:
    """The model: ``_scale_axes`` at a fixed scale (picklable for a cluster)."""

    def __init__(self, scale):
        self.scale = tuple(Fraction(s).limit_denominator(8) for s in scale)

    def __call__(self, b):
        return _scale_axes(np.asarray(b), self.scale)


def _oracle(vol, fn, size, stride, scale, border="shift", blend="gaussian", pad_mode="reflect"):
    scale = tuple(Fraction(s).limit_denominator(8) for s in scale)
    grid = dp.PatchGrid(vol.shape, size, stride, border=border)
    ins = naive_patches(vol, grid, pad_mode)
    outs = np.concatenate([fn(ins[i:i + 1]) for i in range(len(ins))])
    out_grid = dp.PatchGrid(tuple(int(n * f) for n, f in zip(grid.shape, scale)),
                            tuple(int(n * f) for n, f in zip(grid.size, scale)),
                            tuple(int(n * f) for n, f in zip(grid.stride, scale)), border=border)
    for a, f in enumerate(scale):  # every output patch starts at its input start times f
        assert [int(s * f) for s in grid.starts[a]] == list(out_grid.starts[a])
    return naive_blend(outs[:, None], out_grid, blend)[0]


CASES = [
    # shape, size, stride, out_scale
    ((20, 24), (8, 8), (4, 4), 2),
    ((20, 22), (8, 8), (4, 6), 2),  # shift: the last patch flush with the end, on both axes
    ((12, 16, 20), (4, 8, 8), (2, 4, 4), (1, 0.5, 0.5)),
    ((18, 22), 6, 4, 1.5),  # 3/2: size 9, stride 6, shape 27 x 33
    ((24, 16), (8, 8), (8, 4), (0.25, 2)),
]


@pytest.mark.parametrize("shape, size, stride, scale", CASES)
@pytest.mark.parametrize("blend", ["gaussian", "constant", "hann"])
def test_scaled_outputs_match_the_naive_oracle(shape, size, stride, scale, blend):
    vol = np.random.default_rng(0).random(shape, dtype=np.float32)
    ndim = len(shape)
    scales = scale if isinstance(scale, tuple) else (scale,) * ndim
    fn = Scaled(scales)
    out = dp.apply_patches(vol, fn, size, stride, out_scale=scale, blend=blend, batch_size=3)
    expected = _oracle(vol, fn, size, stride, scales, blend=blend)
    assert out.shape == expected.shape == tuple(int(n * Fraction(f).limit_denominator(8))
                                                for n, f in zip(shape, scales))
    np.testing.assert_allclose(out.compute(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dp.to_numpy(out), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("border", ["pad", "drop"])
def test_pad_and_drop_borders_at_another_scale(border):
    vol = np.random.default_rng(1).random((22, 18), dtype=np.float32)
    fn = Scaled((2, 2))
    fill = 0.0 if border == "drop" else None
    out = dp.apply_patches(vol, fn, 8, 6, out_scale=2, border=border, fill_value=fill,
                           blend="hann")
    expected = _oracle(vol, fn, 8, 6, (2, 2), border=border, blend="hann")
    if border == "drop":
        expected = np.nan_to_num(expected, nan=0.0)
    np.testing.assert_allclose(out.compute(), expected, rtol=1e-5, atol=1e-6)


def test_crop_blend_copies_the_owning_patch_at_the_scaled_size():
    """blend="crop" at 2x: each output voxel from the patch whose (scaled) centre is nearest;
    a model that is nearest-neighbour upsampling gives the volume repeated, exactly."""
    vol = np.random.default_rng(2).random((16, 20), dtype=np.float32)
    up = dp.apply_patches(vol, lambda b: b.repeat(2, 1).repeat(2, 2), 8, 4, out_scale=2,
                          blend="crop")
    np.testing.assert_array_equal(up.compute(), vol.repeat(2, 0).repeat(2, 1))


def test_channels_and_batch_axes_at_another_scale():
    """Channel-first (C in, K out) and a leading batch axis: only spatial axes scale."""
    vol = np.random.default_rng(3).random((2, 3, 12, 16), dtype=np.float32)  # batch, C, y, x

    def fn(b):  # (B, 3, 8, 8) -> (B, 2, 4, 4): two channels at half resolution
        pooled = b.reshape(b.shape[:2] + (4, 2, 4, 2)).mean(axis=(3, 5))
        return np.stack([pooled[:, 0] + pooled[:, 1], pooled[:, 2]], axis=1)

    out = dp.apply_patches(vol, fn, (8, 8), (4, 4), channel_axis=1, out_channels=2,
                           out_scale=0.5, blend="constant")
    assert out.shape == (2, 2, 6, 8)
    pooled = vol.reshape(2, 3, 6, 2, 8, 2).mean(axis=(3, 5))
    expected = np.stack([pooled[:, 0] + pooled[:, 1], pooled[:, 2]], axis=1)
    np.testing.assert_allclose(out.compute(), expected, rtol=1e-5)


def test_out_scale_infer_reads_the_scale_off_one_patch(tmp_path):
    data = np.random.default_rng(4).random((12, 16, 20), dtype=np.float32)
    vol = zarr.open_array(write_zarr(tmp_path / "in.zarr", data, (6, 8, 10)), mode="r")
    fn = Scaled((1, 0.5, 0.5))
    declared = dp.apply_patches(vol, fn, (4, 8, 8), (2, 4, 4), out_scale=(1, 0.5, 0.5))
    inferred = dp.apply_patches(vol, fn, (4, 8, 8), (2, 4, 4), out_scale="infer")
    assert inferred.name == declared.name  # the same graph
    np.testing.assert_array_equal(inferred.compute(), declared.compute())
    def double(b):
        return 2 * b

    same = dp.apply_patches(vol, double, 4, 2, out_scale="infer")
    assert same.name == dp.apply_patches(vol, double, 4, 2).name  # scale 1: no scale at all


def test_torch_upsampling_network_at_2x():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 1, 3, padding=1),
                              torch.nn.Upsample(scale_factor=2, mode="nearest"))
    vol = np.random.default_rng(5).random((1, 16, 16, 12), dtype=np.float32)
    out = dp.apply_patches(vol, net, 8, 4, channel_axis=0, out_scale="infer", batch_size=4)
    assert out.shape == (1, 32, 32, 24)
    model = dp.TorchModel(net)
    expected = _oracle(vol[0], lambda b: model(b[:, None])[:, 0], 8, 4, (2, 2, 2))
    np.testing.assert_allclose(out.compute()[0], expected, rtol=1e-4, atol=1e-5)


# -- ported from TorchIO: GridAggregator with a downsampling model --------------------------------
@pytest.mark.parametrize("blend", ["crop", "constant"])
def test_torchio_downsampling_model_aggregator(blend):
    """Port of TorchIO's test of ``GridAggregator(..., downsampling_factor=...)`` (TorchIO pull
    request #1394, "Add support for downsampled outputs in aggregator", for encoders such as a
    ViT's whose output is smaller than their input; tests/data/inference/test_aggregator.py).
    The stored copies of that file predate the pull request, so this re-creates its check from
    the pull request's description rather than copying it: a grid sampler over a one-channel
    image, a model that downsamples each patch by 2 on every axis (average pooling), the
    aggregator's ``crop`` and ``average`` modes; the aggregated output has the image's shape
    halved and equals the image pooled by 2 (a pooled patch is the pooled image's patch)."""
    torch = pytest.importorskip("torch")
    image = torch.rand(1, 20, 16, 24, generator=torch.Generator().manual_seed(0))  # C, x, y, z
    model = torch.nn.AvgPool3d(2)
    patch_size, overlap = 8, 4
    out = dp.apply_patches(image.numpy(), model, patch_size, patch_size - overlap,
                           channel_axis=0, out_scale=0.5, blend=blend, batch_size=3)
    assert out.shape == (1, 10, 8, 12)
    expected = model(image[None])[0].numpy()
    np.testing.assert_allclose(out.compute(), expected, rtol=1e-5, atol=1e-6)


# -- errors: named parameter, axis, expected and given; nothing written ----------------------------
ERRORS = [
    # shape, size, stride, out_scale, exception, match
    ((20, 20), 7, 7, 0.5, ParameterError,
     r"out_scale=1/2 on spatial axis 0 maps the patch size 7 to 3\.5 voxels; it must map to a "
     r"whole"),
    ((20, 20), 8, (4, 3), 0.5, ParameterError,
     r"out_scale=1/2 on spatial axis 1 maps the patch stride 3 to 1\.5 voxels"),
    ((20, 21), 8, 4, 0.5, ParameterError,
     r"out_scale=1/2 on spatial axis 1 maps the volume shape 21 to 10\.5 voxels.*crop or pad"),
    ((20, 20), 8, 4, (1, 2, 2), ParameterError,
     r"out_scale must have one entry per spatial axis \(2\) or be one number; got 3 entries"),
    ((20, 20), 8, 4, 0, ParameterError, r"out_scale must be a positive number; got 0"),
    ((20, 20), 8, 4, (2, -1), ParameterError,
     r"out_scale must be a positive number; got -1 on axis 1"),
    ((20, 20), 8, 4, "twice", ParameterError,
     r"out_scale must be a positive number, one per spatial axis, or 'infer'; got 'twice'"),
    ((20, 20), 8, 4, [True, 2], TypeError, r"out_scale must be a positive number.*got True"),
]


@pytest.mark.parametrize("shape, size, stride, scale, exc, match", ERRORS)
def test_bad_out_scale_is_refused_naming_the_axis(shape, size, stride, scale, exc, match,
                                                  tmp_path):
    vol = np.zeros(shape, np.float32)
    with pytest.raises(exc, match=match) as info:
        dp.to_zarr(dp.apply_patches(vol, lambda b: b, size, stride, out_scale=scale),
                   tmp_path / "out.zarr")
    assert info.value.param == "out_scale"
    assert not (tmp_path / "out.zarr").exists()


def test_a_model_at_another_scale_than_declared_names_the_axis(tmp_path):
    vol = np.zeros((16, 16), np.float32)
    out = dp.apply_patches(vol, lambda b: b[:, ::2, :], 8, 4, out_scale=2)
    with pytest.raises(ModelOutputError, match=r"fn returned shape \(\d, 4, 8\) for a batch of "
                       r"shape \(\d, 8, 8\); expected \(\d, 16, 16\).*\(out_scale=\(2, 2\)\); "
                       r"axis 1 has 4 where 16 was expected"):
        out.compute()
    with pytest.raises(ModelOutputError, match=r"out_scale='infer': fn returned shape \(1, 4\) "
                       r"for a batch of shape \(1, 8, 8\); expected \(1, \.\.\.\) with 2 spatial"):
        dp.apply_patches(vol, lambda b: b[:, 0, :4], 8, 4, out_scale="infer")


# -- out of core: Zarr on disk, resume, fingerprint ------------------------------------------------
class FailsAfter:
    """``Scaled`` that raises once it has been called ``n`` times (an interrupted run)."""

    def __init__(self, scale, n):
        self.inner, self.n, self.calls = Scaled(scale), n, 0

    def __call__(self, b):
        self.calls += 1
        if self.calls > self.n:
            raise RuntimeError("interrupted")
        return self.inner(b)

    def __dask_tokenize__(self):
        return ("scaled-model", self.inner.scale)


@pytest.mark.needs_dask("culling of the chunks a resume skips (without it, the order decides)")
def test_to_zarr_resume_and_fingerprint_record_out_scale(tmp_path):
    import dask

    data = np.random.default_rng(6).random((24, 32, 16), dtype=np.float32)
    src = zarr.open_array(write_zarr(tmp_path / "in.zarr", data, (8, 8, 8)), mode="r")
    args = dict(size=(8, 8, 8), stride=(4, 4, 4), out_scale=(1, 0.5, 0.5), batch_size=2,
                block_shape=(8, 4, 4))
    expected = _oracle(data, Scaled((1, 0.5, 0.5)), 8, 4, (1, 0.5, 0.5))
    dst = tmp_path / "out.zarr"
    with dask.config.set(scheduler="sync"):
        with pytest.raises(RuntimeError, match="interrupted"):
            dp.to_zarr(dp.apply_patches(dp.open_volume(src), FailsAfter((1, 0.5, 0.5), 9),
                                        **args), dst)
        partial = zarr.open_array(dst, mode="r")
        assert partial.shape == (24, 16, 8)
        assert stored_fingerprint(partial) is not None
        with pytest.raises(ResumeMismatchError, match="out_scale"):
            dp.to_zarr(dp.apply_patches(dp.open_volume(src), Scaled((1, 1, 1)),
                                        **{**args, "out_scale": None}), dst, resume=True)
        z = dp.to_zarr(dp.apply_patches(dp.open_volume(src), FailsAfter((1, 0.5, 0.5), 10**6),
                                        **args), dst, resume=True)
    fp = stored_fingerprint(z)
    assert '"out_scale": ["1", "1/2", "1/2"]' in str(fp).replace("'", '"')
    np.testing.assert_allclose(z[...], expected, rtol=1e-5, atol=1e-6)


def test_xarray_dims_kept_and_scaled_coordinates_dropped():
    xr = pytest.importorskip("xarray")
    vol = xr.DataArray(np.random.default_rng(7).random((16, 12), dtype=np.float32),
                       dims=("y", "x"), coords={"y": np.arange(16) * 0.5, "x": np.arange(12)},
                       attrs={"units": "mm"}, name="ct")
    out = dp.apply_patches(vol, Scaled((2, 1)), 4, 2, out_scale=(2, 1))
    assert out.dims == ("y", "x") and out.shape == (32, 12)
    assert "y" not in out.coords and list(out.coords["x"].values) == list(range(12))
    assert out.attrs == {"units": "mm"} and out.name == "ct"


# -- a real dask.distributed LocalCluster ----------------------------------------------------------
@pytest.mark.cluster
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore:.*:UserWarning:distributed")
def test_out_scale_on_a_local_cluster(tmp_path):
    distributed = pytest.importorskip("distributed")
    data = np.random.default_rng(8).random((24, 20, 16), dtype=np.float32)
    src = zarr.open_array(write_zarr(tmp_path / "in.zarr", data, (8, 8, 8)), mode="r")
    expected = {s: _oracle(data, Scaled((s,) * 3), 8, 4, (s,) * 3) for s in (2, 0.5)}
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0", silence_logs=50) as cluster, \
            distributed.Client(cluster):
        for s in (2, 0.5):
            out = dp.apply_patches(dp.open_volume(src), Scaled((s,) * 3), 8, 4, out_scale=s,
                                   batch_size=3)
            z = dp.to_zarr(out, tmp_path / f"out-{s}.zarr")
            assert z.shape == expected[s].shape
            np.testing.assert_allclose(z[...], expected[s], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(out.compute(), expected[s], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", [2, 0.5])
def test_spilled_halos_and_explicit_blocks_in_output_voxels(scale, tmp_path):
    vol = np.random.default_rng(9).random((24, 20, 16), dtype=np.float32)
    fn = Scaled((scale,) * 3)
    block = int(8 * scale)  # output voxels: a multiple of the scaled stride (4 * scale)
    out = dp.apply_patches(vol, fn, 8, 4, out_scale=scale, spill=tmp_path / "spill",
                           block_shape=block)
    assert out.chunks[0][0] == block
    np.testing.assert_allclose(out.compute(), _oracle(vol, fn, 8, 4, (scale,) * 3),
                               rtol=1e-5, atol=1e-6)
