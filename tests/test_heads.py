"""Several heads, test-time flips and uncertainty: one model call per patch (and flip) for every
head, a NumPy oracle looping over patches and flips, to_zarr of a dict as a resumable group."""

from __future__ import annotations

import itertools
import threading

import dask
import numpy as np
import pytest
import zarr

import daskpatch as dp
from daskpatch import PatchGrid
from daskpatch.errors import (ModelOutputError, ModelOutputTypeError, ParameterError,
                              ParameterTypeError, ResumeMismatchError, TargetExistsError,
                              UnsafeTargetError)

from .conftest import naive_blend


class Counting:
    """A model counting the patches it sees (thread-safe), returning ``fn(batch)``."""

    def __init__(self, fn):
        self.fn, self.patches, self.lock = fn, 0, threading.Lock()

    def __call__(self, batch):
        with self.lock:
            self.patches += len(batch)
        return self.fn(batch)


def _two_heads(b):  # (B, 1, *size) -> seg (B, 3, ...) and dist (B, 1, ...)
    return {"seg": np.concatenate([b, 2 * b, -b], axis=1), "dist": b + 1}


def _uneven(b):
    """Not flip-equivariant and different in every patch position: a real spread."""
    ramp = np.linspace(0.5, 1.5, b.shape[-2])[:, None]
    return 100 + b * ramp + 0.3 * np.sin(7 * b)  # an offset of 100 tests the cancellation


def _oracle(vol, fn, size, stride, blend, flips):
    """Mean and std by the definition: every patch, every flip, the full N-D window."""
    grid = PatchGrid(vol.shape, size, stride)
    pred, sq = [], []
    for sl in grid:
        p = vol[sl][None].astype(np.float64)
        outs = []
        for f in flips:
            axes = tuple(1 + a for a in f)
            outs.append(np.flip(fn(np.flip(p, axes).copy()), axes))
        outs = np.stack(outs)  # (flips, 1, *size)
        pred.append(outs.mean(0))
        sq.append((outs ** 2).mean(0))
    m = naive_blend(np.stack(pred), grid, blend)[0]
    e2 = naive_blend(np.stack(sq), grid, blend)[0]
    return m, np.sqrt(np.maximum(e2 - m * m, 0))


def test_dict_heads_one_call_per_patch_and_each_head_as_alone():
    vol = np.random.default_rng(0).random((24, 20), dtype=np.float32)
    model = Counting(_two_heads)
    out = dp.apply_patches(vol, model, 8, 4, out_channels={"seg": 3, "dist": 1},
                           dtype={"seg": "float32", "dist": "float64"}, batch_size=3)
    assert set(out) == {"seg", "dist"}
    assert out["seg"].shape == (3, 24, 20) and out["dist"].shape == (1, 24, 20)
    assert out["seg"].dtype == np.float32 and out["dist"].dtype == np.float64
    seg, dist = dask.compute(out["seg"], out["dist"])
    assert model.patches == len(PatchGrid(vol.shape, 8, 4))  # once per patch, both heads
    alone = dp.apply_patches(vol[None], lambda b: 2 * b, 8, 4, channel_axis=0).compute()
    np.testing.assert_allclose(seg[1], alone[0], atol=1e-6)
    np.testing.assert_allclose(dist[0], vol + 1, atol=1e-6)


def test_tuple_heads_channel_last_and_cast_rules():
    vol = np.random.default_rng(1).random((16, 20, 2), dtype=np.float32)
    out = dp.apply_patches(vol, lambda b: (b * 300, b[..., :1] > 0.5), 8, 4, channel_axis=-1,
                           out_channels=(2, 1), dtype=("uint8", "bool"))
    a, b = dask.compute(*out)
    assert a.shape == (16, 20, 2) and a.dtype == np.uint8 and a.max() == 255  # saturated
    assert b.shape == (16, 20, 1) and b.dtype == np.bool_


