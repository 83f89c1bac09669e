#!/usr/bin/env python
"""Memory, speed and graph figures of the daskpatch engine (issue 3, item 5).

Sections (``--sections``, comma separated; default all):

``memory``
    Zarr -> Zarr, float32 cubes of growing side (default 256, 512, 1024 = 4 GiB), size 128,
    stride 64, gaussian, identity model, batch 8, threaded scheduler. Each case runs in a fresh
    subprocess: the input store is written chunk by chunk (never held in RAM) by one subprocess,
    then another builds ``apply_patches`` over the ``zarr.Array`` and stores the result into a Zarr
    array chunked like the result. Reports wall time and the peak RSS of the process
    (``ru_maxrss``), what the scheduler held at the moment of the peak, and the identity error on
    sample regions. Target: peak RSS <= 1 GiB at 1024^3, flat as the volume grows.
``peers``
    In memory, 384^3 float32, size 128, stride 64, identity, batch 8: daskpatch
    (``apply_patches(...).compute()``, gaussian) vs MONAI ``sliding_window_inference`` (gaussian,
    overlap 0.5) vs TorchIO ``GridSampler`` + ``GridAggregator`` (hann). Every contender runs in its
    own fresh subprocess (the peers in the peers' venv, see ``_peers_engine.py``), in alternating
    order over ``--rounds`` rounds; 2 threads for torch and for dask. Reports the median ratios.
    Targets: time <= 1/3 of MONAI's, peak RSS (above the baseline) <= 1/2 of MONAI's.
``graph``
    Exactly-once (a model that records every patch it sees), tasks per output chunk, and the time
    to build ``apply_patches`` on a 8192^3 virtual volume (target < 2 s).

Examples::

    python benchmarks/bench_engine.py                      # everything, full sizes (~15-25 min)
    python benchmarks/bench_engine.py --quick              # tiny sizes, seconds (CI smoke run)
    python benchmarks/bench_engine.py --sections graph
    python benchmarks/bench_engine.py --sections memory --sizes 512,1024 --chunks 256
    python benchmarks/bench_engine.py --sections peers --rounds 5 --json out.json
"""

from __future__ import annotations

import argparse
import collections
import datetime
import itertools
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MiB = 2**20
GiB = 2**30


