"""Pictures without a plotting library: a :class:`PatchGrid` and a blend window as SVG text.

:func:`grid_svg` draws a grid as dask draws an array: the volume's outline (a rectangle in 2-D,
an oblique box in 3-D; the last three axes of a grid with more), and on a ruler beside each
drawn axis the patches along that axis: one tick per patch start, the coverage shaded by how many
patches overlap there (white where none does), the start of a patch shifted back to end flush
with the volume marked in red, and the extent of the first and the last patch outlined in the
volume. Optional work blocks are dashed lines across the faces. Only per-axis starts are
drawn, never one shape per patch, and an axis with many starts gets every k-th tick, so a
10000^3 grid of a million patches draws as fast as a small one.

:func:`plot_window` draws the normalised blend weights of the patches along one axis and their
sum (one wherever a patch covers), as daskpatch's engine uses them.

Both return SVG text that parses as XML; in a notebook, ``PatchGrid`` shows its picture as its
``_repr_html_``, and ``IPython.display.SVG(dp.plot_window(...))`` shows the window.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any
from xml.sax.saxutils import escape

import numpy as np

from daskpatch.geometry.parse import BORDERS, parse_choice, parse_int

__all__ = ["grid_svg", "plot_window"]

#: Most start ticks drawn on one axis (more starts: every k-th, and always the last).
MAX_TICKS = 40
#: Most block lines drawn across one axis.
MAX_BLOCK_LINES = 40
#: Longest drawn axis, in pixels; shortest.
_LONG, _SHORT = 220.0, 36.0
_BAND, _GAP = 10.0, 6.0  # ruler band width and its distance from the volume's edge
_BAR = 18.0  # height of a 1-D volume

_VOLUME = "#ECB172"  # dask's chunk colour
_COVER = "#1f77b4"
_SHIFTED = "#d62728"
_FONT = 'font-family="sans-serif" font-size="11"'


class _Canvas:
    """SVG elements plus their bounding box."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.lo = [math.inf, math.inf]
        self.hi = [-math.inf, -math.inf]

    def _see(self, *pts: tuple[float, float]) -> None:
        for x, y in pts:
            self.lo = [min(self.lo[0], x), min(self.lo[1], y)]
            self.hi = [max(self.hi[0], x), max(self.hi[1], y)]

    def polygon(self, pts: list[tuple[float, float]], style: str, cls: str = "") -> None:
        self._see(*pts)
        p = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
        c = f' class="{cls}"' if cls else ""
        self.items.append(f'<polygon{c} points="{p}" style="{style}"/>')

    def line(self, a: tuple[float, float], b: tuple[float, float], style: str,
             cls: str = "") -> None:
        self._see(a, b)
        c = f' class="{cls}"' if cls else ""
        self.items.append(f'<line{c} x1="{a[0]:.1f}" y1="{a[1]:.1f}" x2="{b[0]:.1f}" '
                          f'y2="{b[1]:.1f}" style="{style}"/>')

    def polyline(self, pts: list[tuple[float, float]], style: str, cls: str = "") -> None:
        self._see(*pts)
        p = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
        c = f' class="{cls}"' if cls else ""
        self.items.append(f'<polyline{c} points="{p}" style="fill:none;{style}"/>')

    def text(self, at: tuple[float, float], s: str, anchor: str = "middle", angle: float = 0,
             extra: str = "") -> None:
        width = 6.2 * len(s)
        x, y = at
        left = {"start": x, "middle": x - width / 2, "end": x - width}[anchor]
        if angle:
            r = max(width, 12.0)
            self._see((x - r, y - r), (x + r, y + r))
        else:
            self._see((left, y - 11), (left + width, y + 3))
        rot = f' transform="rotate({angle:.0f},{x:.1f},{y:.1f})"' if angle else ""
        self.items.append(f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" {_FONT}'
                          f'{extra}{rot}>{escape(s)}</text>')

    def svg(self, margin: float = 8.0) -> str:
        x0, y0 = self.lo[0] - margin, self.lo[1] - margin
        w, h = self.hi[0] - self.lo[0] + 2 * margin, self.hi[1] - self.lo[1] + 2 * margin
        head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w:.0f}" height="{h:.0f}" '
                f'viewBox="{x0:.1f} {y0:.1f} {w:.1f} {h:.1f}">')
        return "\n".join([head, *self.items, "</svg>"])