@pytest.mark.parametrize("blend", ["gaussian", "constant", "hann"])
@pytest.mark.parametrize("tta", [None, "flip", [(), (1,)]])
def test_uncertainty_matches_oracle(blend, tta):
    vol = np.random.default_rng(2).random((20, 18), dtype=np.float32)
    flips = [()] if tta is None else [(), (0,), (1,), (0, 1)] if tta == "flip" else tta
    model = Counting(_uneven)
    mean, std = dp.apply_patches(vol, model, 8, 4, blend=blend, tta=tta, uncertainty=True)
    m, s = dask.compute(mean, std)
    assert model.patches == len(flips) * len(PatchGrid(vol.shape, 8, 4))
    om, os_ = _oracle(vol, _uneven, 8, 4, blend, flips)
    np.testing.assert_allclose(m, om, rtol=1e-6)
    np.testing.assert_allclose(s, os_, atol=2e-5)  # float64 sums: no cancellation at 100
    assert s.max() > 1e-3


def test_tta_flip_averages_unflipped_outputs():
    vol = np.random.default_rng(3).random((16, 16), dtype=np.float32)
    out = dp.apply_patches(vol, _uneven, 8, 4, tta="flip", blend="hann")
    om, _ = _oracle(vol, _uneven, 8, 4, "hann", [(), (0,), (1,), (0, 1)])
    np.testing.assert_allclose(out.compute(), om, rtol=1e-6)
    assert out.dtype == np.float32


def test_heads_with_uncertainty_and_flips_to_numpy_each():
    vol = np.random.default_rng(4).random((12, 16), dtype=np.float32)
    out = dp.apply_patches(vol, _two_heads, 8, 4, out_channels={"seg": 3, "dist": 1},
                           tta="flip", uncertainty=True)
    assert isinstance(out["seg"], tuple) and out["seg"]._fields == ("mean", "std")
    seg_std = dp.to_numpy(out["seg"].std)
    assert np.abs(seg_std).max() < 1e-5  # a pointwise model: every prediction is the same
    np.testing.assert_allclose(dp.to_numpy(out["dist"].mean)[0], vol + 1, atol=1e-6)


def test_nan_in_an_integer_head_names_it():
    vol = np.ones((8, 8), dtype=np.float32)
    out = dp.apply_patches(vol, lambda b: {"a": b * np.nan, "b": b}, 4, 4,
                           out_channels={"a": 1, "b": 1}, dtype={"a": "uint8", "b": "f4"})
    with pytest.raises(ValueError, match=r"head 'a': NaN has no uint8 value: output chunk"):
        out["a"].compute()


def test_monai_multioutput_tuple_and_dict():
    """Port of MONAI's ``tests/inferers/test_sliding_window_inference.py::test_multioutput``:
    a model returning a tuple and a dict of outputs at the patch's resolution, half of it and a
    quarter of it (MONAI infers each output's scale from its shape: ``out_scale="infer"``)."""
    inputs = np.ones((6, 20, 20), dtype=np.float32)

    def compute(data):
        return data + 1, data[:, ::3, ::2, ::2] + 2, data[:, ::2, ::4, ::4] + 3

    def compute_dict(data):
        return {1: data + 1, 2: data[:, ::3, ::2, ::2] + 2, 3: data[:, ::2, ::4, ::4] + 3}

    model = Counting(compute)
    result = dp.apply_patches(inputs, model, 8, 4, channel_axis=0, batch_size=10,
                              blend="constant", out_channels=(6, 2, 3), out_scale="infer")
    result_dict = dp.apply_patches(inputs, compute_dict, 8, 4, channel_axis=0, batch_size=10,
                                   blend="constant", out_channels={1: 6, 2: 2, 3: 3},
                                   out_scale={1: 1, 2: 0.5, 3: 0.25})
    expected = (np.ones((6, 20, 20)) + 1, np.ones((2, 10, 10)) + 2, np.ones((3, 5, 5)) + 3)
    model.patches = 0  # the probe of "infer" ran once, when the graph was built
    computed = dask.compute(*result)
    assert model.patches == len(PatchGrid((20, 20), 8, 4))  # once per patch for all outputs
    for rr, ee in zip(computed, expected):
        assert rr.shape == ee.shape
        np.testing.assert_allclose(rr, ee, rtol=1e-4)
    for (k, rr), ee in zip(dask.compute(result_dict)[0].items(), expected):
        assert rr.shape == ee.shape
        np.testing.assert_allclose(rr, ee, rtol=1e-4)


