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


class Same:
    """``fn`` fingerprinted as :func:`model` (counting and killing are the machine's doing,
    not another model)."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.fn(batch)

    def __daskpatch_fingerprint__(self) -> dict:
        return {"by": "tests/_child_write.py", "model": "model"}  # in the child or not


def build(source, stride: int = 8, blend: str = "gaussian", fn=model):
    import daskpatch as dp

    volume = source if hasattr(source, "ndim") else dp.open_volume(source)
    return dp.apply_patches(volume, fn, 16, stride, block_shape=16,
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
    parser.add_argument("--storage-option", action="append", default=[],
                        help="KEY=VALUE for an fsspec URL's input and target (e.g. s3://)")
    args = parser.parse_args()
    options = dict(o.split("=", 1) for o in args.storage_option)

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

    source = dp.open_volume(args.input, storage_options=options) if options else args.input
    out = build(source, args.stride, args.blend, Same(counted))
    try:
        with dask.config.set(scheduler="threads", num_workers=args.threads):
            dp.to_zarr(out, args.target, resume=args.resume,
                       **({"storage_options": options} if options else {}))
    except ValueError as err:
        print(f"REFUSED: {err}", flush=True)
        sys.exit(3)
    print(f"DONE {calls[0]}", flush=True)


if __name__ == "__main__":
    main()
