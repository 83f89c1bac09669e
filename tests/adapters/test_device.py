"""Blending on the model's device (issue 20 item 2): the device path, run here with
``device="cpu", blend_on_device=True``, equals the host path to float rounding on every surface
(windows, scales, layouts, Zarr regions, spilled writes, a cluster), and leaves to the host what
only the host does (crop, overflow saturation)."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

torch = pytest.importorskip("torch")

import daskpatch as dp  # noqa: E402
import daskpatch.adapters.device as device_mod  # noqa: E402
from daskpatch.errors import ModelOutputError  # noqa: E402

CUDA_REASON = "needs a CUDA GPU (CI has none)"


@pytest.fixture
def calls(monkeypatch):
    """How many blocks went through the device path and came back from it (a spy on the real
    function, which still runs)."""
    seen = {"blocks": 0, "back": 0}
    real = device_mod._accumulate

    def spy(*args, **kwargs):
        seen["blocks"] += 1
        out = real(*args, **kwargs)
        seen["back"] += out is not None
        return out

    monkeypatch.setattr(device_mod, "_accumulate", spy)
    return seen


def _net(cin=1, cout=3, dims=3, seed=0):
    torch.manual_seed(seed)
    conv = torch.nn.Conv3d if dims == 3 else torch.nn.Conv2d
    return torch.nn.Sequential(conv(cin, 4, 3, padding=1), torch.nn.Tanh(),
                               conv(4, cout, 3, padding=1))


def _both(vol, net, *args, model_kw=None, **kw):
    """(host, device) results of the same apply_patches."""
    model_kw = model_kw or {}
    host = dp.apply_patches(vol, dp.TorchModel(net, **model_kw), *args, **kw).compute()
    dev = dp.apply_patches(vol, dp.TorchModel(net, device="cpu", blend_on_device=True,
                                              **model_kw), *args, **kw).compute()
    return host, dev


def _close(host, dev, rtol=2e-6):
    assert host.shape == dev.shape and host.dtype == dev.dtype
    np.testing.assert_allclose(dev, host, rtol=rtol, atol=rtol * float(np.abs(host).max()))


@pytest.mark.parametrize("blend", ["gaussian", "hann", "constant", "triangular", "user"])
def test_windows_equal_the_host_path(blend, calls):
    vol = np.random.default_rng(0).random((1, 40, 36, 30), dtype=np.float32)
    if blend == "user":
        blend = np.hanning(16)[:, None, None] * np.hanning(16)[None, :, None] + 0.1 \
            + np.zeros((1, 1, 16))
    host, dev = _both(vol, _net(), 16, 8, channel_axis=0, out_channels=3, batch_size=4,
                      blend=blend)
    _close(host, dev)
    assert calls["blocks"] > 0 and calls["back"] == calls["blocks"]


def test_to_numpy_takes_the_device_path(calls):
    """to_numpy's straight accumulation into the result is the host's: an engine whose model
    blends on its device takes the chunk path instead, each block's buffer coming back whole."""
    vol = np.random.default_rng(10).random((1, 32, 28, 24), dtype=np.float32)
    net = _net()
    host = dp.to_numpy(dp.apply_patches(vol, dp.TorchModel(net), 16, 8, channel_axis=0,
                                        out_channels=3, batch_size=4))
    assert calls["blocks"] == 0
    model = dp.TorchModel(net, device="cpu", blend_on_device=True)
    dev = dp.to_numpy(dp.apply_patches(vol, model, 16, 8, channel_axis=0, out_channels=3,
                                       batch_size=4))
    _close(host, dev)
    assert calls["back"] == calls["blocks"] > 0


def test_defaults_follow_the_device():
    net = _net()
    assert not dp.TorchModel(net).blends_on_device  # parameters on the CPU: the host blends
    assert not dp.TorchModel(net, device="cpu").blends_on_device
    assert dp.TorchModel(net, device="cuda").blends_on_device  # built anywhere; runs on a GPU
    assert dp.TorchModel(net, device="cpu", blend_on_device=True).blends_on_device
    assert not dp.TorchModel(net, device="cuda", blend_on_device=False).blends_on_device
    with pytest.raises(TypeError, match="blend_on_device must be None, True or False"):
        dp.TorchModel(net, blend_on_device="yes")
    assert "blend_on_device=True" in repr(dp.TorchModel(net, blend_on_device=True))


def test_zarr_regions_pad_border_channel_last_and_float64(tmp_path, calls):
    vol = np.random.default_rng(1).random((37, 29, 2))
    z = zarr.open_array(tmp_path / "v.zarr", mode="w", shape=vol.shape, chunks=(16, 16, 2),
                        dtype=vol.dtype)
    z[:] = vol

    class ChannelLast(torch.nn.Module):  # (B, H, W, C) in and out
        def __init__(self):
            super().__init__()
            self.net = _net(2, 2, dims=2).double()

        def forward(self, x):
            return self.net(x.movedim(-1, 1)).movedim(1, -1)

    net = ChannelLast()
    host, dev = _both(dp.open_volume(z), net, 12, 8, channel_axis=-1, border="pad",
                      pad_mode="reflect", batch_size=3)
    assert dev.dtype == np.float64
    _close(host, dev, rtol=1e-12)
    assert calls["back"] == calls["blocks"] > 0