def _pyramid(b):
    """Three heads of (B, 1, 16, 12) patches: full resolution, half, and (1, 1/4) -- each a
    different, non-constant function of the patch, so that blending errors show."""
    half = b.reshape(b.shape[0], 1, 8, 2, 6, 2).mean((3, 5))
    return {"full": np.concatenate([b, b * b], 1), "half": np.sin(3 * half) + 2,
            "thin": b.reshape(b.shape[0], 1, 16, 3, 4).max(-1) * 5}


def _head_alone(vol, head, scale, **kw):
    """One head through apply_patches alone, at its own out_scale (the reference)."""
    return dp.apply_patches(vol[None], lambda b: _pyramid(b)[head], (16, 12), (8, 4),
                            channel_axis=0, out_channels=2 if head == "full" else 1,
                            out_scale=scale, **kw).compute()


@pytest.mark.parametrize("blend", ["gaussian", "hann", "crop"])
def test_heads_at_different_resolutions_equal_each_head_alone(blend):
    vol = np.random.default_rng(11).random((40, 36), dtype=np.float32)
    model = Counting(_pyramid)
    scales = {"full": 1, "half": 0.5, "thin": (1, 0.25)}
    out = dp.apply_patches(vol, model, (16, 12), (8, 4), out_channels={"full": 2, "half": 1,
                           "thin": 1}, out_scale=scales, blend=blend, batch_size=3)
    got = dask.compute(out)[0]
    assert model.patches == len(PatchGrid(vol.shape, (16, 12), (8, 4)))
    assert got["full"].shape == (2, 40, 36) and got["half"].shape == (1, 20, 18) \
        and got["thin"].shape == (1, 40, 9)
    for head, scale in scales.items():
        alone = _head_alone(vol, head, scale, blend=blend)
        np.testing.assert_allclose(got[head], alone, rtol=2e-6, atol=1e-6)
    # the same from "infer", with uncertainty and flips, and a block shape of the first head
    model.patches = 0
    mean = dp.apply_patches(vol, model, (16, 12), (8, 4), out_scale="infer", blend=blend,
                            out_channels={"full": 2, "half": 1, "thin": 1}, block_shape=16,
                            tta=[(), (0,)], uncertainty=True)
    assert [mean[k].mean.chunks[-2:] for k in scales] == [
        ((16, 16, 8), (16, 16, 4)), ((8, 8, 4), (8, 8, 2)), ((16, 16, 8), (4, 4, 1))]
    got2 = dask.compute(mean)[0]
    assert model.patches == 2 * len(PatchGrid(vol.shape, (16, 12), (8, 4))) + 1  # + the probe
    for head in scales:
        assert got2[head].mean.shape == got[head].shape
        assert np.isfinite(got2[head].std).all()


