"""Large zeroed arrays whose memory is mapped in at once, without asking for huge pages.

NumPy advises every allocation of 4 MiB or more for transparent huge pages
(``madvise(MADV_HUGEPAGE)``). Where the kernel's THP ``defrag`` setting is ``madvise`` (a common
default), the first touch of such memory compacts memory synchronously whenever no free 2 MiB
page is at hand: faulting in a 384^3 float32 result then took anywhere from 0.01 s to 0.7 s from
one run to the next. Plain anonymous memory faulted in page by page is steadier but costs two
faults per 4 KiB page where it is read before it is written (the accumulation adds into it):
0.2 - 0.3 s for those 226 MiB. Mapped in at once (``MADV_POPULATE_WRITE``, Linux 5.14, split
across threads; else ``MAP_POPULATE``) it costs a steady ~0.1 s of one core. The arrays a
computation fills whole go through here: :func:`daskpatch.to_numpy`'s result, the batches and
the output chunks. A work block's buffer, filled row by row over its task, is mapped in the same
way but row by row as the accumulation reaches it (``populate=False``, then :func:`reach`), so
that the tasks running at once do not each hold a whole buffer from their start.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

#: Below this size NumPy does not advise huge pages, and its allocator reuses memory.
_LARGE = 4 << 20
#: ``MADV_POPULATE_WRITE`` (Linux 5.14; Python's mmap module names it from 3.13 on).
_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
_populate_write_works = hasattr(mmap, "MAP_POPULATE")  # Linux; set to False if refused


def _libc_madvise() -> Any:
    """libc's ``madvise`` through ctypes, or ``None`` where there is none."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):  # pragma: no cover - no libc madvise (Windows)
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


_c_madvise = _libc_madvise()


def _madvise(buf: mmap.mmap, advice: int, start: int, length: int) -> None:
    """``buf.madvise(advice, start, length)``, without holding the GIL.

    ``mmap.madvise`` holds it for the whole system call, and mapping in (the kernel zeroing the
    pages) takes ~0.5 ms per MiB here: the other threads' Python waited that long (13% of the
    time the GIL was held in ``busy.py``), and the threads of :func:`zeros` took turns. A call
    through ctypes releases it.
    """
    if _c_madvise is None:  # pragma: no cover - no libc madvise
        buf.madvise(advice, start, length)
        return
    address = ctypes.addressof(ctypes.c_char.from_buffer(buf))  # the export ends at once
    if _c_madvise(address + start, length, advice) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"madvise: {os.strerror(errno)}")


def _populate(buf: mmap.mmap, start: int, length: int) -> None:
    _madvise(buf, _POPULATE_WRITE, start, length)


def zeros(shape: tuple[int, ...], dtype: Any, threads: int = 1, populate: bool = True
          ) -> np.ndarray:
    """A zeroed array of ``shape`` and ``dtype``, its memory mapped in already when large
    (by ``threads`` threads, where the kernel can split the work); with ``populate=False``, not
    yet: :func:`reach` maps in its rows later.

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
    if not populate:
        return np.frombuffer(mmap.mmap(-1, nbytes, flags=anonymous), dtype=dtype).reshape(shape)
    if not _populate_write_works:
        map_populate = getattr(mmap, "MAP_POPULATE", 0)
        buf = mmap.mmap(-1, nbytes, flags=anonymous | map_populate)
        if not map_populate:  # written once now: one fault per page, not a read then a write
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


def _mapping(a: np.ndarray) -> mmap.mmap | None:
    """The mapping behind ``a`` when ``a`` is a whole array from :func:`zeros` (not a view)."""
    buf: Any = a
    while buf is not None and not isinstance(buf, mmap.mmap):  # array -> array -> memoryview
        buf = buf.obj if isinstance(buf, memoryview) else getattr(buf, "base", None)
    if isinstance(buf, mmap.mmap) and a.nbytes == len(buf) and a.flags.c_contiguous:
        return buf
    return None


def drop(a: np.ndarray, lo: int, hi: int) -> None:
    """Give rows ``lo:hi`` of the second axis of ``a`` (an array from :func:`zeros` with
    ``populate=False``) back to the system: they read as zeros afterwards. Only whole pages
    inside those rows go; anything else is left as it is.

    Examples
    --------
    >>> a = zeros((1, 64, 128, 128), np.float32, populate=False)
    >>> a[:] = 1; drop(a, 0, 32); float(a[0, :32].max()), float(a[0, 32:].min())
    (0.0, 1.0)
    """
    buf = _mapping(a)
    dontneed = getattr(mmap, "MADV_DONTNEED", None)
    if buf is None or dontneed is None:
        return
    page = mmap.PAGESIZE
    for start, end in _spans(a, lo, hi):
        start, end = -(-start // page) * page, end // page * page  # whole pages inside
        if end > start:
            _madvise(buf, dontneed, start, end - start)


def reach(a: np.ndarray, lo: int, hi: int) -> None:
    """Map in rows ``lo:hi`` of the second axis of ``a`` (for every index of the first), an
    array from :func:`zeros` with ``populate=False``; anything else is left as it is.

    Examples
    --------
    >>> a = zeros((2, 64, 128, 128), np.float32, populate=False)  # 8 MiB, not yet mapped in
    >>> reach(a, 0, 16); float(a[:, :16].sum())
    0.0
    """
    buf = _mapping(a)
    if buf is None or not _populate_write_works:
        return
    for start, end in _spans(a, lo, hi):
        start = start // mmap.PAGESIZE * mmap.PAGESIZE  # madvise starts on a page
        try:
            _populate(buf, start, end - start)
        except OSError:  # a kernel before 5.14: the pages fault in as they are written
            return


def _spans(a: np.ndarray, lo: int, hi: int) -> list[tuple[int, int]]:
    """The byte ranges of rows ``lo:hi`` (second axis) of C-contiguous ``a``, one per index of
    its first axis."""
    if hi <= lo:
        return []
    plane, row = a.strides[0], a.strides[1]
    return [(c * plane + lo * row, c * plane + hi * row) for c in range(a.shape[0])]
