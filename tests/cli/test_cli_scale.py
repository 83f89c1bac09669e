"""The command line: --out-scale, info's axes line, and torch files fixed to one batch size."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import zarr

import daskpatch as dp
from daskpatch.cli import main

from .test_cli import models, on_path, src  # noqa: F401 - fixtures


def _half(batch):  # (B, x, y, z) -> half resolution: 2 x 2 x 2 block means
    b, x, y, z = batch.shape
    return batch.reshape(b, x // 2, 2, y // 2, 2, z // 2, 2).mean(axis=(2, 4, 6))


def test_apply_out_scale_equals_the_python_api(src, tmp_path, on_path, capsys,  # noqa: F811
                                               monkeypatch):
    (tmp_path / "half_model.py").write_text(
        "import numpy as np\n\n\ndef half(batch):\n    b, x, y, z = batch.shape\n"
        "    return batch.reshape(b, x // 2, 2, y // 2, 2, z // 2, 2).mean(axis=(2, 4, 6))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    dst = tmp_path / "half.zarr"
    assert main(["apply", src, str(dst), "--model", "half_model:half", "--size", "16",
                 "--stride", "8", "--out-scale", "0.5", "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "3-D patches; output patches at out_scale=0.5" in out.splitlines()[0]
    got = zarr.open_array(str(dst))
    expected = dp.apply_patches(dp.open_volume(src), _half, 16, 8, out_scale=0.5).compute()
    assert got.shape == (20, 18, 16) == expected.shape
    np.testing.assert_allclose(got[...], expected, rtol=1e-6)
    # resume with another scale is refused, naming it; the output is untouched
    assert main(["apply", src, str(dst), "--model", "half_model:half", "--size", "16",
                 "--stride", "8", "--out-scale", "0.25", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "daskpatch: error:" in err and "out_scale" in err.replace("--out-scale", "out_scale")


@pytest.mark.parametrize("flag, message", [
    ("3", "out_scale=3 on spatial axis 0 maps"),  # fine: 120 x 108 x 96
    ("0.3", "--out-scale=3/10 on spatial axis 0 maps the patch size 16 to 4.8 voxels"),
    ("x", "expected a positive number"),
])
def test_a_bad_out_scale_is_one_line_and_writes_nothing(src, tmp_path, on_path, capsys,  # noqa: F811
                                                        flag, message):
    dst = tmp_path / "bad.zarr"
    status = main(["apply", src, str(dst), "--model", "cli_models:affine", "--size", "16",
                   "--stride", "8", "--out-scale", flag])
    err = capsys.readouterr().err
    if flag == "3":  # a whole mapping is no error, but the model returns the input's shape
        assert status == 1 and "axis 1 has 16 where 48 was expected" in err
        return
    assert status == 2, err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not dst.exists()


def test_info_prints_the_axes_line_of_apply_first(src, capsys):  # noqa: F811
    assert main(["info", src, "--size", "16", "--stride", "8", "--out-channels", "3",
                 "--out-scale", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("daskpatch: the 3-D volume of shape (40, 36, 32) is read as spatial axes "
                        "0, 1, 2 (40, 36, 32) (no channel axis): 3-D patches; the model gets 1 "
                        "channel and returns 3; output patches at out_scale=2")
    assert any("result       3 x 80 x 72 x 64 float32  (out_scale 2,2,2)" in ln for ln in lines)
    assert main(["info", src, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["axes"].endswith("(no channel axis): 3-D patches")
    assert main(["info", src, "--size", "16", "--out-scale", "infer"]) == 2
    assert "cannot infer the scale" in capsys.readouterr().err


def test_info_and_apply_print_the_same_axes_line(src, tmp_path, on_path, capsys):  # noqa: F811
    args = ["--size", "8,16", "--stride", "8"]
    assert main(["info", src, *args]) == 0
    info_line = capsys.readouterr().out.splitlines()[0]
    assert main(["apply", src, str(tmp_path / "o.zarr"), "--model", "cli_models:affine",
                 *args]) == 0
    assert capsys.readouterr().out.splitlines()[0] == info_line
    assert "batch axis 0 (40) and spatial axes 1, 2 (36, 32)" in info_line


# -- torch files fixed to one batch size -----------------------------------------------------------
@pytest.fixture
def fixed_models(tmp_path):
    """A Conv3d exported (torch.export) for batch 4, the same traced (batch-generic convs), and
    a traced module whose forward reshapes to batch 4 (it takes no other)."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(1, 1, 3, padding=1).eval()

    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv

        def forward(self, x):
            return self.conv(x).view(4, 1, 8, 8, 8)

    example = torch.zeros(4, 1, 8, 8, 8)
    torch.export.save(torch.export.export(conv, (example,)), str(tmp_path / "fixed.pt2"))
    with warnings.catch_warnings():  # torch.jit is deprecated in torch 2.13, still in use
        warnings.simplefilter("ignore")
        torch.jit.trace(Fixed().eval(), example).save(str(tmp_path / "fixed.pt"))
    return tmp_path, dp.TorchModel(conv)