@pytest.mark.needs_dask("group writes merge HighLevelGraph layers")
def test_heads_at_different_resolutions_out_of_core_and_resumed(tmp_path):
    vol = np.random.default_rng(12).random((48, 40), dtype=np.float32)
    z = zarr.open_array(tmp_path / "in.zarr", mode="w", shape=vol.shape, chunks=(16, 8),
                        dtype=vol.dtype)
    z[:] = vol
    model = Counting(_pyramid)
    kw = dict(out_channels={"full": 2, "half": 1, "thin": 1}, block_shape=(16, 8),
              out_scale={"full": 1, "half": 0.5, "thin": (1, 0.25)})
    heads = dp.apply_patches(dp.open_volume(z), model, (16, 12), (8, 4), **kw)
    dp.to_zarr(heads, tmp_path / "out.zarr")
    g = zarr.open_group(tmp_path / "out.zarr", mode="r")
    assert model.patches == len(PatchGrid(vol.shape, (16, 12), (8, 4)))
    assert g["half"].shape == (1, 24, 20) and g["thin"].shape == (1, 48, 10)
    for head in ("full", "half", "thin"):
        np.testing.assert_allclose(g[head][...], _head_alone(vol, head, kw["out_scale"][head]),
                                   rtol=2e-6, atol=1e-6)
    model.patches = 0
    dp.to_zarr(dp.apply_patches(dp.open_volume(z), model, (16, 12), (8, 4), **kw),
               tmp_path / "out.zarr", resume=True)
    assert model.patches == 0  # all written: nothing run again


@pytest.mark.parametrize("spill", [False, True])
def test_one_head_of_several_resolutions_written_alone(tmp_path, spill):
    """A head taken alone from a model with heads at several resolutions: to_zarr lowers its
    engine (spilled halos, chunk tasks writing themselves), to_numpy fills memory."""
    vol = np.random.default_rng(13).random((40, 36), dtype=np.float32)
    out = dp.apply_patches(vol, _pyramid, (16, 12), (8, 4), block_shape=(16, 8),
                           out_channels={"full": 2, "half": 1, "thin": 1},
                           out_scale={"full": 1, "half": 0.5, "thin": (1, 0.25)})
    with dask.config.set({"daskpatch.spill-bytes": 1 if spill else "1 GiB"}):
        z = dp.to_zarr(out["half"], tmp_path / "half.zarr")
    alone = _head_alone(vol, "half", 0.5)
    np.testing.assert_allclose(z[...], alone, rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(dp.to_numpy(out["thin"]), _head_alone(vol, "thin", (1, 0.25)),
                               rtol=2e-6, atol=1e-6)


@pytest.mark.needs_dask("group writes merge HighLevelGraph layers")
def test_heads_at_different_resolutions_on_a_local_cluster(tmp_path):
    distributed = pytest.importorskip("distributed")
    vol = np.random.default_rng(14).random((40, 36), dtype=np.float32)
    out = dp.apply_patches(vol, _pyramid, (16, 12), (8, 4), block_shape=(16, 8),
                           out_channels={"full": 2, "half": 1, "thin": 1},
                           out_scale={"full": 1, "half": 0.5, "thin": (1, 0.25)})
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                  dashboard_address=":0") as cluster, \
            distributed.Client(cluster):
        g = dp.to_zarr(out, tmp_path / "o.zarr")
    for head, scale in (("full", 1), ("half", 0.5), ("thin", (1, 0.25))):
        np.testing.assert_allclose(g[head][...], _head_alone(vol, head, scale), rtol=2e-6,
                                   atol=1e-6)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(out_scale={"a": 1}), ParameterError,
     r"out_scale as a dict gives one scale per head and must name the heads"),
    (dict(out_scale={"a": 1, "b": 0.3}), ParameterError,
     r"out_scale of head 'b' maps the patch size 8 on spatial axis 0 to 12/5"),
    (dict(out_scale="twice"), ParameterError, r"a dict of one per head, or 'infer'"),
    (dict(out_scale={"a": 1, "b": 0.125}), ParameterError,
     r"out_scale\['b'\]=1/8 on spatial axis 0 maps the patch stride 4 to 0.5 voxels"),
])
def test_bad_per_head_scales(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        dp.apply_patches(np.zeros((16, 16), np.float32), lambda b: {"a": b, "b": b}, 8, 4,
                         out_channels={"a": 1, "b": 1}, **kwargs)


def test_wrong_head_resolution_names_the_head():
    inputs = np.ones((6, 20, 20), dtype=np.float32)

    def smaller(data):
        return {"full": data + 1, "half": data[:, :, ::2, ::2] + 2}

    out = dp.apply_patches(inputs, smaller, 8, 4, channel_axis=0,
                           out_channels={"full": 6, "half": 6})
    with pytest.raises(ModelOutputError, match=r"head 'half' has shape \(1, 6, 4, 4\).*"
                       r"spatial shape \(4, 4\), not \(8, 8\).*out_scale='infer'"):
        out["full"].compute()


def test_torch_module_returning_a_dict():
    torch = pytest.importorskip("torch")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            return {"logits": y, "prob": torch.sigmoid(y[:, :1])}

    vol = np.random.default_rng(5).random((1, 16, 16), dtype=np.float32)
    out = dp.apply_patches(vol, Net(), 8, 4, channel_axis=0,
                           out_channels={"logits": 2, "prob": 1})
    a, b = dask.compute(out["logits"], out["prob"])
    assert a.shape == (2, 16, 16) and b.shape == (1, 16, 16) and 0 < b.min() <= b.max() < 1


# -- errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(tta="mirror"), ParameterError, r"tta must be None, one of \('flip',\)"),
    (dict(tta=[(0,), (0,)]), ParameterError, r"tta names the flip of axes \(0,\) twice"),
    (dict(tta=[(2,)]), ParameterError, r"from -2 to 1 \(2 spatial axes\); got 2"),
    (dict(tta=(0, 1)), ParameterTypeError, r"tta's entries must be sequences"),
    (dict(tta=[]), ParameterTypeError, r"non-empty list"),
    (dict(uncertainty="yes"), TypeError, r"uncertainty"),
    (dict(out_channels={}), ParameterError, r"at least one head"),
    (dict(out_channels={"a": 0}), ValueError, r"out_channels\['a'\]"),
    (dict(out_channels={"a": 1}, dtype={"b": "f4"}), ParameterError,
     r"dtype must name the same heads as out_channels \(\['a'\]\)"),
    (dict(out_channels=2, dtype=("f4", "f4")), ParameterTypeError,
     r"dtype must be one NumPy dtype for a model returning one array"),
    (dict(out_channels=(1,), dtype=("c8",), uncertainty=True), ParameterError,
     r"uncertainty=True needs real dtypes"),
])
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        dp.apply_patches(np.zeros((8, 8), np.float32), lambda b: b, 4, 4, **kwargs)


