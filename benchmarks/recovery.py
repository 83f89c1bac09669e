"""Model work after a failure, against a clean run of the same write (issue 23, item 3).

    python benchmarks/recovery.py [--n 192] [--rounds 3] [--cases worker,resume,resume-spill]

Each case runs in fresh processes and counts the patches the model ran, through a file each
model call appends one byte per patch to (a killed process or worker keeps its count):

- ``worker``: ``to_zarr`` on a 2-worker ``LocalCluster`` (one thread per worker, processes);
  one worker is killed (``os._exit``) once ``--kill-at`` of the clean run's patches ran; the
  job finishes on the other worker and on the nanny's restarted one. Prints the patches run
  over the clean run's.
- ``resume``: a local ``to_zarr`` (threads) SIGKILLed once ``--kill-at`` of the patches ran,
  then ``resume=True``: the resumed run's patches over the clean run's, and the share of
  chunks the crash left missing (the floor: the missing chunks' own share).
- ``resume-spill``: the same with every halo spilled into the output store
  (``daskpatch.spill-bytes: 0``, what a cluster and a large volume do).

Every output is checked against the clean run's, bit for bit, outside the counts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.join(tempfile.gettempdir(), "daskpatch-bench", "recovery")
SIZE, STRIDE, BLOCK, BATCH = 32, 24, 48, 8


class Counted:
    """The model: a cheap elementwise map, a short sleep per batch (the GIL released, as a
    device would), one byte per patch appended to ``log``; ``kill`` (patch count, how) ends
    the process once that many patches ran in all processes together."""

    def __init__(self, log: str, kill: int = 0, how: str = "") -> None:
        self.log, self.kill, self.how = log, kill, how

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        time.sleep(0.004)
        fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, b"." * batch.shape[0])
        finally:
            os.close(fd)
        if self.kill and os.path.getsize(self.log) >= self.kill:
            if self.how == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif self.how == "exit" and not os.path.exists(self.log + ".killed"):
                open(self.log + ".killed", "w").close()
                os._exit(1)
        return np.tanh(batch) * 0.5

    def __daskpatch_fingerprint__(self) -> dict:
        return {"by": "benchmark", "model": "tanh/2"}


def _graph(src: str, log: str, kill: int = 0, how: str = ""):
    import daskpatch as dp

    return dp.apply_patches(dp.open_volume(src), Counted(log, kill, how), SIZE, STRIDE,
                            batch_size=BATCH, block_shape=BLOCK)


def child(args: argparse.Namespace) -> None:
    """One run, in this process: ``--role clean|kill|resume|cluster``."""
    import dask

    import daskpatch as dp

    if args.spill:
        dask.config.set({"daskpatch.spill-bytes": 0})
    if args.role == "cluster":
        from distributed import Client, LocalCluster

        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                          dashboard_address=None) as cluster, Client(cluster):
            dp.to_zarr(_graph(args.src, args.log, args.kill, "exit" if args.kill else ""),
                       args.dst)
        return
    with dask.config.set(scheduler="threads", num_workers=2):
        dp.to_zarr(_graph(args.src, args.log, args.kill, "sigkill" if args.kill else ""),
                   args.dst, resume=args.role == "resume")


def _run(*extra: str) -> int:
    proc = subprocess.run([sys.executable, __file__, "--child", *extra], capture_output=True,
                          text=True, timeout=1800)
    return proc.returncode


def _patches(log: str) -> int:
    return os.path.getsize(log) if os.path.exists(log) else 0


def _same(a: str, b: str) -> bool:
    import zarr

    return bool(np.array_equal(zarr.open_array(a, mode="r")[...],
                               zarr.open_array(b, mode="r")[...]))


def _missing(dst: str) -> tuple[float, int]:
    """The share of chunks a crashed write left unrecorded, and the patches that reach them
    (the least a resume must run: the missing chunks' own patches and their overlap)."""
    import itertools

    import zarr

    import daskpatch as dp
    from daskpatch.storage import markers

    z = zarr.open_array(dst, mode="r")
    blocks = markers.numblocks(z)
    done = markers.done_chunks(z, blocks)
    total = int(np.prod(blocks))
    if done is None:
        return 0.0, 0
    grid = dp.PatchGrid(z.shape, SIZE, STRIDE)
    starts = [grid.axis_starts(a) for a in range(z.ndim)]
    missing = [loc for loc in np.ndindex(*blocks) if loc not in done]
    needed = 0
    for start in itertools.product(*starts):
        if any(all(s < (c + 1) * ch and s + SIZE > c * ch
                   for s, c, ch in zip(start, loc, z.chunks)) for loc in missing):
            needed += 1
    return 1 - len(done) / total, needed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=192)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kill-at", type=float, default=0.55)
    parser.add_argument("--cases", default="worker,resume,resume-spill")
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--role", default="clean")
    parser.add_argument("--src"), parser.add_argument("--dst"), parser.add_argument("--log")
    parser.add_argument("--kill", type=int, default=0)
    parser.add_argument("--spill", action="store_true")
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    import zarr

    shutil.rmtree(ROOT, ignore_errors=True)
    os.makedirs(ROOT)
    src = os.path.join(ROOT, "in.zarr")
    rng = np.random.default_rng(0)
    z = zarr.create_array(src, shape=(args.n,) * 3, chunks=(BLOCK,) * 3, dtype="f4")
    z[...] = rng.standard_normal(z.shape, dtype=np.float32)
    import daskpatch

    print(f"daskpatch from {os.path.dirname(daskpatch.__file__)}; {args.n}^3, size {SIZE}, "
          f"stride {STRIDE}, blocks {BLOCK}^3, kill at {args.kill_at:.0%} of the patches")
    results: dict = {}
    for case in args.cases.split(","):
        ratios, missing = [], []
        for r in range(args.rounds):
            d = os.path.join(ROOT, f"{case}-{r}")
            os.makedirs(d)
            spill = ["--spill"] if case != "resume" else []
            role = "cluster" if case == "worker" else "clean"
            clean_log = os.path.join(d, "clean.log")
            rc = _run("--role", role, "--src", src, "--dst", os.path.join(d, "clean.zarr"),
                      "--log", clean_log, *spill)
            assert rc == 0, f"clean run failed ({rc})"
            clean = _patches(clean_log)
            kill = int(args.kill_at * clean)
            log, dst = os.path.join(d, "run.log"), os.path.join(d, "run.zarr")
            if case == "worker":
                rc = _run("--role", "cluster", "--src", src, "--dst", dst, "--log", log,
                          "--kill", str(kill), *spill)
                assert rc == 0, f"the run with a worker killed failed ({rc})"
                ran = _patches(log)
            else:
                rc = _run("--role", "kill", "--src", src, "--dst", dst, "--log", log,
                          "--kill", str(kill), *spill)
                assert rc == -signal.SIGKILL, f"the run to kill ended with {rc}"
                share, needed = _missing(dst)
                missing.append(share)
                before = _patches(log)
                rc = _run("--role", "resume", "--src", src, "--dst", dst, "--log", log, *spill)
                assert rc == 0, f"the resume failed ({rc})"
                ran = _patches(log) - before
            assert _same(dst, os.path.join(d, "clean.zarr")), f"{case}: output differs"
            ratios.append(ran / clean)
            extra = (f"  chunks missing {missing[-1]:.2f}, patches reaching them {needed} "
                     f"(this run / those: {ran / max(needed, 1):.3f})") if missing else ""
            print(f"{case} round {r}: clean {clean} patches, this run {ran} "
                  f"({ran / clean:.3f}x){extra}", flush=True)
        results[case] = {"ratio_median": statistics.median(ratios), "ratios": ratios,
                         "missing": missing}
        print(f"{case}: patches / clean run: median {statistics.median(ratios):.3f} "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f})", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
