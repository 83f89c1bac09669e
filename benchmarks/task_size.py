#!/usr/bin/env python
"""Pickled size of one work block's task spec as the volume grows (virtual volumes, nothing is
computed): a block task carries only its own part of the plan, so its size must not grow with
the volume (target: <= 1.2x from 2048^3 to 32768^3).

Usage: ``python benchmarks/task_size.py [--sizes 2048,8192,32768]``
"""

from __future__ import annotations

import argparse
import pickle

import dask.array as da
import numpy as np

import daskpatch as dp


def spec_bytes(n: int) -> int:
    v = da.zeros((n, n, n), dtype=np.float32, chunks=(512, 512, 512))
    r = dp.apply_patches(v, np.negative, 64, 32, block_shape=512)
    layer = r.__dask_graph__().layers[r.name]
    key = next(iter(layer))  # the first block's accumulate task
    return len(pickle.dumps(layer[key][1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="2048,8192,32768")
    sizes = [int(s) for s in ap.parse_args().sizes.split(",")]
    first = None
    for n in sizes:
        b = spec_bytes(n)
        first = first or b
        print(f"{n}^3: block task spec {b} bytes ({b / first:.3f}x the first)")


if __name__ == "__main__":
    main()
