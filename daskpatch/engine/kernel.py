"""The accumulation kernel: weighted patches added into a block's extended buffer."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Union

import numpy as np

from daskpatch.engine import memory as _memory
from daskpatch.engine.numbers import Numbers, cast, doubled, saturate, wide_dtype
from daskpatch.engine.spec import Weights

if TYPE_CHECKING:
    from daskpatch.geometry.grid import PatchGrid
    from daskpatch.geometry.windows import Window
    from daskpatch.engine.sink import Sink

#: A patch of a group in :meth:`Accumulator.add_batch`: its index in the batch, its start
#: relative to the buffer, its grid index.
_Member = tuple[int, tuple[int, ...], tuple[int, ...]]
#: The key of a scratch array: its use, and the thread part using it.
_ScratchKey = tuple[Union[str, int], ...]


class Accumulator:
    """The extended buffer of one block and the weights of its patches.

    With a ``sink`` (separable windows, two or more axes) the buffer is the result itself, and
    each slab is added into it. ``numbers`` (:class:`~daskpatch._numbers.Numbers`) gives the
    dtypes; with ``numbers.copy`` (crop) each patch's owned box is copied into the buffer, whose
    other voxels hold the additive identity (-0.0 for floats), so summing buffers copies too.

    Every sum into the buffer is made out of place under ``np.errstate(over="raise")``: where
    one overflows (finite data near the dtype's limit, weights summing to 1 + ulp) the buffer is
    still intact, and that slab is summed again in float64 at half scale, doubled and saturated
    (:mod:`daskpatch._numbers`).
    """

    def __init__(self, ext_lo: tuple[int, ...], ext_shape: tuple[int, ...], channels: int,
                 numbers: Numbers, weights: Weights, sink: Sink | None = None) -> None:
        self.lo = np.asarray(ext_lo)
        self.shape = tuple(ext_shape)
        user_window = weights.user
        extra = user_window is not None
        self.sink = sink
        self.numbers = numbers
        acc_dtype = numbers.acc
        if sink is not None:
            self.buf = sink.view(tuple(ext_lo), self.shape)
        elif numbers.copy and acc_dtype.kind in "fc":
            self.buf = np.full((channels + extra,) + self.shape, -0.0, dtype=acc_dtype)
        else:  # mapped in row by row as the patches reach it (see reach)
            self.buf = _memory.zeros((channels + extra,) + self.shape, acc_dtype, populate=False)
        self._reached = 0
        # separable: one weight row per start and axis (a user window has none)
        self.q: list[np.ndarray] = weights.q if weights.q is not None else []
        self.q_ids, self.user = weights.q_ids, user_window
        self.slab_bytes = weights.slab_bytes
        self.acc_dtype = acc_dtype
        self.own = _owned_boxes(weights.q) if numbers.copy and weights.q is not None else None
        self._w: dict[int, np.ndarray] = {}  # by weight row id
        self._planes: dict[tuple[int | str, ...], np.ndarray] = {}  # by row ids and dtype
        self._scratch: dict[_ScratchKey, np.ndarray] = {}

    def weight(self, gidx: tuple[int, ...]) -> np.ndarray:
        """A patch's whole weight in :meth:`add`: the user window, or on one axis its row
        (separable weights on two or more axes go through :meth:`add_batch`'s planes)."""
        if self.user is not None:
            return self.user
        key = int(self.q_ids[0][gidx[0]])
        w = self._w.get(key)
        if w is None:
            w = self._w[key] = self.q[0][gidx[0]].astype(self.acc_dtype)
        return w

    def add_batch(self, gidxs: list[tuple[int, ...]], starts: list[np.ndarray],
                  ys: list[np.ndarray]) -> None:
        """Add patches ``ys[m]`` ``(C, *size)`` placed at absolute ``starts[m]``, weighted.

        Separable weights are applied row by row: patches with the same start (and weight row) on
        the first axis form a group; for each slab of a few rows of the buffer, the group's
        patches, each times its cached weight plane (the outer product over the other axes), are
        summed into a scratch that stays in cache, which is then scaled by the first axis's
        weights and added into the buffer once. Memory traffic: each output read once and the
        buffer updated once per group, instead of a multiply and an add over every whole patch.
        """
        if ys and ys[0].dtype.kind == "c" and self.numbers.out.kind != "c":
            raise TypeError(
                f"fn returned {ys[0].dtype} values but the result dtype is {self.numbers.out}: "
                "the imaginary part would be lost; pass "
                f"dtype={np.promote_types(ys[0].dtype, self.numbers.out)} (or return real values)"
            )
        if self.own is not None:
            for g, st, y in zip(gidxs, starts, ys):
                self._copy(g, st, y)
            return
        if self.user is not None or len(self.shape) < 2:
            for g, st, y in zip(gidxs, starts, ys):
                self.add(g, st, y)
            return
        groups: dict[tuple[int, int], list[_Member]] = {}
        for m, (g, st) in enumerate(zip(gidxs, starts)):
            rel = tuple(int(v) for v in np.asarray(st) - self.lo)
            groups.setdefault((rel[0], int(self.q_ids[0][g[0]])), []).append((m, rel, g))
        for (r0, _), members in groups.items():
            self._add_group(r0, members, ys)

    def _add_group(self, r0: int, members: list[_Member], ys: list[np.ndarray]) -> None:
        dt, rest = self.acc_dtype, len(self.shape) - 1
        channels = ys[members[0][0]].shape[0]
        ext = [tuple(min(y, b - r) for y, b, r in zip(ys[m].shape[1:], self.shape, rel))
               for m, rel, _ in members]
        lo = [min(rel[a + 1] for _, rel, _ in members) for a in range(rest)]
        hi = [max(rel[a + 1] + e[a + 1] for (_, rel, _), e in zip(members, ext))
              for a in range(rest)]
        box = tuple(h - l for l, h in zip(lo, hi))
        rows = max(1, self.slab_bytes // (channels * math.prod(box) * dt.itemsize))
        n0 = max(e[0] for e in ext)
        rows = min(rows, n0)
        tmp_shape = tuple(max(e[a + 1] for e in ext) for a in range(rest))
        whole = slice(None)

        def weights(dtype: np.dtype) -> tuple[np.ndarray, list[np.ndarray]]:
            col = self.q[0][members[0][2][0]].astype(dtype)
            return col.reshape(col.shape + (1,) * rest), [self._plane(g, dtype)
                                                          for _, _, g in members]

        col, planes = weights(dt)

        def fill(slab: np.ndarray, tmp: np.ndarray, i: int, n: int, col: np.ndarray,
                 planes: list[np.ndarray]) -> None:
            """``slab`` = rows ``i:i + n`` of the group's weighted patches. The first patch
            is multiplied straight into the slab, which is zeroed only around it."""
            first = True
            for (m, rel, _), e, plane in zip(members, ext, planes):
                k = min(n, e[0] - i)
                if k <= 0:
                    continue
                inner = tuple(slice(0, x) for x in e[1:])
                place = tuple(slice(r - l, r - l + x) for r, l, x in zip(rel[1:], lo, e[1:]))
                src = ys[m][(whole, slice(i, i + k)) + inner]
                if first and k == n:
                    _zero_around(slab, place)
                    np.multiply(src, plane[inner], out=slab[(whole, whole) + place],
                                casting="unsafe")
                    first = False
                    continue
                if first:
                    slab.fill(0)
                    first = False
                t = tmp[(whole, slice(0, k)) + inner]
                np.multiply(src, plane[inner], out=t, casting="unsafe")
                d = slab[(whole, slice(0, k)) + place]
                np.add(d, t, out=d)
            if first:
                slab.fill(0)
            np.multiply(slab, col[i:i + n], out=slab)

        def run(part: int, i0: int, i1: int) -> None:
            acc = self._scratch_array(("acc", part), (channels, rows) + box)
            tmp = self._scratch_array(("tmp", part), (channels, rows) + tmp_shape)
            with np.errstate(over="raise"):
                for i in range(i0, i1, rows):
                    n = min(rows, i1 - i)
                    if self.sink is not None:
                        dst = self.sink.view((int(self.lo[0]) + r0 + i,) + tuple(
                            int(o) + l for o, l in zip(self.lo[1:], lo)), (n,) + box)[:channels]
                    else:
                        dst = self.buf[(slice(0, channels), slice(r0 + i, r0 + i + n))
                                       + tuple(slice(l, h) for l, h in zip(lo, hi))]
                    slab = acc[:, :n]
                    try:
                        fill(slab, tmp, i, n, col, planes)
                        np.add(dst, slab, out=slab)  # out of place: dst survives an overflow
                    except FloatingPointError:  # the same rows in float64, saturated
                        wide = wide_dtype(dt)
                        col64, planes64 = weights(wide)
                        with np.errstate(over="ignore"):
                            half = np.empty(slab.shape, wide)
                            fill(half, np.empty((channels, n) + tmp_shape, wide), i, n,
                                 col64 * 0.5, planes64)
                            half += dst.astype(wide) * 0.5
                        slab[...] = saturate(doubled(half), dt)
                    np.copyto(dst, slab)

        self._reach(r0 + n0)
        pool = self.sink.pool if self.sink is not None else None
        if pool is None or n0 <= rows:
            run(0, 0, n0)
            return
        assert self.sink is not None  # a pool is a sink's
        # blocks run one at a time into a sink: each splits its rows across the cores
        cut = np.linspace(0, -(-n0 // rows), self.sink.workers + 1).round().astype(int) * rows
        parts = [(p, int(a), min(int(b), n0)) for p, (a, b) in enumerate(zip(cut, cut[1:]))
                 if a < b and a < n0]
        for f in [pool.submit(run, *part) for part in parts]:
            f.result()

    def _reach(self, end: int) -> None:
        """Map in the buffer's rows (first spatial axis) up to ``end`` before they are added to:
        a running block holds the rows its patches have reached, not its whole buffer."""
        if self.sink is None and end > self._reached:
            _memory.reach(self.buf, self._reached, end)
            self._reached = end

    def _plane(self, gidx: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """Outer product of the weight rows of all axes but the first, cached by row identity."""
        key = tuple(int(ids[i]) for ids, i in zip(self.q_ids[1:], gidx[1:])) + (dtype.str,)
        w = self._planes.get(key)
        if w is None:
            w = np.ones((), dtype=np.float64)
            for q, i in zip(self.q[1:], gidx[1:]):
                w = np.multiply.outer(w, q[i])
            w = self._planes[key] = w.astype(dtype)
        return w

    def _scratch_array(self, key: _ScratchKey, shape: tuple[int, ...]) -> np.ndarray:
        """A scratch array of ``shape``: one buffer per ``key``, grown when too small."""
        n = math.prod(shape)
        flat = self._scratch.get(key)
        if flat is None or flat.size < n:
            flat = self._scratch[key] = np.empty(n, dtype=self.acc_dtype)
        return flat[:n].reshape(shape)

    def add(self, gidx: tuple[int, ...], start: np.ndarray, data: np.ndarray) -> None:
        """Add one patch's ``data`` ``(C, *size)`` placed at absolute ``start``."""
        w = self.weight(gidx)
        rel = start - self.lo
        size = data.shape[1:]
        end = np.minimum(rel + size, self.shape)
        dst = tuple(slice(int(r), int(e)) for r, e in zip(rel, end))
        src = tuple(slice(0, int(e - r)) for r, e in zip(rel, end))  # border="pad": cropped
        n = data.shape[0]
        self._reach(int(end[0]))
        target = self.buf[(slice(0, n),) + dst]
        data, wc = data[(slice(None),) + src], w[src]
        # one reused scratch buffer: no fresh (page-faulting) temporary per patch
        tmp = self._scratch_array(("add",), data.shape)
        try:
            with np.errstate(over="raise"):
                np.multiply(data, wc, out=tmp, casting="unsafe")
                np.add(target, tmp, out=tmp)  # out of place: target survives an overflow
        except FloatingPointError:  # the same sum in float64 at half scale, saturated
            with np.errstate(over="ignore"):
                half = data.astype(wide_dtype(tmp.dtype)) * (wc * 0.5) + target * 0.5
            tmp[...] = saturate(doubled(half), tmp.dtype)
        np.copyto(target, tmp)
        if self.user is not None:  # weights scaled to add up to at most 1: no overflow
            self.buf[(n,) + dst] += wc

    def _copy(self, gidx: tuple[int, ...], start: np.ndarray, data: np.ndarray) -> None:
        """Copy the box of ``data`` ``(C, *size)`` (at absolute ``start``) its patch owns."""
        own = self.own
        assert own is not None  # copy mode only
        rel = np.asarray(start) - self.lo
        src, dst = [], []
        for a, (r, i) in enumerate(zip(rel.tolist(), gidx)):
            o0, o1 = own[a][i]
            d0, d1 = r + o0, min(r + o1, self.shape[a])
            if d1 <= d0:
                return
            src.append(slice(o0, o0 + d1 - d0))
            dst.append(slice(d0, d1))
        piece = data[(slice(None),) + tuple(src)]
        target = self.buf[(slice(0, piece.shape[0]),) + tuple(dst)]
        origin = [int(self.lo[a]) + d.start for a, d in enumerate(dst)]

        def nan_at(idx: tuple[int, ...]) -> Exception:
            return self.numbers.nan_error((idx[0],) + tuple(o + i for o, i in zip(origin, idx[1:])))

        target[...] = cast(piece, target.dtype, nan_at)


def _zero_around(slab: np.ndarray, place: tuple[slice, ...]) -> None:
    """Zero ``slab`` ``(C, rows, *box)`` outside ``place`` (slices of the box's axes)."""
    head: tuple[slice, ...] = (slice(None), slice(None))
    for sl, n in zip(place, slab.shape[2:]):
        if sl.start > 0:
            slab[head + (slice(0, sl.start),)] = 0
        if sl.stop < n:
            slab[head + (slice(sl.stop, n),)] = 0
        head += (sl,)


def _owned_boxes(q: list[np.ndarray]) -> list[list[tuple[int, int]]]:
    """Per axis, per patch: the ``[lo, hi)`` (in the patch) of the voxels it owns under crop's
    0/1 weights (an interval: the crop rule is a partition of each axis)."""
    boxes = []
    for qa in q:
        nz = qa > 0
        lo = nz.argmax(axis=1)
        hi = qa.shape[1] - nz[:, ::-1].argmax(axis=1)
        hi = np.where(nz.any(axis=1), hi, lo)
        boxes.append(list(zip(lo.tolist(), hi.tolist())))
    return boxes



def make_weights(grid: PatchGrid, window: Window, slab_bytes: int) -> Weights:
    """The normalised weights of ``window``'s patches on ``grid``: per axis, a row per patch
    start and the id of each distinct row (separable windows), or the user window itself."""
    if not window.separable:
        zeros = [np.zeros(len(grid.axis_starts(a)), dtype=np.int64) for a in range(grid.ndim)]
        return Weights(None, zeros, window.array, slab_bytes)
    q: list[np.ndarray] = []
    q_ids: list[np.ndarray] = []
    for a in range(grid.ndim):
        qa = window.axis_weights(grid.axis_starts(a), grid.size[a], grid.padded_shape[a], axis=a)
        _, ids = np.unique(qa, axis=0, return_inverse=True)
        q.append(qa)
        q_ids.append(ids.ravel())
    return Weights(q, q_ids, window.array, slab_bytes)