class KeysChange:
    def __init__(self):
        self.n = 0

    def __call__(self, b):
        self.n += 1
        return {"a": b, "b": b} if self.n == 1 else {"a": b, "c": b}


@pytest.mark.parametrize("fn, out_channels, exc, match", [
    (KeysChange(), {"a": 1, "b": 1}, ModelOutputError,
     r"fn returned a dict with keys \['a', 'c'\]; out_channels declares the heads \['a', 'b'\]"),
    (lambda b: {"a": b[:1]}, {"a": 1}, ModelOutputError,
     r"head 'a' has shape \(1, 4, 4\), expected \(2, 4, 4\): 1 patches for a batch of 2"),
    (lambda b: (b,), (1, 1), ModelOutputError, r"a tuple of 1 arrays; out_channels declares 2"),
    (lambda b: b, {"a": 1}, ModelOutputTypeError, r"fn must return a dict with keys \['a'\]"),
    (lambda b: {"a": b}, None, ModelOutputTypeError,
     r"fn returned a dict with keys \['a'\].*out_channels=\{name: channels"),
    (lambda b: {"a": "x"}, {"a": 1}, ModelOutputTypeError, r"head 'a' must be an array"),
])
def test_bad_model_outputs(fn, out_channels, exc, match):
    vol = np.zeros((8, 8), np.float32)
    out = dp.apply_patches(vol, fn, 4, 4, batch_size=2, out_channels=out_channels,
                           tta=None if out_channels else [()])
    first = next(iter(out.values())) if isinstance(out, dict) else \
        out[0] if isinstance(out, tuple) else out
    with pytest.raises(exc, match=match):
        first.compute(scheduler="sync")


