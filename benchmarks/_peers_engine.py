"""Peer side of ``bench_engine.py``: MONAI and TorchIO sliding-window inference, one case per run.

Run with the peers' interpreter (a separate virtual environment with torch, monai, torchio)::

    /work/peers/bin/python benchmarks/_peers_engine.py monai --n 384 --size 128 --stride 64

Prints one JSON line (prefixed ``RESULT``) with the wall time of the inference call, the peak RSS
of the process (raw) and the RSS just before the call (baseline), and the identity error.
Needs only the standard library, NumPy and the peer under test (no psutil: RSS is read from /proc).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time


def rss_now() -> int:
    """Resident set size of this process in bytes (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def maxrss() -> int:
    """Peak RSS of this process so far, in bytes (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Sampler(threading.Thread):
    """Sample RSS every ``interval`` seconds; ``peak`` is the highest sample."""

    def __init__(self, interval: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak, self._stop_evt = interval, 0, threading.Event()

    def run(self) -> None:
        while not self._stop_evt.is_set():
            self.peak = max(self.peak, rss_now())
            time.sleep(self.interval)

    def stop(self) -> int:
        self._stop_evt.set()
        self.join()
        return self.peak


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("peer", choices=["monai", "torchio"])
    ap.add_argument("--n", type=int, default=384)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--stride", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(args.threads)
    except RuntimeError:
        pass
    versions = {"torch": torch.__version__}
    if args.peer == "monai":
        import monai
        from monai.inferers import sliding_window_inference

        versions["monai"] = monai.__version__
    else:
        import torchio as tio

        versions["torchio"] = tio.__version__

    def identity(b):
        return b

    def infer(x):
        with torch.no_grad():
            if args.peer == "monai":
                out = sliding_window_inference(
                    x[None, None], roi_size=(args.size,) * 3, sw_batch_size=args.batch,
                    predictor=identity, overlap=1 - args.stride / args.size, mode="gaussian",
                )
                return out[0, 0]
            subject = tio.Subject(img=tio.ScalarImage(tensor=x[None]))
            overlap = args.size - args.stride
            sampler_ = tio.inference.GridSampler(subject, patch_size=args.size,
                                                 patch_overlap=overlap)
            loader = torch.utils.data.DataLoader(sampler_, batch_size=args.batch)
            agg = tio.inference.GridAggregator(sampler_, overlap_mode="hann")
            for batch in loader:
                agg.add_batch(identity(batch["img"][tio.DATA]), batch[tio.LOCATION])
            return agg.get_output_tensor()[0]

    # warm-up on a small volume: one-time imports and initialisation are not timed
    infer(torch.zeros((args.size + args.stride,) * 3))
    vol = np.random.default_rng(args.seed).random((args.n,) * 3, dtype=np.float32)
    x = torch.from_numpy(vol)  # shares memory with vol
    baseline = rss_now()
    base_max = maxrss()
    sampler = Sampler()
    sampler.start()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    out = infer(x)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    peak = maxrss()
    sampled = sampler.stop()
    # identity error (after the peak has been read, so the check's temporaries do not count)
    err = (out.float() - x).abs()
    max_err = float(err.max())
    k = args.size // 2
    interior = err[k:-k, k:-k, k:-k]
    max_err_interior = float(interior.max()) if interior.numel() else float("nan")
    res = {
        "peer": args.peer, "versions": versions, "n": args.n, "wall_s": wall,
        "peak_rss": peak, "baseline_rss": baseline, "baseline_maxrss": base_max,
        "sampled_peak": sampled, "max_err": max_err, "max_err_interior": max_err_interior,
        "out_dtype": str(out.dtype), "out_shape": list(out.shape), "cpu_s": cpu,
    }
    print("RESULT " + json.dumps(res))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
