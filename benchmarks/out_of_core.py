"""Out-of-core goal (issue 12): daskpatch Zarr -> Zarr on an N^3 float32 volume inside a memory
cgroup (v1, needs root), against a plain dask Zarr copy in the same cgroup.

    python benchmarks/out_of_core.py --n 1024 --limit-mib 1024 --max-ratio 1.5 --max-disk 0.5

Creates the input once under ``--dir`` (outside the cgroup: input chunks ``--s``^3), then runs,
each in a fresh child process confined to ``--limit-mib``: the copy (``da.to_zarr``), then
daskpatch (identity model, gaussian, size ``--p``, stride ``--s``, batch 4, ``dp.to_zarr``).
While daskpatch runs, the bytes under the output directory (spilled parts included) are polled
every 0.5 s. Checks 8 sampled blocks of the output against the input, then prints the time ratio
and the transient disk beyond the finished output (as a multiple of it) against the goals; exits
1 when a goal is missed. ``--profile`` also prints, per task kind, the seconds the daskpatch
child's tasks spent (summed over threads) and the spilled bytes written and deleted.
"""
import argparse
import os
import shutil
import subprocess
import sys
import threading
import time

ap = argparse.ArgumentParser()
ap.add_argument("--n", type=int, default=1024)
ap.add_argument("--limit-mib", type=int, default=1024)
ap.add_argument("--p", type=int, default=128)
ap.add_argument("--s", type=int, default=64)
ap.add_argument("--dir", default="/tmp/daskpatch-bench", help="where the input and output live")
ap.add_argument("--child", action="store_true")
ap.add_argument("--copy", action="store_true", help="child: plain dask zarr copy (the I/O floor)")
ap.add_argument("--profile", action="store_true", help="time the task kinds of the daskpatch run")
ap.add_argument("--skip-copy", type=float, default=None, help="use this copy time (s) instead")
ap.add_argument("--max-ratio", type=float, default=1.5, help="time goal: a multiple of the copy")
ap.add_argument("--max-disk", type=float, default=0.5,
                help="transient bytes under the output beyond the finished output, as a multiple "
                     "of it")
a = ap.parse_args()
data = os.path.join(a.dir, f"in{a.n}_s{a.s}.zarr")
out = os.path.join(a.dir, f"out{a.n}.zarr")

if a.child:
    import resource

    import daskpatch as dp

    t0 = time.perf_counter()
    if a.copy:
        import dask.array as da

        da.to_zarr(da.from_zarr(data), out, overwrite=True)
    else:
        x = dp.apply_patches(dp.open_volume(data), lambda b: b, a.p, a.s, blend="gaussian",
                             batch_size=4)
        if a.profile:
            from collections import defaultdict

            from dask.callbacks import Callback
            from dask.utils import key_split

            spent: dict = defaultdict(float)
            starts: dict = {}

            class Phases(Callback):
                def _pretask(self, key, dsk, state):
                    starts[key] = time.perf_counter()

                def _posttask(self, key, result, dsk, state, id):
                    spent[key_split(key)[:24]] += time.perf_counter() - starts.pop(key)

            with Phases():
                dp.to_zarr(x, out, overwrite=True)
            print("tasks: " + ", ".join(f"{k} {v:.1f}s" for k, v in sorted(spent.items())))
        else:
            dp.to_zarr(x, out, overwrite=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"child seconds={time.perf_counter() - t0:.1f} peak_rss_mib={rss:.0f}")
    sys.exit(0)

import dask.array as da  # noqa: E402
import numpy as np  # noqa: E402
import zarr  # noqa: E402

if not os.path.exists(data):
    os.makedirs(a.dir, exist_ok=True)
    x = da.random.random((a.n,) * 3, chunks=(a.s * 2,) * 3).astype(np.float32)
    z = zarr.create_array(data, shape=x.shape, chunks=(a.s,) * 3, dtype="f4")
    da.store(x, z, lock=False)


def du(path):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def confined(extra):
    shutil.rmtree(out, ignore_errors=True)
    cg = f"/sys/fs/cgroup/memory/daskpatch_ooc_{os.getpid()}"
    os.mkdir(cg)
    try:
        with open(f"{cg}/memory.limit_in_bytes", "w") as f:
            f.write(str(a.limit_mib * 2**20))
        try:
            with open(f"{cg}/memory.memsw.limit_in_bytes", "w") as f:
                f.write(str(a.limit_mib * 2**20))
        except OSError:
            pass

        def enter():
            with open(f"{cg}/cgroup.procs", "w") as f:
                f.write(str(os.getpid()))

        peak, done = [0], threading.Event()

        def poll():  # bytes under the output directory (spilled parts included)
            while not done.wait(0.5):
                tot = 0
                for root, _, files in os.walk(out):
                    for f in files:
                        try:
                            tot += os.path.getsize(os.path.join(root, f))
                        except OSError:
                            pass
                peak[0] = max(peak[0], tot)

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        t0 = time.perf_counter()
        cmd = [sys.executable, __file__, "--child", "--n", str(a.n), "--p", str(a.p), "--s",
               str(a.s), "--dir", a.dir, *extra]
        r = subprocess.run(cmd, preexec_fn=enter, capture_output=True, text=True)
        dt = time.perf_counter() - t0
        done.set()
        th.join()
        with open(f"{cg}/memory.failcnt") as f:
            failcnt = f.read().strip()
    finally:
        time.sleep(0.5)
        try:
            os.rmdir(cg)
        except OSError:
            pass
    if r.returncode != 0:
        print(r.stdout[-500:], r.stderr[-1500:])
        print(f"fail: child {extra} exit {r.returncode} (killed by OOM if -9) after {dt:.0f}s, "
              f"limit {a.limit_mib} MiB, failcnt {failcnt}")
        sys.exit(1)
    return dt, r.stdout.strip(), peak[0]


if a.skip_copy is None:
    tc, copy_out, _ = confined(["--copy"])
else:
    tc, copy_out = a.skip_copy, "given"
dt, dp_out, disk_peak = confined(["--profile"] if a.profile else [])
final = du(out)
disk_ratio = max(disk_peak - final, 0) / max(final, 1)
zi, zo = zarr.open_array(data, mode="r"), zarr.open_array(out, mode="r")
rng = np.random.default_rng(0)
for _ in range(8):
    lo = rng.integers(0, a.n - 64, 3)
    sl = tuple(slice(int(v), int(v) + 64) for v in lo)
    if not np.allclose(zi[sl], zo[sl], rtol=1e-5, atol=1e-6):
        print(f"fail: output differs from input at {sl}")
        sys.exit(1)
ratio = dt / tc
ok = ratio <= a.max_ratio and disk_ratio <= a.max_disk
print(f"{a.n}^3 float32 ({a.n**3 * 4 / 2**30:.2f} GiB) under a {a.limit_mib} MiB cgroup:\n"
      f"  daskpatch {dt:.0f}s ({dp_out.replace(chr(10), '; ')})\n"
      f"  dask zarr copy {tc:.0f}s ({copy_out})\n"
      f"  time ratio {ratio:.2f} (goal <= {a.max_ratio}): {'ok' if ratio <= a.max_ratio else 'MISSED'}\n"
      f"  transient disk beyond the output {disk_ratio:.2f}x the output ({disk_peak / 2**20:.0f} "
      f"MiB peak, output {final / 2**20:.0f} MiB; goal <= {a.max_disk}): "
      f"{'ok' if disk_ratio <= a.max_disk else 'MISSED'}")
sys.exit(0 if ok else 1)