# -- to_zarr of a dict: one group, one pass, resumable ------------------------------------------
@pytest.mark.parametrize("spill", [False, True])
@pytest.mark.needs_dask("group writes merge HighLevelGraph layers")
def test_to_zarr_group_one_call_per_patch(tmp_path, spill):
    vol = np.random.default_rng(6).random((32, 40), dtype=np.float32)
    model = Counting(_two_heads)
    out = dp.apply_patches(vol, model, 8, 4, out_channels={"seg": 3, "dist": 1},
                           dtype={"seg": "float32", "dist": "uint8"}, block_shape=8,
                           uncertainty=True)
    with dask.config.set({"daskpatch.spill-bytes": 1 if spill else "1 GiB"}):
        g = dp.to_zarr(out, tmp_path / "o.zarr", path="pred")
    assert model.patches == len(PatchGrid(vol.shape, 8, 4))
    assert g.attrs["daskpatch"]["complete"] is True
    assert not (tmp_path / "o.zarr" / "pred" / ".daskpatch-spill").exists()
    ref = dp.to_numpy(out["seg"].mean)
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "o.zarr", path="pred/seg/mean")[:],
                                  ref)
    # a careless user: again, over an array, a foreign group, other heads
    with pytest.raises(TargetExistsError, match="a group of arrays already exists"):
        dp.to_zarr(out, tmp_path / "o.zarr", path="pred")
    with pytest.raises(ResumeMismatchError, match=r"was started with \['seg/mean'"):
        dp.to_zarr({"seg": out["seg"].mean}, tmp_path / "o.zarr", path="pred", resume=True)
    with pytest.raises(UnsafeTargetError, match="a group that daskpatch did not write"):
        dp.to_zarr(out, tmp_path / "o.zarr")
    zarr.create_array(tmp_path / "arr.zarr", shape=(2,), dtype="f4")
    with pytest.raises(TargetExistsError, match="an array already exists"):
        dp.to_zarr(out, tmp_path / "arr.zarr")
    with pytest.raises(ParameterError, match="ome apply to one array"):
        dp.to_zarr(out, tmp_path / "x.zarr", ome=True)
    model.patches = 0
    g = dp.to_zarr({"seg": out["seg"].mean}, tmp_path / "o.zarr", path="pred", overwrite=True)
    assert list(g.attrs["daskpatch"]["arrays"]) == ["seg"]
    assert sorted(g.array_keys()) == ["seg"]


class Flaky:
    """A model that raises once it has seen ``limit`` patches; the same fingerprint (none)
    whatever its limit, as the same model in another run."""

    def __init__(self, limit):
        self.limit, self.patches = limit, 0

    def __call__(self, b):
        if self.patches >= self.limit:
            raise RuntimeError("interrupted")
        self.patches += len(b)
        return _two_heads(b)


@pytest.mark.needs_dask("group writes merge HighLevelGraph layers")
def test_to_zarr_group_resume_and_compute_false(tmp_path):
    vol = np.random.default_rng(7).random((32, 32), dtype=np.float32)
    kw = dict(out_channels={"seg": 3, "dist": 1}, block_shape=8, tta=[(), (0,)])
    with dask.config.set(scheduler="sync"), pytest.raises(RuntimeError, match="interrupted"):
        dp.to_zarr(dp.apply_patches(vol, Flaky(70), 8, 4, **kw), tmp_path / "o.zarr")
    assert zarr.open_group(tmp_path / "o.zarr").attrs["daskpatch"]["complete"] is False
    done = list((tmp_path / "o.zarr" / "seg" / ".daskpatch-done" / "chunks").iterdir())
    assert done  # some chunks were written and recorded before the interruption
    with pytest.raises(ResumeMismatchError, match="tta"):  # another tta is another result
        dp.to_zarr(dp.apply_patches(vol, Flaky(10**6), 8, 4, **{**kw, "tta": "flip"}),
                   tmp_path / "o.zarr", resume=True)
    model = Flaky(10**6)
    job = dp.to_zarr(dp.apply_patches(vol, model, 8, 4, **kw), tmp_path / "o.zarr",
                     resume=True, compute=False)
    assert model.patches == 0  # nothing ran yet
    g = job.compute()
    n = len(PatchGrid(vol.shape, 8, 4))
    assert 0 < model.patches <= 2 * n  # two flips; blocks the chunks left need, at most all
    whole = dp.apply_patches(vol, _two_heads, 8, 4, **kw)
    np.testing.assert_allclose(g["seg"][:], whole["seg"].compute(), rtol=1e-6)
    assert g.attrs["daskpatch"]["complete"] is True


