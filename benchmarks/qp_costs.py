"""Costs of dask's array query planning for daskpatch (see benchmarks/query_planning.md).

Runs each case in fresh processes, alternating legacy and query planning, and prints the times:
``python benchmarks/qp_costs.py [rounds]`` (run from the repository root). Target: ``to_numpy``
no slower than legacy; one chunk of a large lazy array is slower (array expressions do not cull).
"""

from __future__ import annotations

import os
import subprocess
import sys

CASE = r'''
import time, dask, numpy as np, dask.array as da, daskpatch as dp
vol = np.random.default_rng(0).random((160, 160, 160), dtype=np.float32)
t = time.perf_counter(); dp.to_numpy(dp.apply_patches(vol, np.sqrt, 32, 16))
a = time.perf_counter() - t
dask.config.set({"array.chunk-size": "1MiB"})
x = dp.extract_patches(da.zeros((2048,) * 3, chunks=256, dtype=np.float32), 64, 64)
t = time.perf_counter(); x[0].compute(); b = time.perf_counter() - t
print(f"{a:.2f} {b:.2f} {x.numblocks[0]}")
'''


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for r in range(rounds):
        for qp in ("False", "True"):
            env = dict(os.environ, PYTHONPATH=root, DASK_ARRAY__QUERY_PLANNING=qp)
            out = subprocess.run([sys.executable, "-c", CASE], env=env, capture_output=True,
                                 text=True, check=True).stdout.split()
            mode = "query planning" if qp == "True" else "legacy        "
            print(f"round {r + 1} {mode}: to_numpy {out[0]} s; one chunk of {out[2]}: {out[1]} s")


if __name__ == "__main__":
    main()
