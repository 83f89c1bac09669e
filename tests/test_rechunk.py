"""The one chunk-size policy (daskpatch.rechunk.stride_multiples) behind aligned_chunks."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import daskpatch as dp
from daskpatch.rechunk import stride_multiples

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
