"""Large zeroed arrays whose memory is mapped in at once, without asking for huge pages.

NumPy advises every allocation of 4 MiB or more for transparent huge pages
(``madvise(MADV_HUGEPAGE)``). Where the kernel's THP ``defrag`` setting is ``madvise`` (a common
default), the first touch of such memory compacts memory synchronously whenever no free 2 MiB
page is at hand: faulting in a 384^3 float32 result then took anywhere from 0.01 s to 0.7 s from
one run to the next. Plain anonymous memory faulted in page by page is steadier but costs two
faults per 4 KiB page where it is read before it is written (the accumulation adds into it):
0.2 - 0.3 s for those 226 MiB. Mapped in at once (``MADV_POPULATE_WRITE``, Linux 5.14, split
across threads; else ``MAP_POPULATE``) it costs a steady ~0.1 s of one core. The arrays a
computation fills whole go through here: :func:`daskpatch.to_numpy`'s result, the work blocks'
buffers and batches, and the output chunks.
"""

from __future__ import annotations

import math
import mmap
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

#: Below this size NumPy does not advise huge pages, and its allocator reuses memory.
_LARGE = 4 << 20
#: ``MADV_POPULATE_WRITE`` (Linux 5.14; Python's mmap module names it from 3.13 on).
_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
_populate_write_works = hasattr(mmap, "MAP_POPULATE")  # Linux; set to False if refused


def _populate(buf: mmap.mmap, start: int, length: int) -> None:
    buf.madvise(_POPULATE_WRITE, start, length)


def zeros(shape: tuple[int, ...], dtype: Any, threads: int = 1) -> np.ndarray:
    """A zeroed array of ``shape`` and ``dtype``, its memory mapped in already when large
    (by ``threads`` threads, where the kernel can split the work).

    The memory is released when the array (and every view of it) is.

    Examples
    --------
    >>> a = zeros((256, 256, 64), np.float32)
    >>> a.shape, a.dtype, float(a.max()), a.flags.writeable
    ((256, 256, 64), dtype('float32'), 0.0, True)
    """
    global _populate_write_works
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    flags = getattr(mmap, "MAP_PRIVATE", None), getattr(mmap, "MAP_ANONYMOUS", None)
    if nbytes < _LARGE or dtype.hasobject or None in flags:  # Windows: NumPy's
        return np.zeros(shape, dtype=dtype)
    anonymous = flags[0] | flags[1]  # type: ignore[operator]
    if not _populate_write_works:
        populate = getattr(mmap, "MAP_POPULATE", 0)
        buf = mmap.mmap(-1, nbytes, flags=anonymous | populate)
        if not populate:  # written once now: one fault per page, not a read then a write
            np.frombuffer(buf, dtype=np.uint8).fill(0)
        return np.frombuffer(buf, dtype=dtype).reshape(shape)
    buf = mmap.mmap(-1, nbytes, flags=anonymous)
    parts = max(1, min(int(threads), nbytes // _LARGE))
    cuts = [nbytes * k // parts // mmap.PAGESIZE * mmap.PAGESIZE for k in range(parts)] + [nbytes]
    try:
        if parts == 1:
            _populate(buf, 0, nbytes)
        else:
            with ThreadPoolExecutor(parts, "daskpatch-populate") as pool:
                list(pool.map(lambda k: _populate(buf, cuts[k], cuts[k + 1] - cuts[k]),
                              range(parts)))
    except OSError:  # a kernel before 5.14
        _populate_write_works = False
        return zeros(shape, dtype, threads)
    return np.frombuffer(buf, dtype=dtype).reshape(shape)
