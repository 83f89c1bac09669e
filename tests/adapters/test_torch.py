"""Torch models as they are: a bare nn.Module or TorchModel in apply_patches, on every scheduler."""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import zarr
from dask.base import tokenize

import daskpatch as dp

from ..conftest import write_zarr

torch = pytest.importorskip("torch", reason="PyTorch is not installed (pip install torch==2.13.0)")

pytestmark = pytest.mark.torch

CUDA_REASON = "needs a CUDA GPU (torch.cuda.is_available() is False here)"


def no_grad_hook(module, inputs, output):
    """Forward hook: the model must run without autograd, in inference mode, wherever it runs."""
    if torch.is_grad_enabled() or not torch.is_inference_mode_enabled():
        raise AssertionError(
            f"forward ran with grad enabled={torch.is_grad_enabled()}, "
            f"inference mode={torch.is_inference_mode_enabled()}"
        )


def conv(seed: int = 0, hook: bool = True) -> torch.nn.Conv3d:
    """A 1-in, 2-out channel Conv3d with fixed random weights (and the no-grad hook)."""
    torch.manual_seed(seed)
    net = torch.nn.Conv3d(1, 2, kernel_size=3, padding=1)
    if hook:
        net.register_forward_hook(no_grad_hook)
    return net


class ManualWrapper:
    """What a user writes by hand today: NumPy in, ``no_grad`` inside, NumPy out."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.module(torch.from_numpy(np.ascontiguousarray(batch))).numpy()


@pytest.fixture
def volume(tmp_path) -> zarr.Array:
    """A 1-channel (C, X, Y, Z) volume in a Zarr store, chunks aligned to the stride 4."""
    data = np.random.default_rng(0).random((1, 24, 20, 16), dtype=np.float32)
    return zarr.open_array(write_zarr(tmp_path / "in.zarr", data, (1, 8, 8, 8)), mode="r")


def logits(volume, model, **kw):
    return dp.apply_patches(volume, model, 8, 4, channel_axis=0, out_channels=2, batch_size=4,
                            **kw)


# -- the module as it is ---------------------------------------------------------------------------
def test_a_bare_conv3d_equals_the_manual_wrapper_bit_for_bit(volume):
    net = conv()
    manual = logits(volume, ManualWrapper(conv(hook=False))).compute(scheduler="threads")
    direct = logits(volume, net).compute(scheduler="threads")  # the hook raises if grads are on
    assert direct.shape == (2, 24, 20, 16) and direct.dtype == np.float32
    np.testing.assert_array_equal(direct, manual)
    assert net.training  # the caller's module keeps its mode: a copy ran in eval mode


def test_the_callers_module_keeps_its_training_mode(volume):
    """A training loop that validates through daskpatch goes on training with BatchNorm and
    Dropout as they were: the module in training mode is copied, the copy runs in eval mode."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3, padding=1), torch.nn.BatchNorm3d(2),
                              torch.nn.Dropout(0.5))
    stats = net[1].running_mean.clone()
    first = logits(volume, net).compute(scheduler="threads")
    again = logits(volume, net).compute(scheduler="threads")
    np.testing.assert_array_equal(first, again)  # eval mode: no dropout, running statistics
    assert net.training and all(m.training for m in net.modules())
    assert torch.equal(net[1].running_mean, stats)  # inference did not update the statistics
    net.eval()
    np.testing.assert_allclose(logits(volume, net).compute(scheduler="threads"), first,
                               rtol=1e-6)


def test_without_inference_mode_the_hook_fails(volume):
    """The hook does catch a model run with autograd on (as a caller's no_grad cannot reach the
    worker threads): so the passing runs above really ran without it."""
    net = conv()

    def leaky(batch):
        return net(torch.from_numpy(batch)).detach().numpy()

    with torch.no_grad(), pytest.raises(AssertionError, match="grad enabled=True"):
        logits(volume, leaky).compute(scheduler="threads")


def test_a_callable_returning_tensors_that_require_grad(volume):
    net = conv(hook=False)
    expected = logits(volume, net).compute(scheduler="threads")
    out = logits(volume, lambda b: net(torch.from_numpy(b)))  # .numpy() would fail on these
    np.testing.assert_array_equal(out.compute(scheduler="threads"), expected)


