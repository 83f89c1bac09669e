"""PatchGrid: pure geometry, checked against hand-computed starts and brute-force coverage."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from daskpatch import PatchGrid


@pytest.mark.parametrize(
    ("n", "size", "stride", "border", "expected"),
    [
        (256, 128, 128, "shift", [0, 128]),
        (256, 128, 64, "shift", [0, 64, 128]),
        (10, 4, 4, "shift", [0, 4, 6]),
        (10, 4, 4, "pad", [0, 4, 8]),
        (10, 4, 4, "drop", [0, 4]),
        (10, 4, 3, "shift", [0, 3, 6]),
        (11, 4, 3, "shift", [0, 3, 6, 7]),
        (11, 4, 3, "pad", [0, 3, 6, 9]),
        (4, 4, 2, "shift", [0]),
        (3, 5, 2, "pad", [0]),
        (10, 2, 5, "shift", [0, 5, 8]),  # sparse sampling, last patch still flush
        (10, 2, 5, "pad", [0, 5]),  # never a patch wholly past the end
        (10, 2, 5, "drop", [0, 5]),
    ],
)
def test_axis_starts(n, size, stride, border, expected):
    grid = PatchGrid((n,), size, stride, border=border)
    assert grid.starts == (tuple(expected),)
    assert len(grid) == len(expected)


def test_multi_axis_c_order_slices_and_iteration():
    grid = PatchGrid((10, 8, 5), size=(4, 4, 5), stride=(3, 4, 1))
    assert grid.grid_shape == (3, 2, 1)
    assert len(grid) == 6
    expected = [
        (slice(a, a + 4), slice(b, b + 4), slice(0, 5))
        for a, b in itertools.product((0, 3, 6), (0, 4))
    ]
    assert list(grid) == expected
    assert grid[-1] == expected[-1]
    assert grid.start(3) == (3, 4, 0)
    assert grid.grid_index(3) == (1, 1, 0)


@pytest.mark.parametrize("ndim", [1, 2, 3, 4, 5])
def test_any_ndim_covers_every_voxel_with_shift(ndim):
    rng = np.random.default_rng(ndim)
    shape = tuple(int(v) for v in rng.integers(5, 9, ndim))
    size = tuple(int(v) for v in rng.integers(2, 5, ndim))
    stride = tuple(int(rng.integers(1, z + 1)) for z in size)
    grid = PatchGrid(shape, size, stride)
    hits = np.zeros(shape, dtype=int)
    for sl in grid:
        hits[sl] += 1
        assert all(s.stop <= n for s, n in zip(sl, shape))
    assert hits.min() >= 1
    assert grid.uncovered == 0


@pytest.mark.parametrize(
    ("shape", "size", "stride", "border"),
    [((10, 7), 4, 4, "drop"), ((10, 7), 2, 3, "shift"), ((13,), 3, 5, "pad"), ((9, 9), 4, 4, "pad")],
)
def test_uncovered_count_matches_brute_force(shape, size, stride, border):
    grid = PatchGrid(shape, size, stride, border=border)
    hit = np.zeros(grid.padded_shape, dtype=bool)
    for sl in grid:
        hit[sl] = True
    crop = tuple(slice(0, n) for n in shape)
    assert grid.uncovered == int((~hit[crop]).sum())


def test_pad_border_extent():
    grid = PatchGrid((10, 6), 4, 4, border="pad")
    assert grid.padded_shape == (12, 8)
    assert grid.pad_width == ((0, 2), (0, 2))


def test_block_ownership_partitions_patches():
    grid = PatchGrid((37, 29), (8, 6), (4, 3))
    block = (8, 9)
    owned = [
        grid.block_patches(b, block)
        for b in itertools.product(*[range(n) for n in grid.block_grid_shape(block)])
    ]
    allp = np.sort(np.concatenate(owned))
    assert (allp == np.arange(len(grid))).all()
    for i in range(len(grid)):
        b = grid.owner(i, block)
        assert all(s // z == bb for s, z, bb in zip(grid.start(i), block, b))
        assert i in grid.block_patches(b, block)


def test_geometry_only_and_small():
    grid = PatchGrid((10000, 10000, 10000), 128, 64)
    assert len(grid) == 156**3  # 155 strided starts + the shifted last one
    assert grid.uncovered == 0
    assert grid.padded_shape == (10000,) * 3


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(shape=(10, 10), size=2.5), TypeError, r"size must be an integer .* got 2\.5 of type float"),
        (dict(shape=(10, 10), size=0), ValueError, r"size must be >= 1 .* got \(0, 0\)"),
        (dict(shape=(10, 10), size=-3), ValueError, r"size must be >= 1"),
        (dict(shape=(10, 10), size=(4, 4, 4)), ValueError, r"size must be .* 2 integers .* \(4, 4, 4\)"),
        (dict(shape=(10, 10), size=4, stride=0), ValueError, r"stride must be >= 1 .* \(0, 0\)"),
        (dict(shape=(10, 10), size=4, stride="2"), TypeError, r"stride must be an integer .* '2'"),
        (dict(shape=(10, 10), size=12), ValueError, r"size \(12, 12\) is larger than the volume shape \(10, 10\)"),
        (dict(shape=(10, 10), size=4, border="wrap"), ValueError, r"border must be one of \('shift', 'pad', 'drop'\); got 'wrap'"),
        (dict(shape=(10, 0), size=4), ValueError, r"shape must be >= 1 .* \(10, 0\)"),
        (dict(shape=10, size=4), TypeError, r"shape must be a sequence of integers; got 10"),
    ],
)
def test_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        PatchGrid(**kwargs)


def test_index_errors():
    grid = PatchGrid((8,), 4)
    with pytest.raises(IndexError, match="patch index 2 is out of range for a grid of 2 patches"):
        grid[2]
    with pytest.raises(ValueError, match=r"block_shape must be a multiple of the stride \(4,\)"):
        grid.owner(0, 6)


@pytest.mark.parametrize("border", ["shift", "pad", "drop"])
def test_block_plan_is_the_ownership_the_engine_computes_with(border):
    """The work blocks of apply_patches are the grid's plan: each block's patches are
    ``block_patches``, its buffer spans its patches, and it reaches exactly the chunks of
    ``targets`` (checked through the result: one chunk per block, every patch once)."""
    import daskpatch as dp

    grid = PatchGrid((37, 29), (8, 6), (4, 3), border=border)
    block = (8, 9)
    plan = grid.block_plan(block)
    assert plan.nblocks == grid.block_grid_shape(block)
    for b in itertools.product(*[range(n) for n in plan.nblocks]):
        flat = grid.block_patches(b, block)
        expect = [tuple(map(int, np.unravel_index(i, grid.grid_shape))) for i in flat]
        got = list(itertools.product(*[range(*plan.owned[a][i]) for a, i in enumerate(b)]))
        assert got == expect
        assert all(plan.owner(g) == b for g in got)
        for a, i in enumerate(b):
            lo, hi = plan.ext[a][i]
            reached = [c for c in range(plan.nblocks[a])
                       if hi > lo and lo < plan.chunk(a, c)[1] and hi > plan.chunk(a, c)[0]]
            assert list(plan.targets[a][i]) == reached
    calls = []

    def fn(batch):
        calls.append(len(batch))
        return batch

    vol = np.random.default_rng(0).random((37, 29), dtype=np.float32)
    out = dp.apply_patches(vol, fn, (8, 6), (4, 3), border=border, block_shape=block,
                           fill_value=0.0)
    assert out.chunks == tuple(tuple(plan.chunk(a, c)[1] - plan.chunk(a, c)[0]
                                     for c in range(n)) for a, n in enumerate(plan.nblocks))
    out.compute(scheduler="synchronous")
    assert sum(calls) == len(grid)
