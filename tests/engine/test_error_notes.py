"""Errors say where: a failing model's exception carries a note naming the work block, the patch
indices and starts and the region read; a corrupt chunk names its array and chunk key."""

from __future__ import annotations

import re

import numpy as np
import pytest
import zarr

import daskpatch as dp

from ..conftest import write_zarr


SMALL = np.random.default_rng(3).random((16, 16, 16)).astype(np.float32)


def _fails_on(start):
    """A model that raises on the batch holding the patch at ``start`` (first axis value)."""

    def fn(batch):
        if np.array_equal(batch[0], SMALL[start[0]:start[0] + 8, start[1]:start[1] + 8,
                                          start[2]:start[2] + 8]):
            raise ZeroDivisionError("the model divided by zero")
        return batch

    return fn


@pytest.mark.parametrize("run", ["compute", "to_numpy"])
def test_a_failing_model_raises_its_error_with_a_note_naming_block_and_patches(run):
    out = dp.apply_patches(SMALL, _fails_on((8, 4, 0)), 8, 4, batch_size=2, block_shape=8)
    with pytest.raises(ZeroDivisionError, match="the model divided by zero") as info:
        out.compute(scheduler="sync") if run == "compute" else dp.to_numpy(out)
    (note,) = info.value.__notes__
    # patch (8, 4, 0) is patch 2*9 + 1*3 + 0 = 21 of the 3x3x3 grid, with (8, 4, 4) in its
    # batch; it belongs to work block (1, 0, 0), which owns the patches starting at 8 on the
    # first axis and at 0, 4 on the others, and so reads [8:16, 0:12, 0:12]
    assert "batch of 2 patches (indices 21, 22 in the order of extract_patches)" in note
    assert "starting at (8, 4, 0), (8, 4, 4)" in note
    assert "work block (1, 0, 0)" in note
    assert "input region [8:16, 0:12, 0:12]" in note


def test_a_wrong_output_shape_gets_the_same_note():
    out = dp.apply_patches(SMALL, lambda b: b[:, :4], 8, 4, batch_size=3, block_shape=16)
    with pytest.raises(ValueError, match=r"fn returned shape \(3, 4, 8, 8\)") as info:
        out.compute(scheduler="sync")
    (note,) = info.value.__notes__
    assert "work block (0, 0, 0)" in note
    assert "starting at (0, 0, 0), (0, 0, 4), (0, 0, 8)" in note


def test_the_note_lists_at_most_eight_patches():
    out = dp.apply_patches(SMALL, lambda b: 1 / 0, 8, 4, batch_size=20, block_shape=16)
    with pytest.raises(ZeroDivisionError) as info:
        out.compute(scheduler="sync")
    (note,) = info.value.__notes__
    assert "batch of 20 patches (indices 0, 1, 2, 3, 4, 5, 6, 7, ..." in note
    assert ", ... (20 patches), in apply_patches work block (0, 0, 0)" in note


def test_a_model_returning_a_list_gets_a_short_type_error():
    out = dp.apply_patches(SMALL, lambda b: list(b), 8, 4, batch_size=2)
    with pytest.raises(TypeError, match=r"got a list of length 2 \(stack it with numpy.stack\)"
                       ) as info:
        out.compute(scheduler="sync")
    assert len(str(info.value)) < 300  # the type and length, not the data
    assert "work block" in info.value.__notes__[0]


@pytest.mark.parametrize("dtype", ["U8", "O", "M8[s]"])
def test_a_model_returning_non_numbers_gets_a_type_error_naming_the_dtype(dtype):
    out = dp.apply_patches(SMALL, lambda b: b.astype(dtype), 8, 4, batch_size=2)
    with pytest.raises(TypeError, match=r"fn must return numbers .* got an array of dtype "
                                        + re.escape(str(np.dtype(dtype)))):
        out.compute(scheduler="sync")


@pytest.fixture
def corrupt(tmp_path):
    """A Zarr volume whose chunk (0, 1, 0) holds garbage."""
    write_zarr(tmp_path / "in.zarr", SMALL, (8, 8, 8))
    (tmp_path / "in.zarr" / "c" / "0" / "1" / "0").write_bytes(b"not zstd" * 8)
    return tmp_path / "in.zarr"


@pytest.mark.parametrize("how", ["apply_patches", "extract_patches", "zarr.Array"])
def test_a_corrupt_chunk_is_named_with_its_array(corrupt, how):
    vol = zarr.open_array(str(corrupt), mode="r") if how == "zarr.Array" else \
        dp.open_volume(corrupt)
    if how == "extract_patches":
        out = dp.extract_patches(vol, 8, 4)
    else:
        out = dp.apply_patches(vol, np.sqrt, 8, 4, block_shape=8)
    with pytest.raises(RuntimeError, match="Zstd decompression error") as info:
        out.compute(scheduler="sync")
    note = info.value.__notes__[-1]
    assert f"of the Zarr array at file://{corrupt}" in note
    assert "its chunk (0, 1, 0) (stored as 'c/0/1/0') cannot be read" in note
