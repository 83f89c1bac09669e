#!/usr/bin/env python
"""Issue 21 item 5: daskpatch against MONAI's ``sliding_window_inference`` on real networks.

MONAI's UNet and BasicUNet (random weights, seed 0, eval mode) run on a random volume through
``monai.inferers.sliding_window_inference`` and through ``daskpatch.apply_patches`` with the
matching parameters:

* stride: MONAI's own ``_get_scan_interval`` (``int(roi * (1 - overlap))``, the roi itself on an
  axis the roi spans whole), windows placed as ``border="shift"`` (the last one ends at the edge);
* ``mode="gaussian", sigma_scale=0.125`` <-> ``blend="gaussian", sigma_scale=0.125,
  min_weight=1e-3``; ``mode="constant"`` <-> ``blend="constant"``.

Per case it prints the largest absolute difference, that over the largest absolute value of
MONAI's result (``rel``), and, for gaussian, the same for daskpatch's default gaussian (no
``min_weight``), which does not clamp. Run with a Python that has torch and MONAI::

    PYTHONPATH=. /work/peers/bin/python benchmarks/monai_agreement.py [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import dask
import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.inferers.utils import _get_scan_interval
from monai.networks.nets import BasicUNet, UNet

import daskpatch as dp

#: (network, volume shape, roi, overlap)
CASES = [
    ("unet", (160, 128, 112), (64, 64, 64), 0.5),
    ("unet", (160, 128, 112), (64, 64, 64), 0.25),
    ("unet", (150, 131, 97), (64, 64, 64), 0.5),  # no axis a multiple of the stride
    ("unet", (96, 80, 72), (48, 32, 64), 0.5),    # an anisotropic roi
    ("basicunet", (160, 128, 112), (64, 64, 64), 0.5),
    ("basicunet", (150, 131, 97), (64, 64, 64), 0.25),
]


def network(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "unet":
        return UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16, 32),
                    strides=(2, 2), num_res_units=1).eval()
    return BasicUNet(spatial_dims=3, in_channels=1, out_channels=2,
                     features=(8, 8, 16, 32, 64, 8)).eval()


class TwoResolutions(torch.nn.Module):
    """A network with a full-resolution head and a half-resolution one (deep supervision)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.net(x)
        return y, torch.nn.functional.avg_pool3d(torch.sin(3 * y), 2)


def multi_resolution(rows: list) -> None:
    """MONAI's outputs at other resolutions against daskpatch's heads at those resolutions.
    ``constant`` must agree to float rounding; MONAI's ``gaussian`` at half resolution samples
    the full-size window with nearest interpolation, where daskpatch uses the gaussian of the
    half-size patch, so that row is printed for information."""
    net = TwoResolutions(network("unet")).eval()
    shape, roi, overlap = (96, 80, 64), (32, 32, 32), 0.5
    vol = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    stride = _get_scan_interval(shape, roi, 3, (overlap,) * 3)
    for mode in ("constant", "gaussian"):
        with torch.inference_mode():
            refs = sliding_window_inference(torch.from_numpy(vol)[None, None], roi, 4, net,
                                            overlap=overlap, mode=mode, sigma_scale=0.125)
        kw = dict(blend="constant") if mode == "constant" else \
            dict(blend="gaussian", sigma_scale=0.125, min_weight=1e-3)
        heads = dp.apply_patches(vol[None], net, roi, stride, channel_axis=0, batch_size=4,
                                 out_channels=(2, 2), out_scale="infer", **kw)
        for k, (ref, got) in enumerate(zip(refs, dask.compute(*heads))):
            diff, rel = compare(ref[0].numpy().astype(np.float64), got)
            row = ["unet+half", "x".join(map(str, shape)), "x".join(map(str, roi)), overlap,
                   "x".join(map(str, stride)), f"{mode} head {k} ({got.shape[1:]})",
                   f"{diff:.3g}", f"{rel:.2g}", "-"]
            rows.append(row)
            print(f"two resolutions {row[1]} roi {row[2]} {mode:8} head {k} "
                  f"{tuple(got.shape)}: max abs {diff:.3g}, rel {rel:.2g}", flush=True)


def compare(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    diff = float(np.abs(got.astype(np.float64) - ref).max())
    return diff, diff / float(np.abs(ref).max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="also write the rows here (the results schema's table)")
    a = ap.parse_args()
    torch.set_num_threads(2)
    rows = []
    print(f"torch {torch.__version__}, MONAI {__import__('monai').__version__}, "
          f"numpy {np.__version__}, {platform.machine()}")
    for name, shape, roi, overlap in CASES:
        net = network(name)
        vol = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
        stride = _get_scan_interval(shape, roi, 3, (overlap,) * 3)
        for mode in ("gaussian", "constant"):
            t0 = time.perf_counter()
            with torch.inference_mode():
                ref = sliding_window_inference(
                    torch.from_numpy(vol)[None, None], roi, 4, net, overlap=overlap, mode=mode,
                    sigma_scale=0.125)[0].numpy().astype(np.float64)
            t_monai = time.perf_counter() - t0
            kw = dict(channel_axis=0, out_channels=2, batch_size=4, border="shift")
            if mode == "gaussian":
                kw.update(blend="gaussian", sigma_scale=0.125, min_weight=1e-3)
            else:
                kw.update(blend="constant")
            t0 = time.perf_counter()
            got = dp.to_numpy(dp.apply_patches(vol[None], net, roi, stride, **kw))
            t_dp = time.perf_counter() - t0
            diff, rel = compare(ref, got)
            plain = "-"
            if mode == "gaussian":
                kw.pop("min_weight")
                p_diff, p_rel = compare(ref, dp.to_numpy(dp.apply_patches(vol[None], net, roi,
                                                                         stride, **kw)))
                plain = f"{p_diff:.3g} ({p_rel:.2g})"
            row = [name, "x".join(map(str, shape)), "x".join(map(str, roi)), overlap,
                   "x".join(map(str, stride)), mode, f"{diff:.3g}", f"{rel:.2g}", plain]
            rows.append(row)
            print(f"{name:9} {row[1]:11} roi {row[2]:8} overlap {overlap:<4} stride {row[4]:8} "
                  f"{mode:8}: max abs {diff:.3g}, rel {rel:.2g}; default gaussian {plain}  "
                  f"(MONAI {t_monai:.1f} s, daskpatch {t_dp:.1f} s)", flush=True)
    multi_resolution(rows)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f)


if __name__ == "__main__":
    main()
