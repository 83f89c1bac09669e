"""The graphs apply_patches builds: a few tasks per output chunk, the model stored once."""

from __future__ import annotations

import math

import dask.array as da
from dask.core import get_dependencies
import numpy as np
import zarr

import daskpatch as dp
from daskpatch.graph import layers as _graph


def test_tasks_per_output_chunk():
    vol = da.zeros((64, 64, 64), chunks=16, dtype=np.float32)
    out = dp.apply_patches(vol, lambda b: b, 16, 8, block_shape=16)
    keys = list(dict(_graph.layers(out)[out.name]))
    per_chunk = len(keys) / math.prod(out.numblocks)
    assert per_chunk <= 3


class _MarkedModel:
    """A model whose pickle carries a marker: the graph keys that ship it can be counted."""

    marker = b"daskpatch-test-model-weights-0xC0FFEE"

    def __init__(self) -> None:
        self.weights = self.marker

    def __call__(self, batch):
        return batch * 2


def test_the_model_is_one_graph_key_that_every_block_task_reads(tmp_path):
    import pickle

    data = np.random.default_rng(3).random((48, 40), dtype=np.float32)
    z = zarr.create_array(tmp_path / "in.zarr", shape=data.shape, chunks=(16, 16), dtype="f4")
    z[...] = data
    model = _MarkedModel()
    out = dp.apply_patches(dp.open_volume(tmp_path / "in.zarr"), model, 16, 8, block_shape=16,
                           batch_size=3)
    graph = dict(out.__dask_graph__())
    holding = [k for k, task in graph.items() if _MarkedModel.marker in pickle.dumps(task)]
    assert len(holding) == 1, holding  # once, not once per block (6 blocks here)
    readers = [k for k in graph if holding[0] in get_dependencies(graph, k)]
    assert len(readers) == 6  # and every block task reads it (the 3 x 2 blocks owning patches)
    np.testing.assert_allclose(out.compute(), 2 * data, rtol=1e-6)
    np.testing.assert_allclose(dp.to_numpy(out), 2 * data, rtol=1e-6)


def test_a_block_task_carries_only_its_own_part_of_the_plan():
    """Its pickled size does not grow with the volume (it carried every patch start and weight
    row of its axes: 1.6 MB per task at 32768^3)."""
    import pickle

    sizes = []
    for n in (2048, 32768):
        v = da.zeros((n, n, n), dtype=np.float32, chunks=(512, 512, 512))
        r = dp.apply_patches(v, np.negative, 64, 32, block_shape=512)
        layer = _graph.layers(r)[r.name]
        sizes.append(len(pickle.dumps(layer[next(iter(layer))][1])))
    assert sizes[1] <= 1.01 * sizes[0] < 64 * 1024
