"""Pictures: PatchGrid._repr_html_ and plot_window are well-formed SVG with the expected marks."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pytest

import daskpatch as dp
import daskpatch.viz

SVG = "{http://www.w3.org/2000/svg}"


def parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)
    assert root.tag == SVG + "svg"
    return root


def marks(root: ET.Element, cls: str) -> list[ET.Element]:
    return [e for e in root.iter() if cls in (e.get("class") or "").split()]


@pytest.mark.parametrize(
    "shape, size, stride, border",
    [
        ((100,), 16, 12, "shift"),
        ((100, 80), 32, 24, "shift"),
        ((64, 80, 50), (32, 32, 20), (16, 24, 10), "shift"),
        ((4, 64, 80, 50), (2, 32, 32, 20), (2, 16, 24, 10), "shift"),
        ((100, 90), 32, 40, "drop"),
        ((100, 90), 32, 24, "pad"),
        ((5, 7), 5, 1, "shift"),
    ],
)
def test_grid_pictures_from_1d_to_4d(shape, size, stride, border):
    grid = dp.PatchGrid(shape, size, stride, border=border)
    root = parse(grid._repr_html_())
    drawn = range(max(0, grid.ndim - 3), grid.ndim)
    assert len(marks(root, "start")) == sum(grid.grid_shape[a] for a in drawn)
    shifted = [a for a in drawn if grid.border == "shift" and grid.starts[a][-1] % grid.stride[a]]
    assert len(marks(root, "shifted")) == len(shifted)
    assert len(marks(root, "volume")) == (3 if grid.ndim >= 3 else 1)
    assert bool(marks(root, "uncovered")) == (grid.uncovered > 0)
    text = " ".join(t.text or "" for t in root.iter(SVG + "text"))
    assert f"{len(grid):,} patches" in text


def test_shifted_border_patch_is_marked():
    root = parse(dp.PatchGrid((100, 80), 32, 24).to_svg())
    (mark,) = marks(root, "shifted")  # axis 0: starts 0, 24, 48 and the shifted 68
    assert "d62728" in mark.get("style")
    assert len(marks(root, "cover2")) > 0  # overlaps are shaded darker


def test_work_blocks():
    grid = dp.PatchGrid((96, 64), 32, 16)
    root = parse(grid.to_svg(block_shape=32))
    # 2 inner block boundaries on axis 0, 1 on axis 1, one line each across the rectangle
    assert len(marks(root, "block")) == 3
    root3 = parse(dp.PatchGrid((96, 64, 32), 32, 16).to_svg(block_shape=32))
    # a boundary of a 3-D axis crosses the two faces that span it: (2 + 1 + 0) * 2
    assert len(marks(root3, "block")) == 6
    with pytest.raises(ValueError, match=r"block_shape must be a multiple of the stride"):
        grid.to_svg(block_shape=24)


def test_a_huge_grid_draws_ticks_not_patches():
    grid = dp.PatchGrid((10000,) * 3, 100)  # a million patches
    assert len(grid) == 10**6
    svg = grid._repr_html_()
    root = parse(svg)
    ticks = marks(root, "start")
    assert 3 * 10 <= len(ticks) <= 3 * (dp.viz.MAX_TICKS + 1)
    assert len(svg) < 50_000
    assert f"axis 2: {len(ticks) // 3} of 100 starts ticked" in svg


def test_plot_window_weights_sum_to_one():
    svg = dp.plot_window("gaussian", size=64, stride=32, n=200, sigma_scale=0.2)
    root = parse(svg)
    starts = dp.PatchGrid((200,), 64, 32).starts[0]
    assert len(marks(root, "weight")) == len(starts)
    assert len(marks(root, "shifted")) == 1  # 200 - 64 = 136 is off the stride grid
    (total,) = marks(root, "sum")
    height = 200
    ys = [float(p.split(",")[1]) for p in total.get("points").split()]
    np.testing.assert_allclose(ys, height * (1 - 1 / 1.15), atol=0.05)  # y = 1 everywhere
    assert "sigma_scale 0.2" in svg


@pytest.mark.parametrize("blend", ["constant", "hann", "triangular", "crop",
                                   np.linspace(1, 2, 16)])
def test_plot_window_for_every_blend(blend):
    root = parse(dp.plot_window(blend, size=16, stride=10, n=50))
    assert len(marks(root, "weight")) == 5


def test_plot_window_bad_arguments():
    with pytest.raises(ValueError, match=r"blend must be one of"):
        dp.plot_window("smooth")
    with pytest.raises(TypeError, match=r"size must be an integer; got 6\.5 of type float"):
        dp.plot_window(size=6.5)
    with pytest.raises(ValueError, match=r"size 64 is larger than the axis length n=32"):
        dp.plot_window(size=64, n=32)
    with pytest.raises(ValueError, match=r"blend must have the patch shape \(16,\)"):
        dp.plot_window(np.ones(8), size=16)
