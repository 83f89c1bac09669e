#!/usr/bin/env python
"""Issue 12 A: daskpatch in memory vs MONAI's sliding_window_inference, cold processes.

Each round runs daskpatch (``to_numpy`` by default) and MONAI once each, alternately, every run
in a fresh process (imports outside the timed region, result checked after it), on an N^3
float32 volume, size 128, stride 64, identity model, gaussian blend, batch 8. Prints every run,
then the median time ratio (target <= 0.5), the spread of daskpatch's single runs (max/min,
target <= 1.5) and the median peak-RSS ratio (target <= 0.5).

Run with a Python that has MONAI and torch (the peers venv); daskpatch is imported from this
tree (or ``--tree``)::

    /work/peers/bin/python benchmarks/ratio_monai.py --rounds 7 --n 384
    /work/peers/bin/python benchmarks/ratio_monai.py --case compute   # .compute() instead
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys

CHILD = r"""
import resource, sys, time, os
import numpy as np
name, n, p, s = sys.argv[1], int(sys.argv[2]), 128, 64
x = np.random.default_rng(0).random((n, n, n), dtype=np.float32)
if name == "monai":
    import torch
    from monai.inferers import sliding_window_inference
    torch.set_num_threads(os.cpu_count())
    t = torch.from_numpy(x)[None, None]
    t0 = time.perf_counter()
    with torch.no_grad():
        y = sliding_window_inference(t, (p, p, p), 8, lambda b: b, overlap=1 - s / p,
                                     mode="gaussian")
    dt = time.perf_counter() - t0
    y = y[0, 0].numpy()
else:
    import daskpatch as dp
    t0 = time.perf_counter()
    a = dp.apply_patches(x, lambda b: b, p, s, blend="gaussian", batch_size=8)
    y = dp.to_numpy(a) if name == "np" else a.compute()
    dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
err = max(float(np.abs(y[i:i + 16] - x[i:i + 16]).max()) for i in range(0, n, 16))
assert err < 1e-4, err
print(f"seconds={dt:.3f} peak_rss_mib={peak:.0f}")
"""


def run(case: str, n: int, tree: str) -> tuple[float, float]:
    env = dict(os.environ, PYTHONPATH=tree)
    out = subprocess.run([sys.executable, "-c", CHILD, case, str(n)], capture_output=True,
                         text=True, env=env, timeout=900)
    m = re.search(r"seconds=([\d.]+) peak_rss_mib=(\d+)", out.stdout)
    if not m:
        raise SystemExit(f"{case} failed: {out.stderr[-800:]}")
    return float(m.group(1)), float(m.group(2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--n", type=int, default=384)
    ap.add_argument("--case", choices=["np", "compute"], default="np")
    ap.add_argument("--tree", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    a = ap.parse_args()
    ts, ms, mine = [], [], []
    for _ in range(a.rounds):
        td, md = run(a.case, a.n, a.tree)
        tm, mm = run("monai", a.n, a.tree)
        ts.append(td / tm)
        ms.append(md / mm)
        mine.append(td)
        print(f"daskpatch {a.case} {td:.2f}s {md:.0f}MiB | monai {tm:.2f}s {mm:.0f}MiB", flush=True)
    t, m, spread = statistics.median(ts), statistics.median(ms), max(mine) / min(mine)
    print(f"time_ratio={t:.3f} (target <= 0.5) spread={spread:.2f} (target <= 1.5) "
          f"rss_ratio={m:.3f} (target <= 0.5)")


if __name__ == "__main__":
    main()
