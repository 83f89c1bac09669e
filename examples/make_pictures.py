"""Write the pictures of the README and the docs: a patch grid and the blend weights along one axis.

Usage::

    python examples/make_pictures.py            # writes examples/images/grid.svg and window.svg

Both are plain SVG made by daskpatch itself (no plotting library): ``PatchGrid.to_svg`` is what a
notebook shows for a grid, ``dp.plot_window`` draws the normalised weights the engine blends with.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import daskpatch as dp


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # a 200 x 160 x 120 volume, 64^3 patches every 48 voxels: the last patch on each axis is
    # shifted back to end flush with the volume; work blocks of 96^3
    grid = dp.PatchGrid((200, 160, 120), 64, 48)
    (out / "grid.svg").write_text(grid.to_svg(block_shape=96) + "\n")
    window = dp.plot_window("gaussian", size=64, stride=32, n=200)
    (out / "window.svg").write_text(window + "\n")
    print(f"wrote {out / 'grid.svg'} ({len(grid)} patches) and {out / 'window.svg'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "images",
                        help="directory to write the pictures to")
    main(parser.parse_args().out)
