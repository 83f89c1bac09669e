#!/usr/bin/env python
"""Issue 12: ``batch_size`` is a target, not a ceiling: ``fn`` gets full batches however the
volume is split into automatic blocks.

For each shape, the batch fill is the fewest calls the patches need, ``ceil(patches /
batch_size)``, over the calls ``fn`` got (``to_numpy`` of ``apply_patches`` with automatic
blocks). Goal: >= 0.85 on every shape (a remainder per block is allowed; splitting a small
volume into one-patch calls is not).

Example::

    python benchmarks/batchfill.py
"""

from __future__ import annotations

import threading

import numpy as np

import daskpatch as dp

SHAPES = [((192,) * 3, 128, 64, 4), ((256, 256, 256), 64, 32, 8),
          ((100, 300, 200), 48, 24, 16), ((512, 512), 64, 32, 32)]
GOAL = 0.85


def main() -> None:
    fills = []
    for shape, size, stride, bs in SHAPES:
        lock, sizes = threading.Lock(), []

        def fn(b, lock=lock, sizes=sizes):
            with lock:
                sizes.append(len(b))
            return b

        x = np.zeros(shape, np.float32)
        out = dp.apply_patches(x, fn, size, stride, batch_size=bs)
        dp.to_numpy(out)
        n = sum(sizes)
        ideal = -(-n // bs)
        fill = ideal / len(sizes)
        fills.append(fill)
        print(f"{shape} size={size} stride={stride} batch={bs}: {n} patches in {len(sizes)} "
              f"calls (ideal {ideal}), fill={fill:.2f}, blocks {out.chunksize}")
    print(f"min_fill={min(fills):.2f} (goal >= {GOAL} on every shape)")
    raise SystemExit(0 if min(fills) >= GOAL else 1)


if __name__ == "__main__":
    main()
