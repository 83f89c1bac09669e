"""Large zeroed arrays (``daskpatch.engine.memory``): mapped in at once, or row by row as a block's
accumulation reaches them, so that running block tasks do not each hold a whole buffer."""

from __future__ import annotations

import ctypes
import mmap
import os
import select
import struct
import sys
import threading

import numpy as np
import pytest

from daskpatch import PatchGrid
from daskpatch.engine import memory as _memory
from daskpatch.engine.kernel import Accumulator, make_weights
from daskpatch.engine.numbers import Numbers
from daskpatch.geometry.windows import parse_blend

MiB = 2**20
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RSS from /proc")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@linux
def test_zeros_mapped_in_at_once_or_row_by_row():
    before = rss()
    a = _memory.zeros((2, 64, 256, 256), np.float32)  # 32 MiB, mapped in now
    assert rss() - before > 30 * MiB
    assert float(a.max()) == 0.0 and a.flags.writeable
    del a
    before = rss()
    b = _memory.zeros((2, 64, 256, 256), np.float32, populate=False)
    assert rss() - before < 4 * MiB  # nothing mapped in yet
    _memory.reach(b, 0, 16)  # a quarter of each of the 2 planes
    grown = rss() - before
    assert 7 * MiB < grown < 12 * MiB, grown / MiB
    _memory.reach(b[:, 8:], 0, 64)  # not the whole mapping: left as it is
    _memory.reach(np.zeros((2, 64, 256, 256), np.float32), 0, 64)  # not ours: left as it is
    assert rss() - before - grown < 4 * MiB
    b[:, 16:] = 1.0  # the rest still zero-filled and writable
    assert float(b[:, :16].max()) == 0.0 and float(b[:, 16:].min()) == 1.0
    full = rss()
    _memory.drop(b, 0, 48)  # three quarters of each plane given back
    assert full - rss() > 20 * MiB
    assert float(b[:, :48].max()) == 0.0 and float(b[:, 48:].min()) == 1.0


@linux
def test_mapping_in_leaves_the_gil_to_other_threads(monkeypatch):
    # mmap.madvise holds the GIL through the whole system call (the kernel zeroing every page):
    # the other threads' Python stood still meanwhile; the call through ctypes releases it. With
    # libc's poll() in madvise's place (the same C signature), the call waits on a pipe that only
    # this thread's Python writes to: it returns 1 (woken) if the GIL was left, else it times out
    buf = mmap.mmap(-1, 16 * MiB)
    _memory._populate(buf, 0, len(buf))
    assert np.frombuffer(buf, np.uint8)[::4096].max() == 0
    with pytest.raises(OSError, match="madvise: Invalid argument"):
        _memory._madvise(buf, 12345, 0, len(buf))

    poll = ctypes.CDLL(None, use_errno=True).poll
    poll.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    poll.restype = ctypes.c_int
    monkeypatch.setattr(_memory, "_c_madvise", poll)
    read_end, write_end = os.pipe()
    fds = mmap.mmap(-1, 4096)
    struct.pack_into("ihh", fds, 0, read_end, select.POLLIN, 0)  # one struct pollfd
    inside, woken = threading.Event(), []

    def wait_in_c():
        inside.set()
        try:
            _memory._madvise(fds, 60_000, 0, 1)  # "advice": poll's timeout in ms (a guard)
        except OSError:  # poll returned 1, not madvise's 0: woken by the write
            woken.append(True)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1000.0)  # no forced switch: the GIL changes hands only when left
    try:
        t = threading.Thread(target=wait_in_c)
        t.start()
        inside.wait()  # runs again once the thread leaves the GIL: in the C call, if ever
        os.write(write_end, b"x")
        t.join()
    finally:
        sys.setswitchinterval(interval)
        os.close(read_end), os.close(write_end)
    assert woken == [True]


@linux
def test_a_zarr_region_gives_back_the_rows_its_patches_passed(tmp_path):
    import zarr

    from daskpatch.storage.sources import Region

    z = zarr.create_array(str(tmp_path / "v.zarr"), shape=(128, 128, 128), chunks=(32,) * 3,
                          dtype="f4")
    z[...] = 1.0
    before = rss()
    region = Region(z, (0, 0, 0), (128, 128, 128), None, [None] * 3)
    region.upto(128)  # 8 MiB read
    assert rss() - before > 7 * MiB and float(region.data.min()) == 1.0
    full = rss()
    region.drop(96)
    assert full - rss() > 5 * MiB
    assert float(region.data[:, 96:].min()) == 1.0


@linux
def test_a_block_buffer_holds_only_the_rows_its_patches_reached():
    grid = PatchGrid((256, 256, 256), 64, 32)
    window = parse_blend("gaussian", grid.size)
    numbers = Numbers(np.dtype(np.float32), np.dtype(np.float32), False, grid.shape,
                      (256, 256, 256), 1, None)
    before = rss()
    acc = Accumulator((0, 0, 0), (256, 256, 256), 1, numbers, make_weights(grid, window, 1 << 20))
    assert rss() - before < 8 * MiB  # a 64 MiB buffer, not mapped in at the start
    ones = np.ones((1, 64, 64, 64), np.float32)
    acc.add_batch([(0, 0, 0), (0, 1, 0)], [np.array([0, 0, 0]), np.array([0, 32, 0])], [ones] * 2)
    grown = rss() - before
    assert grown < 24 * MiB, grown / MiB  # rows 0:64 of 256 (16 MiB) and scratch
    assert float(acc.buf[0, :64, :96, :64].min()) > 0.0 and float(acc.buf[0, 64:].max()) == 0.0
