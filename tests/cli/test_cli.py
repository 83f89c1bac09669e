"""The ``daskpatch`` command line, run as users run it.

Subprocess tests run ``python -m daskpatch`` (what the console script ``daskpatch`` calls:
``daskpatch.cli:main``) with this worktree and a directory of test models on ``PYTHONPATH``;
the others call :func:`daskpatch.cli.main` in-process. Every store is a real Zarr store on disk,
results are compared with the Python API bit for bit.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr

import daskpatch as dp
from daskpatch.cli import main

ROOT = Path(__file__).resolve().parents[2]

MODELS = '''\
"""Models of the command-line tests (imported by SPEC, in the CLI and on workers)."""
import os
import sys
import threading

import numpy as np

CALLS = [0]
_LOCK = threading.Lock()


def affine(batch):
    with _LOCK:
        CALLS[0] += 1
        n = CALLS[0]
    if n == int(os.environ.get("DASKPATCH_TEST_HANG_AT", "0")):
        threading.Event().wait()  # never set: the run cannot finish (the test kills it)
    return 2 * batch + np.sqrt(np.abs(batch))


def three_channels(batch):  # (B, C, *size) -> (B, 3, *size)
    m = batch.mean(axis=1, keepdims=True)
    return np.concatenate([m, 2 * m, batch[:, :1] ** 2], axis=1)


def make_affine():
    return affine


class Scaled:
    def __call__(self, batch):
        return 3 * batch


class NeedsArgs:
    def __init__(self, factor):
        self.factor = factor


def boom(batch):
    raise ZeroDivisionError("this model always fails")


def exits(batch):
    sys.exit(7)
'''

TORCH_MODELS = '''\
"""Torch models of the command-line tests."""
import torch


def make_conv():
    torch.manual_seed(0)
    return torch.nn.Conv3d(1, 1, 3, padding=1)


conv = make_conv()


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = make_conv()

    def forward(self, x):
        return self.conv(x)
'''

SHAPE, CHUNKS, SIZE, STRIDE = (40, 36, 32), (16, 16, 16), 16, 8


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("models")
    (d / "cli_models.py").write_text(MODELS)
    (d / "cli_torch_models.py").write_text(TORCH_MODELS)
    return d


@pytest.fixture
def on_path(models, monkeypatch):
    """The test models importable in this process (in-process main(), in-process workers)."""
    monkeypatch.syspath_prepend(str(models))
    import cli_models

    cli_models.CALLS[0] = 0
    return cli_models


def _volume(path: Path, shape=SHAPE, chunks=CHUNKS, seed=0) -> str:
    data = np.random.default_rng(seed).random(shape, dtype=np.float32)
    z = zarr.create_array(str(path), shape=shape, chunks=chunks, dtype=data.dtype)
    z[...] = data
    return str(path)


@pytest.fixture
def src(tmp_path) -> str:
    return _volume(tmp_path / "vol.zarr")


def _cli(models: Path, *args: str, env: dict | None = None, wait: bool = True):
    environ = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(models)]),
                   **(env or {}))
    cmd = [sys.executable, "-m", "daskpatch", *args]
    if not wait:
        return subprocess.Popen(cmd, env=environ, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=environ, capture_output=True, text=True, timeout=300)


def _reference(src: str, fn, out: Path, **kwargs) -> np.ndarray:
    kwargs = {"size": SIZE, "stride": STRIDE, **kwargs}
    result = dp.apply_patches(dp.open_volume(src), fn, **kwargs)
    return dp.to_zarr(result, str(out))[...]


def _assert_one_error_line(stderr: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("daskpatch: error: "), stderr
    assert "Traceback" not in stderr


# -- help and entry points -----------------------------------------------------------------------
@pytest.mark.processes
def test_help_and_the_console_script_entry(models, capsys):
    done = _cli(models, "--help")
    assert done.returncode == 0, done.stderr
    for word in ("info", "apply", "rechunk", "--resume"):
        assert word in done.stdout
    assert main(["apply", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--model SPEC" in out and "package.module:name" in out and ".pt2" in out
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attr = scripts["daskpatch"].partition(":")
    assert getattr(__import__(module, fromlist=[attr]), attr) is main


# -- info ----------------------------------------------------------------------------------------
@pytest.mark.processes
def test_info_json_of_a_daskpatch_output(models, src, tmp_path, on_path):
    dst = tmp_path / "out.zarr"
    result = dp.apply_patches(dp.open_volume(src), on_path.affine, SIZE, STRIDE)
    dp.to_zarr(result, str(dst))
    done = _cli(models, "info", str(dst), "--size", str(SIZE), "--stride", str(STRIDE),
                "--workers", "3", "--json")
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout)
    assert (r["shape"], r["dtype"], r["chunks"]) == (list(SHAPE), "float32",
                                                     [list(c)[0] for c in result.chunks])
    assert r["node"] == "array" and r["zarr_format"] == 3
    assert [c["name"] for c in r["codecs"]][0] == "bytes"
    assert r["status"] == "complete" and r["chunks_done"] == r["chunks_total"] == r["nchunks"]
    assert r["stride_aligned"] is True
    plan = r["plan"]
    assert plan["patches"] == len(dp.PatchGrid(SHAPE, SIZE, STRIDE))
    assert plan["blocks"] == int(np.prod(result.numblocks))
    assert plan["block_shape"] == [c[0] for c in result.chunks]
    assert plan["threads"] == 3 and plan["peak_memory"] == 3 * sum(
        plan["memory_per_thread"].values())
    tp = plan["thread_plan"]  # torch's threads per dask thread, fitting the cores
    if tp["by"] == "auto":
        assert tp["dask_threads"] == 3 and tp["torch_threads"] == max(1, tp["cores"] // 3)


def test_info_of_an_unaligned_foreign_array(tmp_path, capsys):
    raw = _volume(tmp_path / "raw.zarr", chunks=(15, 15, 15))
    assert main(["info", raw, "--stride", "8", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["status"] == "not-daskpatch" and r["stride_aligned"] is False
    assert all(c % 8 == 0 or c == n for c, n in zip(r["aligned_chunks"], SHAPE))
    assert "plan" not in r
    assert main(["info", raw, "--size", "16", "--stride", "8"]) == 0  # the human form
    out = capsys.readouterr().out
    assert "NO: run 'daskpatch rechunk" in out and "peak memory" in out
    assert re.search(r"threads +\d+ dask x (\d+ torch = \d+ of \d+ cores|torch as )", out)


def test_info_of_ome_zarr_images_and_groups(tmp_path, capsys):
    for fmt, version in ((3, "0.5"), (2, "0.4")):
        g = zarr.open_group(str(tmp_path / f"ome{fmt}.zarr"), mode="w", zarr_format=fmt)
        g.create_array("0", shape=(2, 32, 32), chunks=(1, 16, 16), dtype="u2")
        g.create_array("1", shape=(2, 16, 16), chunks=(1, 16, 16), dtype="u2")
        multiscales = [{"name": "img", "axes": [
            {"name": "c", "type": "channel"}, {"name": "y", "type": "space", "unit": "um"},
            {"name": "x", "type": "space", "unit": "um"}],
            "datasets": [{"path": str(i), "coordinateTransformations": [
                {"type": "scale", "scale": [1, 2.0**i, 2.0**i]}]} for i in range(2)]}]
        if fmt == 3:
            g.attrs["ome"] = {"version": version, "multiscales": multiscales}
        else:
            multiscales[0]["version"] = version
            g.attrs["multiscales"] = multiscales
        assert main(["info", str(tmp_path / f"ome{fmt}.zarr"), "--json"]) == 0
        r = json.loads(capsys.readouterr().out)
        assert r["node"] == "ome-zarr image" and r["ome"]["version"] == version
        assert [a["name"] for a in r["ome"]["axes"]] == ["c", "y", "x"]
        assert [lv["scale"] for lv in r["ome"]["levels"]] == [[1, 1, 1], [1, 2, 2]]
        assert [lv["shape"] for lv in r["ome"]["levels"]] == [[2, 32, 32], [2, 16, 16]]
        assert r["shape"] == [2, 32, 32] and r["chunks"] == [1, 16, 16]
        assert main(["info", str(tmp_path / f"ome{fmt}.zarr")]) == 0
        assert "pass --channel-axis 0" in capsys.readouterr().out
    plain = zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    plain.create_array("raw", shape=(8, 8), dtype="u1")
    plain.create_group("labels")
    assert main(["info", str(tmp_path / "plain.zarr"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["node"] == "group" and (r["shape"], r["dtype"], r["chunks"]) == (None, None, None)
    assert [(m["name"], m["kind"]) for m in r["members"]] == [("labels", "group"),
                                                              ("raw", "array")]


# -- apply ---------------------------------------------------------------------------------------
@pytest.mark.processes
def test_apply_module_callable_equals_the_python_api(models, src, tmp_path, on_path):
    expected = _reference(src, on_path.affine, tmp_path / "ref.zarr", batch_size=4)
    dst = tmp_path / "out.zarr"
    done = _cli(models, "apply", src, str(dst), "--model", "cli_models:affine", "--size",
                str(SIZE), "--stride", str(STRIDE), "--batch-size", "4")
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout and done.stderr == ""
    out = zarr.open_array(str(dst), mode="r")
    assert out.dtype == expected.dtype
    np.testing.assert_array_equal(out[...], expected)


def test_resume_with_another_model_is_refused_in_flags(models, src, tmp_path, on_path, capsys):
    dst = str(tmp_path / "out.zarr")
    args = ["apply", src, dst, "--size", str(SIZE), "--stride", str(STRIDE)]
    assert main([*args, "--model", "cli_models:affine"]) == 0
    capsys.readouterr()
    assert main([*args, "--model", "cli_models:three_channels", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "was written with model=" in err and "cli_models:affine" in err
    assert "cli_models:three_channels" in err and err.count("\n") == 1
    assert main([*args, "--model", "cli_models:affine", "--resume"]) == 0  # the same model


def test_a_model_calling_sys_exit_is_an_error_not_a_silent_exit(models, src, tmp_path, on_path,
                                                               capsys):
    (models / "exits_on_import.py").write_text("import sys\nsys.exit(0)\n")
    dst = str(tmp_path / "out.zarr")
    args = ["apply", src, dst, "--size", str(SIZE), "--stride", str(STRIDE)]
    assert main([*args, "--model", "exits_on_import:f"]) == 2
    err = capsys.readouterr().err
    assert "importing 'exits_on_import' called sys.exit(0)" in err and not os.path.exists(dst)
    assert main([*args, "--model", "cli_models:exits"]) == 1
    err = capsys.readouterr().err
    assert "the run failed: RuntimeError: fn called sys.exit(7) on a batch" in err


def test_an_in_memory_destination_is_refused(src, on_path, capsys):
    assert main(["apply", src, "memory://out", "--model", "cli_models:affine", "--size",
                 str(SIZE)]) == 2
    assert "is an in-memory store: the result would vanish" in capsys.readouterr().err


def test_overlap_and_run_id_flags(src, tmp_path, on_path, capsys):
    base = ["apply", src, "--model", "cli_models:affine", "--size", "16"]
    assert main([base[0], base[1], str(tmp_path / "a.zarr"), *base[2:], "--stride", "8"]) == 0
    assert main([base[0], base[1], str(tmp_path / "b.zarr"), *base[2:], "--overlap", "0.5",
                 "--run-id", "affine-v1"]) == 0
    a, b = zarr.open_array(str(tmp_path / "a.zarr")), zarr.open_array(str(tmp_path / "b.zarr"))
    np.testing.assert_array_equal(a[...], b[...])  # overlap 0.5 of 16 is stride 8
    assert b.attrs["daskpatch"]["fingerprint"]["run_id"] == "affine-v1"
    capsys.readouterr()
    assert main([base[0], base[1], str(tmp_path / "b.zarr"), *base[2:], "--overlap", "0.5",
                 "--run-id", "affine-v2", "--resume"]) == 2
    assert "run_id='affine-v1', but this call has run_id='affine-v2'" in capsys.readouterr().err
    assert main([base[0], base[1], str(tmp_path / "c.zarr"), *base[2:], "--overlap", "0.5",
                 "--stride", "8"]) == 2
    assert "--overlap and --stride both set the stride" in capsys.readouterr().err
    assert main([base[0], base[1], str(tmp_path / "c.zarr"), *base[2:], "--overlap", "1.5"]) == 2
    assert "expected a fraction from 0 to below 1" in capsys.readouterr().err


def test_one_channel_in_k_classes_out_on_the_command_line(src, tmp_path, on_path, capsys):
    dst = tmp_path / "k.zarr"
    assert main(["apply", src, str(dst), "--model", "cli_models:three_channels", "--size", "16",
                 "--stride", "8", "--out-channels", "3"]) == 0
    out = capsys.readouterr().out
    assert "(no channel axis): 3-D patches; the model gets 1 channel and returns 3" in out
    expected = dp.apply_patches(dp.open_volume(src), on_path.three_channels, 16, 8,
                                out_channels=3).compute()
    got = zarr.open_array(str(dst))[...]
    assert got.shape == (3, *zarr.open_array(src).shape)
    np.testing.assert_array_equal(got, expected)


def test_a_failed_overwrite_puts_the_old_output_back(src, tmp_path, on_path, capsys):
    dst = str(tmp_path / "out.zarr")
    args = ["apply", src, dst, "--size", str(SIZE), "--stride", str(STRIDE)]
    assert main([*args, "--model", "cli_models:affine"]) == 0
    before = zarr.open_array(dst)[...]
    capsys.readouterr()
    assert main([*args, "--model", "cli_models:boom", "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert "the run failed: ZeroDivisionError" in err and "was put back unchanged" in err
    assert "run the --overwrite again" in err and "--resume" not in err
    np.testing.assert_array_equal(zarr.open_array(dst)[...], before)
    assert not os.path.exists(os.path.join(dst, ".daskpatch-replaced"))


def test_apply_options_reach_the_python_api(tmp_path, on_path, capsys):
    src = str(tmp_path / "ch.zarr")
    data = np.random.default_rng(1).random((2, 24, 20, 18), dtype=np.float32)
    z = zarr.create_array(src, shape=data.shape, chunks=(2, 12, 10, 9), dtype=data.dtype)
    z[...] = data
    options = dict(size=(8, 8, 6), stride=(4, 4, 3), border="pad", pad_mode="edge", blend="hann",
                   batch_size=3, channel_axis=0, out_channels=3, dtype="float64",
                   block_shape=(8, 8, 6))
    expected = _reference(src, on_path.three_channels, tmp_path / "ref.zarr", **options)
    argv = ["apply", src, str(tmp_path / "grp.zarr"), "--dst-path", "pred/a", "--model",
            "cli_models:three_channels", "--size", "8,8,6", "--stride", "4,4,3", "--border",
            "pad", "--pad-mode", "edge", "--blend", "hann", "--batch-size", "3",
            "--channel-axis", "0", "--out-channels", "3", "--dtype", "float64", "--block-shape",
            "8,8,6", "--scheduler", "sync", "--progress", "--compressor", "blosc-lz4"]
    assert main(argv) == 0
    out = zarr.open_array(str(tmp_path / "grp.zarr"), path="pred/a", mode="r")
    assert out.dtype == np.float64 and out.chunks == (3, 8, 8, 6)
    assert [c.to_dict()["configuration"]["cname"] for c in out.compressors] == ["lz4"]
    np.testing.assert_array_equal(out[...], expected)
    assert "100% Completed" in capsys.readouterr().out  # dask's progress bar


@pytest.mark.parametrize("spec, fn", [
    ("cli_models:make_affine", "affine"),  # a factory: called once
    ("cli_models:Scaled", None),  # a class: instantiated
])
def test_apply_factories_and_classes(tmp_path, src, on_path, spec, fn):
    model = on_path.affine if fn else on_path.Scaled()
    expected = _reference(src, model, tmp_path / "ref.zarr")
    assert main(["apply", src, str(tmp_path / "o.zarr"), "--model", spec, "--size", str(SIZE),
                 "--stride", str(STRIDE)]) == 0
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "o.zarr"))[...], expected)


@pytest.mark.processes
@pytest.mark.cluster
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore:.*:UserWarning:distributed")
def test_apply_on_a_local_cluster_address(models, src, tmp_path, on_path):
    distributed = pytest.importorskip("distributed")
    expected = _reference(src, on_path.affine, tmp_path / "ref.zarr")
    with distributed.LocalCluster(n_workers=1, processes=False, threads_per_worker=2,
                                  protocol="tcp", dashboard_address=":0",
                                  silence_logs=50) as cluster:
        on_path.CALLS[0] = 0
        done = _cli(models, "apply", src, str(tmp_path / "out.zarr"), "--model",
                    "cli_models:affine", "--size", str(SIZE), "--stride", str(STRIDE),
                    "--scheduler", cluster.scheduler_address)
    assert done.returncode == 0, done.stderr
    # the patches went through the model in this process: on the cluster's in-process worker
    assert on_path.CALLS[0] == len(dp.PatchGrid(SHAPE, SIZE, STRIDE))
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "out.zarr"))[...], expected)


@pytest.mark.processes
def test_resume_after_a_killed_run_is_bit_identical(models, tmp_path, on_path, capsys):
    src = _volume(tmp_path / "big.zarr", shape=(64, 64, 64))
    dst = tmp_path / "out.zarr"
    argv = ["apply", src, str(dst), "--model", "cli_models:affine", "--size", "16", "--stride",
            "8", "--block-shape", "16", "--workers", "2"]
    # its last model call never returns (batch size 1: one call per patch), so the run cannot
    # finish; the chunks the other blocks complete are written and marked meanwhile
    last = str(len(dp.PatchGrid((64, 64, 64), 16, 8)))
    proc = _cli(models, *argv, env={"DASKPATCH_TEST_HANG_AT": last}, wait=False)
    markers = dst / ".daskpatch-done" / "chunks"
    deadline = time.monotonic() + 300  # a guard against a hung child, not a timing check
    try:
        while proc.poll() is None and not (markers.is_dir() and len(os.listdir(markers)) >= 3) \
                and time.monotonic() < deadline:
            time.sleep(0.01)
        # a second writer while the first runs is refused, whatever it asks, writing nothing
        before = [(dst / name).read_bytes() for name in ("zarr.json", ".daskpatch-lease")]
        for flag in ("--overwrite", "--resume"):
            assert main([*argv, flag]) == 2
            err = capsys.readouterr().err
            assert "another writer is writing" in err and f"process {proc.pid} on" in err
        assert [(dst / name).read_bytes() for name in ("zarr.json", ".daskpatch-lease")] == before
    finally:
        proc.send_signal(signal.SIGKILL)
        _, stderr = proc.communicate()
    assert main(["info", str(dst), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["status"] == "incomplete", (status, stderr)  # killed mid-run, not after it
    assert 3 <= status["chunks_done"] < status["chunks_total"] == 64

    assert main(argv) == 2  # an existing output needs --resume or --overwrite
    assert "--resume" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 0
    assert "chunks already done" in capsys.readouterr().err
    expected = _reference(src, on_path.affine, tmp_path / "ref.zarr", size=16, stride=8,
                          block_shape=16)
    np.testing.assert_array_equal(zarr.open_array(str(dst))[...], expected)
    assert main(["info", str(dst), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "complete"


def test_a_failing_model_exits_1_with_one_line(tmp_path, src, on_path, capsys):
    dst = tmp_path / "o.zarr"
    assert main(["apply", src, str(dst), "--model", "cli_models:boom", "--size", "16"]) == 1
    err = capsys.readouterr().err
    _assert_one_error_line(err)
    assert "ZeroDivisionError: this model always fails" in err and "--resume" in err


# -- torch ---------------------------------------------------------------------------------------
def _conv_reference(src: str, out: Path) -> np.ndarray:
    import torch
    from cli_torch_models import make_conv

    conv = make_conv()

    def manual(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return conv(torch.from_numpy(batch)[:, None]).numpy()[:, 0]

    return _reference(src, manual, out, batch_size=4)


@pytest.mark.processes
@pytest.mark.torch
def test_apply_a_torch_module(models, src, tmp_path, on_path):
    pytest.importorskip("torch")
    expected = _conv_reference(src, tmp_path / "ref.zarr")
    done = _cli(models, "apply", src, str(tmp_path / "out.zarr"), "--model",
                "cli_torch_models:conv", "--size", str(SIZE), "--stride", str(STRIDE),
                "--batch-size", "4", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "out.zarr"))[...], expected)


@pytest.mark.torch
def test_apply_torchscript_and_torch_export_files(src, tmp_path, on_path):
    torch = pytest.importorskip("torch")
    from cli_torch_models import make_conv

    expected = _conv_reference(src, tmp_path / "ref.zarr")
    example = torch.zeros((2, 1, SIZE, SIZE, SIZE))
    with warnings.catch_warnings():  # torch.jit is deprecated in torch 2.13, still in use
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.trace(make_conv(), example).save(str(tmp_path / "conv.pt"))
    batch = torch.export.Dim("batch")
    program = torch.export.export(make_conv(), (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(tmp_path / "conv.pt2"))
    for spec in ("conv.pt", "conv.pt2", "cli_torch_models:Net"):
        dst = tmp_path / f"{spec}.zarr"
        assert main(["apply", src, str(dst), "--model", str(tmp_path / spec) if "." in spec
                     and ":" not in spec else spec, "--size", str(SIZE), "--stride",
                     str(STRIDE), "--batch-size", "4"]) == 0, spec
        np.testing.assert_allclose(zarr.open_array(str(dst))[...], expected, rtol=0,
                                   atol=1e-6, err_msg=spec)


# -- bad inputs ----------------------------------------------------------------------------------
BAD = {
    "unknown module": (["--model", "no_such_module:fn", "--size", "16"], "no module named"),
    "size 0": (["--model", "cli_models:affine", "--size", "0"], "argument --size"),
    "missing store": (["--model", "cli_models:affine", "--size", "16"], "no Zarr array"),
    "existing output": (["--model", "cli_models:affine", "--size", "16"], "already exists"),
}


@pytest.mark.processes
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gives_one_line_and_writes_nothing(models, src, tmp_path, case):
    args, match = BAD[case]
    dst = tmp_path / "out.zarr"
    if case == "missing store":
        src = str(tmp_path / "missing.zarr")
    if case == "existing output":
        dp.to_zarr(np.ones((4, 4), np.float32), str(dst))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    done = _cli(models, "apply", src, str(dst), *args)
    assert done.returncode == 2
    _assert_one_error_line(done.stderr)
    assert match in done.stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    if case == "existing output":
        np.testing.assert_array_equal(zarr.open_array(str(dst))[...], np.ones((4, 4)))


@pytest.mark.parametrize("args, match", [
    (["--model", "cli_models:affine", "--size", "16", "--dtype", "float33"], "--dtype"),
    (["--model", "cli_models:affine", "--size", "16,16", "--stride", "4,4,4"], "stride"),
    (["--model", "cli_models:affine", "--size", "16", "--device", "cpu"], "torch models"),
    (["--model", "cli_models:NeedsArgs", "--size", "16"], "needs arguments"),
    (["--model", "cli_models:nothing", "--size", "16"], "has no attribute 'nothing'"),
    (["--model", "cli_models.py", "--size", "16"], "pass cli_models:NAME"),
    (["--model", "missing.pt", "--size", "16"], "no such file"),
    (["--model", "cli_models:affine", "--size", "16", "--resume", "--overwrite"],
     "not allowed with argument"),
    (["--model", "cli_models:affine", "--size", "16", "--scheduler", "gpu"], "--scheduler"),
    (["--model", "cli_models:affine"], "required: --size"),
    (["--model", "cli_models:affine", "--size", "16", "--scheduler", "tcp://127.0.0.1:1",
      "--workers", "2"], "has its own workers"),
])
def test_more_bad_inputs_in_process(tmp_path, src, on_path, capsys, args, match):
    assert main(["apply", src, str(tmp_path / "out.zarr"), *args]) == 2
    err = capsys.readouterr().err
    _assert_one_error_line(err)
    assert match in err
    assert not (tmp_path / "out.zarr").exists()


def test_writing_over_the_source_is_refused_before_anything_is_written(src, on_path, capsys):
    before = zarr.open_array(src, mode="r")[...]
    assert main(["apply", src, src, "--model", "cli_models:affine", "--size", "16",
                 "--overwrite"]) == 2
    err = capsys.readouterr().err
    _assert_one_error_line(err)
    assert "must differ from SRC" in err
    np.testing.assert_array_equal(zarr.open_array(src, mode="r")[...], before)
    assert on_path.CALLS[0] == 0


def test_debug_adds_the_traceback(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing.zarr"), "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("daskpatch: error:")


# -- rechunk -------------------------------------------------------------------------------------
def test_rechunk_to_the_stride(tmp_path, capsys):
    raw = _volume(tmp_path / "raw.zarr", chunks=(15, 15, 15))
    dst = str(tmp_path / "aligned.zarr")
    assert main(["rechunk", raw, dst, "--stride", "8", "--target-bytes", "64kB",
                 "--compressor", "none"]) == 0
    out = zarr.open_array(dst, mode="r")
    assert out.compressors == ()
    assert dp.is_stride_aligned(out.chunks, 8, shape=out.shape)
    assert np.prod(out.chunks) * 4 <= 64_000
    np.testing.assert_array_equal(out[...], zarr.open_array(raw, mode="r")[...])
    assert "rechunked" in capsys.readouterr().err
    assert main(["rechunk", raw, dst, "--stride", "8"]) == 2  # exists
    _assert_one_error_line(capsys.readouterr().err)
    # already aligned: nothing written, the target untouched
    assert main(["rechunk", dst, str(tmp_path / "unused.zarr"), "--stride", "8"]) == 0
    assert "nothing written" in capsys.readouterr().err
    assert not (tmp_path / "unused.zarr").exists()


@pytest.mark.processes
@pytest.mark.slow
def test_apply_with_the_processes_scheduler(models, src, tmp_path, on_path):
    expected = _reference(src, on_path.affine, tmp_path / "ref.zarr")
    done = _cli(models, "apply", src, str(tmp_path / "out.zarr"), "--model",
                "cli_models:affine", "--size", str(SIZE), "--stride", str(STRIDE),
                "--scheduler", "processes", "--workers", "2")
    assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "out.zarr"))[...], expected)


# -- the estimate of crop, errors in flags, rechunk into its source ----------------------------
def test_info_names_an_interrupted_pyramid_incomplete(tmp_path, capsys):
    target = tmp_path / "img.zarr"
    dp.to_zarr(np.ones((16, 32, 32), np.float32), target, ome=True, levels=2, chunks=8)
    g = zarr.open_group(str(target), mode="r+")
    attrs = dict(g.attrs)
    attrs.pop("ome")  # as the write leaves it before its last step
    attrs["daskpatch"] = {**attrs["daskpatch"], "complete": False}
    g.attrs.put(attrs)
    assert main(["info", str(target), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["node"] == "incomplete ome-zarr image" and r["write"]["complete"] is False
    assert main(["info", str(target)]) == 0
    assert "INCOMPLETE: an OME-Zarr image of 2 levels" in capsys.readouterr().out


def test_info_estimates_crop_in_the_result_dtype(tmp_path, capsys):
    src = _volume(tmp_path / "v.zarr")
    assert main(["info", src, "--size", "16", "--stride", "8", "--blend", "crop", "--dtype",
                 "float16", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    result = dp.apply_patches(dp.open_volume(src), lambda b: b, 16, 8, blend="crop",
                              dtype="float16")
    assert plan["block_shape"] == [c[0] for c in result.chunks]
    ext = np.prod([min(b + 16 - 8, n) for b, n in zip(plan["block_shape"], SHAPE)])
    assert plan["memory_per_thread"]["buffer"] == ext * 2  # crop copies into float16
    assert main(["info", src, "--size", "16", "--stride", "8", "--dtype", "float16",
                 "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    ext = np.prod([min(b + 16 - 8, n) for b, n in zip(plan["block_shape"], SHAPE)])
    assert plan["memory_per_thread"]["buffer"] == ext * 4  # gaussian adds in float32


def test_library_errors_name_the_flags(tmp_path, src, on_path, capsys):
    argv = ["apply", src, str(tmp_path / "o.zarr"), "--model", "cli_models:affine", "--size",
            "16", "--stride", "20", "--border", "drop", "--dtype", "uint8"]
    assert main([*argv, "--fill-value", "300"]) == 2
    err = capsys.readouterr().err
    _assert_one_error_line(err)
    assert "--fill-value=300.0 does not fit the result dtype uint8" in err
    assert "fill_value" not in err
    assert main(argv) == 2  # uncovered voxels
    err = capsys.readouterr().err
    assert "pass --fill-value=..." in err and "fill_value" not in err
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    group.create_array("a", shape=(8, 8), dtype="f4")
    for command, flag in (("apply", "--src-path"), ("rechunk", "--path")):
        args = ["--model", "cli_models:affine", "--size", "4"] if command == "apply" else \
            ["--stride", "4"]
        assert main([command, str(tmp_path / "g.zarr"), str(tmp_path / "o.zarr"), *args]) == 2
        err = capsys.readouterr().err
        _assert_one_error_line(err)
        assert f"pass {flag} one of ['a']" in err and "path=" not in err
    assert not (tmp_path / "o.zarr").exists()


@pytest.mark.parametrize("target", ["same", "inside"])
def test_rechunk_into_its_own_source_is_bad_input(tmp_path, capsys, target):
    raw = _volume(tmp_path / "raw.zarr", chunks=(15, 15, 15))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    dst = raw if target == "same" else os.path.join(raw, "x")
    assert main(["rechunk", raw, dst, "--stride", "8", "--overwrite"]) == 2
    err = capsys.readouterr().err
    _assert_one_error_line(err)
    assert "DST must differ from SRC" in err and "the run failed" not in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@pytest.mark.needs_dask("group writes merge HighLevelGraph layers")
def test_apply_tta_and_uncertainty_write_mean_and_std(src, tmp_path, on_path, capsys):
    dst = str(tmp_path / "out.zarr")
    args = ["apply", src, dst, "--model", "cli_models:affine", "--size", str(SIZE),
            "--stride", str(STRIDE), "--batch-size", "4", "--tta", "flip", "--uncertainty"]
    assert main(args) == 0
    assert "mean and std" in capsys.readouterr().out
    grid = dp.PatchGrid(SHAPE, SIZE, STRIDE)
    batches = sum(-(-n // 4) for n in [len(grid)])  # an upper bound: blocks cut batches
    assert on_path.CALLS[0] >= 8 * batches  # eight flips of three axes per batch
    mean, std = dp.apply_patches(dp.open_volume(src), on_path.affine, SIZE, STRIDE,
                                 batch_size=4, tta="flip", uncertainty=True)
    np.testing.assert_allclose(zarr.open_array(dst, path="mean")[:], mean.compute(), rtol=1e-6)
    np.testing.assert_allclose(zarr.open_array(dst, path="std")[:], std.compute(), atol=1e-6)
    assert main(args) == 2  # exists
    assert main([*args, "--resume"]) == 0  # complete: nothing to do


def test_uncertainty_exit_status_before_and_after_the_group_exists(tmp_path, src, on_path,
                                                                    capsys):
    """`--uncertainty` writes a group: a model failing once it exists exits 1 (resume), a
    group in the way exits 2 (nothing written) -- as a single array's write does."""
    dst = str(tmp_path / "o.zarr")
    args = ["apply", src, dst, "--size", "16", "--uncertainty"]
    assert main([*args, "--model", "cli_models:boom"]) == 1
    assert "--resume" in capsys.readouterr().err
    assert main([*args, "--model", "cli_models:boom"]) == 2  # the group exists now
    err = capsys.readouterr().err
    _assert_one_error_line(err)
    assert "--overwrite" in err and "--resume" in err, err
