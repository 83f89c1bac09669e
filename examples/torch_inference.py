"""Sliding-window inference of a small 3-D PyTorch net on a Zarr volume, blended, written to Zarr.

Usage::

    python examples/torch_inference.py                 # 192^3 volume, patch 64, stride 32
    python examples/torch_inference.py --edge 96       # smaller, as CI runs it
    python examples/torch_inference.py --device cuda   # on a GPU (mixed precision: --amp)

The net has random weights (the point is the plumbing): it takes ``(B, 1, 64, 64, 64)`` float32
batches and returns 2-class logits ``(B, 2, 64, 64, 64)``. It goes to ``apply_patches`` as it is
(wrapped in ``dp.TorchModel`` only to pick the device): each batch runs under
``torch.inference_mode()`` on the module's device, whichever thread runs it, and comes back as
NumPy. The single-channel volume has its channel axis first (``(1, X, Y, Z)``, ``channel_axis=0``),
as torch layers want. Every patch goes through the net exactly once; overlapping predictions are
blended with a gaussian window; the result is written chunk by chunk to Zarr with a progress bar,
so the volume never has to fit in memory.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import daskpatch as dp


class TinyNet(nn.Module):
    def __init__(self, out_channels: int = 2) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(1, 8, 3, padding=1), nn.ReLU(),
            nn.Conv3d(8, 8, 3, padding=1), nn.ReLU(),
            nn.Conv3d(8, out_channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def main(n: int = 192, size: int = 64, stride: int = 32, batch_size: int = 4,
         device: str = "cpu", amp: bool = False) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)  # dask runs one task per core
    net = TinyNet()
    calls = []
    net.register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
    model = dp.TorchModel(net, device=device, amp=amp)  # or pass `net` itself: the CPU, float32
    vol = np.random.default_rng(0).random((1, n, n, n), dtype=np.float32)  # (C, X, Y, Z)

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "image.zarr", Path(tmp) / "logits.zarr"
        dp.to_zarr(vol, src, chunks=dp.aligned_chunks(vol.shape, stride, 4, channel_axis=0))
        image = dp.open_volume(src)
        logits = dp.apply_patches(image, model, size, stride, channel_axis=0, out_channels=2,
                                  batch_size=batch_size, blend="gaussian", dtype=np.float32)
        grid = dp.PatchGrid(vol.shape[1:], size, stride)
        print(f"image {image.shape} -> logits {logits.shape}, {len(grid)} patches, "
              f"{math.prod(logits.numblocks)} output chunks")
        t0 = time.perf_counter()
        dp.to_zarr(logits, dst, progress=True)
        elapsed = time.perf_counter() - t0
        out = dp.open_volume(dst)
        # spot check: one interior patch through the net alone agrees away from patch edges
        c = (n // 2 // stride) * stride
        sl = (slice(None),) + (slice(c, c + size),) * 3
        alone = model(vol[sl][None])[0]
        inner = (slice(None),) + (slice(size // 4, 3 * size // 4),) * 3
        diff = float(np.abs(out[sl].compute()[inner] - alone[inner]).max())
    print(f"inference + blend + write: {elapsed:.2f} s; model calls {len(calls) - 1} "
          f"(batches of <= {batch_size}); max interior deviation from a lone patch {diff:.3f}")
    print("torch_inference: OK")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edge", type=int, default=192,
                        help="volume edge length (the patch size is fixed)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    parser.add_argument("--amp", action="store_true", help="mixed precision (autocast)")
    args = parser.parse_args()
    main(args.edge, device=args.device, amp=args.amp)
