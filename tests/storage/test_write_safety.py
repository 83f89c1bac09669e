"""No lost data, no silent mix of results: to_zarr's and to_numpy's safety checks (what overwrite
deletes, what resume checks, incomplete outputs, concurrent writers, killed writers).

Subprocess tests run ``tests/_child_write.py`` (a ``to_zarr`` of an ``apply_patches`` result).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
import zarr
import zarr.storage

import daskpatch as dp

from .._child_write import build, model
from ..conftest import write_zarr

CHILD = Path(__file__).resolve().parents[1] / "_child_write.py"
V = np.random.default_rng(0).random((16, 16, 16), dtype=np.float32)


def _files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (not LocalStore's in-flight ``*.partial`` files) and its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.endswith(".partial")}


def _volume(path: Path, shape=(48, 48, 48), seed=1) -> Path:
    data = np.random.default_rng(seed).random(shape, dtype=np.float32)
    write_zarr(path, data, (16, 16, 16))
    return path


class Crash:
    """A model that fails at its ``at``-th call (a crash half way through a write)."""

    def __init__(self, at: int, fn=model) -> None:
        self.at, self.fn, self.calls = at, fn, 0

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.calls == self.at:
            raise RuntimeError("simulated crash")
        return self.fn(batch)

    def __daskpatch_fingerprint__(self) -> dict:
        """The model it runs: the crash is the machine's, not another model."""
        from daskpatch.adapters.models import model_fingerprint

        return model_fingerprint(self.fn)


def _crashed_write(target: Path, source: Path, at: int = 20, **kwargs) -> None:
    with dask.config.set(scheduler="synchronous"), pytest.raises(RuntimeError, match="simulated"):
        dp.to_zarr(build(source, fn=Crash(at), **kwargs), target)


# --------------------------------------------------------------------------------------------
# overwrite only ever replaces a Zarr array
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overwrite", [True, False])
def test_overwrite_refuses_a_directory_holding_other_files(tmp_path, overwrite):
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "keep.txt").write_text("mine")
    (d / "sub" / "notes.txt").write_text("also mine")
    (d / "empty").mkdir()
    before = _files(d)
    match = r"no Zarr array but holds 3 entries that are not part of a Zarr array \('empty/', " \
            r"'keep.txt', 'sub/notes.txt'\).*never deletes anything else"
    with pytest.raises(FileExistsError, match=match):
        dp.to_zarr(V, d, overwrite=overwrite)
    assert _files(d) == before and (d / "empty").is_dir()
    assert not (d / "zarr.json").exists()


def test_overwrite_refuses_an_array_holding_other_files(tmp_path):
    d = tmp_path / "a.zarr"
    dp.to_zarr(V, d, "pred", chunks=8)
    (d / "pred" / "README.txt").write_text("how this was made")
    before = _files(d)
    with pytest.raises(FileExistsError, match=r"is a Zarr array, which also holds 1 entry that "
                       r"is not part of a Zarr array \('README.txt'\)"):
        dp.to_zarr(V + 1, d, "pred", overwrite=True)
    assert _files(d) == before
    # a plain array (markers, chunks) is replaced; an empty directory is written into
    dp.to_zarr(V + 2, d, "other", chunks=8)
    z = dp.to_zarr(V + 3, d, "other", overwrite=True)
    np.testing.assert_array_equal(z[...], V + 3)
    (tmp_path / "empty.zarr").mkdir()
    np.testing.assert_array_equal(dp.to_zarr(V, tmp_path / "empty.zarr")[...], V)


# --------------------------------------------------------------------------------------------
# never write over a store the graph reads
# --------------------------------------------------------------------------------------------


def _f(b):
    return 2 * b


