#!/usr/bin/env python
"""Issue 12 A: daskpatch in memory vs MONAI's sliding_window_inference, cold processes.

Each round runs daskpatch (``to_numpy`` by default) and MONAI once each, alternately, every run
in a fresh process (imports outside the timed region, result checked after it), on an N^3
float32 volume, size 128, stride 64, identity model, gaussian blend, batch 8: the
``daskpatch_np`` (or ``daskpatch``) and ``monai_gauss`` entries of ``peers.py``. Prints every run,
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
import statistics

from peers_table import run  # one peers.py entry in a fresh process: (seconds, peak RSS MiB)

ENTRY = {"np": "daskpatch_np", "compute": "daskpatch", "monai": "monai_gauss"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--n", type=int, default=384)
    ap.add_argument("--case", choices=["np", "compute"], default="np")
    ap.add_argument("--tree", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    a = ap.parse_args()
    ts, ms, mine = [], [], []
    for _ in range(a.rounds):
        td, md = run(ENTRY[a.case], a.n, a.tree)
        tm, mm = run(ENTRY["monai"], a.n, a.tree)
        ts.append(td / tm)
        ms.append(md / mm)
        mine.append(td)
        print(f"daskpatch {a.case} {td:.2f}s {md:.0f}MiB | monai {tm:.2f}s {mm:.0f}MiB", flush=True)
    t, m, spread = statistics.median(ts), statistics.median(ms), max(mine) / min(mine)
    print(f"time_ratio={t:.3f} (target <= 0.5) spread={spread:.2f} (target <= 1.5) "
          f"rss_ratio={m:.3f} (target <= 0.5)")


if __name__ == "__main__":
    main()