# -- the grid ----------------------------------------------------------------------------------
def _lengths(shape: Sequence[int]) -> list[float]:
    """Drawn length in pixels of each axis: proportional, clamped to [_SHORT, _LONG]."""
    longest = max(shape)
    return [min(_LONG, max(_SHORT, _LONG * n / longest)) for n in shape]


def _vectors(lengths: list[float]) -> list[np.ndarray]:
    """Pixel vector of each drawn axis (full length): the last axis to the right, the one
    before down, a third diagonally (down-right), as dask draws 3-D arrays."""
    if len(lengths) == 1:
        return [np.array([lengths[0], 0.0])]
    if len(lengths) == 2:
        return [np.array([0.0, lengths[0]]), np.array([lengths[1], 0.0])]
    d = lengths[0] * 0.6 / math.sqrt(2)
    return [np.array([d, d]), np.array([0.0, lengths[1]]), np.array([lengths[2], 0.0])]


def _coverage(starts: np.ndarray, size: int, n: int, extent: int) -> tuple[np.ndarray, np.ndarray]:
    """Breakpoints ``b`` and the number of patches covering each ``[b[j], b[j+1])``."""
    ends = starts + size
    if len(starts) <= MAX_TICKS:
        b = np.unique(np.concatenate([[0, n, extent], starts, ends]))
    else:  # about pixel resolution
        b = np.unique(np.concatenate([np.linspace(0, extent, 4 * MAX_TICKS + 1).round(),
                                      [n]]).astype(np.int64))
    mid = (b[:-1] + b[1:]) / 2
    count = np.searchsorted(starts, mid, "right") - np.searchsorted(ends, mid, "right")
    keep = np.concatenate([[True], count[1:] != count[:-1]])  # merge runs of equal counts
    return np.append(b[:-1][keep], b[-1]), count[keep]