@pytest.mark.parametrize("case", [
    "open_volume-apply_patches", "zarr.Array-apply_patches", "extract_patches",
    "extract-reconstruct", "rechunk",
    pytest.param("from_zarr-inline", marks=pytest.mark.needs_dask("dask.array.from_zarr")),
    "parent-directory", "child-of-input",
    "store-object",
])
def test_refuses_to_write_over_what_the_graph_reads(tmp_path, case):
    src = tmp_path / "vol.zarr"
    z = zarr.create_array(str(src), shape=V.shape, chunks=(8, 8, 8), dtype=V.dtype)
    z[...] = V
    store, path = src, None
    if case == "open_volume-apply_patches":
        x = dp.apply_patches(dp.open_volume(src), _f, 8, 4)
    elif case == "zarr.Array-apply_patches":
        x = dp.apply_patches(zarr.open_array(str(src), mode="r"), _f, 8, 4)
    elif case == "extract_patches":
        x = dp.extract_patches(dp.open_volume(src), 8, 4)
    elif case == "extract-reconstruct":
        x = dp.reconstruct(dp.extract_patches(dp.open_volume(src), 8, 4), V.shape, 8, 4)
    elif case == "rechunk":
        x = dp.apply_patches(dp.open_volume(src), _f, 8, 4).rechunk(4) + 1
    elif case == "from_zarr-inline":
        x = da.from_zarr(str(src), inline_array=True) * 2
    elif case == "parent-directory":
        x, store = dp.apply_patches(dp.open_volume(src), _f, 8, 4), tmp_path
    elif case == "child-of-input":
        x, path = dp.apply_patches(dp.open_volume(src), _f, 8, 4), "c"
    else:
        x, store = dp.open_volume(src) + 1, zarr.storage.LocalStore(str(src))
    before = _files(tmp_path)
    with pytest.raises(ValueError, match="the input array reads from .*which this call would "
                       "write"):
        dp.to_zarr(x, store, path, overwrite=True)
    assert _files(tmp_path) == before
    np.testing.assert_array_equal(dp.open_volume(src).compute(), V)


# --------------------------------------------------------------------------------------------
# a refused overwrite deletes nothing
# --------------------------------------------------------------------------------------------


def _make_unwritable(directory: Path) -> bool:
    """Make ``directory`` refuse new and deleted entries (chattr +i as root); False if the
    platform does not let us."""
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(
                ["chattr", "+i", str(directory)], capture_output=True).returncode:
            return False
    else:
        directory.chmod(0o555)
    try:
        (directory / "probe").touch()
    except OSError:
        return True
    (directory / "probe").unlink()
    _make_writable(directory)
    return False


def _make_writable(directory: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(directory)], capture_output=True)
    else:
        directory.chmod(0o755)


def test_failed_overwrite_leaves_the_old_array_intact(tmp_path):
    target = tmp_path / "old.zarr"
    dp.to_zarr(V, target, chunks=4)
    before = _files(target)
    locked = target / "c" / "2"
    if not _make_unwritable(locked):
        pytest.skip("cannot make a directory unwritable here")
    try:
        with pytest.raises(PermissionError, match=r"cannot overwrite .*its directory 'c/2' .*is "
                           r"not writable.*nothing was deleted or written"):
            dp.to_zarr(V + 1, target, chunks=4, overwrite=True)
    finally:
        _make_writable(locked)
    assert _files(target) == before
    np.testing.assert_array_equal(dp.open_volume(target).compute(), V)


def test_an_undeletable_file_does_not_cost_the_old_array(tmp_path):
    """An overwrite sets the old array aside and deletes it only once the new one is complete:
    a file that cannot be deleted (immutable, in a writable directory) no longer destroys the
    old array half-way; the new array is written and the leftover is named in a warning."""
    target = tmp_path / "old.zarr"
    dp.to_zarr(V, target, chunks=4)
    stuck = target / "c" / "0" / "0" / "0"
    if os.geteuid() != 0 or shutil.which("chattr") is None or subprocess.run(
            ["chattr", "+i", str(stuck)], capture_output=True).returncode:
        pytest.skip("needs root and chattr to make a file undeletable")
    try:
        with pytest.warns(UserWarning, match=r"is complete, but \d+ file\(s\) of the array it "
                                             r"replaced could not be deleted"):
            dp.to_zarr(V + 1, target, chunks=4, overwrite=True)
    finally:
        subprocess.run(["chattr", "-R", "-i", str(target)], capture_output=True)
    np.testing.assert_array_equal(dp.open_volume(target).compute(), V + 1)


def test_a_failed_overwrite_puts_the_old_array_back(tmp_path):
    target = tmp_path / "old.zarr"
    dp.to_zarr(V, target, chunks=4)
    before = _files(target)

    def broken(batch):
        raise RuntimeError("the model broke")

    with pytest.raises(RuntimeError, match="the model broke"):
        dp.to_zarr(dp.apply_patches(V, broken, 8), target, chunks=4, overwrite=True)
    assert _files(target) == before  # bit for bit, and nothing set aside is left
    np.testing.assert_array_equal(dp.open_volume(target).compute(), V)


