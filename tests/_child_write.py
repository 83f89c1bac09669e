"""A ``to_zarr`` of an ``apply_patches`` result, run as a separate process by storage/test_write_safety.py.

    python tests/_child_write.py INPUT TARGET [--stride S] [--kill-at K] [--hold FILE] ...

Exit status 0 with "DONE" when the write finished, 3 with "REFUSED: <message>" when to_zarr
refused it (a ValueError), -9 when killed (``--kill-at K``: the K-th model call SIGKILLs the
process, while the scheduler's other threads may be writing chunks, markers or spilled parts).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

import numpy as np


def model(batch: np.ndarray) -> np.ndarray:
    """The model of every run (the same math in every process)."""
    return np.tanh(1.5 * batch) + 0.25 * batch.mean(axis=(1, 2, 3), keepdims=True)


def build(source, stride: int = 8, blend: str = "gaussian", fn=model):
    import daskpatch as dp

    return dp.apply_patches(dp.open_volume(source), fn, 16, stride, block_shape=16,
                            batch_size=4, blend=blend)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("input")
    parser.add_argument("target")
    parser.add_argument("--stride", type=int, default=8)
    parser.add_argument("--blend", default="gaussian")
    parser.add_argument("--kill-at", type=int, default=0)
    parser.add_argument("--spill-bytes", type=int, default=None)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--ready", default=None, help="file created at the first model call")
    parser.add_argument("--hold", default=None, help="model calls wait until this file exists")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()

    import dask

    import daskpatch as dp

    if args.spill_bytes is not None:
        dask.config.set({"daskpatch.spill-bytes": args.spill_bytes})
    lock = threading.Lock()
    calls = [0]

    def counted(batch: np.ndarray) -> np.ndarray:
        with lock:
            calls[0] += 1
            n = calls[0]
        if n == 1 and args.ready:
            open(args.ready, "w").close()
        if args.hold:
            while not os.path.exists(args.hold):
                time.sleep(0.01)
        if n == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return model(batch)

    out = build(args.input, args.stride, args.blend, counted)
    try:
        with dask.config.set(scheduler="threads", num_workers=args.threads):
            dp.to_zarr(out, args.target, resume=args.resume)
    except ValueError as err:
        print(f"REFUSED: {err}", flush=True)
        sys.exit(3)
    print(f"DONE {calls[0]}", flush=True)


if __name__ == "__main__":
    main()
