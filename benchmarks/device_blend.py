#!/usr/bin/env python
"""Issue 20 item 2: blending on the model's device against blending on the host, one real
network, a fresh process per run (time it from outside with farm-bench, A/B alternating)::

    PYTHONPATH=. farm-bench -n 5 --timeout 900 -- /work/peers/bin/python \
        benchmarks/device_blend.py --mode device --vs \
        "/work/peers/bin/python benchmarks/device_blend.py --mode host"

MONAI's UNet (random weights, seed 0) over 160x128x112, patch 64, overlap 0.5 (stride 32),
batch 4, gaussian window; ``--mode device`` wraps it in ``TorchModel(net, device="cpu",
blend_on_device=True)`` (this machine has no GPU: the device is the CPU, so this measures the
cost of the device path's torch ops against the NumPy kernel, not a GPU's saved copies),
``--mode host`` in ``TorchModel(net)``. Each run prints its own wall time of the apply and a
checksum (compared outside the timed part: ``--check`` runs both and prints their difference).
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def run(mode: str) -> np.ndarray:
    import torch
    from monai.networks.nets import UNet

    import daskpatch as dp

    torch.manual_seed(0)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16, 32),
               strides=(2, 2), num_res_units=1).eval()
    vol = np.random.default_rng(1).standard_normal((160, 128, 112)).astype(np.float32)
    model = dp.TorchModel(net, device="cpu", blend_on_device=True) if mode == "device" \
        else dp.TorchModel(net)
    t0 = time.perf_counter()
    out = dp.to_numpy(dp.apply_patches(vol[None], model, 64, 32, channel_axis=0,
                                       out_channels=2, batch_size=4))
    print(f"{mode}: {time.perf_counter() - t0:.3f} s, sum {float(out.sum(dtype=np.float64)):.6g}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=("host", "device"), default="device")
    ap.add_argument("--check", action="store_true", help="run both; print their difference")
    a = ap.parse_args()
    if a.check:
        host, dev = run("host"), run("device")
        print(f"max abs diff {float(np.abs(host - dev).max()):.3g}, relative "
              f"{float(np.abs(host - dev).max() / np.abs(host).max()):.3g}")
    else:
        run(a.mode)


if __name__ == "__main__":
    main()
