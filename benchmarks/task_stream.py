#!/usr/bin/env python
"""Where a 2-worker run of ``scaling.py``'s case spends its time: the task stream, per worker.

Runs ``dp.to_zarr`` of ``scaling.py``'s CPU-heavy model on a 256^3 Zarr volume on a
LocalCluster (2 processes, 1 thread each) and prints every task longer than 20 ms and every
transfer (seconds from the first start, action, worker port, key), then ``dask.order``'s rank of
the block (``acc-``) tasks in ``to_zarr``'s optimised job and the order the cluster is given
(the blocks' priority annotations first, biggest blocks first; dask.order breaks ties).

    python benchmarks/task_stream.py
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

import numpy as np
import zarr


def main() -> None:
    import dask
    from dask.order import order
    from distributed import Client, LocalCluster, get_task_stream

    import daskpatch as dp

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from scaling import model

    tmp = tempfile.mkdtemp(prefix="daskpatch-stream-")
    src = f"{tmp}/in.zarr"
    x = np.random.default_rng(0).random((256,) * 3, dtype=np.float32)
    zarr.create_array(src, shape=x.shape, chunks=(64,) * 3, dtype="f4")[:] = x
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as c, Client(c):
        r = dp.apply_patches(dp.open_volume(src), model, 64, 32, batch_size=8)
        with get_task_stream() as ts:
            t = time.perf_counter()
            dp.to_zarr(r, f"{tmp}/out.zarr")
            wall = time.perf_counter() - t
    print(f"wall {wall:.2f} s")
    events = [(s["start"], s["stop"], s["action"], e["worker"].rsplit(":", 1)[-1], e["key"])
              for e in ts.data for s in e["startstops"]]
    t0 = min(e[0] for e in events)
    for start, stop, action, worker, key in sorted(events, key=lambda e: e[0]):
        if stop - start > 0.02 or action != "compute":
            print(f"{start - t0:6.2f} {stop - t0:6.2f} {action:9} {worker} {key}")
    job = dp.to_zarr(dp.apply_patches(dp.open_volume(src), model, 64, 32, batch_size=8),
                     f"{tmp}/out2.zarr", compute=False)
    (optimised,) = dask.optimize(job)
    rank = order(dict(optimised.__dask_graph__()))
    blocks = sorted((p, k[1:]) for k, p in rank.items()
                    if isinstance(k, tuple) and str(k[0]).startswith("acc-"))
    print("dask.order of the blocks in to_zarr's job:", [b for _, b in blocks])
    from daskpatch.graph.engine import find_engines
    from daskpatch.graph.order import BiggestFirst

    arr = dp.apply_patches(dp.open_volume(src), model, 64, 32, batch_size=8)
    (engine,) = find_engines(arr).values()
    first = BiggestFirst([engine])
    print("the order the cluster is given (priority annotations, biggest first, then dask.order):",
          [b for _, b in sorted(blocks, key=lambda pb: (-first((engine.acc_name, *pb[1])),
                                                        pb[0]))])
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
