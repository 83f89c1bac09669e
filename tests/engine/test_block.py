"""Batches: fn gets full batches however the volume is split, and a slow fn (an accelerator)
overlaps with copying batches in and blending them (a helper thread per block task).

Whether fn counts as slow is the engine's measurement (``block.OVERLAP``): the tests set it, to 0
(every fn goes to the helper thread) or to infinity (none does), instead of timing a sleeping fn.
"""

from __future__ import annotations

import threading
import time

import dask
import numpy as np
import pytest
import zarr

import daskpatch as dp
from daskpatch import PatchGrid
from daskpatch.engine import block


class Sizes:
    """A model recording the size of each batch and the thread that ran it."""

    def __init__(self, fn=lambda b: b):
        self.fn = fn
        self.sizes: list[int] = []
        self.threads: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, batch):
        with self.lock:
            self.sizes.append(len(batch))
            self.threads.append(threading.current_thread().name)
        return self.fn(batch)


@pytest.fixture
def slow_fn(monkeypatch):
    """Every fn counts as slow: the block tasks run it in their helper thread."""
    monkeypatch.setattr(block, "OVERLAP", 0.0)


def _helpers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("daskpatch-fn")]


def _owning_blocks(out, shape, size, stride) -> int:
    grid = PatchGrid(shape, size, stride)
    plan = grid.block_plan(tuple(c[0] for c in out.chunks))
    return int(np.prod([sum(i1 > i0 for i0, i1 in o) for o in plan.owned]))


