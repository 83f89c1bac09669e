"""Nothing is computed or read while graphs are built; graphs stay small on huge volumes."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest

import daskpatch as dp
from daskpatch.graph import layers as _graph

from ..conftest import ComputeForbidden


def test_building_computes_nothing(no_compute):
    x = da.random.random((64, 64, 64), chunks=16)
    p = dp.extract_patches(x, 16, 8, border="pad")
    r = dp.reconstruct(p, x.shape, 16, 8, border="pad")
    a = dp.apply_patches(x, lambda b: b, 16, 8, blend="crop", batch_size=4)
    assert p.shape[0] == 7**3 and r.shape == a.shape == x.shape
    with pytest.raises(ComputeForbidden):
        a.compute()  # the fixture really refuses


@pytest.mark.needs_dask("dask.array.from_zarr")
def test_building_reads_no_chunk(counting_zarr, no_compute):
    z, store = counting_zarr(np.ones((32, 32, 32), np.float32), (16, 16, 16))
    p = dp.extract_patches(z, 16, 8)
    dp.reconstruct(p, z.shape, 16, 8)
    dp.apply_patches(z, lambda b: b, 16, 8)
    dp.apply_patches(da.from_zarr(z), lambda b: b, 16, 8)
    assert store.chunk_reads == 0


def test_extract_reads_only_overlapping_chunks(counting_zarr):
    data = np.arange(64**3, dtype=np.float32).reshape(64, 64, 64)
    z, store = counting_zarr(data, (16, 16, 16))
    p = dp.extract_patches(z, 16, 16)  # stride-aligned chunks: one chunk per patch
    first = p[0].compute()
    np.testing.assert_array_equal(first, data[:16, :16, :16])
    per_task = p.chunks[0][0]  # patches in the first task's group
    assert store.chunk_reads == per_task


@pytest.mark.needs_dask("graph culling (computing one chunk builds every task)")
def test_huge_virtual_volume_builds_lazily():
    """10000^3 float64 would occupy 8 TB; the graph is built without enumerating tasks."""
    x = da.zeros((10000, 10000, 10000), chunks=500)
    p = dp.extract_patches(x, 128, 128)
    assert p.shape == (79**3, 128, 128, 128)
    assert not _graph.layers(p)[p.name].is_materialized()
    first = p[0]
    culled = first.__dask_optimize__(first.__dask_graph__(), first.__dask_keys__())
    assert len(dict(culled)) < 50  # computing one patch touches a handful of tasks
    assert float(first.sum().compute()) == 0.0
    out = dp.apply_patches(x, lambda b: b, 128, 64, batch_size=8)
    assert not _graph.layers(out)[out.name].is_materialized()
    assert out.shape == x.shape


def test_identical_calls_share_graph_names():
    x = da.ones((32, 32), chunks=16)
    assert dp.extract_patches(x, 8).name == dp.extract_patches(x, 8).name
    assert dp.extract_patches(x, 8).name != dp.extract_patches(x, 8, 4).name
    p = dp.extract_patches(x, 8, 4)
    assert dp.reconstruct(p, x.shape, 8, 4).name == dp.reconstruct(p, x.shape, 8, 4).name


def test_works_on_the_distributed_graph_path_without_a_cluster():
    """Graphs pickle (what a Client does before sending them)."""
    import pickle

    x = da.ones((32, 32), chunks=16)
    out = dp.apply_patches(x, np.negative, 8, 4)
    graph = dict(dask.optimize(out)[0].__dask_graph__())
    pickle.dumps(graph)
