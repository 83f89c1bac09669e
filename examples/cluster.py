"""The torch inference example on a dask.distributed LocalCluster (worker processes).

Usage::

    python examples/cluster.py            # 192^3 volume, 2 worker processes
    python examples/cluster.py --edge 96  # smaller, as CI runs it

The graph is built exactly as on the local scheduler; with a ``Client`` active, ``dp.to_zarr``
runs it on the cluster and shows distributed's progress bar. Point a browser at the printed
dashboard address to watch the tasks. For a real cluster, replace ``LocalCluster(...)`` with the
scheduler's address: ``Client("tcp://scheduler:8786")``; the Zarr stores must then be on storage
every worker can reach (a shared file system or an object store URL).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from distributed import Client, LocalCluster
from torch_inference import TinyNet

import daskpatch as dp


def main(n: int = 192, size: int = 64, stride: int = 32) -> None:
    torch.manual_seed(0)
    net = TinyNet()  # as it is: pickled with the graph, run under inference_mode on each worker
    vol = np.random.default_rng(0).random((1, n, n, n), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp, \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                         dashboard_address=":0") as cluster, Client(cluster) as client:
        print(f"dashboard: {client.dashboard_link}")
        src, dst = Path(tmp) / "image.zarr", Path(tmp) / "logits.zarr"
        dp.to_zarr(vol, src, chunks=dp.aligned_chunks(vol.shape, stride, 4, channel_axis=0))
        logits = dp.apply_patches(dp.open_volume(src), net, size, stride, channel_axis=0,
                                  out_channels=2, batch_size=4, dtype=np.float32)
        t0 = time.perf_counter()
        dp.to_zarr(logits, dst, progress=True)
        elapsed = time.perf_counter() - t0
        on_cluster = dp.open_volume(dst).compute()
        local = logits.compute(scheduler="threads")
    # daskpatch's own arithmetic is deterministic (tests/graph/test_cluster.py checks bit equality with
    # a NumPy model), but torch's CPU kernels round differently with other thread counts
    diff = float(np.abs(on_cluster - local).max())
    same = diff <= 1e-5
    print(f"\ncluster run {elapsed:.2f} s; max |cluster - threaded| = {diff:.1e}")
    if not same:
        raise SystemExit("cluster: the cluster result differs from the local one")
    print("cluster: OK")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edge", type=int, default=192,
                        help="volume edge length (the patch size is fixed)")
    main(parser.parse_args().edge)
