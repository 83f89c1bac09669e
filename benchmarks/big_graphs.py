"""What the scheduler is handed by a ``to_zarr`` of a huge volume (issue 23, item 5): the time
from the call until the scheduler holds the job's tasks (graph, optimisation, packing,
submission), the number of tasks it holds, and its memory (RSS) then. Virtual volumes: a Zarr
input of the given size with no chunk written (nothing is computed: the scheduler has no
worker, and the job is cancelled once measured).

    python benchmarks/big_graphs.py [--sizes 4096,16384,32768] [--chunk 512]

The scheduler runs in its own process (``dask scheduler``), so its RSS is its own; ``to_zarr``
runs with ``compute=True`` in a thread of this process, as a user's call would, and the first
submission is measured (a write in waves submits one wave at a time: ``daskpatch.wave-chunks``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.join(tempfile.gettempdir(), "daskpatch-bench", "big-graphs")


def _scheduler() -> tuple[subprocess.Popen, str]:
    sfile = os.path.join(ROOT, "scheduler.json")
    if os.path.exists(sfile):  # an earlier scheduler's
        os.remove(sfile)
    proc = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler",
                             "--scheduler-file", sfile, "--port", "0",
                             "--dashboard-address", ":0", "--idle-timeout", "3600"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=ROOT)  # imports daskpatch from PYTHONPATH, not from here
    for _ in range(600):
        if os.path.exists(sfile):
            break
        time.sleep(0.1)
    return proc, sfile


def measure(n: int, chunk: int, bound: float) -> dict:
    import numpy as np
    import psutil
    import zarr
    from distributed import Client

    import daskpatch as dp

    src = os.path.join(ROOT, f"in-{n}.zarr")
    dst = os.path.join(ROOT, f"out-{n}.zarr")
    shutil.rmtree(dst, ignore_errors=True)
    if not os.path.exists(src):
        zarr.create_array(src, shape=(n, n, n), chunks=(chunk,) * 3, dtype="f4")
    proc, sfile = _scheduler()
    sched = psutil.Process(proc.pid)
    try:
        client = Client(scheduler_file=sfile)
        base_rss = sched.memory_info().rss
        x = dp.apply_patches(dp.open_volume(src), np.negative, 64, 32, block_shape=chunk)
        err: list = []

        def write() -> None:
            try:
                dp.to_zarr(x, dst)
            except BaseException as e:  # cancelled once measured
                err.append(e)

        t0 = time.perf_counter()
        thread = threading.Thread(target=write, daemon=True)
        thread.start()
        count, last, stable_since = 0, -1, None
        while time.perf_counter() - t0 < bound and not err:
            count = client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))
            if count and count == last:
                if stable_since is None:
                    stable_since = time.perf_counter()
                elif time.perf_counter() - stable_since > 2.0:
                    break
            else:
                stable_since = None
            last = count
            time.sleep(0.25)
        if err:
            raise RuntimeError(f"to_zarr failed before it was measured: {err[0]!r}")
        submitted = (stable_since or time.perf_counter()) - t0
        rss = sched.memory_info().rss
        out = {"n": n, "chunk": chunk, "blocks": (n // chunk) ** 3, "tasks": count,
               "submitted_s": round(submitted, 2),
               "scheduler_rss_gib": round(rss / 2**30, 3),
               "scheduler_rss_job_gib": round((rss - base_rss) / 2**30, 3),
               "client_rss_gib": round(psutil.Process().memory_info().rss / 2**30, 3)}
        client.close()
        return out
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(dst, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="4096,16384,32768")
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--bound", type=float, default=900.0, help="seconds to wait at most")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    os.makedirs(ROOT, exist_ok=True)
    import daskpatch

    print(f"daskpatch from {os.path.dirname(daskpatch.__file__)}", flush=True)
    results = []
    for n in [int(s) for s in args.sizes.split(",")]:
        r = measure(n, args.chunk, args.bound)
        results.append(r)
        print(json.dumps(r), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