def test_half_and_bfloat16_results_come_back_as_float32(volume):
    out = logits(volume, lambda b: torch.from_numpy(np.repeat(b, 2, axis=1)).to(torch.bfloat16))
    got = out.compute(scheduler="threads")
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, np.repeat(volume[...], 2, axis=0), rtol=1e-2)


def test_one_channel_volume_without_a_channel_axis_fails_at_build_time():
    vol = np.zeros((24, 20, 16), np.float32)
    with pytest.raises(ValueError, match=r"input layer Conv3d\(1, 2.*takes batches \(B, 1, D, H, "
                       r"W\).*the 3-D volume of shape \(24, 20, 16\) is read as spatial axes 0, "
                       r"1, 2 \(24, 20, 16\) \(no channel axis\): fn gets batches \(B, 8, 8, 8\)"
                       r".*volume\[None\] with channel_axis=0"):
        dp.apply_patches(vol, conv(), 8)
    # channel_axis=0 with a scalar size: 24 channels and 2-D patches
    with pytest.raises(ValueError, match=r"channel axis 0 \(24 channels\) and spatial axes 1, 2 "
                       r"\(20, 16\).*wants 3 spatial axes, the batches have 2"):
        dp.apply_patches(vol, conv(), 8, channel_axis=0, out_channels=2)
    with pytest.raises(ValueError, match=r"the volume has 3 channels where the model takes 1"):
        dp.apply_patches(np.zeros((3, 16, 16, 16)), conv(), 8, channel_axis=0, out_channels=2)
    with pytest.raises(ValueError, match=r"put the channel axis first"):
        dp.apply_patches(np.zeros((16, 16, 16, 1)), conv(), 8, channel_axis=-1, out_channels=2)
    seq = torch.nn.Sequential(conv(), torch.nn.ReLU())
    with pytest.raises(ValueError, match=r"input layer Conv3d\(1, 2"):
        dp.apply_patches(vol, seq, 8)


def test_a_failing_model_error_notes_the_batch_layout():
    vol = np.zeros((1, 16, 16, 16), np.float32)
    net = torch.nn.Conv2d(1, 2, 3, padding=1)  # a 2-D net on 3-D patches: torch itself fails

    class Wrapped(torch.nn.Module):  # a custom forward: no build-time check applies
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)

    out = dp.apply_patches(vol, Wrapped(), 8, channel_axis=0, out_channels=2)
    with pytest.raises(RuntimeError) as info:
        out.compute(scheduler="sync")
    assert any("fn was called on a batch of shape (1, 1, 8, 8, 8)" in n and
               "channel axis 0 (1 channels)" in n for n in info.value.__notes__)


# -- devices, dtypes, mixed precision ------------------------------------------------------------
def test_dtype_follows_the_module_parameters(volume):
    net64 = conv(hook=False).double()
    seen = []
    net64.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    out = logits(volume, net64, dtype=np.float64).compute(scheduler="sync")
    assert set(seen) == {torch.float64} and out.dtype == np.float64
    ref = logits(volume, conv(hook=False)).compute(scheduler="sync")
    np.testing.assert_allclose(out, ref, atol=1e-5)
    # an explicit dtype converts the module on its first call (a copy of a module in training
    # mode: the caller's keeps its mode and dtype)
    net = conv(hook=False).eval()
    model = dp.TorchModel(net, dtype="float64")
    assert net.weight.dtype == torch.float32  # nothing moves when the graph is built
    got = logits(volume, model, dtype=np.float64).compute(scheduler="sync")
    assert net.weight.dtype == torch.float64
    np.testing.assert_array_equal(got, out)
    trained = conv(hook=False)
    got = logits(volume, dp.TorchModel(trained, dtype="float64"), dtype=np.float64).compute(
        scheduler="sync")
    assert trained.training and trained.weight.dtype == torch.float32
    np.testing.assert_array_equal(got, out)


def test_amp_on_the_cpu_uses_bfloat16_autocast(volume):
    seen = []
    net = conv(hook=False)
    net.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    ref = logits(volume, conv(hook=False)).compute(scheduler="sync")
    out = logits(volume, dp.TorchModel(net, amp=True)).compute(scheduler="sync")
    assert set(seen) == {torch.bfloat16} and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=2e-2)
    assert dp.TorchModel(net, amp="float16").amp == "float16"


def test_explicit_cpu_device(volume):
    ref = logits(volume, conv()).compute(scheduler="threads")
    out = logits(volume, dp.TorchModel(conv(), device="cpu")).compute(scheduler="threads")
    np.testing.assert_array_equal(out, ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON)
