#!/usr/bin/env python
"""Issue 20 item 3: MONAI's UNet through ``apply_patches(...).compute()`` (work blocks in
parallel on the threaded scheduler), one run in this process, with the library's defaults (no
thread settings by hand). Prints one JSON line: seconds, torch threads seen in the model, dask
threads. Run it in fresh processes against two trees, alternating (``farm-bench --vs``)::

    PYTHONPATH=TREE /work/peers/bin/python benchmarks/torch_threads.py [--to-numpy]
"""

from __future__ import annotations

import argparse
import json
import time

import dask
import numpy as np
import torch
from monai.networks.nets import UNet

import daskpatch as dp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[160, 128, 112])
    ap.add_argument("--to-numpy", action="store_true", help="dp.to_numpy instead of compute()")
    a = ap.parse_args()
    torch.manual_seed(0)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16, 32),
               strides=(2, 2), num_res_units=1).eval()
    seen: set[int] = set()

    class Probe(torch.nn.Module):  # what torch runs with inside the tasks
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.add(torch.get_num_threads())
            return self.net(x)

    vol = np.random.default_rng(1).standard_normal(tuple(a.shape)).astype(np.float32)
    res = dp.apply_patches(vol[None], Probe(), 64, 32, channel_axis=0, out_channels=2,
                           batch_size=4, block_shape=(64, 64, 64))
    t0 = time.perf_counter()
    dp.to_numpy(res) if a.to_numpy else res.compute()
    dt = time.perf_counter() - t0
    print(json.dumps({"seconds": dt, "torch_threads": sorted(seen),
                      "dask_threads": dask.config.get("num_workers", None) or "pool"}))


if __name__ == "__main__":
    main()