CALLS: list[int] = []


def _counted_two_heads(b):
    CALLS.append(len(b))  # list.append is atomic: no lock to pickle for the cluster
    return _two_heads(b)


@pytest.mark.needs_dask("group writes merge HighLevelGraph layers")
def test_group_on_a_local_cluster(tmp_path):
    distributed = pytest.importorskip("distributed")
    vol = np.random.default_rng(8).random((24, 24), dtype=np.float32)
    CALLS.clear()
    out = dp.apply_patches(vol, _counted_two_heads, 8, 4, out_channels={"seg": 3, "dist": 1},
                           tta="flip", uncertainty=True, block_shape=8)
    with distributed.LocalCluster(n_workers=1, processes=False, threads_per_worker=2,
                                  dashboard_address=":0") as cluster, \
            distributed.Client(cluster):
        g = dp.to_zarr(out, tmp_path / "o.zarr")
    assert sum(CALLS) == 4 * len(PatchGrid(vol.shape, 8, 4))
    om, _ = _oracle(vol, lambda b: b + 1, 8, 4, "gaussian", [()])
    np.testing.assert_allclose(g["dist/mean"][0], om, rtol=1e-6)
    assert np.abs(g["dist/std"][:]).max() < 1e-5


def test_flips_list_of_axis_sets():
    assert dp.apply_patches(np.zeros((4, 4, 4), np.float32), lambda b: b, 2, tta="flip",
                            uncertainty=True)[0].shape == (4, 4, 4)
    flips = list(itertools.chain.from_iterable(
        itertools.combinations(range(3), k) for k in range(4)))
    assert len(flips) == 8


@pytest.mark.needs_dask("group writes merge HighLevelGraph layers")
def test_failed_group_overwrite_puts_the_old_group_back(tmp_path):
    vol = np.random.default_rng(9).random((16, 16), dtype=np.float32)
    kw = dict(out_channels={"seg": 3, "dist": 1}, block_shape=8)
    dp.to_zarr(dp.apply_patches(vol, _two_heads, 8, 4, **kw), tmp_path / "o.zarr")
    before = zarr.open_array(tmp_path / "o.zarr", path="seg")[:]
    with dask.config.set(scheduler="sync"), \
            pytest.raises(RuntimeError, match="interrupted") as info:
        dp.to_zarr(dp.apply_patches(vol, Flaky(6), 8, 4, uncertainty=True, **kw),
                   tmp_path / "o.zarr", overwrite=True)
    assert "was put back unchanged" in str(info.value.__notes__)
    g = zarr.open_group(tmp_path / "o.zarr")
    assert sorted(g.array_keys()) == ["dist", "seg"] and g.attrs["daskpatch"]["complete"]
    np.testing.assert_array_equal(g["seg"][:], before)
    g = dp.to_zarr(dp.apply_patches(vol, _two_heads, 8, 4, uncertainty=True, **kw),
                   tmp_path / "o.zarr", overwrite=True)
    assert sorted(g.group_keys()) == ["dist", "seg"] and not any(
        p.name.startswith(".daskpatch-re") for p in (tmp_path / "o.zarr").iterdir())


