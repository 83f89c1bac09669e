"""Quickstart: Zarr volume -> lazy patches -> per-patch function -> blended volume -> Zarr.

Runs on the local threaded scheduler (Dask's default). Usage::

    python examples/quickstart.py            # 256^3 float32 volume
    python examples/quickstart.py --edge 96  # smaller, as CI runs it

It writes a synthetic volume to a Zarr store with stride-aligned chunks, cuts it into overlapping
patches lazily, applies a simple per-patch function (a contrast stretch with per-patch statistics,
so that overlapping patches disagree and blending matters), blends the results back with a
gaussian window, writes them to Zarr and checks them against a plain NumPy loop over the patches.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

import daskpatch as dp


def stretch(batch: np.ndarray) -> np.ndarray:
    """A per-patch function: centre each patch on its own mean."""
    return batch - batch.mean(axis=tuple(range(1, batch.ndim)), keepdims=True)


def expected_result(vol: np.ndarray, size: int, stride: int) -> np.ndarray:
    """The same thing with a NumPy loop: every patch, gaussian weights, divided by their sum."""
    grid = dp.PatchGrid(vol.shape, size, stride)
    w = dp.window("gaussian", grid.size)
    num = np.zeros(vol.shape)
    den = np.zeros(vol.shape)
    for sl in grid:
        num[sl] += w * stretch(vol[sl][None])[0]
        den[sl] += w
    return num / den


def main(n: int = 256, size: int = 64, stride: int = 32) -> None:
    rng = np.random.default_rng(0)
    x = np.linspace(0, 4 * np.pi, n, dtype=np.float32)
    vol = (np.sin(x)[:, None, None] * np.cos(x)[None, :, None] + x[None, None, :] / 8
           + 0.1 * rng.standard_normal((n, n, n), dtype=np.float32)).astype(np.float32)

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "volume.zarr", Path(tmp) / "result.zarr"
        t0 = time.perf_counter()
        dp.to_zarr(vol, src, chunks=dp.aligned_chunks(vol.shape, stride, vol.itemsize))
        volume = dp.open_volume(src)  # lazy: nothing read yet
        t1 = time.perf_counter()

        patches = dp.extract_patches(volume, size, stride)  # lazy (N, size, size, size)
        print(f"volume {vol.shape} chunks {tuple(c[0] for c in volume.chunks)} -> {patches.shape[0]} patches "
              f"of {patches.shape[1:]} (graph built, nothing computed)")
        result = dp.apply_patches(volume, stretch, size, stride, blend="gaussian", batch_size=8)
        t2 = time.perf_counter()
        dp.to_zarr(result, dst)
        t3 = time.perf_counter()

        out = dp.open_volume(dst).compute()
        ref = expected_result(vol, size, stride)
        err = float(np.abs(out - ref).max())
        # the round trip of plain patches, blended back, is the input itself; to_numpy adds
        # the blocks straight into one array (compute() would also hold all the chunks)
        back = dp.to_numpy(dp.reconstruct(patches, vol.shape, size, stride))
        err_rt = float(np.abs(back - vol).max())

    print(f"write input {t1 - t0:.2f} s | build graph {t2 - t1:.3f} s | "
          f"apply + blend + write {t3 - t2:.2f} s")
    print(f"max |result - NumPy loop| = {err:.2e}; max |reconstruct(extract(v)) - v| = {err_rt:.2e}")
    if err > 1e-4 or err_rt > 1e-5:
        raise SystemExit("quickstart: result does not match the expected volume")
    print("quickstart: OK")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edge", type=int, default=256,
                        help="volume edge length (the patch size is fixed)")
    args = parser.parse_args()
    main(args.edge)
