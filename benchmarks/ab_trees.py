#!/usr/bin/env python
"""Before/after: the same daskpatch workload from two source trees, alternating, fresh processes.

Each round runs every case once per tree (A B A B ...), each run in a fresh, cold process (no
warm-up call: users run cold processes) with ``PYTHONPATH`` pointing at that tree, and checks the
result outside the timed region. Prints per-run figures, then per case the median wall time and
CPU seconds (user + system, of the timed region) and peak RSS of each tree, the
spread (max/min) of the wall times, and the median of the per-round ratios B/A.

Cases (``--cases``, comma separated):

``np``
    ``dp.to_numpy(dp.apply_patches(x, identity, P, S, blend="gaussian", batch_size=8))`` on an
    in-memory N^3 float32 volume.
``compute``
    The same with ``.compute()``.
``zarr``
    Zarr (chunks S^3) -> ``dp.to_zarr`` -> Zarr; the input is written before the timer starts.
``uint8``
    ``to_numpy`` of the same with ``dtype="uint8"`` (the integer cast path).

Examples::

    git worktree add /tmp/base <commit>
    python benchmarks/ab_trees.py /tmp/base . --cases np,zarr --rounds 7 --n 384
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import sys, time, resource, tempfile, shutil
import numpy as np
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
case, n, p, s = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
x = np.random.default_rng(0).random((n, n, n), dtype=np.float32)
import daskpatch as dp
ident = lambda b: b
if case == "zarr":
    import zarr
    d = tempfile.mkdtemp(dir=sys.argv[5])
    zi = zarr.create_array(d + "/in.zarr", shape=x.shape, chunks=(s,) * 3, dtype="f4")
    zi[:] = x
    t0, c0 = time.perf_counter(), cpu()
    dp.to_zarr(dp.apply_patches(dp.open_volume(d + "/in.zarr"), ident, p, s, batch_size=8),
               d + "/out.zarr")
    dt, dc = time.perf_counter() - t0, cpu() - c0
    y = zarr.open_array(d + "/out.zarr", mode="r")
    err = max(float(np.abs(y[i:i + 32] - x[i:i + 32]).max()) for i in range(0, n, 32))
    shutil.rmtree(d)
else:
    t0, c0 = time.perf_counter(), cpu()
    if case == "np":
        y = dp.to_numpy(dp.apply_patches(x, ident, p, s, batch_size=8))
    elif case == "compute":
        y = dp.apply_patches(x, ident, p, s, batch_size=8).compute()
    elif case == "uint8":
        x *= 255
        y = dp.to_numpy(dp.apply_patches(x, ident, p, s, batch_size=8, dtype="uint8"))
    else:
        raise SystemExit("unknown case " + case)
    dt, dc = time.perf_counter() - t0, cpu() - c0
    want = np.rint(x) if case == "uint8" else x
    err = max(float(np.abs(y[i:i + 32].astype(np.float64) - want[i:i + 32]).max())
              for i in range(0, n, 32))
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"seconds={dt:.4f} cpu={dc:.4f} peak_rss_mib={rss:.0f} maxerr={err:.3g}")
"""


def run(tree: str, case: str, args: argparse.Namespace) -> tuple[float, float, float, str]:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
    out = subprocess.run(
        [sys.executable, "-c", CHILD, case, str(args.n), str(args.p), str(args.s), args.tmp],
        capture_output=True, text=True, env=env, timeout=1800,
    )
    line = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    if out.returncode or "seconds=" not in line:
        raise SystemExit(f"{tree} {case} failed:\n{out.stderr[-2000:]}")
    fields = dict(kv.split("=") for kv in line.split())
    return (float(fields["seconds"]), float(fields["cpu"]), float(fields["peak_rss_mib"]),
            fields["maxerr"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a", help="source tree A (before)")
    ap.add_argument("b", help="source tree B (after)")
    ap.add_argument("--cases", default="np,zarr")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n", type=int, default=384)
    ap.add_argument("--p", type=int, default=128)
    ap.add_argument("--s", type=int, default=64)
    ap.add_argument("--tmp", default=tempfile.gettempdir())
    args = ap.parse_args()
    cases = args.cases.split(",")
    res: dict = {(c, t): [] for c in cases for t in "ab"}
    for r in range(args.rounds):
        for c in cases:
            for t, tree in (("a", args.a), ("b", args.b)) if r % 2 == 0 else (("b", args.b),
                                                                              ("a", args.a)):
                sec, cpu, rss, err = run(tree, c, args)
                res[c, t].append((sec, cpu, rss))
                print(f"round {r} {c:8s} {t}={tree}: {sec:.2f} s, cpu {cpu:.2f} s, {rss:.0f} MiB,"
                      f" maxerr {err}", flush=True)
    print(f"\n{args.n}^3 float32, size {args.p}, stride {args.s}, batch 8, {args.rounds} rounds")
    print("| case | A median s (spread) | B median s (spread) | B/A time | A cpu s | B cpu s "
          "| B/A cpu | A MiB | B MiB | B/A RSS |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for c in cases:
        a, b = res[c, "a"], res[c, "b"]
        ta, tb = [v[0] for v in a], [v[0] for v in b]
        ca, cb = [v[1] for v in a], [v[1] for v in b]
        ma, mb = [v[2] for v in a], [v[2] for v in b]
        tr = statistics.median(y / x for x, y in zip(ta, tb))
        cr = statistics.median(y / x for x, y in zip(ca, cb))
        mr = statistics.median(y / x for x, y in zip(ma, mb))
        print(f"| {c} | {statistics.median(ta):.2f} ({max(ta) / min(ta):.2f}x) | "
              f"{statistics.median(tb):.2f} ({max(tb) / min(tb):.2f}x) | {tr:.3f} | "
              f"{statistics.median(ca):.2f} | {statistics.median(cb):.2f} | {cr:.3f} | "
              f"{statistics.median(ma):.0f} | {statistics.median(mb):.0f} | {mr:.3f} |")


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)
    main()