def test_cuda_device_and_amp(volume):  # pragma: no cover - no GPU in CI
    ref = logits(volume, conv()).compute(scheduler="threads")
    net = conv()
    out = logits(volume, dp.TorchModel(net, device="cuda")).compute(scheduler="threads")
    assert net.weight.device.type == "cuda"
    np.testing.assert_allclose(out, ref, atol=1e-4)
    half = logits(volume, dp.TorchModel(conv(), device="cuda", amp=True))
    got = half.compute(scheduler="threads")
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=1e-2)
    # a module already on the GPU is used there as it is
    on_gpu = logits(volume, conv().cuda()).compute(scheduler="threads")
    np.testing.assert_allclose(on_gpu, ref, atol=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where CUDA is missing")
def test_cuda_device_without_a_gpu_fails_clearly(volume):
    out = logits(volume, dp.TorchModel(conv(), device="cuda"))  # building is fine
    with pytest.raises(RuntimeError, match=r"TorchModel\(device='cuda'\): CUDA is not available"):
        out.compute(scheduler="sync")


# -- pickling and graph names ----------------------------------------------------------------------
def test_pickles_and_tokenizes_by_content(volume):
    net = conv()
    model = dp.TorchModel(net)
    batch = np.random.default_rng(1).random((2, 1, 8, 8, 8), dtype=np.float32)
    back = pickle.loads(pickle.dumps(model))
    np.testing.assert_array_equal(back(batch), model(batch))
    assert tokenize(model) == tokenize(dp.TorchModel(copy.deepcopy(net))) == tokenize(back)
    assert logits(volume, net).name == logits(volume, copy.deepcopy(net)).name
    before = tokenize(model)
    with torch.no_grad():
        model.module.weight[0, 0, 0, 0, 0] += 1
    assert tokenize(model) != before
    assert tokenize(model) != tokenize(dp.TorchModel(net, amp=True))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch 2.13 deprecates TorchScript
def test_a_torchscript_module_pickles(volume):
    scripted = torch.jit.script(conv(hook=False))
    model = pickle.loads(pickle.dumps(dp.TorchModel(scripted)))
    batch = np.random.default_rng(2).random((2, 1, 8, 8, 8), dtype=np.float32)
    np.testing.assert_array_equal(model(batch), dp.TorchModel(scripted)(batch))
    expected = logits(volume, conv(hook=False)).compute(scheduler="sync")
    np.testing.assert_array_equal(logits(volume, model).compute(scheduler="sync"), expected)


def test_bad_arguments():
    with pytest.raises(TypeError, match=r"module must be a torch.nn.Module; got 'net' of type str"):
        dp.TorchModel("net")
    with pytest.raises(ValueError, match=r"device must name a torch device .* got 'gpu'"):
        dp.TorchModel(conv(), device="gpu")
    with pytest.raises(TypeError, match=r"device must be None, a device name .* got 0 of type int"):
        dp.TorchModel(conv(), device=0)
    with pytest.raises(ValueError, match=r"dtype must be one of .* got 'int32'"):
        dp.TorchModel(conv(), dtype="int32")
    with pytest.raises(ValueError, match=r"amp must be True, False or one of .* got 'fp8'"):
        dp.TorchModel(conv(), amp="fp8")
    with pytest.raises(TypeError, match=r"amp must be True, False or one of .* of type int"):
        dp.TorchModel(conv(), amp=1)


@pytest.mark.processes
def test_import_daskpatch_does_not_import_torch():
    code = ("import sys, numpy as np, daskpatch as dp; "
            "dp.apply_patches(np.ones((8, 8)), lambda b: b, 4, 2).compute(); "
            "print('torch' in sys.modules)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True)
    assert out.stdout.strip() == "False"


# -- on a dask.distributed cluster -----------------------------------------------------------------
@pytest.mark.cluster
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore:.*:UserWarning:distributed")
@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
def test_on_a_local_cluster(volume, processes):
    distributed = pytest.importorskip("distributed", reason="dask.distributed is not installed")
    expected = logits(volume, ManualWrapper(conv(hook=False))).compute(scheduler="threads")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=processes,
                                  dashboard_address=":0", silence_logs=50) as cluster:
        with distributed.Client(cluster) as client:
            got = client.compute(logits(volume, conv())).result()  # the hook travels with it
    np.testing.assert_array_equal(got, expected)