def test_a_completed_overwrite_leaves_nothing_aside(tmp_path):
    target = tmp_path / "old.zarr"
    dp.to_zarr(V, target, chunks=4)
    dp.to_zarr(V + 1, target, chunks=4, overwrite=True)
    assert not (target / ".daskpatch-replaced").exists()
    np.testing.assert_array_equal(dp.open_volume(target).compute(), V + 1)


def test_overwrite_into_a_read_only_store_is_refused(tmp_path):
    dp.to_zarr(V, tmp_path / "ro.zarr")
    before = _files(tmp_path / "ro.zarr")
    store = zarr.storage.LocalStore(str(tmp_path / "ro.zarr"), read_only=True)
    with pytest.raises(PermissionError, match="the store is read-only; nothing was deleted"):
        dp.to_zarr(V + 1, store, overwrite=True)
    assert _files(tmp_path / "ro.zarr") == before


# --------------------------------------------------------------------------------------------
# to_numpy's out must not be the input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["same", "view", "extract-reconstruct"])
def test_to_numpy_refuses_out_sharing_memory_with_the_input(how):
    X = np.random.default_rng(1).random((64, 64), dtype=np.float32)
    before = X.copy()
    if how == "extract-reconstruct":
        x, expected = dp.reconstruct(dp.extract_patches(X, 8, 4), X.shape, 8, 4), before
    else:
        x, expected = dp.apply_patches(X, _f, 8, 4), 2 * before
    out = X if how != "view" else X.reshape(X.shape)
    with pytest.raises(ValueError, match=r"out shares memory with a NumPy array the computation "
                       r"reads \(shape \(64, 64\), dtype float32\)"):
        dp.to_numpy(x, out=out)
    np.testing.assert_array_equal(X, before)
    np.testing.assert_allclose(dp.to_numpy(x, out=np.empty_like(X)), expected, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# resume checks a fingerprint of the parameters
# --------------------------------------------------------------------------------------------


@pytest.fixture
def source(tmp_path):
    return _volume(tmp_path / "in.zarr")


def test_fingerprint_is_stored_in_the_attributes(tmp_path, source):
    z = dp.to_zarr(build(source), tmp_path / "o.zarr", run_id="unet-v1")
    fp = z.attrs["daskpatch"]["fingerprint"]
    (engine,) = fp["engines"]
    assert fp["shape"] == [48, 48, 48] and fp["dtype"] == "float32" and fp["run_id"] == "unet-v1"
    assert engine["kind"] == "apply_patches" and engine["stride"] == [8, 8, 8]
    assert engine["blend"] == "gaussian" and engine["batch_size"] == 4
    (only,) = fp["inputs"]  # where, and a hash of its metadata (cheap evidence of a swap)
    assert only.startswith(f"zarr file://{os.path.realpath(source)} metadata sha256:")
    assert fp["operations"] == []  # nothing of the user's on top of the engine
    json.dumps(fp, allow_nan=False)  # plain JSON
    y = dp.to_zarr(dp.apply_patches(V, _f, 8, 4, fill_value=np.nan), tmp_path / "n.zarr")
    fp = y.attrs["daskpatch"]["fingerprint"]
    assert fp["engines"][0]["fill_value"] == "nan"
    assert fp["inputs"] == ["numpy (content not fingerprinted) shape (16, 16, 16) dtype float32"]


W1 = np.ones((16, 16, 16), dtype=np.float32)
W2 = np.outer(np.hanning(18)[1:-1], np.ones(256)).reshape(16, 16, 16) + 0.1


@pytest.mark.parametrize("first, then, match", [
    ({}, {"stride": 4}, r"stride=\(8, 8, 8\), but this call has stride=\(4, 4, 4\)"),
    ({}, {"size": 8}, r"size=\(16, 16, 16\), but this call has size=\(8, 8, 8\)"),
    ({}, {"blend": "hann"}, r"blend='gaussian', but this call has blend='hann'"),
    ({"blend": W1}, {"blend": W2}, r"window='sha256:\w+', but this call has window='sha256:"),
    ({}, {"sigma_scale": 0.25}, r"sigma_scale=0.125, but this call has sigma_scale=0.25"),
    ({}, {"border": "pad"}, r"border='shift', but this call has border='pad'"),
    ({"border": "pad"}, {"border": "pad", "pad_mode": "edge"},
     r"pad_mode='reflect', but this call has pad_mode='edge'"),
    ({}, {"batch_size": 2}, r"batch_size=4, but this call has batch_size=2"),
    ({}, {"run_id": "v2"}, r"run_id=None, but this call has run_id='v2'"),
    ({}, {"input": "copy.zarr"}, r"input=\('zarr file://.*/in.zarr metadata sha256:\w+',\), "
                                 r"but this call has input=\('zarr file://.*/copy.zarr metadata"),
])
def test_resume_with_other_parameters_is_refused(tmp_path, source, first, then, match):
    target = tmp_path / "o.zarr"

    def write(params, fn, **kwargs):
        params = dict(params)
        run_id = params.pop("run_id", None)
        src = tmp_path / params.pop("input") if "input" in params else source
        if src != source:
            shutil.copytree(source, src)
        args = dict(size=16, stride=8, block_shape=16, batch_size=4) | params
        size, stride = args.pop("size"), args.pop("stride")
        x = dp.apply_patches(dp.open_volume(src), fn, size, stride, **args)
        return dp.to_zarr(x, target, run_id=run_id, **kwargs)

    with dask.config.set(scheduler="synchronous"), pytest.raises(RuntimeError, match="simul"):
        write(first, Crash(20))
    before = _files(target)
    with pytest.raises(ValueError, match="resume=True: the root of store .* was written with "
                       + match + r".*first parameter that differs.*overwrite=True"):
        write(then, model, resume=True)
    assert _files(target) == before
    write(first, model, resume=True)  # the same parameters finish it


def test_resume_of_a_complete_array_with_other_parameters_is_refused(tmp_path, source):
    target = tmp_path / "o.zarr"
    dp.to_zarr(build(source), target)
    with pytest.raises(ValueError, match=r"was written with blend='gaussian', but this call has "
                       r"blend='triangular'"):
        dp.to_zarr(build(source, blend="triangular"), target, resume=True)
    recon = dp.reconstruct(dp.extract_patches(dp.open_volume(source), 16, 8), (48, 48, 48), 16, 8,
                           blend="hann", block_shape=16)
    dp.to_zarr(recon, tmp_path / "r.zarr", run_id="a")
    with pytest.raises(ValueError, match=r"with run_id='a', but this call has run_id='b'"):
        dp.to_zarr(recon, tmp_path / "r.zarr", resume=True, run_id="b")
    with pytest.raises(ValueError, match=r"with pipeline=\('reconstruct',\), but this call has "
                       r"pipeline=\('apply_patches',\)"):
        dp.to_zarr(build(source), tmp_path / "r.zarr", resume=True, run_id="a")
    # an array with no fingerprint (not written by to_zarr) is not resumed
    zarr.create_array(str(tmp_path / "foreign.zarr"), shape=(48,) * 3, chunks=(16,) * 3,
                      dtype="float32")
    with pytest.raises(ValueError, match=r"has no such record .*overwrite=True"):
        dp.to_zarr(build(source), tmp_path / "foreign.zarr", resume=True)
    with pytest.raises(TypeError, match="run_id must be None or a string.*got 3 of type int"):
        dp.to_zarr(build(source), tmp_path / "x.zarr", run_id=3)


# --------------------------------------------------------------------------------------------
# an incomplete output says so when opened; unreadable metadata names its file
# --------------------------------------------------------------------------------------------


def test_open_volume_warns_on_an_incomplete_output(tmp_path, source):
    target = tmp_path / "o.zarr"
    _crashed_write(target, source)
    with pytest.warns(dp.IncompleteWarning, match=r"o.zarr' is an incomplete daskpatch output: "
                      r"\d+ of 27 chunks were written.*resume=True"):
        vol = dp.open_volume(target)
    assert vol.shape == (48, 48, 48)
    dp.to_zarr(build(source), target, resume=True)
    expected = dp.to_zarr(build(source), tmp_path / "clean.zarr")[...]
    np.testing.assert_array_equal(dp.open_volume(target).compute(), expected)  # no warning now
    job = dp.to_zarr(build(source), tmp_path / "later.zarr", compute=False)
    with pytest.warns(dp.IncompleteWarning, match=r"0 of 27 chunks"):
        dp.open_volume(tmp_path / "later.zarr")
    job.compute()
    dp.open_volume(tmp_path / "later.zarr")
    assert issubclass(dp.IncompleteWarning, UserWarning)


def test_corrupt_metadata_names_the_file(tmp_path):
    dp.to_zarr(V, tmp_path / "c.zarr", "pred")
    meta = tmp_path / "c.zarr" / "pred" / "zarr.json"
    meta.write_text('{"zarr_format": 3, "node_type": "arr')
    before = _files(tmp_path / "c.zarr")
    match = r"cannot open path 'pred' of store .*: its metadata file .*c.zarr/pred/zarr.json " \
            r"is not valid JSON"
    with pytest.raises(ValueError, match=match):
        dp.open_volume(tmp_path / "c.zarr", "pred")
    with pytest.raises(ValueError, match=match):
        dp.to_zarr(V, tmp_path / "c.zarr", "pred", overwrite=True)
    assert _files(tmp_path / "c.zarr") == before


# --------------------------------------------------------------------------------------------
# two writers of one array with other parameters
# --------------------------------------------------------------------------------------------


def _child(*args: str, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(dp.__file__).parent.parent)] + os.environ.get("PYTHONPATH", "").split(
            os.pathsep)))
    return subprocess.Popen([sys.executable, str(CHILD), *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def _wait_for(path: Path, proc: subprocess.Popen) -> None:
    for _ in range(6000):  # a generous bound, not a timed assertion
        if path.exists() or proc.poll() is not None:
            return
        time.sleep(0.01)


@pytest.mark.processes
def test_a_concurrent_resume_with_other_parameters_is_refused(tmp_path, source):
    target, ready, hold = tmp_path / "o.zarr", tmp_path / "ready", tmp_path / "go"
    first = _child(str(source), str(target), "--resume", "--ready", str(ready),
                   "--hold", str(hold))
    try:
        _wait_for(ready, first)
        assert ready.exists(), first.communicate()
        second = _child(str(source), str(target), "--resume", "--stride", "4")
        out, err = second.communicate(timeout=120)
        assert second.returncode == 3, (out, err)
        assert "REFUSED: resume=True: the root of store" in out
        assert "stride=(8, 8, 8), but this call has stride=(4, 4, 4)" in out
    finally:
        hold.touch()
        out, err = first.communicate(timeout=120)
    assert first.returncode == 0 and out.startswith("DONE"), (out, err)
    expected = dp.to_zarr(build(source), tmp_path / "clean.zarr")
    np.testing.assert_array_equal(dp.open_volume(target).compute(), expected[...])


def test_a_second_writer_is_refused_while_the_first_holds_the_lease(tmp_path, source):
    from daskpatch.errors import WriterConflictError

    target = tmp_path / "o.zarr"
    first = dp.to_zarr(build(source), target, compute=False)  # created, holds the lease
    before = _files(target)
    for blend, kwargs in (("hann", {"overwrite": True}), ("gaussian", {"resume": True})):
        with pytest.raises(WriterConflictError, match=r"another writer is writing .* \(process "
                           rf"{os.getpid()} on .*\); run one writer at a time") as info:
            dp.to_zarr(build(source, blend=blend), target, **kwargs)
        assert isinstance(info.value, ValueError) and str(os.getpid()) in info.value.holder
    assert _files(target) == before  # the second writer wrote nothing
    first.compute()  # the first finishes, and gives its lease up
    assert not (target / ".daskpatch-lease").exists()
    dp.to_zarr(build(source, blend="hann"), target, overwrite=True)


def test_a_writer_whose_lease_was_taken_over_stops(tmp_path, source):
    from daskpatch.errors import WriterConflictError

    target = tmp_path / "o.zarr"
    stale = dp.to_zarr(build(source), target, compute=False)
    # another writer took the lease over (as it may once this one's lease expired)
    (target / ".daskpatch-lease").write_text(json.dumps(
        {"token": "theirs", "host": "elsewhere", "pid": 1, "since": 0, "expires": 4e9}))
    with pytest.raises(WriterConflictError, match=r"was taken over by another writer \(process "
                       r"1 on 'elsewhere'.*does not record its chunk"):
        stale.compute(scheduler="sync")
    assert not list((target / ".daskpatch-done").glob("chunks/*"))  # no chunk recorded done
    with pytest.warns(dp.IncompleteWarning):
        dp.open_volume(target)


def test_a_lease_of_a_process_that_ended_is_taken_over(tmp_path, source):
    target = tmp_path / "o.zarr"
    _crashed_write(target, source)
    (target / ".daskpatch-lease").write_text(json.dumps(  # as a killed writer leaves it
        {"token": "dead", "host": socket.gethostname(), "pid": _ended_pid(), "since": 0,
         "expires": 4e9}))
    z = dp.to_zarr(build(source), target, resume=True)
    np.testing.assert_array_equal(z[...], dp.to_zarr(build(source), tmp_path / "c.zarr")[...])


def _ended_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


# --------------------------------------------------------------------------------------------
# every spilled part is deleted on completion
# --------------------------------------------------------------------------------------------


def _scaled_by_3(batch):
    return 3 * batch


def test_resume_with_another_model_is_refused(tmp_path, source):
    target = tmp_path / "o.zarr"
    _crashed_write(target, source)
    before = _files(target)
    with pytest.raises(ValueError, match=r"was written with model=\{by: 'qualified name and "
                       r"code', name: 'tests._child_write.model'.* but this call has model=.*"
                       r"_scaled_by_3.*a model is fingerprinted by"):
        dp.to_zarr(build(source, fn=_scaled_by_3), target, resume=True)
    assert _files(target) == before
    z = dp.to_zarr(build(source), target, resume=True)  # the same model finishes it
    fp = z.attrs["daskpatch"]["fingerprint"]["engines"][0]["model"]
    assert fp["by"] == "qualified name and code" and fp["name"] == "tests._child_write.model"


@pytest.mark.needs_dask("array expressions: the user's operations by name only")
def test_resume_with_other_operations_under_the_engine_is_refused(tmp_path, source):
    """``apply_patches(vol * 2, ...)`` resumed as ``apply_patches(vol * 3, ...)`` mixed two
    results; the user's own operations are in the fingerprint now."""
    target = tmp_path / "o.zarr"
    vol = dp.open_volume(source)
    with dask.config.set(scheduler="synchronous"), pytest.raises(RuntimeError, match="simul"):
        dp.to_zarr(dp.apply_patches(vol * 2, Crash(20), 16, 8, block_shape=16, batch_size=4),
                   target)
    before = _files(target)
    with pytest.raises(ValueError, match=r"was written with operations=\('mul-\w+',\), but "
                                         r"this call has operations=\('mul-\w+',\)"):
        dp.to_zarr(dp.apply_patches(vol * 3, model, 16, 8, block_shape=16, batch_size=4),
                   target, resume=True)
    assert _files(target) == before
    z = dp.to_zarr(dp.apply_patches(vol * 2, model, 16, 8, block_shape=16, batch_size=4),
                   target, resume=True)  # the same operations, in this process or another
    expected = dp.apply_patches(vol * 2, model, 16, 8, block_shape=16, batch_size=4).compute()
    np.testing.assert_array_equal(z[...], expected)


def test_a_model_that_cannot_be_fingerprinted_is_recorded_as_such(tmp_path):
    class Opaque:
        def __call__(self, batch):
            return batch

    z = dp.to_zarr(dp.apply_patches(V, Opaque(), 8), tmp_path / "o.zarr")
    model_fp = z.attrs["daskpatch"]["fingerprint"]["engines"][0]["model"]
    assert model_fp["by"].startswith("nothing: pass run_id=") and model_fp["type"].endswith(
        "Opaque")


def test_a_torch_model_is_fingerprinted_by_its_parameters(tmp_path):
    torch = pytest.importorskip("torch")
    vol = np.random.default_rng(2).random((1, 16, 16, 16), dtype=np.float32)

    def net(seed):
        torch.manual_seed(seed)
        return torch.nn.Conv3d(1, 1, 3, padding=1)

    def write(module, **kw):
        return dp.to_zarr(dp.apply_patches(vol, module, 8, 4, channel_axis=0),
                          tmp_path / "o.zarr", **kw)

    write(net(0))
    write(net(0), resume=True)  # another object with the same weights: the same model
    with pytest.raises(ValueError, match=r"model=\{by: 'module class and parameters'.*"
                                         r"parameters: '\w+'.*the first parameter that differs"):
        write(net(1), resume=True)


def test_resume_with_another_graph_name_leaves_no_spilled_parts(tmp_path, source, setting):
    setting("daskpatch.spill-bytes", 0)  # spill into the output store
    target = tmp_path / "o.zarr"
    _crashed_write(target, source)  # its graph's name comes from the crashing model
    spill = target / ".daskpatch-spill"
    assert [p for p in spill.rglob("*") if p.is_file()]
    again = build(source, fn=Crash(10**9))  # the same model, another graph name
    z = dp.to_zarr(again, target, resume=True)
    assert not [p for p in spill.rglob("*") if p.is_file()]
    np.testing.assert_array_equal(z[...], dp.to_zarr(build(source), tmp_path / "c.zarr")[...])


# --------------------------------------------------------------------------------------------
# fault injection: SIGKILL a writer at random points, resume, compare bit for bit
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault")
    source = _volume(root / "in.zarr")
    proc = _child(str(source), str(root / "clean.zarr"), "--spill-bytes", "0")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, (out, err)
    return source, root / "clean.zarr", int(out.split()[1])


def _kill_and_resume(tmp_path, uninterrupted, seed):
    source, clean, n_calls = uninterrupted
    rng = np.random.default_rng(seed)
    target = tmp_path / "o.zarr"
    kills = 1 + seed % 2  # odd seeds: killed again while resuming
    for _ in range(kills):
        at = int(rng.integers(1, n_calls))
        proc = _child(str(source), str(target), "--resume", "--spill-bytes", "0",
                      "--kill-at", str(at), "--threads", str(int(rng.integers(1, 5))))
        out, err = proc.communicate(timeout=300)
        assert proc.returncode in (-signal.SIGKILL, 0), (out, err)
    proc = _child(str(source), str(target), "--resume", "--spill-bytes", "0")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, (out, err)
    assert _files(target / "c") == _files(clean / "c")  # chunk for chunk, bit for bit
    assert json.loads((target / "zarr.json").read_text()) == json.loads(
        (clean / "zarr.json").read_text())
    assert (target / ".daskpatch-done" / "complete").exists()
    assert not (target / ".daskpatch-done" / "chunks").exists()
    assert not [p for p in (target / ".daskpatch-spill").rglob("*") if p.is_file()]


@pytest.mark.processes
@pytest.mark.parametrize("seed", range(5))
def test_killed_writes_resume_bit_for_bit(tmp_path, uninterrupted, seed):
    _kill_and_resume(tmp_path, uninterrupted, seed)


@pytest.mark.processes
@pytest.mark.slow
@pytest.mark.parametrize("seed", range(5, 25))
def test_killed_writes_resume_bit_for_bit_more_seeds(tmp_path, uninterrupted, seed):
    _kill_and_resume(tmp_path, uninterrupted, seed)


def test_a_write_the_cluster_lost_says_how_to_resume(tmp_path, source):
    """What dask.distributed raises when a job's scheduler goes away (a CancelledError) gets a
    note saying how to finish the write; the chunks written are kept."""
    import concurrent.futures

    class Lost:
        def __init__(self) -> None:
            self.calls = 0

        def __call__(self, batch: np.ndarray) -> np.ndarray:
            self.calls += 1
            if self.calls == 20:
                raise concurrent.futures.CancelledError("the scheduler is gone")
            return model(batch)

        def __daskpatch_fingerprint__(self) -> dict:
            from daskpatch.adapters.models import model_fingerprint

            return model_fingerprint(model)

    target = tmp_path / "o.zarr"
    with dask.config.set(scheduler="synchronous"), pytest.raises(
            concurrent.futures.CancelledError) as info:
        dp.to_zarr(build(source, fn=Lost()), target)
    assert any("resume=True" in n and "chunks already written are kept" in n
               for n in info.value.__notes__)
    z = dp.to_zarr(build(source), target, resume=True)
    np.testing.assert_array_equal(z[...], dp.to_zarr(build(source), tmp_path / "c.zarr")[...])


# --------------------------------------------------------------------------------------------
# work already done is not done again: a resume reuses spilled halos; waves run blocks once
# --------------------------------------------------------------------------------------------


class Counting:
    """:func:`model`, counting the patches it ran."""

    def __init__(self) -> None:
        self.patches = 0

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.patches += batch.shape[0]
        return model(batch)

    def __daskpatch_fingerprint__(self) -> dict:
        from daskpatch.adapters.models import model_fingerprint

        return model_fingerprint(model)


def _block_patches(x) -> dict[tuple[int, ...], int]:
    """Patches each work block of ``x``'s engine owns, by block index."""
    import itertools
    import math

    from daskpatch.graph.engine import find_engines

    (engine,) = find_engines(x).values()
    counts = engine.block_patches()
    return {b: math.prod(c[i] for c, i in zip(counts, b))
            for b in itertools.product(*[range(len(c)) for c in counts])}


@pytest.mark.parametrize("at", [6, 20, 30])
@pytest.mark.needs_dask("chunk tasks writing their chunk (the written path)")
def test_a_resume_runs_only_the_blocks_of_the_missing_chunks(tmp_path, source, setting, at):
    """With the halos spilled, a resumed write runs the model on the blocks whose own chunk
    is missing, and no other: the other blocks' parts for the missing chunks wait in the
    spill store (a part is deleted only once its chunk is written)."""
    from daskpatch.storage import markers

    setting("daskpatch.spill-bytes", 0)
    target = tmp_path / "o.zarr"
    _crashed_write(target, source, at=at)
    z = zarr.open_array(target, mode="r")
    done = markers.done_chunks(z, markers.numblocks(z))
    assert done and len(done) < 27  # crashed half way
    counted = Counting()
    x = build(source, fn=counted)
    expected = sum(n for b, n in _block_patches(x).items() if b not in done)
    z = dp.to_zarr(x, target, resume=True)
    assert counted.patches == expected
    np.testing.assert_array_equal(z[...], dp.to_zarr(build(source), tmp_path / "c.zarr")[...])
    assert not [p for p in (target / ".daskpatch-spill").rglob("*") if p.is_file()]


def test_a_resume_without_spilled_halos_runs_the_missing_blocks_and_their_neighbours(
        tmp_path, source):
    """Halos held in memory die with the crashed process: a resume runs the blocks of the
    missing chunks and the blocks whose patches reach them (and only those)."""
    from daskpatch.storage import markers

    target = tmp_path / "o.zarr"
    _crashed_write(target, source, at=25)
    z = zarr.open_array(target, mode="r")
    done = markers.done_chunks(z, markers.numblocks(z))
    counted = Counting()
    x = build(source, fn=counted)
    patches = _block_patches(x)
    # a block's patches (16 wide, stride 8, blocks of 16) reach its own chunk and the next one
    reach = {b for b in patches for d in np.ndindex(2, 2, 2)
             if tuple(min(i + s, 2) for i, s in zip(b, d)) not in done}
    z = dp.to_zarr(x, target, resume=True)
    assert counted.patches == sum(patches[b] for b in reach)
    np.testing.assert_array_equal(z[...], dp.to_zarr(build(source), tmp_path / "c.zarr")[...])


@pytest.mark.parametrize("wave", [1, 5, 26])
@pytest.mark.needs_dask("chunk tasks writing their chunk (the written path)")
def test_a_write_in_waves_runs_each_block_once(tmp_path, source, setting, wave):
    """``daskpatch.wave-chunks``: the write is computed as several graphs of that many chunks;
    each patch still goes through the model once, and the result is the same bit for bit."""
    from dask.callbacks import Callback

    whole = Counting()
    expected = dp.to_zarr(build(source, fn=whole), tmp_path / "c.zarr")[...]
    setting("daskpatch.wave-chunks", wave)
    computes = []
    counted = Counting()
    with Callback(start=lambda dsk: computes.append(len(dsk))):
        z = dp.to_zarr(build(source, fn=counted), tmp_path / "o.zarr")
    assert len(computes) == -(-27 // wave)
    assert counted.patches == whole.patches
    np.testing.assert_array_equal(z[...], expected)
    assert (tmp_path / "o.zarr" / ".daskpatch-done" / "complete").exists()
    assert not [p for p in (tmp_path / "o.zarr" / ".daskpatch-spill").rglob("*") if p.is_file()]


def test_a_write_in_waves_resumes_after_a_crash(tmp_path, source, setting):
    setting("daskpatch.wave-chunks", 4)
    target = tmp_path / "o.zarr"
    _crashed_write(target, source, at=30)
    counted = Counting()
    z = dp.to_zarr(build(source, fn=counted), target, resume=True)
    np.testing.assert_array_equal(z[...], dp.to_zarr(build(source), tmp_path / "c.zarr")[...])
    assert counted.patches < Counting().patches + sum(_block_patches(build(source)).values())