# -- full batches --------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, size, stride, batch_size, min_fill", [
    ((48, 48, 48), 32, 16, 4, 1.0),  # 8 patches: two calls of 4, not eight of one (min-blocks)
    ((64, 64, 64), 16, 8, 8, 0.85),
    ((25, 75, 50), 12, 6, 16, 0.85),
    ((128, 128), 16, 8, 32, 0.85),
    ((40, 30), 8, 4, 7, 0.5),  # 63 patches in 4 blocks of 15 or 16: 3 calls each, not 9
])
def test_every_call_gets_a_full_batch_but_one_remainder_per_block(shape, size, stride,
                                                                  batch_size, min_fill):
    vol = np.random.default_rng(0).random(shape, dtype=np.float32)
    rec = Sizes(lambda b: b * 2)
    out = dp.apply_patches(vol, rec, size, stride, batch_size=batch_size)
    result = out.compute()
    n = len(PatchGrid(shape, size, stride))
    assert sum(rec.sizes) == n
    assert max(rec.sizes) <= batch_size
    blocks = _owning_blocks(out, shape, size, stride)
    assert sum(s < batch_size for s in rec.sizes) <= blocks  # one remainder per block at most
    # and every block owns a batch at least: no block makes only a part-filled call
    assert len(rec.sizes) <= n // batch_size + blocks
    fill = -(-n // batch_size) / len(rec.sizes)
    assert fill >= min_fill, (rec.sizes, out.chunks)
    # the same numbers whatever the blocks, to rounding: the order of the float sums follows
    # the blocks and batches (bit for bit only for the same blocks and batch_size)
    small = dp.apply_patches(vol, lambda b: b * 2, size, stride, batch_size=batch_size,
                             block_shape=stride)
    assert small.numblocks != out.numblocks
    np.testing.assert_allclose(result, small.compute(), rtol=2e-6, atol=1e-6)


def test_batch_size_one_keeps_the_blocks_and_min_blocks():
    vol = np.zeros((48, 48, 48), np.float32)
    one = dp.apply_patches(vol, lambda b: b, 32, 16)
    four = dp.apply_patches(vol, lambda b: b, 32, 16, batch_size=4)
    assert _owning_blocks(one, vol.shape, 32, 16) == 8  # min-blocks: 8 blocks of one patch
    # two blocks of four patches: both cores busy, full batches
    assert _owning_blocks(four, vol.shape, 32, 16) == 2


def test_blocks_grown_from_input_chunks_stay_whole_chunks(tmp_path, setting):
    """Aligned input chunks are the blocks; where they hold too few patches for full batches,
    the blocks are several whole chunks (each chunk still read by one block)."""
    setting("daskpatch.block-bytes", "64 KiB")  # 16^3 float32 chunks are in range
    z = zarr.create_array(tmp_path / "in.zarr", shape=(64, 64, 64), chunks=(16, 16, 16),
                          dtype="f4")
    z[:] = np.random.default_rng(1).random(z.shape, dtype=np.float32)
    rec = Sizes()
    out = dp.apply_patches(dp.open_volume(tmp_path / "in.zarr"), rec, 32, 16, batch_size=8)
    assert all(c[0] % 16 == 0 for c in out.chunks)
    assert tuple(c[0] for c in out.chunks) != (16, 16, 16)  # one patch per chunk: grown
    np.testing.assert_allclose(out.compute(), z[:], atol=1e-5)
    n = len(PatchGrid(z.shape, 32, 16))
    assert -(-n // 8) / len(rec.sizes) >= 0.85
    with dask.config.set({"daskpatch.block-bytes": "64 KiB"}):
        unbatched = dp.apply_patches(dp.open_volume(tmp_path / "in.zarr"), rec, 32, 16)
    assert tuple(c[0] for c in unbatched.chunks) == (16, 16, 16)  # batch_size=1: the input's chunks, as before


# -- the pipeline --------------------------------------------------------------------------------
def _volume(shape=(24, 24, 24)):
    return np.random.default_rng(2).random(shape, dtype=np.float32)


@pytest.mark.parametrize("run", ["compute", "to_numpy", "zarr"])
def test_a_slow_model_runs_in_a_helper_thread_with_the_same_result(run, tmp_path, monkeypatch):
    vol = _volume()

    def model(b):
        return np.sin(b) * 3 + 1

    slow = Sizes(model)
    fast = Sizes(model)
    kw = dict(batch_size=4, blend="gaussian", block_shape=16)

    def result(fn, overlap, name):
        monkeypatch.setattr(block, "OVERLAP", overlap)
        x = dp.apply_patches(vol, fn, 8, 4, **kw)
        if run == "compute":
            return x.compute()
        if run == "to_numpy":
            return dp.to_numpy(x)
        return dp.to_zarr(x, tmp_path / name)[:]

    got = result(slow, 0.0, "a.zarr")  # slow: fn in the helper thread
    want = result(fast, float("inf"), "b.zarr")  # fast: fn in the task's own thread
    np.testing.assert_array_equal(got, want)  # bit for bit: blended in the same order
    assert any(t.startswith("daskpatch-fn") for t in slow.threads)  # overlapped
    assert not any(t.startswith("daskpatch-fn") for t in fast.threads)
    assert sorted(slow.sizes) == sorted(fast.sizes)
    assert _helpers() == []  # joined before the task returned


def test_a_model_keeping_the_cores_busy_stays_in_the_task_thread(monkeypatch):
    """A model with threads of its own on the CPU (torch's intra-op threads) keeps every core
    busy during its first call, so the helper thread would only take cores from it; one that
    waits (an accelerator) gets the helper. One core here, so that a model spinning in its own
    thread is "every core"; the threshold low, so that a loaded machine does not decide."""
    monkeypatch.setattr(dask.system, "cpu_count", lambda: 1)
    monkeypatch.setattr(block, "CORES_BUSY", 0.3)
    monkeypatch.setattr(block, "OVERLAP", 0.0)  # slow next to the block's own work, both

    def spin(b):
        end = time.process_time() + 0.01  # 10 ms of CPU
        while time.process_time() < end:
            pass
        return b * 2

    busy = Sizes(spin)
    sleepy = Sizes(lambda b: (time.sleep(0.01), b * 2)[1])
    vol = _volume((16, 16, 16))
    a = dp.apply_patches(vol, busy, 8, 4, batch_size=2, block_shape=16).compute(scheduler="sync")
    b = dp.apply_patches(vol, sleepy, 8, 4, batch_size=2, block_shape=16).compute(
        scheduler="sync")
    np.testing.assert_array_equal(a, b)
    assert not any(t.startswith("daskpatch-fn") for t in busy.threads)
    assert any(t.startswith("daskpatch-fn") for t in sleepy.threads)


def test_a_slow_model_failing_in_the_helper_keeps_its_note_and_stops_the_block(slow_fn):
    vol = _volume((16, 16, 16))
    calls = []

    def model(b):
        calls.append(threading.current_thread().name)
        if len(calls) == 4:
            raise ZeroDivisionError("the model divided by zero")
        return b

    out = dp.apply_patches(vol, model, 8, 4, batch_size=2, block_shape=16)
    with pytest.raises(ZeroDivisionError, match="the model divided by zero") as info:
        out.compute(scheduler="sync")
    (note,) = info.value.__notes__
    # the fourth batch of block (0, 0, 0): patches 6 and 7 of its 3x3x3
    assert "batch of 2 patches (indices 6, 7 in the order of extract_patches)" in note
    assert "starting at (0, 8, 0), (0, 8, 4)" in note
    assert "work block (0, 0, 0)" in note
    assert calls[-1].startswith("daskpatch-fn")
    assert len(calls) == 4  # the batch queued behind the failing one never reached fn
    assert _helpers() == []


def test_an_error_blending_stops_the_helper_too(slow_fn):
    """An error in the task's own thread (here a complex output into a real result) joins the
    helper thread before it propagates."""
    vol = _volume((16, 16, 16))
    calls = []

    def model(b):
        calls.append(1)
        return b.astype(np.complex64) if len(calls) >= 3 else b

    out = dp.apply_patches(vol, model, 8, 4, batch_size=2, block_shape=16)
    with pytest.raises(TypeError, match="the imaginary part would be lost"):
        out.compute(scheduler="sync")
    assert _helpers() == []
    assert len(calls) <= 4  # the failing batch and at most the one queued behind it


@pytest.mark.parametrize("channel_axis, border", [(None, "shift"), (0, "pad"), (-1, "shift")])
def test_a_zarr_region_is_read_in_slabs_each_chunk_once(counting_zarr, channel_axis, border,
                                                        slow_fn):
    """A block's region is read slab by slab as its batches reach it (while the model runs on
    the batch before), every chunk once per block (with the chunk cache off; on, once per job);
    the result is the eager read's."""
    shape = (40, 36, 28)
    data = np.random.default_rng(8).random(shape).astype(np.float32)
    chunks = (8, 12, 7)
    if channel_axis is not None:
        data = np.stack([data, 1 - data], axis=channel_axis)
        chunks = (2, *chunks) if channel_axis == 0 else (*chunks, 2)
    z, store = counting_zarr(data, chunks)
    kw = dict(batch_size=3, block_shape=16, border=border, channel_axis=channel_axis)
    slow = Sizes(np.sqrt)
    with dask.config.set({"daskpatch.chunk-cache-bytes": 0}):
        got = dp.apply_patches(z, slow, 8, 4, **kw).compute()
    np.testing.assert_array_equal(got, dp.apply_patches(data, np.sqrt, 8, 4, **kw).compute())
    grid = PatchGrid(shape, 8, 4, border=border)
    plan = grid.block_plan(16)
    spatial = (8, 12, 7)
    expected = 0
    for bidx in np.ndindex(*plan.nblocks):
        if not plan.has_patches(bidx):
            continue
        touched = 1
        for a, b in enumerate(bidx):
            i0, i1 = plan.owned[a][b]
            lo = int(grid.axis_starts(a)[i0])
            hi = min(int(grid.axis_starts(a)[i1 - 1]) + 8, shape[a])
            touched *= (hi - 1) // spatial[a] - lo // spatial[a] + 1
        expected += touched
    assert store.chunk_reads == expected
    assert any(t.startswith("daskpatch-fn") for t in slow.threads)
    before = store.chunk_reads  # the chunk cache on: each chunk once per job
    np.testing.assert_array_equal(dp.apply_patches(z, slow, 8, 4, **kw).compute(), got)
    assert store.chunk_reads - before == 5 * 3 * 4