def _nine_patches(tmp_path):
    vol = np.random.default_rng(0).random((24, 24, 8), dtype=np.float32)  # 3 x 3 x 1 patches
    z = zarr.create_array(str(tmp_path / "vol.zarr"), shape=vol.shape, chunks=(8, 8, 8),
                          dtype=vol.dtype)
    z[...] = vol
    return str(tmp_path / "vol.zarr"), vol


@pytest.mark.parametrize("name, flags", [
    ("fixed.pt2", []),  # detected: batches of 4, the last padded
    ("fixed.pt2", ["--batch-size", "3"]),  # any batch size: pieces of 4
    ("fixed.pt", ["--batch-size", "4"]),  # found by running one patch, then a batch of 4
])
def test_a_model_fixed_to_one_batch_size_runs(fixed_models, capsys, name, flags):
    d, reference = fixed_models
    src, vol = _nine_patches(d)
    dst = d / "out.zarr"
    assert main(["apply", src, str(dst), "--model", str(d / name), "--size", "8",
                 *flags]) == 0, capsys.readouterr().err
    expected = dp.apply_patches(vol[None], reference, 8, channel_axis=0)[0].compute()
    np.testing.assert_allclose(zarr.open_array(str(dst))[...], expected, rtol=1e-5, atol=1e-6)


def test_a_model_fixed_to_one_batch_size_is_refused_before_any_store(fixed_models, capsys):
    d, _ = fixed_models
    src, _ = _nine_patches(d)
    dst = d / "out.zarr"
    assert main(["apply", src, str(dst), "--model", str(d / "fixed.pt"), "--size", "8"]) == 2
    err = capsys.readouterr().err
    assert "fails on a batch of one patch (1, 8, 8, 8)" in err
    assert "pass that size as --batch-size" in err and len(err.strip().splitlines()) == 1
    assert main(["apply", src, str(dst), "--model", str(d / "fixed.pt2"), "--size", "4"]) == 2
    err = capsys.readouterr().err
    assert "exported (torch.export) for inputs (B, 1, 8, 8, 8)" in err
    assert not dst.exists()


def test_torch_model_pads_a_fixed_batch_size_in_the_python_api(fixed_models):
    torch = pytest.importorskip("torch")
    d, reference = fixed_models
    _, vol = _nine_patches(d)
    program = torch.export.load(str(d / "fixed.pt2")).module()
    assert dp.TorchModel(program).batch_size == 4  # detected
    expected = dp.apply_patches(vol[None], reference, 8, channel_axis=0).compute()
    for batch_size in (1, 3, 4, 5):
        got = dp.apply_patches(vol[None], program, 8, channel_axis=0, batch_size=batch_size)
        np.testing.assert_allclose(got.compute(), expected, rtol=1e-5, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.load(str(d / "fixed.pt"))
    got = dp.apply_patches(vol[None], dp.TorchModel(traced, batch_size=4), 8, channel_axis=0,
                           batch_size=2)
    np.testing.assert_allclose(got.compute(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"exported \(torch.export\) for inputs "
                       r"\(B, 1, 8, 8, 8\).*fn gets batches \(B, 1, 4, 4, 4\)"):
        dp.apply_patches(vol[None], program, 4, channel_axis=0)
    with pytest.raises(TypeError, match="batch_size must be None or an integer >= 1"):
        dp.TorchModel(reference.module, batch_size=0)