# -- measuring -----------------------------------------------------------------------------------
def rss_now() -> int:
    """Resident set size of this process in bytes (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def maxrss() -> int:
    """Peak RSS of this process so far in bytes (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_s() -> float:
    """User + system CPU seconds of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Sampler(threading.Thread):
    """Sample RSS every ``interval`` s: the peak, and a coarse timeline ``[(t, rss)]``."""

    def __init__(self, interval: float = 0.005, every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.interval, self.every = interval, every
        self.peak, self.peak_t, self.timeline = 0, 0.0, []
        self._stop_evt = threading.Event()
        self.t0 = time.perf_counter()

    def run(self) -> None:
        last = -1e9
        while not self._stop_evt.is_set():
            r = rss_now()
            t = time.perf_counter() - self.t0
            if r > self.peak:
                self.peak, self.peak_t = r, t
            if t - last >= self.every:
                self.timeline.append((round(t, 2), r))
                last = t
            time.sleep(self.interval)

    def stop(self) -> int:
        self._stop_evt.set()
        self.join()
        return self.peak


def _kind(key, out_name: str) -> str:
    name = key[0] if isinstance(key, tuple) else str(key)
    if name.startswith("acc-"):
        return "acc"
    if name.startswith("halo-"):
        return "halo"
    if name == out_name or (out_name is None and name.startswith("apply-patches-")):
        return "out"
    if name.startswith(("store", "to-zarr")):
        return "store"
    if name.startswith(("source-", "original-", "array-original-")):
        return "input"  # the user's volume (or a handle on it): not made by the engine
    return "other"


def _nbytes(v) -> int:
    """Bytes of the NumPy data in a task result (a zarr.Array's nbytes is on disk: not counted)."""
    import numpy as np

    if isinstance(v, np.ndarray):
        return int(v.nbytes)
    if isinstance(v, dict):
        return sum(_nbytes(x) for x in v.values())
    if isinstance(v, (list, tuple)):
        return sum(_nbytes(x) for x in v)
    return 0


def held_tracker(out_name: str | None):
    """A dask local-scheduler callback recording what the scheduler holds at the RSS peak."""
    from dask.callbacks import Callback

    class Held(Callback):
        def __init__(self):
            super().__init__()
            self.best = {"rss": 0}
            self.max_held = {"bytes": 0}
            self.done = collections.Counter()
            self.lock = threading.Lock()

        def _posttask(self, key, result, dsk, state, worker_id):
            self.done[_kind(key, out_name)] += 1
            by_kind = collections.Counter()
            count = collections.Counter()
            for k, v in list(state["cache"].items()):
                kind = _kind(k, out_name)
                if kind == "input":
                    continue
                by_kind[kind] += _nbytes(v)
                count[kind] += 1
            total = sum(by_kind.values())
            r = rss_now()
            snap = {"rss": r, "held_bytes": dict(by_kind), "held_count": dict(count),
                    "running": len(state["running"]), "done": dict(self.done)}
            if r > self.best["rss"]:
                self.best = snap
            if total > self.max_held["bytes"]:
                self.max_held = {"bytes": total, **snap}

    return Held()


# -- a model of what the scheduler holds -----------------------------------------------------
def _task_tuple(t):
    """A task as a tuple ``(func, *args)`` (legacy tuples, or dask's Task objects)."""
    if hasattr(t, "func") and hasattr(t, "args"):
        return (t.func, *[getattr(a, "value", a) for a in t.args])
    return t


def held_by_order(obj, out_name: str, chunk_bytes: int) -> tuple[int, dict]:
    """Peak bytes of task results held when ``obj``'s graph runs on one thread in dask.order.

    Counts the engine's results only (accumulation buffers, halo pieces, output chunks), not
    the memory inside a running task. A result is freed when its last dependent has run.
    """
    import dask
    from dask.core import get_dependencies
    from dask.order import order

    (obj,) = dask.optimize(obj)
    dsk = dict(obj.__dask_graph__())
    deps = {k: set(get_dependencies(dsk, k)) for k in dsk}
    waiting = collections.Counter()
    for k, ds in deps.items():
        for d in ds:
            waiting[d] += 1
    prio = order(dsk)

    def size(k) -> int:
        t = _task_tuple(dsk[k])
        fname = getattr(t[0], "__name__", "") if isinstance(t, tuple) and t else ""
        if fname == "apply_block":  # an accumulation buffer (its spec's extended shape)
            return math.prod(t[1].ext_shape) * 4
        if fname == "halo":  # (possibly fused into its acc key by dask's optimisation)
            if len(t) > 3 and t[3] is not None:  # spilled to disk: the result is file names
                return 0
            return sum(math.prod(s.stop - s.start for s in sl) * 4 for _, sl in t[2])
        if fname == "add":
            return chunk_bytes
        return 0  # writes, sources (and an output fused into its write: transient)

    live: dict = {}
    cur = peak = 0
    at_peak: dict = {}
    for k in sorted(dsk, key=prio.__getitem__):
        live[k] = size(k)
        cur += live[k]
        if cur > peak:
            peak = cur
            at_peak = collections.Counter()
            for kk, v in live.items():
                at_peak[_kind(kk, out_name)] += v
        for d in deps[k]:
            waiting[d] -= 1
            if waiting[d] == 0 and d in live:
                cur -= live.pop(d)
        if waiting[k] == 0:
            cur -= live.pop(k)
    return peak, {k: v for k, v in at_peak.items() if v}


def held_raster(n: int, b: int, size: int, stride: int, per_piece: bool) -> int:
    """Peak bytes held when blocks run one at a time in C order (acc -> halo -> own output).

    ``per_piece=False`` models the engine's halo task (one result holding every piece until the
    last neighbour has used it); ``True`` models one result per (block, neighbour) piece. Either
    way the pending halos form a front across the volume: O(n^2 (size - stride)) bytes.
    """
    h = size - stride
    nb = -(-n // b)

    def ext(i):
        return i * b, (min(i * b + b + h, n) if i < nb - 1 else n)

    def overlap(i, t):
        lo, hi = ext(i)
        return max(0, min(hi, min((t + 1) * b, n)) - max(lo, t * b))

    by_target: dict = collections.defaultdict(list)  # target -> [(source, bytes)]
    remaining: dict = {}  # source -> [targets left, bytes] (per_piece=False)
    cur = peak = 0
    for blk in itertools.product(range(nb), repeat=3):
        e = math.prod(ext(i)[1] - ext(i)[0] for i in blk) * 4
        pieces = {}
        for tgt in itertools.product(*[(i, i + 1) if i + 1 < nb else (i,) for i in blk]):
            if tgt != blk:
                v = math.prod(overlap(i, t) for i, t in zip(blk, tgt)) * 4
                if v:
                    pieces[tgt] = v
        halo = sum(pieces.values())
        peak = max(peak, cur + e + halo)
        cur += halo
        if not per_piece and pieces:
            remaining[blk] = [len(pieces), halo]
        for tgt, v in pieces.items():
            by_target[tgt].append((blk, v))
        peak = max(peak, cur + b**3 * 4)  # the output chunk of blk, its own buffer freed
        for src, v in by_target.pop(blk, []):
            if per_piece:
                cur -= v
            else:
                remaining[src][0] -= 1
                if remaining[src][0] == 0:
                    cur -= remaining.pop(src)[1]
    return peak


# -- section 1: Zarr -> Zarr ---------------------------------------------------------------------
def worker_make_zarr(p: dict) -> dict:
    """Write a float32 cube chunk by chunk (seeded per chunk; never the whole cube in RAM)."""
    import numpy as np
    import zarr

    n, c = p["n"], p["chunk"]
    kw = {} if p["compressor"] == "default" else {"compressors": None}
    z = zarr.create_array(store=p["path"], shape=(n,) * 3, chunks=(c,) * 3, dtype="float32",
                          overwrite=True, **kw)
    t0 = time.perf_counter()
    nc = -(-n // c)
    for i in range(nc):
        for j in range(nc):
            for k in range(nc):
                sl = tuple(slice(a * c, min((a + 1) * c, n)) for a in (i, j, k))
                rng = np.random.default_rng([p["seed"], i, j, k])
                z[sl] = rng.random(tuple(s.stop - s.start for s in sl), dtype=np.float32)
    return {"write_s": time.perf_counter() - t0, "peak_rss": maxrss()}


def _sample_regions(n: int, size: int, count: int = 6, side: int = 48, seed: int = 1) -> list:
    """Regions to check the identity on: the corners (borders) and random places."""
    import numpy as np

    side = min(side, n)
    regs = [(0, 0, 0), (n - side,) * 3, (0, n - side, n // 3)]
    rng = np.random.default_rng(seed)
    while len(regs) < count:
        regs.append(tuple(int(v) for v in rng.integers(0, n - side + 1, 3)))
    # a region across a block boundary (where halos meet)
    regs.append(tuple(max(0, min(n - side, n // 2 - side // 2)) for _ in range(3)))
    return [tuple(slice(a, a + side) for a in r) for r in regs]


def worker_zarr(p: dict) -> dict:
    """One Zarr -> Zarr run: build, store, measure, check."""
    import dask
    import dask.array as da
    import numpy as np
    import zarr

    import daskpatch as dp
    from daskpatch.graph import lowering
    from daskpatch.storage.spill import spill_bytes

    dask.config.set(scheduler="threads")
    if p.get("workers"):
        dask.config.set(num_workers=p["workers"])
    if p.get("zarr_concurrency"):
        zarr.config.set({"async.concurrency": p["zarr_concurrency"]})
    src = zarr.open_array(p["path"], mode="r")
    baseline = rss_now()
    sampler = Sampler()
    sampler.start()
    c0 = cpu_s()
    t0 = time.perf_counter()
    mode = p.get("spill", "auto")
    kw_spill: dict = {}  # auto: spill=None, to_zarr decides (spills into the output store)
    spill_dir = str(Path(p["out_path"]) / ".daskpatch-spill")
    if mode == "off":
        kw_spill = {"spill": False}
    elif mode == "on":
        spill_dir = str(Path(p["out_path"]).parent / "spill")
        kw_spill = {"spill": spill_dir}
    out = dp.apply_patches(src, lambda b: b, p["size"], p["stride"], blend="gaussian",
                           batch_size=p["batch"], block_shape=p.get("block_shape"), **kw_spill)
    t_build = time.perf_counter() - t0
    chunks = tuple(c[0] for c in out.chunks)
    kw = {} if p["compressor"] == "default" else {"compressors": None}
    writer = "dask.array.store"
    try:  # the library's writer, if it exists and works
        from daskpatch.io import to_zarr as dp_to_zarr  # type: ignore[import-not-found]
    except Exception:
        dp_to_zarr = None
    tracker = held_tracker(out.name)
    t1 = time.perf_counter()
    with tracker:
        stored = False
        if dp_to_zarr is not None and p.get("writer", "io") == "io":
            try:
                dp_to_zarr(out, p["out_path"], overwrite=True)
                writer = "daskpatch.io.to_zarr"
                stored = True
            except Exception as err:  # fall back, say so
                writer = f"dask.array.store (daskpatch.io.to_zarr failed: {err!r:.120})"
        if not stored:
            dst = zarr.create_array(store=p["out_path"], shape=out.shape, chunks=chunks,
                                    dtype=out.dtype, overwrite=True, **kw)
            da.store(out, dst, lock=False)
    t_store = time.perf_counter() - t1
    wall = time.perf_counter() - t0
    cpu = cpu_s() - c0
    peak = maxrss()
    sampled = sampler.stop()
    # identity check on sample regions (after the peak has been read)
    res_arr = zarr.open_array(p["out_path"], mode="r")
    errs = []
    for sl in _sample_regions(p["n"], p["size"]):
        a = np.asarray(res_arr[sl], dtype=np.float64)
        b = np.asarray(src[sl], dtype=np.float64)
        errs.append(float(np.abs(a - b).max()))
    ntasks = len(dict(out.__dask_graph__())) if p.get("count_tasks") else None
    files = [f for f in Path(spill_dir).rglob("*") if f.is_file()]
    spill_files, spill_bytes = len(files), sum(f.stat().st_size for f in files)
    # did the halos go to a store? (lowering only builds a graph; nothing runs)
    would_spill = bool(lowering._spilled(out, None, "probe", spill_bytes())[1])
    spilled = would_spill and (mode == "on" or writer == "daskpatch.io.to_zarr")
    return {
        "n": p["n"], "chunk": p["chunk"], "block": chunks, "numblocks": list(out.numblocks),
        "build_s": t_build, "store_s": t_store, "wall_s": wall, "cpu_s": cpu, "peak_rss": peak,
        "baseline_rss": baseline, "sampled_peak": sampled, "peak_at_s": sampler.peak_t,
        "timeline": sampler.timeline, "held_at_peak": tracker.best,
        "max_held": tracker.max_held, "max_err": max(errs), "writer": writer,
        "spill": mode, "spilled": spilled, "spill_bytes_left": spill_bytes,
        "spill_files_left": spill_files, "block_bytes_default":
        dask.utils.parse_bytes(dask.config.get("daskpatch.block-bytes")),
        "num_workers": dask.config.get("num_workers", None) or os.cpu_count(), "ntasks": ntasks,
    }


# -- section 2: in memory vs peers ---------------------------------------------------------------
def worker_mem_ours(p: dict) -> dict:
    import dask
    import numpy as np

    import daskpatch as dp

    dask.config.set(scheduler="threads", num_workers=p["threads"])

    def identity(b):
        return b

    def infer(vol):
        arr = dp.apply_patches(vol, identity, p["size"], p["stride"], blend="gaussian",
                               batch_size=p["batch"])
        # to_numpy: blocks add straight into the result; compute: chunks, then concatenated
        return arr, (dp.to_numpy(arr) if p.get("mode", "to_numpy") == "to_numpy"
                     else arr.compute())

    # warm-up on a small volume: one-time imports and initialisation are not timed (dask's
    # first compute imports distributed when it is installed: ~0.3 s)
    infer(np.zeros((p["size"] + p["stride"],) * 3, dtype=np.float32))
    vol = np.random.default_rng(p["seed"]).random((p["n"],) * 3, dtype=np.float32)

    baseline = rss_now()
    base_max = maxrss()
    sampler = Sampler()
    sampler.start()
    c0 = cpu_s()
    t0 = time.perf_counter()
    tracker = held_tracker(None)
    with tracker:
        arr, out = infer(vol)
    wall = time.perf_counter() - t0
    cpu = cpu_s() - c0
    peak = maxrss()
    sampled = sampler.stop()
    err = np.abs(out - vol)
    k = p["size"] // 2
    interior = err[k:-k, k:-k, k:-k]
    return {
        "peer": "daskpatch", "mode": p.get("mode", "to_numpy"), "versions": {"daskpatch": dp.__version__, "dask": dask.__version__},
        "n": p["n"], "wall_s": wall, "peak_rss": peak, "baseline_rss": baseline,
        "baseline_maxrss": base_max, "sampled_peak": sampled, "max_err": float(err.max()),
        "max_err_interior": float(interior.max()) if interior.size else float("nan"),
        "out_dtype": str(out.dtype), "out_shape": list(out.shape), "timeline": sampler.timeline,
        "cpu_s": cpu, "block": [c[0] for c in arr.chunks], "numblocks": list(arr.numblocks),
        "max_held": tracker.max_held, "held_at_peak": tracker.best,
    }


WORKERS = {"make-zarr": worker_make_zarr, "zarr": worker_zarr, "mem-ours": worker_mem_ours}


def run_sub(argv: list[str], timeout: float, env: dict | None = None) -> dict:
    """Run a subprocess that prints ``RESULT <json>``; return the dict (or an error dict)."""
    e = dict(os.environ)
    e.update(env or {})
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=e)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    for line in r.stdout.splitlines()[::-1]:
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (r.stderr or r.stdout).strip().splitlines()[-5:]
    return {"error": f"exit {r.returncode}: " + " | ".join(tail)}


def run_worker(kind: str, params: dict, timeout: float, threads: int) -> dict:
    env = {"OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}
    return run_sub([sys.executable, str(Path(__file__).resolve()), "--worker", kind,
                    "--params", json.dumps(params)], timeout, env)


# -- printing ------------------------------------------------------------------------------------
def table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e-2 and v != 0 else f"{v:,.2f}"
        return str(v)

    cells = [[fmt(v) for v in r] for r in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in cells]
    return "\n".join(lines)


def mib(b) -> float:
    return b / MiB


def section_memory(args, report: dict) -> None:
    import zarr

    conc = args.zarr_concurrency or zarr.config.get("async.concurrency")
    print(f"\n## Zarr -> Zarr (size {args.size}, stride {args.stride}, gaussian, identity, "
          f"batch {args.batch}, threaded scheduler, zarr async.concurrency {conc}, codec "
          f"{args.compressor})\n", flush=True)
    base = Path(args.tmpdir)
    base.mkdir(parents=True, exist_ok=True)
    rows, results = [], []
    for chunk in args.chunks:
        for n in args.sizes:
            if chunk > n:
                continue
            tmp = Path(tempfile.mkdtemp(prefix=f"bench_engine_{n}_{chunk}_", dir=base))
            try:
                p = {"n": n, "chunk": chunk, "path": str(tmp / "in.zarr"),
                     "out_path": str(tmp / "out.zarr"), "seed": 0, "size": args.size,
                     "stride": args.stride, "batch": args.batch,
                     "compressor": args.compressor, "workers": args.workers,
                     "block_shape": args.block_shape, "zarr_concurrency": args.zarr_concurrency}
                made = run_worker("make-zarr", p, args.timeout, args.threads)
                if "error" in made:
                    print(f"  n={n} chunk={chunk}: input creation failed: {made['error']}")
                    continue
                print(f"  input {n}^3 chunks {chunk}^3 written in {made['write_s']:.1f} s "
                      f"(writer process peak RSS {mib(made['peak_rss']):.0f} MiB)", flush=True)
                for writer, spill in itertools.product(args.writers, args.spill):
                    r = run_worker("zarr", {**p, "writer": writer, "spill": spill}, args.timeout,
                                   args.threads)
                    shutil.rmtree(tmp / "spill", ignore_errors=True)
                    if "error" in r:
                        print(f"  n={n} chunk={chunk} writer={writer} spill={spill}: FAILED: "
                              f"{r['error']}", flush=True)
                        results.append({"n": n, "chunk": chunk, "writer": writer, **r})
                        continue
                    r["input_write_s"] = made["write_s"]
                    r["input_writer_peak_rss"] = made["peak_rss"]
                    results.append(r)
                    held = r["held_at_peak"].get("held_bytes", {})
                    mx = r["max_held"].get("held_bytes", {})
                    vol_bytes = n**3 * 4
                    rows.append([
                        f"{n}^3 ({vol_bytes / GiB:.3g} GiB)", f"{chunk}^3",
                        "x".join(map(str, r["block"])), math.prod(r["numblocks"]),
                        r["writer"].split(" (")[0],
                        f"{spill}: " + ("no" if not r["spilled"] else
                                        f"yes ({mib(r['spill_bytes_left'] or 0):.0f} MiB left)"),
                        r["wall_s"], r["cpu_s"],
                        vol_bytes / MiB / r["wall_s"],
                        mib(r["peak_rss"]), mib(r["peak_rss"] - r["baseline_rss"]),
                        mib(sum(held.values())),
                        " ".join(f"{k}:{mib(v):.0f}" for k, v in sorted(held.items()) if v),
                        mib(sum(mx.values())), r["max_err"],
                    ])
                    print(f"  done n={n} chunk={chunk} spill={spill}: wall {r['wall_s']:.1f} s, "
                          f"peak RSS {mib(r['peak_rss']):.0f} MiB (writer: {r['writer']})",
                          flush=True)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(table(["volume", "in chunks", "block", "blocks", "writer", "spill", "wall s", "CPU s",
                 "MiB/s",
                 "peak RSS MiB", "peak - baseline MiB", "held at RSS peak MiB",
                 "held at RSS peak by kind MiB", "max held MiB", "max err (samples)"], rows))
    print("\nheld at peak = results the scheduler kept in memory (acc buffers, halo pieces, output"
          " chunks) when RSS was highest; the rest of the peak is inside running tasks and the"
          " allocator.")
    report["memory"] = results


def section_peers(args, report: dict) -> None:
    n, size, stride, batch = args.mem_n, args.mem_size, args.mem_stride, args.batch
    print(f"\n## In memory {n}^3 float32, size {size}, stride {stride}, identity, batch {batch}, "
          f"{args.threads} threads\n", flush=True)
    peers_py = Path(args.peers_python)
    ours = {"daskpatch": "to_numpy", "daskpatch-compute": "compute"}
    contenders = list(ours)
    for peer in ("monai", "torchio"):
        if not peers_py.exists():
            print(f"  {peer}: SKIPPED (no interpreter at {peers_py})")
            continue
        chk = subprocess.run([str(peers_py), "-c", f"import torch, {peer}"], capture_output=True,
                             text=True)
        if chk.returncode != 0:
            msg = chk.stderr.strip().splitlines()[-1:] or ["?"]
            print(f"  {peer}: SKIPPED (import failed in {peers_py}: {msg[0]})")
            continue
        contenders.append(peer)
    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    runs: dict[str, list] = {c: [] for c in contenders}
    for rnd in range(args.rounds):
        order = contenders[rnd % len(contenders):] + contenders[:rnd % len(contenders)]
        for c in order:
            if c in ours:
                r = run_worker("mem-ours", {"n": n, "size": size, "stride": stride,
                                            "batch": batch, "threads": args.threads, "seed": 0,
                                            "mode": ours[c]},
                               args.timeout, args.threads)
            else:
                r = run_sub([str(peers_py), str(HERE / "_peers_engine.py"), c, "--n", str(n),
                             "--size", str(size), "--stride", str(stride), "--batch", str(batch),
                             "--threads", str(args.threads)], args.timeout, env)
            r["round"] = rnd
            runs[c].append(r)
            if "error" in r:
                print(f"  round {rnd} {c}: FAILED: {r['error']}", flush=True)
            else:
                print(f"  round {rnd} {c}: {r['wall_s']:.2f} s, peak {mib(r['peak_rss']):.0f} MiB"
                      f" (delta {mib(r['peak_rss'] - r['baseline_rss']):.0f} MiB)", flush=True)
    rows = []
    med = {}
    for c in contenders:
        ok = [r for r in runs[c] if "error" not in r]
        if not ok:
            continue
        m = {
            "wall_s": statistics.median(r["wall_s"] for r in ok),
            "peak": statistics.median(r["peak_rss"] for r in ok),
            "base": statistics.median(r["baseline_rss"] for r in ok),
            "delta": statistics.median(r["peak_rss"] - r["baseline_rss"] for r in ok),
            "err": max(r["max_err"] for r in ok),
            "err_int": max(r["max_err_interior"] for r in ok),
            "cpu_s": statistics.median(r.get("cpu_s", float("nan")) for r in ok),
        }
        med[c] = m
        label = {"daskpatch": "daskpatch to_numpy(apply_patches(...)) (gaussian)",
                 "daskpatch-compute": "daskpatch apply_patches(...).compute() (gaussian)",
                 "monai": "MONAI sliding_window_inference (gaussian)",
                 "torchio": "TorchIO GridSampler+GridAggregator (hann)"}[c]
        rows.append([label, len(ok), m["wall_s"], min(r["wall_s"] for r in ok), m["cpu_s"],
                     mib(m["peak"]), mib(m["base"]), mib(m["delta"]), m["err"], m["err_int"]])
    print()
    print(table(["contender", "runs", "median wall s", "min wall s", "median CPU s",
                 "peak RSS MiB",
                 "baseline MiB", "peak - baseline MiB", "max abs err", "max abs err interior"],
                rows))
    ok = [r for r in runs.get("daskpatch-compute", []) if "error" not in r and "max_held" in r]
    if ok:
        mh = statistics.median(r["max_held"].get("bytes", 0) for r in ok)
        print(f"\ndaskpatch: blocks {ok[0]['block']} x {ok[0]['numblocks']}; at most "
              f"{mib(mh):.0f} MiB of block buffers, halos and output chunks held by the scheduler "
              f"at once (median over runs); the result ({mib(n**3 * 4):.0f} MiB) is then "
              "concatenated from the output chunks by compute().")
    ratios = {}
    rrows = []
    for o, c in itertools.product(ours, ("monai", "torchio")):
        if o in med and c in med:
            per_round = []
            for r_ours, r_peer in zip(runs[o], runs[c]):
                if "error" in r_ours or "error" in r_peer:
                    continue
                per_round.append((r_ours["wall_s"] / r_peer["wall_s"],
                                  r_ours["peak_rss"] / r_peer["peak_rss"],
                                  (r_ours["peak_rss"] - r_ours["baseline_rss"])
                                  / max(1, r_peer["peak_rss"] - r_peer["baseline_rss"])))
            if not per_round:
                continue
            rt, rp, rd = (statistics.median(x[i] for x in per_round) for i in range(3))
            ratios[f"{o}/{c}"] = {"time": rt, "peak_raw": rp, "peak_delta": rd}
            rrows.append([f"{o} ({ours[o]}) / {c}", rt, rp, rd])
    print()
    print(table(["ratio (median of per-round ratios)", "wall time", "peak RSS raw",
                 "peak RSS delta"], rrows))
    for o in ours:
        r = ratios.get(f"{o}/monai")
        if r:
            print(f"\n{o} ({ours[o]}): target time <= 1/3 of MONAI: "
                  f"{'MET' if r['time'] <= 1 / 3 else 'NOT MET'} ({r['time']:.2f}); target peak "
                  f"RSS <= 1/2 of MONAI: above baseline "
                  f"{'MET' if r['peak_delta'] <= 0.5 else 'NOT MET'} ({r['peak_delta']:.2f}), raw "
                  f"{'MET' if r['peak_raw'] <= 0.5 else 'NOT MET'} ({r['peak_raw']:.2f})")
    report["peers"] = {"runs": runs, "medians": med, "ratios": ratios}


def section_graph(args, report: dict) -> None:
    import dask
    import dask.array as da
    import numpy as np
    import zarr
    from dask.core import flatten

    import daskpatch as dp

    dask.config.set(scheduler="threads", num_workers=args.threads)
    g = {}
    n, size, stride, batch = args.graph_n, args.graph_size, args.graph_stride, args.batch
    print(f"\n## Graph: exactly-once ({n}^3, size {size}, stride {stride}, batch {batch})\n")
    # every voxel holds its flat index: a patch's first voxel names its start
    vol = np.arange(n**3, dtype=np.int64).reshape((n,) * 3)
    if n**3 < 2**24:
        vol = vol.astype(np.int32)
    grid = dp.PatchGrid(vol.shape, size, stride)
    expected = collections.Counter(
        tuple(int(s) for s in st) for st in np.stack(np.meshgrid(*grid.starts, indexing="ij"),
                                                     -1).reshape(-1, 3))
    tmp = Path(tempfile.mkdtemp(prefix="bench_engine_graph_", dir=args.tmpdir))
    zin = zarr.create_array(store=str(tmp / "in.zarr"), shape=vol.shape, chunks=(2 * stride,) * 3,
                            dtype=vol.dtype)
    zin[...] = vol
    inputs = {
        "numpy": vol,
        "zarr.Array": zin,
        "dask from_zarr": da.from_zarr(zin),
        "dask (generic, unaligned chunks)": da.from_array(vol, chunks=(stride * 3 // 2 + 1,) * 3)
        + 0,
    }
    rows = []
    once = {}
    for (label, src), bs in itertools.product(inputs.items(), (None, args.graph_block)):
        calls: list = []
        lock = threading.Lock()

        def fn(b, calls=calls, lock=lock):
            firsts = b[:, 0, 0, 0].astype(np.int64)
            with lock:
                calls.append(firsts.tolist())
            return b.astype(np.float32)

        out = dp.apply_patches(src, fn, size, stride, batch_size=batch, blend="gaussian",
                               block_shape=bs)
        t0 = time.perf_counter()
        res = out.compute()
        t = time.perf_counter() - t0
        seen = collections.Counter()
        for c in calls:
            for f in c:
                seen[tuple(int(v) for v in np.unravel_index(f, vol.shape))] += 1
        patches = sum(seen.values())
        exactly_once = seen == expected
        max_b = max(len(c) for c in calls)
        # fewest calls possible when each block batches its own patches
        counts = [np.bincount(np.asarray(s) // c[0]) for s, c in zip(grid.starts, out.chunks)]
        per_block = math.prod(len(c) for c in counts)
        min_calls = int(sum(math.ceil(int(np.prod(v)) / batch)
                            for v in itertools.product(*counts) if np.prod(v) > 0))
        err = float(np.abs(res.astype(np.float64) - vol).max() / max(1, n**3))
        label = f"{label}, block {'auto' if bs is None else bs} ({per_block} blocks)"
        rows.append([label, len(expected), patches, patches / len(expected),
                     "yes" if exactly_once else "NO", len(calls), min_calls,
                     math.ceil(len(expected) / batch), max_b, f"{err:.2g}", t])
        once[label] = {"patches": len(expected), "seen": patches, "exactly_once": exactly_once,
                       "calls": len(calls), "min_calls_blocks": min_calls,
                       "blocks": per_block, "max_batch": max_b, "rel_err": err, "compute_s": t}
    print(table(["input", "grid patches", "patches seen by fn", "seen / patches",
                 "each exactly once", "fn calls", "sum over blocks ceil(own/batch)",
                 "ceil(patches/batch)", "max batch",
                 "max rel err (identity)", "compute s"], rows))
    g["exactly_once"] = once

    # tasks per output chunk
    print("\n## Graph: tasks per output chunk\n")
    gb = args.graph_block
    cases = [
        (f"{n}^3 numpy, size {size}, stride {stride}", vol.astype(np.float32), size, stride,
         None),
        (f"{n}^3 numpy, size {size}, stride {stride}, block {gb}", vol.astype(np.float32), size,
         stride, gb),
        (f"{n}^3 zarr chunks {2 * stride}, size {size}, stride {stride}, block {gb}", zin, size,
         stride, gb),
        (f"{n}^3 dask (generic), size {size}, stride {stride}, block {gb}", inputs[
            "dask (generic, unaligned chunks)"], size, stride, gb),
    ]
    zbig = zarr.create_array(store=str(tmp / "big.zarr"), shape=(args.tasks_n,) * 3,
                             chunks=(args.tasks_chunk,) * 3, dtype="float32")
    cases.append((f"{args.tasks_n}^3 zarr chunks {args.tasks_chunk} (virtual), size "
                  f"{args.size}, stride {args.stride}", zbig, args.size, args.stride,
                  args.block_shape))
    cases.append((f"{args.tasks_n}^3 zarr chunks {args.tasks_chunk} (virtual), size "
                  f"{args.size}, stride {args.stride}, spill", zbig, args.size, args.stride,
                  args.block_shape, str(tmp / "spill")))
    rows = []
    tpc = {}
    for label, src, sz, st, bs, *spill in cases:
        kw = {"spill": spill[0]} if spill else {}
        out = dp.apply_patches(src, lambda b: b, sz, st, batch_size=batch, block_shape=bs, **kw)
        t0 = time.perf_counter()
        (opt,) = dask.optimize(out)
        graph = dict(opt.__dask_graph__())
        t_mat = time.perf_counter() - t0
        kinds = collections.Counter(_kind(k, out.name) for k in graph)
        # the optimiser may rename the output layer: count keys named like the result's
        nchunks = math.prod(out.numblocks)
        ours = kinds["acc"] + kinds["halo"] + kinds["out"]
        if kinds["out"] == 0:  # renamed by optimisation; count by the optimised name
            kinds = collections.Counter(_kind(k, opt.name) for k in graph)
            ours = kinds["acc"] + kinds["halo"] + kinds["out"]
        rows.append([label, "x".join(map(str, (c[0] for c in out.chunks))), nchunks, len(graph),
                     kinds["acc"], kinds["halo"], kinds["out"], kinds["other"], ours / nchunks,
                     t_mat])
        tpc[label] = {"chunks": nchunks, "tasks": len(graph), **dict(kinds),
                      "per_chunk": ours / nchunks, "materialise_s": t_mat}
    print(table(["case", "block", "output chunks", "tasks (optimised)", "acc", "halo", "out",
                 "input/other", "engine tasks / chunk", "optimise s"], rows))
    g["tasks_per_chunk"] = tpc
    shutil.rmtree(tmp, ignore_errors=True)

    # build time on a virtual volume
    V = args.build_n
    print(f"\n## Graph: build time of apply_patches on a {V}^3 virtual volume "
          f"(da.zeros chunks {args.build_chunk}, size {args.size}, stride {args.stride})\n")
    rows = []
    builds = []
    for i in range(args.build_repeats):
        t0 = time.perf_counter()
        z = da.zeros((V,) * 3, dtype="float32", chunks=args.build_chunk)
        t1 = time.perf_counter()
        out = dp.apply_patches(z, lambda b: b, args.size, args.stride, batch_size=batch)
        t2 = time.perf_counter()
        builds.append(t2 - t1)
        if i == 0:
            npatch = len(dp.PatchGrid((V,) * 3, args.size, args.stride))
            layer_len = len(out.__dask_graph__().layers[out.name])
            first = t2 - t1
            zeros_s = t1 - t0
    # graph work a user will meet: one chunk's compute, and optimising the whole graph
    t0 = time.perf_counter()
    one = out.blocks[(0,) * 3]
    (o1,) = dask.optimize(one)
    n_one = len(dict(o1.__dask_graph__()))
    t_one = time.perf_counter() - t0
    t0 = time.perf_counter()
    keys = set(flatten(out.__dask_keys__()))
    culled = out.__dask_graph__().cull(keys)
    n_all = len(culled)
    t_cull = time.perf_counter() - t0
    rows.append([f"{V}^3 ({V**3 * 4 / 2**40:.1f} TiB)", npatch,
                 "x".join(map(str, (c[0] for c in out.chunks))), math.prod(out.numblocks),
                 layer_len, first, statistics.median(builds), zeros_s, t_one, n_one, t_cull,
                 n_all])
    print(table(["volume", "patches", "block", "output chunks", "engine tasks (layer len)",
                 "build s (first)", f"build s (median of {len(builds)})", "da.zeros s",
                 "cull+optimise 1 chunk s", "tasks for 1 chunk", "cull whole graph s",
                 "tasks (whole, culled)"], rows))
    ok = first < 2
    print(f"\ntarget build < 2 s: {'MET' if ok else 'NOT MET'} (first {first:.3f} s, median "
          f"{statistics.median(builds):.3f} s)")
    g["build"] = {"n": V, "patches": npatch, "first_s": first, "median_s": statistics.median(
        builds), "builds": builds, "layer_len": layer_len, "one_chunk_s": t_one,
        "one_chunk_tasks": n_one, "cull_s": t_cull, "culled_tasks": n_all}

    # what the scheduler holds as the volume grows (a model: no data, graphs only)
    print(f"\n## Scheduler-held memory as the volume grows (model, size {args.size}, stride "
          f"{args.stride}, chunks {args.model_chunk}^3)\n")
    print("dask.order columns: results held at once when the Zarr -> Zarr graph runs on one "
          "thread in dask.order's priority order; raster columns: the same engine with blocks run "
          "one at a time in C order (a lower bound for its halo design), and with one result per "
          "halo piece.\n")
    try:
        from daskpatch.io import to_zarr as dp_to_zarr_  # type: ignore[import-not-found]
    except Exception:
        dp_to_zarr_ = None
    rows, model = [], {}
    tmpm = Path(tempfile.mkdtemp(prefix="bench_engine_model_", dir=args.tmpdir))
    try:
        for mn in args.model_sizes:
            zm = zarr.create_array(store=str(tmpm / f"in{mn}.zarr"), shape=(mn,) * 3,
                                   chunks=(args.model_chunk,) * 3, dtype="float32")
            om = dp.apply_patches(zm, lambda b: b, args.size, args.stride, batch_size=batch,
                                  block_shape=args.block_shape)
            blk = om.chunks[0][0]
            cb = blk**3 * 4
            dst = zarr.create_array(store=str(tmpm / f"out{mn}.zarr"), shape=om.shape,
                                    chunks=(blk,) * 3, dtype="float32")
            st_peak, st_kinds = held_by_order(da.store(om, dst, lock=False, compute=False),
                                              om.name, cb)
            try:
                if dp_to_zarr_ is None:
                    raise ImportError("daskpatch.io.to_zarr is missing")
                job = dp_to_zarr_(om, str(tmpm / f"io{mn}.zarr"), overwrite=True, compute=False)
                io_peak, io_kinds = held_by_order(job, om.name, cb)
            except Exception:
                io_peak, io_kinds = float("nan"), {}
            om_s = dp.apply_patches(zm, lambda b: b, args.size, args.stride, batch_size=batch,
                                    block_shape=args.block_shape, spill=str(tmpm / "spill"))
            dst_s = zarr.create_array(store=str(tmpm / f"outs{mn}.zarr"), shape=om.shape,
                                      chunks=(blk,) * 3, dtype="float32")
            sp_peak, _ = held_by_order(da.store(om_s, dst_s, lock=False, compute=False),
                                       om_s.name, cb)
            r_dict = held_raster(mn, blk, args.size, args.stride, per_piece=False)
            r_piece = held_raster(mn, blk, args.size, args.stride, per_piece=True)
            front = mn * mn * (args.size - args.stride) * 4
            rows.append([f"{mn}^3 ({mn**3 * 4 / GiB:.3g} GiB)", blk, math.prod(om.numblocks),
                         mib(st_peak),
                         " ".join(f"{k}:{mib(v):.0f}" for k, v in sorted(st_kinds.items())),
                         mib(io_peak), mib(sp_peak), mib(r_dict), mib(r_piece), mib(front)])
            model[mn] = {"block": blk, "store_order": st_peak, "store_kinds": st_kinds,
                         "io_order": io_peak, "io_kinds": io_kinds, "store_spill": sp_peak,
                         "raster_dict": r_dict,
                         "raster_piece": r_piece, "front_bytes": front}
    finally:
        shutil.rmtree(tmpm, ignore_errors=True)
    print(table(["volume", "block", "blocks", "dask.order, da.store MiB", "by kind MiB",
                 "dask.order, daskpatch.io.to_zarr MiB", "dask.order, da.store, spill MiB",
                 "raster, halo dict MiB",
                 "raster, halo per piece MiB", "n^2 (size-stride) 4 B MiB"], rows))
    g["held_model"] = model
    report["graph"] = g


# -- main ----------------------------------------------------------------------------------------
def code_state() -> str:
    """The commit of the daskpatch checkout, and a hash of uncommitted changes to the package."""
    import hashlib

    root = HERE.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        diff = subprocess.run(["git", "-C", str(root), "diff", "HEAD", "--", "daskpatch"],
                              capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    if not head:
        return "unknown (not a git checkout)"
    if diff:
        return f"{head} + uncommitted changes to daskpatch/ (diff sha1 " \
               f"{hashlib.sha1(diff.encode()).hexdigest()[:10]})"
    return head


def ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 1)[1])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (CI smoke run)")
    ap.add_argument("--sections", default="memory,peers,graph")
    ap.add_argument("--sizes", type=ints, help="cube sides of the Zarr case (default 256,512,1024)")
    ap.add_argument("--chunks", type=ints, help="input Zarr chunk sides (default 256)")
    ap.add_argument("--size", type=int, help="patch size (default 128)")
    ap.add_argument("--stride", type=int, help="patch stride (default 64)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--block-shape", type=int, default=None,
                    help="block_shape of the Zarr case (default: the engine's choice)")
    ap.add_argument("--compressor", choices=["default", "none"], default="default",
                    help="Zarr codec of input and output (default: zarr's, zstd)")
    ap.add_argument("--workers", type=int, default=None,
                    help="dask threads in the Zarr case (default: dask's, = CPU count)")
    ap.add_argument("--writers", default="io,store",
                    help="Zarr writers to compare: io = daskpatch.io.to_zarr (falls back to store"
                         " if missing or failing), store = dask.array.store into zarr.create_array"
                         " (default: io,store)")
    ap.add_argument("--spill", default="auto,off",
                    help="halo spilling of the Zarr case: auto (spill=None, the default: to_zarr "
                         "spills into the output store above SPILL_BYTES of halos), off "
                         "(spill=False: in memory), on (spill= a directory beside the output); "
                         "default auto,off")
    ap.add_argument("--zarr-concurrency", type=int, default=None,
                    help="zarr's async.concurrency in the Zarr case (default: zarr's, 10): how "
                         "many chunks one read decodes at once")
    ap.add_argument("--mem-n", type=int, help="in-memory cube side (default 384)")
    ap.add_argument("--rounds", type=int, help="alternating rounds of the peers case (default 3)")
    ap.add_argument("--threads", type=int, default=2, help="torch and dask threads (default 2)")
    ap.add_argument("--peers-python", default="/work/peers/bin/python")
    ap.add_argument("--tmpdir", default="/work/bench_tmp")
    ap.add_argument("--timeout", type=float, default=1800, help="per subprocess, s")
    ap.add_argument("--json", help="also write all raw results to this JSON file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--params", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        res = WORKERS[args.worker](json.loads(args.params))
        print("RESULT " + json.dumps(res))
        return

    q = args.quick
    args.writers = [w.strip() for w in args.writers.split(",") if w.strip()]
    args.spill = [v.strip() for v in args.spill.split(",") if v.strip()]
    if not set(args.spill) <= {"auto", "off", "on"}:
        ap.error(f"--spill takes auto, off and on; got {args.spill}")
    args.sizes = args.sizes or ([64, 128] if q else [256, 512, 1024])
    if q and args.block_shape is None:
        args.block_shape = 32  # several blocks even at tiny sizes, so halos are exercised
    args.chunks = args.chunks or ([32] if q else [256])
    args.size = args.size or (32 if q else 128)
    args.stride = args.stride or (16 if q else 64)
    args.mem_n = args.mem_n or (96 if q else 384)
    args.mem_size, args.mem_stride = args.size, args.stride
    args.rounds = args.rounds or (1 if q else 3)
    args.graph_n, args.graph_size, args.graph_stride = (48, 16, 8) if q else (256, 64, 32)
    args.graph_block = 24 if q else 96  # 3 strides, not dividing the side: uneven last blocks
    args.tasks_n, args.tasks_chunk = (256, 32) if q else (1024, 256)
    args.build_n, args.build_chunk = (1024, 64) if q else (8192, 256)
    args.build_repeats = 3
    args.model_sizes = [64, 128, 256] if q else [512, 1024, 2048, 4096]
    args.model_chunk = 32 if q else 256

    import dask
    import numpy as np
    import zarr

    import daskpatch as dp

    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    now = datetime.datetime.now().isoformat(timespec="seconds")
    print(f"# daskpatch engine benchmark — {now}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GiB:.1f} GiB RAM; "
          f"python {platform.python_version()}, daskpatch {dp.__version__}, dask "
          f"{dask.__version__}, zarr {zarr.__version__}, numpy {np.__version__}")
    state = code_state()
    print(f"daskpatch code: {state}")
    report = {"argv": sys.argv, "date": datetime.datetime.now().isoformat(), "code": state}
    Path(args.tmpdir).mkdir(parents=True, exist_ok=True)
    for s in sections:
        {"memory": section_memory, "peers": section_peers, "graph": section_graph}[s](args, report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