@pytest.mark.needs_dask("Array.__array__ (xarray .values)")
def test_batch_axes_crop_and_dataarrays():
    vols = np.random.default_rng(10).random((2, 12, 16), dtype=np.float32)  # two volumes
    out = dp.apply_patches(vols, lambda b: (b, 2 * b), (8, 8), 4, out_channels=(1, 1),
                           tta="flip")
    a, b = dask.compute(*out)
    np.testing.assert_allclose(b, 2 * vols, atol=1e-6)
    labels = (vols * 4).astype(np.uint8)  # crop copies voxels: integers come back exact
    mean, std = dp.apply_patches(labels, lambda b: b, (8, 8), 4, blend="crop", tta="flip",
                                 uncertainty=True, dtype="uint8")
    np.testing.assert_array_equal(mean.compute(), labels)
    assert mean.dtype == np.uint8 and std.dtype == np.float32 and float(std.max().compute()) == 0
    xr = pytest.importorskip("xarray")
    v = xr.DataArray(vols[0][None], dims=("c", "y", "x"))
    heads = dp.apply_patches(v, lambda b: {"a": b, "b": 2 * b}, 8, 4, channel_axis="c",
                             out_channels={"a": 1, "b": 1}, uncertainty=True)
    assert heads["b"].std.dims == ("c", "y", "x")
    np.testing.assert_allclose(heads["b"].mean.values[0], 2 * vols[0], atol=1e-6)


def test_torch_input_layer_checked_before_anything_runs():
    torch = pytest.importorskip("torch")
    net = torch.nn.Conv2d(3, 2, 3, padding=1)  # takes 3 channels
    with pytest.raises(ValueError, match=r"takes batches \(B, 3, H, W\).*1 channels"):
        dp.apply_patches(np.zeros((1, 8, 8), np.float32), net, 4, channel_axis=0, tta="flip")


def test_heads_flips_and_uncertainty_at_another_resolution():
    """``out_scale`` with several heads, tta or uncertainty: every head at that one scale,
    each the same as the head alone through ``out_scale`` (one model call per patch)."""
    vol = np.random.default_rng(8).random((24, 20), dtype=np.float32)

    def up(b):  # nearest-neighbour 2x upsampling
        return b.repeat(2, axis=1).repeat(2, axis=2)

    calls = []

    def two(b):
        calls.append(b.shape[0])
        return {"a": up(b), "b": 3 * up(b)}

    heads = dp.apply_patches(vol, two, 8, 4, out_scale=2, out_channels={"a": 1, "b": 1})
    a, b = dask.compute(heads["a"], heads["b"])
    alone = dp.apply_patches(vol, up, 8, 4, out_scale=2).compute()
    assert a.shape == (48, 40) and sum(calls) == len(dp.PatchGrid(vol.shape, 8, 4))
    np.testing.assert_allclose(a, alone, rtol=1e-6)
    np.testing.assert_allclose(b, 3 * alone, rtol=1e-6)
    mean, std = dp.apply_patches(vol, up, 8, 4, out_scale=2, tta="flip", uncertainty=True)
    np.testing.assert_allclose(mean.compute(), alone, rtol=1e-6)
    assert float(std.max().compute()) < 1e-5  # flips of a pointwise upsampling agree
    calls.clear()
    inferred = dp.apply_patches(vol, two, 8, 4, out_scale="infer", out_channels={"a": 1, "b": 1})
    assert calls == [1]  # the probe, when the graph is built
    np.testing.assert_allclose(inferred["b"].compute(), 3 * alone, rtol=1e-6)
    bad = dp.apply_patches(vol, lambda b: {"a": b, "b": b}, 8, 4, out_scale=2,
                           out_channels={"a": 1, "b": 1})
    with pytest.raises(ModelOutputError, match=r"head 'a' has shape .*\(16, 16\)"):
        bad["a"].compute()