def test_no_channel_axis_out_scale_and_batch_axes(calls):
    class Up(torch.nn.Module):  # (B, H, W) -> (B, 2H, 2W), no channel axis
        def forward(self, x):
            return torch.sin(3 * x).repeat_interleave(2, 1).repeat_interleave(2, 2)

    vol = np.random.default_rng(2).random((33, 28), dtype=np.float32)
    host, dev = _both(vol, Up(), 12, 4, out_scale=2)
    assert dev.shape == (66, 56)
    _close(host, dev)
    stack = np.random.default_rng(3).random((3, 20, 24), dtype=np.float32)  # a batch axis

    class Sq(torch.nn.Module):
        def forward(self, x):
            return x * x

    host, dev = _both(stack, Sq(), (1, 8, 8), (1, 4, 4), batch_size=5)
    _close(host, dev)
    assert calls["back"] == calls["blocks"] > 0


def test_fixed_batch_size_and_integer_volume(calls):
    vol = (np.random.default_rng(4).random((1, 24, 20, 20)) * 200).astype(np.uint8)
    host, dev = _both(vol, _net(), 8, 4, channel_axis=0, out_channels=3, batch_size=5,
                      model_kw=dict(batch_size=4))
    _close(host, dev)
    assert calls["back"] == calls["blocks"] > 0


def test_crop_and_overflow_stay_on_the_host(calls):
    vol = np.random.default_rng(5).random((1, 24, 24, 24), dtype=np.float32)
    host, dev = _both(vol, _net(), 8, 4, channel_axis=0, out_channels=3, blend="crop")
    np.testing.assert_array_equal(dev, host)
    assert calls["blocks"] == 0  # crop copies owned boxes: never sent to the device

    class Huge(torch.nn.Module):  # float32's largest: weights summing to 1 + ulp overflow
        def forward(self, x):
            return torch.full_like(x, float(np.finfo(np.float32).max))

    host, dev = _both(vol, Huge(), 9, 3, channel_axis=0, blend="constant")
    assert np.isfinite(dev).all()
    np.testing.assert_array_equal(dev, host)
    assert calls["blocks"] > calls["back"]  # overflowed on the device: redone on the host


def test_nan_and_wrong_shapes_say_what_the_host_says():
    vol = np.random.default_rng(6).random((1, 16, 16, 16), dtype=np.float32)

    class NaNs(torch.nn.Module):
        def forward(self, x):
            return x * torch.nan

    model = dp.TorchModel(NaNs(), device="cpu", blend_on_device=True)
    out = dp.apply_patches(vol, model, 8, 4, channel_axis=0, dtype="uint8")
    with pytest.raises(ValueError, match="NaN has no uint8 value"):
        out.compute()

    class Half(torch.nn.Module):
        def forward(self, x):
            return x[:, :, ::2]

    model = dp.TorchModel(Half(), device="cpu", blend_on_device=True)
    with pytest.raises(ModelOutputError, match=r"fn returned shape \(1, 1, 4, 8, 8\)") as err:
        dp.apply_patches(vol, model, 8, 4, channel_axis=0).compute(scheduler="sync")
    assert any("blending on the model's device" in n for n in err.value.__notes__)


def test_to_zarr_spilled_and_resumed(tmp_path, calls):
    import dask

    vol = np.random.default_rng(7).random((1, 40, 32, 24), dtype=np.float32)
    net = _net()
    host = dp.apply_patches(vol, dp.TorchModel(net), 16, 8, channel_axis=0, out_channels=3,
                            block_shape=8).compute()
    model = dp.TorchModel(net, device="cpu", blend_on_device=True)
    out = dp.apply_patches(vol, model, 16, 8, channel_axis=0, out_channels=3, block_shape=8)
    with dask.config.set({"daskpatch.spill-bytes": 1}):
        z = dp.to_zarr(out, tmp_path / "o.zarr")
    _close(host, z[...])
    blocks = calls["blocks"]
    dp.to_zarr(out, tmp_path / "o.zarr", resume=True)
    assert calls["blocks"] == blocks  # all written: no block runs again


def test_on_a_local_cluster(tmp_path):
    distributed = pytest.importorskip("distributed")
    vol = np.random.default_rng(8).random((1, 32, 32, 16), dtype=np.float32)
    net = _net()
    host = dp.apply_patches(vol, dp.TorchModel(net), 16, 8, channel_axis=0,
                            out_channels=3).compute()
    model = dp.TorchModel(net, device="cpu", blend_on_device=True)
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                  dashboard_address=":0") as cluster, \
            distributed.Client(cluster):
        z = dp.to_zarr(dp.apply_patches(vol, model, 16, 8, channel_axis=0, out_channels=3),
                       tmp_path / "o.zarr")
    _close(host, z[...])


@pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON)
def test_cuda_blends_on_the_gpu(calls):  # pragma: no cover - no GPU in CI
    vol = np.random.default_rng(9).random((1, 48, 40, 32), dtype=np.float32)
    net = _net()
    host = dp.apply_patches(vol, dp.TorchModel(net), 16, 8, channel_axis=0,
                            out_channels=3).compute()
    model = dp.TorchModel(net, device="cuda")
    assert model.blends_on_device
    dev = dp.apply_patches(vol, model, 16, 8, channel_axis=0, out_channels=3).compute()
    _close(host, dev, rtol=1e-5)
    assert calls["back"] == calls["blocks"] > 0
