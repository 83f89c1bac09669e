#!/usr/bin/env python
"""daskpatch and its peers side by side: ``peers.py`` entries run alternately, each in a fresh
process, over several rounds; prints each contender's median seconds and peak RSS (with the
spread of its single runs, max/min) and both as ratios to MONAI's gaussian sliding window.

Run with a Python that has MONAI, TorchIO and tiler (the peers venv); daskpatch is imported from
this tree (or ``--tree``)::

    /work/peers/bin/python benchmarks/peers_table.py --rounds 5
    /work/peers/bin/python benchmarks/peers_table.py daskpatch_np monai_gauss --rounds 7

The first round's order is the list's; each later round rotates it by one, so no contender
always runs right after the same neighbour.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT = ["daskpatch_np", "daskpatch", "monai_gauss", "torchio_hann", "tiler_hann", "memcpy"]


def run(name: str, n: int, tree: str) -> tuple[float, float]:
    env = dict(os.environ, PYTHONPATH=tree)
    out = subprocess.run([sys.executable, os.path.join(HERE, "peers.py"), name, "--n", str(n)],
                         capture_output=True, text=True, env=env, timeout=1800)
    m = re.search(r"seconds=([\d.]+) peak_rss_mib=(\d+)", out.stdout)
    if not m:
        raise SystemExit(f"{name} failed: {out.stderr[-800:]}")
    return float(m.group(1)), float(m.group(2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*", default=DEFAULT, help="peers.py entries")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n", type=int, default=384)
    ap.add_argument("--tree", default=os.path.dirname(HERE))
    a = ap.parse_args()
    names = a.names or DEFAULT
    got: dict[str, list[tuple[float, float]]] = {k: [] for k in names}
    for r in range(a.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            got[name].append(run(name, a.n, a.tree))
        print(f"round {r}: " + " | ".join(f"{k} {got[k][-1][0]:.2f}s {got[k][-1][1]:.0f}MiB"
                                           for k in names), flush=True)
    med = {k: (statistics.median(t for t, _ in v), statistics.median(m for _, m in v))
           for k, v in got.items()}
    ref = med.get("monai_gauss")
    print(f"\n{a.n}^3 float32, size 128, stride 64, batch 8, identity model, {a.rounds} rounds")
    print("| contender | median s | spread (max/min) | peak RSS MiB | time / MONAI | RSS / MONAI |")
    print("|---|---|---|---|---|---|")
    for k, (t, m) in med.items():
        ts = [x for x, _ in got[k]]
        rel = f"{t / ref[0]:.2f} | {m / ref[1]:.2f}" if ref else "- | -"
        print(f"| {k} | {t:.2f} | {max(ts) / max(min(ts), 0.01):.2f} | {m:.0f} | {rel} |")


if __name__ == "__main__":
    main()
