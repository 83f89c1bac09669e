#!/usr/bin/env python
"""Peak memory of an OME-Zarr pyramid write vs a single level (issue 10).

Zarr -> Zarr, float32 cube (default 512^3 = 0.5 GiB, input chunks 128^3 written chunk by chunk
so the cube is never in RAM), ``apply_patches(open_volume(...), identity, 128, 64,
batch_size=8)`` written with ``to_zarr(..., ome=True, levels=L)`` for each ``L`` of ``--levels``
(default 1 and 3), each in a fresh process on the threaded scheduler. Prints the peak RSS of the
process (``ru_maxrss``), the wall time, the level shapes, and the largest identity error on level 0
(on sample regions) and on level 1 against a NumPy 2x block mean of the input.

Examples::

    python benchmarks/bench_ome.py                    # 512^3, levels 1 and 3 (~1 min)
    python benchmarks/bench_ome.py --n 128            # seconds
    python benchmarks/bench_ome.py --n 1024 --levels 1,4
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def maxrss() -> int:
    """Peak RSS of this process so far in bytes (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker_make(p: dict) -> dict:
    """Write a float32 cube chunk by chunk (seeded per chunk; never the whole cube in RAM)."""
    import numpy as np
    import zarr

    n, c = p["n"], p["chunk"]
    z = zarr.create_array(store=p["path"], shape=(n,) * 3, chunks=(c,) * 3, dtype="float32",
                          overwrite=True)
    nc = -(-n // c)
    for idx in np.ndindex(nc, nc, nc):
        sl = tuple(slice(a * c, min((a + 1) * c, n)) for a in idx)
        rng = np.random.default_rng([p["seed"], *idx])
        z[sl] = rng.random(tuple(s.stop - s.start for s in sl), dtype=np.float32)
    return {"peak_rss": maxrss()}


def worker_write(p: dict) -> dict:
    """In a fresh process: the OME-Zarr write, then its peak RSS (before any check reads)."""
    import numpy as np

    import daskpatch as dp

    def identity(batch: np.ndarray) -> np.ndarray:
        return batch

    base = maxrss()
    t0 = time.perf_counter()
    out = dp.apply_patches(dp.open_volume(p["src"]), identity, 128, 64, batch_size=8)
    dp.to_zarr(out, p["dst"], ome=True, levels=p["levels"], scale=(1.0, 0.5, 0.5),
               units=["micrometer"] * 3)
    wall = time.perf_counter() - t0
    peak = maxrss()

    import zarr

    src = zarr.open_array(p["src"], mode="r")
    img = zarr.open_group(p["dst"], mode="r")
    shapes = [list(img[str(k)].shape) for k in range(p["levels"])]
    n, side = src.shape[0], 64
    err0 = err1 = 0.0
    for lo in (0, n // 3, n - side):
        sl = (slice(lo, lo + side),) * 3
        err0 = max(err0, float(np.abs(img["0"][sl] - src[sl]).max()))
        if p["levels"] > 1:
            ref = src[sl].reshape(side // 2, 2, side // 2, 2, side // 2, 2).mean(axis=(1, 3, 5))
            half = (slice(lo // 2, lo // 2 + side // 2),) * 3
            err1 = max(err1, float(np.abs(img["1"][half] - ref).max()))
    return {"wall_s": wall, "base_rss": base, "peak_rss": peak, "shapes": shapes,
            "err_level0": err0, "err_level1": err1}


WORKERS = {"make": worker_make, "write": worker_write}


def run_worker(kind: str, params: dict, timeout: float = 3600) -> dict:
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", kind,
                        "--params", json.dumps(params)], capture_output=True, text=True,
                       timeout=timeout)
    for line in r.stdout.splitlines()[::-1]:
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"worker {kind} failed (exit {r.returncode}): {r.stderr[-2000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=512, help="cube side (default 512)")
    ap.add_argument("--chunk", type=int, default=128, help="input chunk side (default 128)")
    ap.add_argument("--levels", default="1,3", help="pyramid levels to compare (default 1,3)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--params", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(WORKERS[args.worker](json.loads(args.params))))
        return

    levels = [int(v) for v in args.levels.split(",")]
    mib = 2**20
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        src = f"{tmp}/in.zarr"
        run_worker("make", {"path": src, "n": args.n, "chunk": args.chunk, "seed": 0})
        print(f"input: {args.n}^3 float32 ({args.n**3 * 4 / mib:.0f} MiB), chunks "
              f"{args.chunk}^3; apply_patches(identity, 128, 64, batch_size=8) -> "
              "to_zarr(ome=True, levels=L)")
        print(f"{'levels':>6} {'wall s':>7} {'peak RSS MiB':>13} {'base MiB':>9} "
              f"{'err level 0':>12} {'err level 1':>12}  shapes")
        for lv in levels:
            r = run_worker("write", {"src": src, "dst": f"{tmp}/out-{lv}.zarr", "levels": lv})
            print(f"{lv:>6} {r['wall_s']:>7.1f} {r['peak_rss'] / mib:>13.0f} "
                  f"{r['base_rss'] / mib:>9.0f} {r['err_level0']:>12.1e} "
                  f"{r['err_level1'] if lv > 1 else float('nan'):>12.1e}  {r['shapes']}")


if __name__ == "__main__":
    main()
