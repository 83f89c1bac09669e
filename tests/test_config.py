"""Settings through dask.config: defaults from daskpatch.yaml, read when a graph is built."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest

import daskpatch as dp

VOL = np.random.default_rng(3).random((48, 40, 24), dtype=np.float32)


def test_defaults_come_from_the_yaml_file():
    for key, value in [("block-bytes", "64 MiB"), ("min-blocks", 8), ("spill-bytes", "128 MiB"),
                       ("slab-bytes", "512 KiB"), ("read-bytes", "64 MiB"),
                       ("chunk-cache-bytes", "128 MiB")]:
        assert dask.config.get(f"daskpatch.{key}") == value


def test_slab_bytes_is_part_of_the_graph_name_and_keeps_the_result_close():
    """The slab size changes the order of float sums, so a result computed with another one is
    another graph (never a cached chunk of the first)."""
    x = da.from_array(VOL, chunks=16)
    a = dp.apply_patches(x, np.sqrt, 16, 8)
    with dask.config.set({"daskpatch.slab-bytes": "4 KiB"}):
        b = dp.apply_patches(x, np.sqrt, 16, 8)
        r = dp.reconstruct(dp.extract_patches(VOL, 16, 8), VOL.shape, 16, 8)
    assert a.name != b.name
    assert r.name != dp.reconstruct(dp.extract_patches(VOL, 16, 8), VOL.shape, 16, 8).name
    np.testing.assert_allclose(b.compute(), a.compute(), rtol=1e-6)
    np.testing.assert_allclose(r.compute(), VOL, rtol=1e-5)
    assert dp.apply_patches(x, np.sqrt, 16, 8).name == a.name  # the same setting: the same


@pytest.mark.needs_dask("Array.chunksize")
def test_block_bytes_and_min_blocks_choose_the_automatic_block():
    default = dp.apply_patches(VOL, np.sqrt, 16, 8)
    assert np.prod(default.numblocks) >= 8  # min-blocks: a small volume still gets 8 blocks
    with dask.config.set({"daskpatch.min-blocks": 1}):
        one = dp.apply_patches(VOL, np.sqrt, 16, 8)
        with dask.config.set({"daskpatch.block-bytes": "16 KiB"}):
            small = dp.apply_patches(VOL, np.sqrt, 16, 8)
    assert np.prod(one.numblocks) < np.prod(default.numblocks)  # 184 KB: fewer, larger
    assert np.prod(small.chunksize) * VOL.itemsize <= 16 * 2**10 < np.prod(one.chunksize) * 4
    np.testing.assert_allclose(small.compute(), np.sqrt(VOL), rtol=1e-5)


@pytest.mark.parametrize("key", ["block-bytes", "slab-bytes"])
def test_a_bad_byte_setting_names_itself(key):
    with dask.config.set({f"daskpatch.{key}": "lots"}), pytest.raises(
            ValueError, match=f"daskpatch.{key} must be a number of bytes"):
        dp.apply_patches(VOL, np.sqrt, 16, 8)
