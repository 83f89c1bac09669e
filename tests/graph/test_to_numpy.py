"""to_numpy: a Dask array into one NumPy array, engine results accumulated straight into it."""

from __future__ import annotations

import os

import dask
import dask.array as da
import numpy as np
import pytest
from dask.callbacks import Callback
from dask.core import istask

import daskpatch as dp

from ..test_apply_patches import Recorder

RNG = np.random.default_rng(11)
VOL = RNG.random((40, 36, 28)).astype(np.float32)


class Keys(Callback):
    """The keys of the tasks that ran."""

    def __init__(self):
        super().__init__()
        self.ran: set = set()

    def _pretask(self, key, dsk, state):
        self.ran.add(key)


def _close(a, b):
    # blocks add into the result in C order, compute() sums chunk parts in another: last bits
    np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("scheduler", ["threads", "synchronous"])
@pytest.mark.parametrize("blend", ["gaussian", "hann", "constant", "crop", "triangular"])
def test_engine_result_accumulated_in_place(scheduler, blend):
    arr = dp.apply_patches(VOL, np.sqrt, 16, 8, blend=blend, batch_size=3, block_shape=16)
    with dask.config.set(scheduler=scheduler), Keys() as keys:
        out = dp.to_numpy(arr)
    assert out.dtype == np.float32 and out.shape == VOL.shape
    _close(out, arr.compute(scheduler="sync"))
    # no halo, no chunk task: none of the array's own tasks ran, only what it holds as data
    # (the input, the model); the job's own tasks added the blocks straight into the result
    graph = dict(arr.dask)
    assert not [k for k in keys.ran & graph.keys() if istask(graph[k])]
    assert keys.ran - graph.keys()


@pytest.mark.parametrize("kwargs, shape", [
    ({"channel_axis": 0, "out_channels": 2}, (3, 30, 26, 20)),
    ({"channel_axis": -1}, (30, 26, 20, 2)),
    ({"border": "pad", "pad_mode": "constant"}, (30, 26, 21)),
    ({"size": (12, 12)}, (3, 30, 26)),  # one batch axis: three 2-D volumes
    ({"size": (12, 8, 10), "stride": (5, 8, 3)}, (30, 26, 21)),
])
def test_layouts_and_grids(kwargs, shape):
    vol = RNG.random(shape).astype(np.float32)
    kw = {"size": 12, "stride": 6, **kwargs}
    out_channels = kw.get("out_channels")

    def model(b):
        if out_channels:
            return np.concatenate([b[:, :1] * 2, b[:, 1:2] - 1], axis=1)
        return b * 2

    arr = dp.apply_patches(vol, model, batch_size=4, block_shape=None, **kw)
    _close(dp.to_numpy(arr), arr.compute())


def test_every_patch_through_the_model_once():
    rec = Recorder()
    vol = np.arange(32 * 24 * 20, dtype=np.float32).reshape(32, 24, 20)
    out = dp.to_numpy(dp.apply_patches(vol, rec, 8, 4, batch_size=5, block_shape=8))
    grid = dp.PatchGrid(vol.shape, 8, 4)
    assert len(rec.seen) == len(set(rec.seen)) == len(grid)
    assert max(rec.batches) == 5
    _close(out, vol)


def test_reconstruct_and_fill_value():
    p = dp.extract_patches(VOL, 16, 8)
    _close(dp.to_numpy(dp.reconstruct(p, VOL.shape, 16, 8, block_shape=16)), VOL)
    dropped = dp.apply_patches(VOL, lambda b: b, 16, 16, border="drop", fill_value=-1.0)
    out = dp.to_numpy(dropped)
    np.testing.assert_array_equal(out, dropped.compute())
    assert (out[32:] == -1).all() and (out[:32, :32, :16] == VOL[:32, :32, :16]).all()


