"""Stride-aligned chunks: the one chunk-size policy (stride_multiples) behind aligned_chunks,
is_stride_aligned, and rechunk_to_stride."""

from __future__ import annotations

import logging
import math

import dask.array as da
import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

import daskpatch as dp
from daskpatch.io import open_volume
from daskpatch.rechunk import aligned_chunks, is_stride_aligned, rechunk_to_stride
from daskpatch.geometry.blocks import stride_multiples

axes = st.lists(st.tuples(st.integers(1, 600), st.sampled_from([1, 2, 3, 16, 48, 64, 100])),
                min_size=1, max_size=4)


@settings(max_examples=200, deadline=None)
@given(axes=axes, budget=st.integers(1, 2**24), clamp=st.booleans(),
       ties=st.sampled_from(["first", "last"]))
def test_stride_multiples_is_the_largest_block_within_the_budget(axes, budget, clamp, ties):
    lengths, strides = [n for n, _ in axes], [s for _, s in axes]
    k = stride_multiples(lengths, strides, budget, clamp=clamp, ties=ties)
    kmax = [-(-n // s) for n, s in axes]
    assert all(1 <= ki <= km for ki, km in zip(k, kmax))

    def sides(k):
        return [min(ki * s, n) if clamp else ki * s for ki, (n, s) in zip(k, axes)]

    if any(ki > 1 for ki in k):  # one stride per axis is the minimum, else within the budget
        assert math.prod(sides(k)) <= budget
    for i in range(len(k)):  # no side can grow by one more stride
        if k[i] < kmax[i]:
            assert math.prod(sides(k[:i] + (k[i] + 1,) + k[i + 1:])) > budget


@pytest.mark.parametrize("shape, stride, itemsize, target, channel_axis, chunks", [
    ((512, 512, 512), 64, 4, 8 * 2**20, None, (128, 128, 128)),
    ((100, 40), 64, 2, 8 * 2**20, None, (100, 40)),
    ((3, 1000, 1000), (48, 48), 1, 2**20, 0, (3, 576, 576)),
])
def test_aligned_chunks_is_the_policy_at_its_byte_target(shape, stride, itemsize, target,
                                                         channel_axis, chunks):
    got = dp.aligned_chunks(shape, stride, itemsize, target_bytes=target,
                            channel_axis=channel_axis)
    assert got == chunks
    assert dp.is_stride_aligned(got, stride, shape=shape, channel_axis=channel_axis)


@settings(max_examples=150, deadline=None)
@given(
    shape=st.lists(st.integers(1, 600), min_size=1, max_size=4),
    data=st.data(),
    itemsize=st.sampled_from([1, 2, 4, 8]),
    target=st.integers(1, 2**22),
)
def test_aligned_chunks_properties(shape, data, itemsize, target):
    n = len(shape)
    stride = tuple(data.draw(st.lists(st.integers(1, 80), min_size=n, max_size=n)))
    chunks = aligned_chunks(shape, stride, itemsize, target_bytes=target)
    assert len(chunks) == len(shape)
    for c, n, s in zip(chunks, shape, stride):
        assert 1 <= c <= n
        assert c == n or c % s == 0  # a stride multiple, or the whole axis
    assert is_stride_aligned(chunks, stride, shape=shape)
    nbytes = math.prod(chunks) * itemsize
    minimal = all(c == min(s, n) for c, n, s in zip(chunks, shape, stride))
    assert nbytes <= target or minimal
    # near the target: no axis can grow by one stride without exceeding it
    for i, (c, n, s) in enumerate(zip(chunks, shape, stride)):
        if c < n:
            grown = min(c + s, n)
            assert nbytes // c * grown > target


def test_aligned_chunks_isotropic_and_channels():
    assert aligned_chunks((1024, 1024, 1024), 32, 4) == (128, 128, 128)
    c = aligned_chunks((2000, 2000, 2000), 16, 1, target_bytes=2**21)
    assert max(c) - min(c) <= 16 and all(v % 16 == 0 for v in c)
    # a short axis is taken whole and its budget goes to the others
    assert aligned_chunks((8, 4096, 4096), 64, 2, target_bytes=2**20) == (8, 256, 256)
    # channel axis kept whole, first or last; batch axes get 1
    budget = 3 * 4 * 128 * 128
    chunks = aligned_chunks((3, 512, 512), 64, 4, channel_axis=0, target_bytes=budget)
    assert chunks == (3, 128, 128)
    budget = 5 * 64 * 64
    assert aligned_chunks((512, 512, 5), 64, 1, channel_axis=-1, target_bytes=budget) == (64, 64, 5)
    assert aligned_chunks((4, 300, 300), (32, 32), 1, target_bytes=2**30) == (1, 300, 300)
    # one stride is the floor even over budget
    assert aligned_chunks((1000, 1000), 100, 8, target_bytes=10) == (100, 100)


@pytest.mark.parametrize(
    "args, kwargs, exc, match",
    [
        (((10, 10), 0, 1), {}, ValueError, r"stride must be >= 1 on every axis"),
        (((10, 10), 2.0, 1), {}, TypeError, "stride must be an integer or a sequence"),
        (((10, 10), (2, 2, 2), 1), {}, ValueError, r"stride has 3 entries but the 2-D array has 2 non-channel axes"),
        (((10, 0), 2, 1), {}, ValueError, r"shape must be >= 1 on every axis"),
        (("ab", 2, 1), {}, TypeError, "shape must be a sequence of integers; got 'ab'"),
        (((10, 10), 2, 0), {}, ValueError, "itemsize must be >= 1; got 0"),
        (((10, 10), 2, np.dtype("f4")), {}, TypeError, "itemsize must be an integer"),
        (((10, 10), 2, 1), {"target_bytes": 0}, ValueError, "target_bytes must be >= 1; got 0"),
        (((10, 10), 2, 1), {"channel_axis": 2}, ValueError, r"channel_axis must be None or.*got 2"),
        (((10, 10), 2, 1), {"channel_axis": "last"}, TypeError, "channel_axis must be an integer"),
        (((10,), 2, 1), {"channel_axis": 0}, ValueError, "no spatial axes"),
    ],
)
def test_aligned_chunks_errors(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        aligned_chunks(*args, **kwargs)


def test_is_stride_aligned():
    assert is_stride_aligned((64, 64, 64), 32)
    assert not is_stride_aligned((64, 48, 64), 32)
    assert is_stride_aligned((64, 48, 64), (32, 16, 32))
    assert is_stride_aligned((3, 64), 32, channel_axis=0)  # channel chunk ignored
    assert is_stride_aligned((1, 64, 64), (32, 32))  # leading batch axis ignored
    assert is_stride_aligned((50, 64), 32, shape=(50, 1000))  # whole axis in one chunk
    assert not is_stride_aligned((50, 64), 32, shape=(51, 1000))
    assert is_stride_aligned(da.ones((100, 70), chunks=((32, 64, 4), (70,))).chunks, 32)
    assert not is_stride_aligned(((30, 70),), 32)
    with pytest.raises(TypeError, match="chunks must be a sequence"):
        is_stride_aligned(64, 32)
    with pytest.raises(ValueError, match=r"shape must have one entry per axis of chunks \(2\)"):
        is_stride_aligned((64, 64), 32, shape=(64,))
    with pytest.raises(ValueError, match=r"chunks\[1\] must be >= 1; got 0"):
        is_stride_aligned((64, 0), 32)


def test_rechunk_to_stride(tmp_path, caplog):
    data = np.random.default_rng(1).random((3, 90, 70)).astype("float32")
    src = zarr.create_array(tmp_path / "s.zarr", name="raw", shape=data.shape, chunks=(1, 25, 25),
                            dtype="float32", zarr_format=2)
    src[:] = data
    with caplog.at_level(logging.INFO, logger="daskpatch.io"):
        new = rechunk_to_stride(tmp_path / "s.zarr", 16, tmp_path / "t.zarr", path="raw",
                                target_path="aligned", channel_axis=0, target_bytes=3 * 4 * 32 * 32)
    assert new.chunks == (3, 32, 32)
    assert is_stride_aligned(new.chunks, 16, shape=new.shape, channel_axis=0)
    np.testing.assert_array_equal(open_volume(tmp_path / "t.zarr", "aligned").compute(), data)
    assert "from chunks (1, 25, 25) to stride-aligned chunks (3, 32, 32)" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="daskpatch.io"):
        same = rechunk_to_stride(tmp_path / "t.zarr", 16, tmp_path / "u.zarr", path="aligned",
                                 channel_axis=0)
    assert same.path == "aligned" and "already has stride-aligned chunks" in caplog.text
    assert not (tmp_path / "u.zarr").exists()

    with pytest.raises(ValueError, match="must differ from the source array"):
        rechunk_to_stride(tmp_path / "s.zarr", 32, str(tmp_path / "s.zarr"), path="raw",
                          target_path="raw", overwrite=True)
    with pytest.raises(TypeError, match="overwrite must be True or False; got 'yes'"):
        rechunk_to_stride(tmp_path / "t.zarr", 16, tmp_path / "u.zarr", path="aligned",
                          overwrite="yes")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        rechunk_to_stride(tmp_path / "s.zarr", 16, tmp_path / "t.zarr", path="raw",
                          target_path="aligned", channel_axis=0)


def test_is_stride_aligned_takes_an_array(tmp_path):
    assert dp.is_stride_aligned(da.zeros((200, 200), chunks=96), 48)
    assert not dp.is_stride_aligned(da.zeros((200, 200), chunks=100), 48)
    z = zarr.create_array(str(tmp_path / "a.zarr"), shape=(100, 96), chunks=(48, 40),
                          dtype="f4")
    assert not dp.is_stride_aligned(z, 48)
    assert dp.is_stride_aligned(z, (48, 40))
    assert dp.is_stride_aligned(np.zeros((100, 100)), 48)  # one chunk
    assert dp.is_stride_aligned(da.zeros((4, 96, 96), chunks=(4, 48, 48)), 48, channel_axis=0)


def test_rechunk_refuses_to_copy_an_interrupted_output(tmp_path):
    import dask.array as da

    from daskpatch.errors import IncompleteOutputError

    dp.to_zarr(da.ones((16, 16), chunks=5), tmp_path / "o.zarr", compute=False)  # never run
    with pytest.raises(IncompleteOutputError, match=r"source is an incomplete daskpatch output "
                                                    r".*Finish it first"):
        dp.rechunk_to_stride(str(tmp_path / "o.zarr"), 4, str(tmp_path / "r.zarr"))
    assert not (tmp_path / "r.zarr").exists()
