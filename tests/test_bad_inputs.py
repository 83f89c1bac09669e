"""The table of bad inputs: every careless or hostile call gives a clear error, never a silent
wrong result.

Each case is a call on real arrays and real Zarr stores under ``tmp``, with the exception type
and a ``match=`` on its message (the parameter, the expectation, the value). Together with
``tests/test_errors.py`` it is the table ``benchmarks/bad_inputs.py`` prints
(``benchmarks/bad_inputs.md``). Cases that fail at compute time compute; the others must fail
while the graph is built.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pytest
import zarr

import daskpatch as dp

V = np.random.default_rng(0).random((16, 16, 16), dtype=np.float32)


def ident(b: np.ndarray) -> np.ndarray:
    return b


def _zarr(tmp: Path, name: str = "vol.zarr", data: np.ndarray = V, chunks: int = 8) -> str:
    path = str(tmp / name)
    z = zarr.create_array(path, shape=data.shape, chunks=(chunks,) * data.ndim, dtype=data.dtype)
    z[...] = data
    return path


def _written(tmp: Path, name: str = "out.zarr") -> str:
    path = str(tmp / name)
    dp.to_zarr(dp.apply_patches(V, ident, 8, 4), path)
    return path


def _corrupt_meta(tmp: Path) -> str:
    path = _zarr(tmp, "bad.zarr")
    Path(path, "zarr.json").write_text("{not json")
    return path


def _dir_with_files(tmp: Path) -> str:
    d = tmp / "mine"
    (d / "sub").mkdir(parents=True)
    (d / "keep.txt").write_text("precious")
    return str(d)


def _apply_compute(fn: Callable, **kw: Any) -> Any:
    return dp.apply_patches(V, fn, 8, 4, **kw).compute()


Case = tuple[str, Callable[[Path], Any], type, str]

CASES: list[Case] = [
    # -- what goes in ---------------------------------------------------------------------------
    ("volume is a list", lambda t: dp.apply_patches([[1.0]], ident, 8), TypeError,
     r"volume must be a NumPy, Dask or Zarr array"),
    ("volume is a string path", lambda t: dp.apply_patches("vol.zarr", ident, 8), TypeError,
     r"volume must be a NumPy, Dask or Zarr array; got 'vol.zarr' of type str"),
    ("volume of unknown shape", lambda t: dp.extract_patches(
        da.from_array(V, chunks=8)[da.from_array(V[:, 0, 0], chunks=8) > 2], 4), ValueError,
     r"volume must have a known shape"),
    ("size a string", lambda t: dp.apply_patches(V, ident, "8"), TypeError,
     r"size must be an integer or a sequence of integers; got '8' of type str"),
    ("size a bool", lambda t: dp.extract_patches(V, True), TypeError,
     r"size must be an integer or a sequence of integers; got True of type bool"),
    ("size a float in a tuple", lambda t: dp.extract_patches(V, (8, 8, 8.5)), TypeError,
     r"size\[2\] must be an integer; got 8\.5 of type float"),
    ("stride a float", lambda t: dp.extract_patches(V, 8, 4.0), TypeError,
     r"stride must be an integer or a sequence of integers; got 4\.0 of type float"),
    ("stride negative on one axis", lambda t: dp.extract_patches(V, 8, (4, -4, 4)), ValueError,
     r"stride must be >= 1 on every axis; got \(4, -4, 4\) \(axis 1 is -4\)"),
    ("stride > size leaves gaps", lambda t: dp.apply_patches(V, ident, 4, 6), ValueError,
     r"leaves \d+ of 4096 voxels uncovered .*fill_value"),
    ("border drop leaves a remainder", lambda t: dp.apply_patches(V, ident, 6, border="drop"),
     ValueError, r"leaves \d+ of 4096 voxels uncovered"),
    ("border None", lambda t: dp.extract_patches(V, 8, border=None), TypeError,
     r"border must be one of \('shift', 'pad', 'drop'\); got None of type NoneType"),
    ("pad_mode wrong", lambda t: dp.apply_patches(V, ident, 8, border="pad", pad_mode="zeros"),
     ValueError, r"pad_mode must be one of .*got 'zeros'"),
    ("channel_axis a float", lambda t: dp.extract_patches(V, 8, channel_axis=0.0), TypeError,
     r"channel_axis must be an integer; got 0\.0 of type float"),
    ("channel_axis out of range", lambda t: dp.apply_patches(V, ident, 8, channel_axis=-4),
     ValueError, r"channel_axis must be None or an axis of the 3-D volume \(from -3 to 2\)"),
    ("size names too many axes", lambda t: dp.apply_patches(V, ident, (8,) * 4), ValueError,
     r"size has 4 entries but the 3-D volume has 3 non-channel axes"),
    ("0-d volume", lambda t: dp.extract_patches(np.zeros(()), 1), ValueError,
     r"the 0-D volume has no spatial axes"),
    # -- the model ------------------------------------------------------------------------------
    ("model returns wrong shape", lambda t: _apply_compute(lambda b: b[:, :4]), ValueError,
     r"fn returned shape \(\d+, 4, 8, 8\) for a batch of shape \(\d+, 8, 8, 8\)"),
    ("model returns None", lambda t: _apply_compute(lambda b: None), TypeError,
     r"fn must return an array .*got None of type NoneType"),
    ("model returns a list", lambda t: _apply_compute(lambda b: list(b)), TypeError,
     r"fn must return an array .* list of length \d+"),
    ("model returns strings", lambda t: _apply_compute(lambda b: b.astype(str)), TypeError,
     r"dtype"),
    ("model raises", lambda t: _apply_compute(lambda b: 1 / 0), ZeroDivisionError,
     r"division by zero"),
    ("batch_size negative", lambda t: dp.apply_patches(V, ident, 8, batch_size=-1), ValueError,
     r"batch_size must be >= 1; got -1"),
    ("out_channels 0", lambda t: dp.apply_patches(V[None], ident, 8, channel_axis=0,
                                                  out_channels=0), ValueError,
     r"out_channels must be >= 1; got 0"),
    ("dtype an object", lambda t: dp.apply_patches(V, ident, 8, dtype=object()), TypeError,
     r"dtype must be a NumPy dtype"),
    # -- blending -------------------------------------------------------------------------------
    ("user window with NaN", lambda t: dp.apply_patches(
        V, ident, 8, blend=np.full((8, 8, 8), np.nan)), ValueError,
     r"blend must be positive and finite everywhere"),
    ("user window negative", lambda t: dp.apply_patches(
        V, ident, 8, blend=-np.ones((8, 8, 8))), ValueError,
     r"blend must be positive and finite everywhere"),
    ("callable window of wrong shape", lambda t: dp.apply_patches(
        V, ident, 8, blend=lambda s: np.ones(4)), ValueError,
     r"the window returned by blend=.* must have the patch shape \(8, 8, 8\); got shape \(4,\)"),
    ("sigma_scale negative", lambda t: dp.apply_patches(V, ident, 8, sigma_scale=-0.1),
     ValueError, r"sigma_scale must be a positive finite number; got -0\.1"),
    ("sigma_scale NaN", lambda t: dp.apply_patches(V, ident, 8, sigma_scale=float("nan")),
     ValueError, r"sigma_scale must be a positive finite number; got nan"),
    ("sigma_scale a string", lambda t: dp.apply_patches(V, ident, 8, sigma_scale="0.1"),
     TypeError, r"sigma_scale must be a positive number or a sequence of 3 .*got '0\.1' of "
                r"type str"),
    ("block_shape zero", lambda t: dp.apply_patches(V, ident, 8, 4, block_shape=0), ValueError,
     r"block_shape must be >= 1 on every axis"),
    ("block_shape too few axes", lambda t: dp.apply_patches(V, ident, 8, 4, block_shape=(8, 8)),
     ValueError, r"block_shape must be an integer or a sequence of 3 integers"),
    # -- reconstruct ----------------------------------------------------------------------------
    ("reconstruct shape a string", lambda t: dp.reconstruct(
        dp.extract_patches(V, 8), "16x16x16", 8), TypeError,
     r"shape must be a sequence of integers; got '16x16x16' of type str"),
    ("reconstruct shape 0", lambda t: dp.reconstruct(dp.extract_patches(V, 8), (16, 0, 16), 8),
     ValueError, r"shape must be >= 1 on every axis"),
    ("reconstruct other stride", lambda t: dp.reconstruct(
        dp.extract_patches(V, 8, 4), V.shape, 8, 8), ValueError,
     r"patches must have shape \(8, 8, 8, 8\) .* got \(27, 8, 8, 8\)"),
    # -- open_volume ----------------------------------------------------------------------------
    ("open a missing store", lambda t: dp.open_volume(str(t / "nope.zarr")), FileNotFoundError,
     r"no Zarr array or group at .*nope\.zarr"),
    ("open a group without path", lambda t: dp.open_volume(
        zarr.open_group(str(t / "g.zarr"), mode="w").store), ValueError,
     r"holds a group"),
    ("open with path an int", lambda t: dp.open_volume(_zarr(t), path=0), TypeError,
     r"path must be None or a string naming a node in the store; got 0 of type int"),
    ("open a zarr.Array with a path", lambda t: dp.open_volume(
        zarr.open_array(_zarr(t)), path="x"), ValueError,
     r"path must be None when store is a zarr.Array"),
    ("open a store an int", lambda t: dp.open_volume(3), TypeError,
     r"store must be a path or URL string, .*; got 3 of type int"),
    # -- to_zarr --------------------------------------------------------------------------------
    ("to_zarr of a list", lambda t: dp.to_zarr([1, 2], str(t / "o.zarr")), TypeError,
     r"array must be a NumPy, Dask or Zarr array; got \[1, 2\] of type list"),
    ("to_zarr of a 0-d array", lambda t: dp.to_zarr(np.float32(1), str(t / "o.zarr")),
     ValueError, r"array must have at least one axis; got a 0-d array"),
    ("to_zarr overwrite a string", lambda t: dp.to_zarr(V, str(t / "o.zarr"), overwrite="yes"),
     TypeError, r"overwrite must be True or False; got 'yes' of type str"),
    ("to_zarr overwrite and resume", lambda t: dp.to_zarr(
        V, str(t / "o.zarr"), overwrite=True, resume=True), ValueError,
     r"overwrite=True and resume=True exclude each other"),
    ("to_zarr progress without compute", lambda t: dp.to_zarr(
        V, str(t / "o.zarr"), progress=True, compute=False), ValueError,
     r"progress=True needs compute=True"),
    ("to_zarr chunks 0", lambda t: dp.to_zarr(V, str(t / "o.zarr"), chunks=0), ValueError,
     r"chunks must be >= 1 on every axis"),
    ("to_zarr chunks of 2 axes for 3", lambda t: dp.to_zarr(V, str(t / "o.zarr"),
                                                            chunks=(8, 8)), ValueError,
     r"chunks must be an integer or a sequence of 3 integers"),
    ("to_zarr unknown chunk sizes", lambda t: dp.to_zarr(
        da.from_array(V, chunks=8)[da.from_array(V[:, 0, 0], chunks=8) > 2], str(t / "o.zarr")),
     ValueError, r"array must have a known shape; got \(nan, 16, 16\) \(call compute_chunk_sizes"),
    ("to_zarr onto an existing array", lambda t: dp.to_zarr(V, _written(t)), FileExistsError,
     r"an array already exists at .*overwrite=True.*resume=True"),
    ("to_zarr onto a group", lambda t: dp.to_zarr(
        V, str(zarr.open_group(str(t / "g.zarr"), mode="w").store.root)), ValueError,
     r"is a group; to_zarr never replaces a group"),
    ("to_zarr under an array", lambda t: dp.to_zarr(V, _written(t), path="child"), ValueError,
     r"its parent '\(the root\)' is an array"),
    ("to_zarr onto its own input", lambda t: dp.to_zarr(
        dp.apply_patches(dp.open_volume(p := _zarr(t)), ident, 8, 4), p, overwrite=True),
     ValueError, r"reads from .* which this call would write"),
    ("to_zarr a store an int", lambda t: dp.to_zarr(V, 7), TypeError,
     r"store must be a path or URL string, .*; got 7 of type int"),
    # -- data loss, resume, half-written stores ----------------------------------------------
    ("overwrite a directory of other files", lambda t: dp.to_zarr(
        V, _dir_with_files(t), overwrite=True), FileExistsError, r"keep\.txt|sub|not a Zarr"),
    ("write into a non-empty non-Zarr directory", lambda t: dp.to_zarr(V, _dir_with_files(t)),
     FileExistsError, r"keep\.txt|sub|not a Zarr"),
    ("overwrite the input through extract+reconstruct", lambda t: dp.to_zarr(
        dp.reconstruct(dp.extract_patches(dp.open_volume(p := _zarr(t)), 8, 4), V.shape, 8, 4),
        p, overwrite=True), ValueError, r"reads from"),
    ("overwrite the group holding the input", lambda t: dp.to_zarr(
        dp.apply_patches(dp.open_volume(_zarr(t, "g.zarr/raw")), ident, 8, 4), str(t / "g.zarr"),
        overwrite=True), ValueError, r"reads from|is a group"),
    ("to_numpy into its own input", lambda t: dp.to_numpy(
        dp.apply_patches(x := V.copy(), ident, 8, 4), out=x), ValueError, r"out .*memory"),
    ("resume with another patch size", lambda t: dp.to_zarr(
        dp.apply_patches(V, ident, 12, 4, block_shape=8), _written(t), resume=True),
     ValueError,
     r"size"),
    ("resume a complete array with another blend", lambda t: dp.to_zarr(
        dp.apply_patches(V, ident, 8, 4, blend="hann"), _written(t), resume=True), ValueError,
     r"blend"),
    ("resume with another run_id", lambda t: dp.to_zarr(
        dp.apply_patches(V, ident, 8, 4), _written(t), resume=True, run_id="v2"), ValueError,
     r"run_id"),
    ("run_id a number", lambda t: dp.to_zarr(V, str(t / "o.zarr"), run_id=3), TypeError,
     r"run_id must be None or a string"),
    ("open a corrupt zarr.json", lambda t: dp.open_volume(_corrupt_meta(t)), ValueError,
     r"zarr\.json"),
    ("spill into an unwritable path", lambda t: dp.apply_patches(
        V, ident, 8, 4, spill="/proc/daskpatch-spill"), ValueError, r"spill"),
    # -- numbers ----------------------------------------------------------------------------
    ("NaN into an integer result", lambda t: _apply_compute(
        lambda b: np.full_like(b, np.nan), dtype="uint8"), ValueError, r"NaN.*chunk"),
    ("fill_value out of the dtype's range", lambda t: dp.apply_patches(
        V, ident, 4, 6, dtype="uint8", fill_value=300), ValueError, r"fill_value"),
    ("fill_value NaN into integers", lambda t: dp.apply_patches(
        V, ident, 4, 6, dtype="int16", fill_value=float("nan")), ValueError, r"fill_value"),
    ("complex model output into a real dtype", lambda t: _apply_compute(
        lambda b: b.astype(np.complex64)), TypeError, r"complex"),
    ("a window whose range underflows", lambda t: dp.apply_patches(
        V, ident, 8, blend=np.where(np.indices((8, 8, 8)).sum(0) % 2, 1e300, 1e-300)),
     ValueError, r"blend"),
    # -- to_numpy -------------------------------------------------------------------------------
    ("to_numpy of a NumPy array", lambda t: dp.to_numpy(V), TypeError,
     r"array must be a dask.array.Array; got an array of shape \(16, 16, 16\) and dtype "
     r"float32 of type ndarray"),
    ("to_numpy out of another dtype", lambda t: dp.to_numpy(
        dp.apply_patches(V, ident, 8), out=np.empty(V.shape, np.float64)), ValueError,
     r"out must be a writable numpy.ndarray of shape \(16, 16, 16\) and dtype float32"),
    ("to_numpy out read-only", lambda t: dp.to_numpy(
        dp.apply_patches(V, ident, 8), out=np.broadcast_to(np.float32(0), V.shape)), ValueError,
     r"writeable=False"),
    ("to_numpy progress a string", lambda t: dp.to_numpy(
        dp.apply_patches(V, ident, 8), progress="yes"), TypeError,
     r"progress must be True or False; got 'yes' of type str"),
    # -- geometry and helpers -------------------------------------------------------------------
    ("PatchGrid empty shape", lambda t: dp.PatchGrid((), 4), ValueError,
     r"shape must have at least one axis; got \(\)"),
    ("PatchGrid index out of range", lambda t: dp.PatchGrid((8, 8), 4)[4], IndexError,
     r"patch index 4 is out of range for a grid of 4 patches"),
    ("PatchGrid index a float", lambda t: dp.PatchGrid((8, 8), 4).start(1.0), TypeError,
     r"index must be an integer; got 1\.0 of type float"),
    ("aligned_chunks itemsize 0", lambda t: dp.aligned_chunks((64, 64), 16, 0), ValueError,
     r"itemsize must be >= 1; got 0"),
    ("is_stride_aligned of a string", lambda t: dp.is_stride_aligned("64", 16), TypeError,
     r"chunks must be a sequence"),
    ("rechunk onto itself", lambda t: dp.rechunk_to_stride(
        p := _zarr(t, chunks=6), 4, p), ValueError,
     r"target/target_path must differ from the source array"),
    ("seed get_patches size 0", lambda t: dp.get_patches(V, size=0, stride=4), ValueError,
     r"size must be >= 1"),
    ("loader labels of another shape", lambda t: dp.PatchDataset(
        V, 8, labels=np.zeros((8, 8, 8))), ValueError, r"label"),
    # -- values that used to pass silently wrong --------------------------------------------------
    ("loader label 300 as uint8", lambda t: dp.PatchDataset(
        V, 8, labels=np.full(V.shape, 300), label_dtype=np.uint8)[0], ValueError,
     r"label_dtype=uint8 holds 0 to 255, but the label of sample 0 has 300"),
    ("loader label -1 as uint8", lambda t: dp.PatchDataset(
        V, 8, labels=np.full(V.shape, -1), label_dtype=np.uint8)[0], ValueError,
     r"label_dtype=uint8 holds 0 to 255, but the label of sample 0 has -1"),
    ("loader epoch 2**64", lambda t: dp.RandomPatchDataset(
        V, 8, samples_per_epoch=2).set_epoch(2**64), ValueError,
     r"epoch must be an int from 0 to 2\*\*63 - 1"),
    ("apply dtype U6", lambda t: dp.apply_patches(V, ident, 8, dtype="U6"), TypeError,
     r"dtype must be a numeric dtype \(bool, integer, floating or complex\)"),
    ("apply dtype datetime64", lambda t: dp.apply_patches(V, ident, 8, dtype="datetime64[s]"),
     TypeError, r"dtype must be a numeric dtype"),
    ("a model calling sys.exit", lambda t: _apply_compute(_exits), RuntimeError,
     r"fn called sys.exit\(7\) on a batch"),
    ("rechunk an interrupted output", lambda t: dp.rechunk_to_stride(
        _interrupted(t), 3, str(t / "r.zarr")), ValueError,
     r"source is an incomplete daskpatch output"),
    ("resume another model", lambda t: _resume_with(t, lambda b: 3 * b), ValueError,
     r"was written with model=.* but this call has model="),
    ("second writer while one writes", lambda t: _second_writer(t), ValueError,
     r"another writer is writing .*; run one writer at a time per array"),
]


def _exits(batch: np.ndarray) -> np.ndarray:
    raise SystemExit(7)


def _interrupted(tmp: Path) -> str:
    dp.to_zarr(da.ones((16, 16), chunks=8), str(tmp / "i.zarr"), compute=False)
    return str(tmp / "i.zarr")


def _resume_with(tmp: Path, fn: Callable) -> Any:
    path = _written(tmp)
    return dp.to_zarr(dp.apply_patches(V, fn, 8, 4), path, resume=True)


def _second_writer(tmp: Path) -> Any:
    dp.to_zarr(dp.apply_patches(V, ident, 8, 4), str(tmp / "w.zarr"), compute=False)
    return dp.to_zarr(dp.apply_patches(V, ident, 8, 4), str(tmp / "w.zarr"), overwrite=True)


#: cases that index with a boolean Dask array (a Dask array of unknown shape)
_MASKED = {"volume of unknown shape", "to_zarr unknown chunk sizes"}
_MASK = pytest.mark.needs_dask("boolean-mask indexing (unknown chunk sizes)")


@pytest.mark.parametrize(("case", "call", "exc", "match"), [
    pytest.param(*c, id=c[0], marks=_MASK if c[0] in _MASKED else ()) for c in CASES])
def test_bad_input(tmp_path: Path, case: str, call: Callable, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        call(tmp_path)
    # a refused call leaves nothing behind: no output store was created
    assert not (tmp_path / "o.zarr").exists()


def test_table_is_large_enough() -> None:
    from tests.test_errors import test_error_table

    n_errors = len(test_error_table.pytestmark[0].args[1])
    assert len(CASES) + n_errors >= 60
    assert len({c[0] for c in CASES}) == len(CASES)
