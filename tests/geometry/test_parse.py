"""What a new user trips over: wrong axes caught early and explained, and the docs they read."""

from __future__ import annotations

import numpy as np
import pytest

import daskpatch as dp

VOL = np.zeros((64, 64, 64), np.float32)


def test_a_channel_axis_that_leaves_too_few_axes_fails_at_build_time(no_compute):
    # channel_axis=0 on a 3-D volume with a 3-entry size: caught before any graph runs
    meant = (r"size has 3 entries but the 3-D volume has 2 non-channel axes \(channel_axis=0\); "
             r"size must name between 1 and 2 spatial axes: channel_axis=0 takes axis 0 "
             r"\(length 64\) as the channel axis, leaving axes 1, 2 \(64, 64\) for the spatial "
             r"\(and batch\) axes")
    with pytest.raises(ValueError, match=meant):
        dp.apply_patches(VOL, lambda b: b, (32, 32, 32), channel_axis=0)
    with pytest.raises(ValueError, match=meant):
        dp.extract_patches(VOL, (32, 32, 32), channel_axis=0)
    with pytest.raises(ValueError, match=r"between spatial axes \(size names 2 spatial axes: "
                                         r"axes 0, 2 \(8, 8\)\)"):
        dp.extract_patches(np.zeros((8, 2, 8)), (4, 4), channel_axis=1)


def test_a_wrong_output_shape_names_the_axes():
    vol = np.zeros((2, 16, 16), np.float32)
    out = dp.apply_patches(vol, lambda b: b[:, :1], 8, channel_axis=0)
    with pytest.raises(ValueError, match=r"fn returned shape \(\d, 1, 8, 8\) for a batch of shape "
                       r"\(\d, 2, 8, 8\); expected \(\d, 2, 8, 8\): the 3-D volume of shape "
                       r"\(2, 16, 16\) is read as channel axis 0 \(2 channels\) and spatial axes "
                       r"1, 2 \(16, 16\): fn gets batches \(B, 2, 8, 8\) and must return "
                       r"\(B, 2, 8, 8\)"):
        out.compute(scheduler="sync")


def test_a_failing_fn_gets_a_note_with_the_axes():
    def broken(batch):
        raise KeyError("oops")

    out = dp.apply_patches(np.zeros((4, 16, 16), np.float32), broken, (8, 8))
    with pytest.raises(KeyError, match="oops") as info:
        out.compute(scheduler="sync")
    (note,) = [n for n in info.value.__notes__ if n.startswith("daskpatch:")]
    assert "batch axis 0 (4) and spatial axes 1, 2 (16, 16) (no channel axis)" in note


def test_stride_larger_than_size_does_not_suggest_the_border_in_use():
    vol = np.zeros((40, 40), np.float32)
    with pytest.raises(ValueError, match=r"or use a stride <= size \(the stride is larger on "
                                         r"axis 0\)$") as info:
        dp.apply_patches(vol, lambda b: b, 8, 12)  # border="shift" already
    assert "border=" not in str(info.value).split(";")[1]
    with pytest.raises(ValueError, match=r"or use border='shift' or 'pad'$"):
        dp.apply_patches(vol, lambda b: b, 12, border="drop")
    with pytest.raises(ValueError, match=r"or use border='shift' or 'pad' with a stride <= size"):
        dp.reconstruct(np.zeros((9, 8, 8)), (40, 40), 8, 16, border="drop")


def test_docs_a_new_user_reads():
    assert "torch.Tensor" in dp.apply_patches.__doc__
    assert "torch.nn.Module" in dp.apply_patches.__doc__
    assert "Parameters" in dp.window.__doc__ and "sigma_scale :" in dp.window.__doc__