def _tick_indices(k: int) -> np.ndarray:
    if k <= MAX_TICKS:
        return np.arange(k)
    step = -(-k // MAX_TICKS)
    return np.unique(np.append(np.arange(0, k, step), k - 1))


def _shifted(starts: np.ndarray, stride: int, border: str) -> bool:
    """Whether the last patch on an axis was moved back off the stride grid."""
    return border == "shift" and len(starts) > 0 and int(starts[-1]) % stride != 0


def grid_svg(grid: Any, block_shape: Any = None) -> str:
    """An SVG picture of a :class:`~daskpatch.PatchGrid` (see the module docstring).

    Parameters
    ----------
    grid : PatchGrid
    block_shape : int or tuple of int, optional
        Work blocks to draw (a multiple of the stride, as in :func:`daskpatch.apply_patches`).

    Returns
    -------
    str
        The SVG text.

    Examples
    --------
    >>> from daskpatch import PatchGrid
    >>> svg = grid_svg(PatchGrid((100, 80), 32, 24), block_shape=48)
    >>> svg.startswith("<svg"), svg.count('class="start')
    (True, 7)
    """
    blocks = None if block_shape is None else grid.normalize_block_shape(block_shape)
    nd = grid.ndim
    drawn = list(range(max(0, nd - 3), nd))  # the last (up to) three axes
    shape = [grid.shape[a] for a in drawn]
    extent = [grid.padded_shape[a] for a in drawn]
    vec = _vectors(_lengths(shape))
    d = len(drawn)
    c = _Canvas()

    def pt(coord: Sequence[float]) -> tuple[float, float]:
        p = sum((t / n * v for t, n, v in zip(coord, shape, vec)), np.zeros(2))
        return float(p[0]), float(p[1])

    # the volume: its faces (dask's layout: in 3-D the faces t2=0, t1=0 and t0=n0)
    if d == 1:
        bar = np.array([0.0, _BAR])
        faces = [[pt([0]), pt([shape[0]]), tuple(np.add(pt([shape[0]]), bar)),
                  tuple(np.add(pt([0]), bar))]]
    elif d == 2:
        faces = [[pt([0, 0]), pt([0, shape[1]]), pt([shape[0], shape[1]]), pt([shape[0], 0])]]
    else:
        n0, n1, n2 = shape
        faces = [
            [pt([0, 0, 0]), pt([n0, 0, 0]), pt([n0, n1, 0]), pt([0, n1, 0])],  # t2 = 0
            [pt([0, 0, 0]), pt([0, 0, n2]), pt([n0, 0, n2]), pt([n0, 0, 0])],  # t1 = 0
            [pt([n0, 0, 0]), pt([n0, 0, n2]), pt([n0, n1, n2]), pt([n0, n1, 0])],  # t0 = n0
        ]
    for face in faces:
        c.polygon(face, f"fill:{_VOLUME};fill-opacity:0.55;stroke:#444;stroke-width:1",
                  "volume")

    # work blocks: dashed lines across each face that spans the axis
    if blocks is not None:
        faces_of: dict[int, list[tuple[int, float] | None]] = {
            1: [], 2: [None], 3: [(2, 0.0), (1, 0.0), (0, float(shape[0]))]}
        fixed = faces_of[d]
        dashed = "stroke:#333;stroke-width:1;stroke-dasharray:4,3"
        for i, a in enumerate(drawn):
            bounds = list(range(blocks[a], grid.shape[a], blocks[a]))
            if len(bounds) > MAX_BLOCK_LINES:
                bounds = bounds[:: -(-len(bounds) // MAX_BLOCK_LINES)]
            for b in bounds:
                if d == 1:
                    p = pt([b])
                    c.line(p, (p[0], p[1] + _BAR), dashed, "block")
                for side in fixed:
                    if side is not None and side[0] == i:
                        continue
                    j = 1 - i if side is None else 3 - i - side[0]
                    lo = [0.0] * d
                    if side is not None:
                        lo[side[0]] = side[1]
                    lo[i] = b
                    hi = list(lo)
                    hi[j] = shape[j]
                    c.line(pt(lo), pt(hi), dashed, "block")

    # one patch box: the first and the last patch, outlined inside the volume
    def box(lo: list[int], hi: list[int], style: str, cls: str) -> None:
        if d == 1:
            c.polygon([pt([lo[0]]), pt([hi[0]]), (pt([hi[0]])[0], _BAR), (pt([lo[0]])[0], _BAR)],
                      style, cls)
        elif d == 2:
            c.polygon([pt([lo[0], lo[1]]), pt([lo[0], hi[1]]), pt([hi[0], hi[1]]),
                       pt([hi[0], lo[1]])], style, cls)
        else:
            (a0, a1, a2), (b0, b1, b2) = lo, hi
            for f in ([[a0, a1, a2], [b0, a1, a2], [b0, b1, a2], [a0, b1, a2]],
                      [[a0, a1, a2], [a0, a1, b2], [b0, a1, b2], [b0, a1, a2]],
                      [[b0, a1, a2], [b0, a1, b2], [b0, b1, b2], [b0, b1, a2]]):
                c.polygon([pt(p) for p in f], style, cls)

    starts = [grid.axis_starts(a) for a in drawn]
    size = [grid.size[a] for a in drawn]
    if len(grid):
        box([0] * d, size, f"fill:{_COVER};fill-opacity:0.25;stroke:{_COVER};stroke-width:1.5",
            "patch first")
        last = [int(s[-1]) for s in starts]
        shifted_any = any(_shifted(s, grid.stride[a], grid.border)
                          for s, a in zip(starts, drawn))
        colour = _SHIFTED if shifted_any else _COVER
        box(last, [l + z for l, z in zip(last, size)],
            f"fill:{colour};fill-opacity:0.15;stroke:{colour};stroke-width:1.5;"
            "stroke-dasharray:5,3", "patch last")

    # rulers: per drawn axis, the coverage band and the start ticks
    rulers = _rulers(d, shape)
    notes = []
    for i, a in enumerate(drawn):
        origin, normal, angle, base = rulers[i]
        along = vec[i] / shape[i]
        o = np.array(pt(origin)) + normal * base

        def at(t: float, off: float) -> tuple[float, float]:
            p = o + along * t + normal * off  # noqa: B023 - used inside this iteration only
            return float(p[0]), float(p[1])

        edges, count = _coverage(starts[i], size[i], shape[i], extent[i])
        for j, k in enumerate(count):
            if k == 0:
                style = f"fill:{_SHIFTED};fill-opacity:0.35;stroke:none"
                cls = "uncovered"
            else:
                style = f"fill:{_COVER};fill-opacity:{min(0.85, 0.2 + 0.22 * (k - 1)):.2f};" \
                        "stroke:none"
                cls = f"cover{min(int(k), 3)}"
            c.polygon([at(edges[j], _GAP), at(edges[j + 1], _GAP),
                       at(edges[j + 1], _GAP + _BAND), at(edges[j], _GAP + _BAND)], style, cls)
        shifted = _shifted(starts[i], grid.stride[a], grid.border)
        shown = _tick_indices(len(starts[i]))
        for j in shown:
            s = int(starts[i][j])
            mark = shifted and j == len(starts[i]) - 1
            style = (f"stroke:{_SHIFTED};stroke-width:2" if mark else "stroke:#222;stroke-width:1")
            c.line(at(s, _GAP - 3), at(s, _GAP + _BAND + 3), style,
                   "start shifted" if mark else "start")
        if extent[i] > shape[i]:  # border="pad": the patches run past the end
            c.line(at(shape[i], _GAP - 5), at(shape[i], _GAP + _BAND + 5),
                   "stroke:#222;stroke-width:1;stroke-dasharray:2,2", "end")
        label = f"axis {a}: {shape[i]}"
        c.text(at(shape[i] / 2, _GAP + _BAND + 16), label, angle=angle)
        if len(shown) < len(starts[i]):
            notes.append(f"axis {a}: {len(shown)} of {len(starts[i])} starts ticked")

    # caption
    y = c.hi[1] + 16
    x = c.lo[0]
    lines = [
        f"PatchGrid shape {grid.shape}, size {grid.size}, stride {grid.stride}, "
        f"border {grid.border!r}",
        f"{len(grid):,} patches ({' x '.join(map(str, grid.grid_shape))})"
        + (f", {grid.uncovered:,} voxels uncovered" if grid.uncovered else ""),
    ]
    if blocks is not None:
        nblocks = grid.block_grid_shape(blocks)
        lines.append(f"work blocks {blocks}: {math.prod(nblocks):,} "
                     f"({' x '.join(map(str, nblocks))})")
    if nd > 3:
        lines.append(f"drawn: the last 3 axes; axes {list(range(nd - 3))} have "
                     f"{[grid.grid_shape[a] for a in range(nd - 3)]} starts")
    if any(_shifted(grid.axis_starts(a), grid.stride[a], grid.border) for a in range(nd)):
        lines.append("red: a patch shifted back to end flush with the volume")
    lines += notes
    for row, line in enumerate(lines):
        c.text((x, y + 15 * row), line, anchor="start")
    return c.svg()


def _rulers(d: int, shape: list[int]) -> list[tuple[list[float], np.ndarray, float, float]]:
    """Per drawn axis: where its ruler starts (voxel coordinates), its outward unit normal, the
    angle of its label, and how far out of the volume the ruler's own offsets start."""
    if d == 1:
        return [([0.0], np.array([0.0, 1.0]), 0, _BAR)]
    if d == 2:
        return [([0.0, shape[1]], np.array([1.0, 0.0]), 90, 0.0),
                ([shape[0], 0.0], np.array([0.0, 1.0]), 0, 0.0)]
    n0, n1, _ = shape
    r2 = math.sqrt(0.5)
    return [([0.0, n1, 0.0], np.array([-r2, r2]), 45, 0.0),
            ([n0, 0.0, shape[2]], np.array([1.0, 0.0]), 90, 0.0),
            ([n0, n1, 0.0], np.array([0.0, 1.0]), 0, 0.0)]


# -- the window --------------------------------------------------------------------------------
def plot_window(
    blend: Any = "gaussian",
    size: int = 64,
    stride: int | None = None,
    n: int | None = None,
    *,
    sigma_scale: float = 0.125,
    border: str = "shift",
    width: int = 520,
    height: int = 200,
) -> str:
    """An SVG plot of the normalised blend weights along one axis.

    Draws, for each patch on an axis of length ``n``, the weight its voxels get in the blended
    result (the window's 1-D profile divided by the sum of all profiles covering each voxel, as
    :func:`daskpatch.apply_patches` weights them), and the sum of those weights: one wherever a
    patch covers.

    Parameters
    ----------
    blend : str, array or callable
        A built-in blend name (:data:`daskpatch.BLENDS`), or a 1-D window of length ``size``.
    size : int
        Patch length.
    stride : int, optional
        Step between patches (default ``size // 2``).
    n : int, optional
        Axis length (default: four strides past one patch, ``size + 4 * stride``, less one so
        that the last patch is shifted).
    sigma_scale : float
        Gaussian sigma as a fraction of the patch size.
    border : {"shift", "pad", "drop"}
        As in :class:`~daskpatch.PatchGrid`.
    width, height : int
        Plot area in pixels.

    Returns
    -------
    str
        The SVG text (show it with ``IPython.display.SVG``, or write it to a ``.svg`` file).

    Examples
    --------
    >>> svg = plot_window("hann", size=32, stride=16, n=80)
    >>> svg.count('class="weight'), 'class="sum"' in svg
    (4, True)
    """
    from daskpatch.geometry.grid import axis_starts
    from daskpatch.geometry.windows import parse_blend

    size = parse_int(size, "size", minimum=1)
    stride = max(1, size // 2) if stride is None else parse_int(stride, "stride", minimum=1)
    n = size + 4 * stride - 1 if n is None else parse_int(n, "n", minimum=1)
    border = parse_choice(border, "border", BORDERS)
    width = parse_int(width, "width", minimum=50)
    height = parse_int(height, "height", minimum=50)
    if size > n and border != "pad":
        raise ValueError(f"size {size} is larger than the axis length n={n}; with "
                         f"border={border!r} no patch fits: use border='pad' or a larger n")
    window = parse_blend(blend, (size,), sigma_scale)
    starts = axis_starts(n, size, stride, border)
    extent = max(n, int(starts[-1]) + size) if len(starts) else n
    if window.separable:
        q = window.axis_weights(starts, size, extent)
    else:
        p = np.asarray(window.array, dtype=np.float64)
        total = np.zeros(extent)
        pos = starts[:, None] + np.arange(size)[None, :]
        np.add.at(total, pos, np.broadcast_to(p, pos.shape))
        q = p[None, :] / total[pos]
    total = np.zeros(extent)
    pos = starts[:, None] + np.arange(size)[None, :]
    np.add.at(total, pos, q)

    c = _Canvas()
    top = 1.15

    def xy(x: float, y: float) -> tuple[float, float]:
        return width * x / extent, height * (1 - y / top)

    c.line(xy(0, 0), xy(extent, 0), "stroke:#444;stroke-width:1", "axis")
    c.line(xy(0, 0), xy(0, top), "stroke:#444;stroke-width:1", "axis")
    for v in (0.5, 1.0):
        c.line(xy(0, v), xy(extent, v), "stroke:#bbb;stroke-width:0.5;stroke-dasharray:3,3")
        c.text((xy(0, v)[0] - 4, xy(0, v)[1] + 4), f"{v:g}", anchor="end")
    c.text((xy(0, 0)[0] - 4, xy(0, 0)[1] + 4), "0", anchor="end")
    if extent > n:
        c.line(xy(n, 0), xy(n, top), "stroke:#444;stroke-dasharray:2,2", "end")
    shifted = _shifted(starts, stride, border)
    palette = (_COVER, "#ff7f0e")
    for i, s in enumerate(starts):
        xs = s + np.arange(size) + 0.5
        pts = [xy(float(x), float(y)) for x, y in zip(xs, q[i])]
        last = shifted and i == len(starts) - 1
        colour = _SHIFTED if last else palette[i % 2]
        c.polyline(pts, f"stroke:{colour};stroke-width:1.5",
                   "weight shifted" if last else "weight")
    covered = total > 0
    xs = np.arange(extent) + 0.5
    runs = np.flatnonzero(np.diff(np.concatenate([[0], covered.astype(np.int8), [0]])))
    for r0, r1 in zip(runs[::2], runs[1::2]):
        c.polyline([xy(float(x), float(y)) for x, y in zip(xs[r0:r1], total[r0:r1])],
                   "stroke:#000;stroke-width:2.5", "sum")
    for t in sorted({0, n} | {int(s) for s in starts[:: max(1, len(starts) // 8)]}):
        c.text((xy(t, 0)[0], xy(t, 0)[1] + 14), str(t))
    name = window.blend if window.separable else "user"
    sigma = f", sigma_scale {window.sigma(0):g}" if name == "gaussian" else ""
    dev = float(np.abs(total[covered] - 1).max()) if covered.any() else 0.0
    c.text((0, height + 32), f"{name} window{sigma}: size {size}, stride {stride}, n {n}, "
           f"border {border!r}: {len(starts)} patches", anchor="start")
    c.text((0, height + 47), f"coloured: each patch's normalised weight; black: their sum "
           f"(1 within {dev:.0e})", anchor="start")
    return c.svg()