@pytest.mark.parametrize("make", [
    lambda: dp.apply_patches(VOL, np.sqrt, 16, 8, blend=np.ones((16, 16, 16)) + 1),  # user window
    lambda: dp.apply_patches(VOL, np.sqrt, 16, 8, dtype="float16"),  # a cast at the end
    lambda: dp.apply_patches((VOL * 100).astype("int16"), lambda b: b, 16, 8, dtype="int16"),
    lambda: dp.apply_patches(VOL[:, 0, 0], np.sqrt, 8, 4),  # one axis
    lambda: dp.apply_patches(VOL, np.sqrt, 16, 8) + 1,  # something after the engine
    lambda: da.from_array(VOL, chunks=10) * 2,  # not an engine at all
])
def test_other_arrays_are_written_chunk_by_chunk(make):
    arr = make()
    out = dp.to_numpy(arr)
    assert out.dtype == arr.dtype
    np.testing.assert_array_equal(out, arr.compute())


@pytest.mark.needs_dask("boolean-mask indexing (unknown chunk sizes)")
def test_out_is_filled_and_checked():
    arr = dp.apply_patches(VOL, np.sqrt, 16, 8)
    out = np.full(VOL.shape, 7.0, dtype=np.float32)  # stale content is replaced
    assert dp.to_numpy(arr, out) is out
    _close(out, np.sqrt(VOL))
    with pytest.raises(ValueError, match=r"out must be a writable numpy.ndarray of shape "
                                         r"\(40, 36, 28\) and dtype float32; got .* shape "
                                         r"\(40, 36\)"):
        dp.to_numpy(arr, np.zeros((40, 36), np.float32))
    with pytest.raises(ValueError, match="dtype float64"):
        dp.to_numpy(arr, np.zeros(VOL.shape))
    frozen = np.zeros(VOL.shape, np.float32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="writeable=False"):
        dp.to_numpy(arr, frozen)
    with pytest.raises(TypeError, match="array must be a dask.array.Array; got"):
        dp.to_numpy(VOL)
    x = da.arange(10, chunks=5)
    with pytest.raises(ValueError, match=r"known chunk sizes; got shape \(nan,\)"):
        dp.to_numpy(x[x > 3])


def test_progress_bar(capsys):
    dp.to_numpy(dp.apply_patches(VOL, np.sqrt, 16, 8), progress=True)
    assert "100% Completed" in capsys.readouterr().out


def test_same_result_on_every_run_and_scheduler():
    vol = RNG.random((45, 40, 33)).astype(np.float32)
    arr = dp.apply_patches(vol, lambda b: b * 3 + 1, 16, 6, blend="gaussian", block_shape=12)
    runs = [dp.to_numpy(arr) for _ in range(3)]
    with dask.config.set(scheduler="synchronous"):
        runs.append(dp.to_numpy(arr))
    with dask.config.set(num_workers=3):
        runs.append(dp.to_numpy(arr))
    for other in runs[1:]:
        np.testing.assert_array_equal(other, runs[0])  # blocks add in C order, bit for bit


def _mappings(lo: int, hi: int) -> list[dict]:
    """The /proc/self/smaps entries (flags, resident bytes) of the mappings holding [lo, hi)."""
    found: list[dict] = []
    entry: dict = {}
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(v, 16) for v in head.split("-"))
                entry = {"flags": [], "rss": 0}
                if start < hi and lo < end:
                    found.append(entry)
            elif head == "VmFlags:":
                entry["flags"] = line.split()[1:]
            elif head == "Rss:":
                entry["rss"] = int(line.split()[1]) * 1024
    return found


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="Linux /proc only")
def test_a_large_result_is_mapped_in_whole_without_asking_for_huge_pages():
    # Memory advised for huge pages (as NumPy advises any array >= 4 MiB) stalls in memory
    # compaction on first touch where free huge pages are short: 0.01 s one run, 0.7 s the next
    vol = np.random.default_rng(0).random((96, 128, 128), dtype=np.float32)  # 6 MiB
    res = dp.to_numpy(dp.apply_patches(vol, lambda b: b, 32, 16, blend="gaussian",
                                       batch_size=4))
    np.testing.assert_allclose(res, vol, rtol=1e-5)
    maps = _mappings(res.ctypes.data, res.ctypes.data + res.nbytes)
    assert maps, "the result's memory is not in /proc/self/smaps"
    assert not [m for m in maps if "hg" in m["flags"]]  # no MADV_HUGEPAGE
    assert sum(m["rss"] for m in maps) >= res.nbytes  # all of it in memory
