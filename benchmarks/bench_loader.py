"""Benchmark the training loaders (daskpatch.data).

1. Throughput: patches/s read from a Zarr store (image float32 + label uint8, chunks 64^3,
   patches 128^3) through ``torch.utils.data.DataLoader(num_workers=2)``, against reading the
   same regions with plain zarr slicing in one process. Grid patches (PatchDataset) and
   label-balanced random patches (RandomPatchDataset, pos_fraction=0.5).
2. Memory of the label index on a 512^3 label volume: ours (per-chunk counts) against TorchIO's
   LabelSampler (a float64 probability map and CDF over every voxel) and MONAI's
   RandCropByPosNegLabel (int64 indices of every foreground and background voxel), each run in
   a fresh subprocess; TorchIO/MONAI run in the peer venv (``--peer-python``) and are skipped
   with a message when it is missing. Ours also on a 1024^3 label volume.

Memory figures per library: the bytes of the index arrays it keeps while sampling, the peak of
traced allocations (tracemalloc; NumPy allocations are traced, torch's are not), and the rise of
the peak RSS (VmHWM, reset through /proc/self/clear_refs) over the RSS before the index is built.

Run: ``python benchmarks/bench_loader.py`` (about 3-5 minutes; ``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import zarr

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

CHUNK = 64
PATCH = 128

# Code run in a fresh interpreter, so that its memory figures are its own. It prints one JSON line.
_MEMORY_PRELUDE = textwrap.dedent("""
    import json, os, sys, time, tracemalloc

    def rss_kb(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise KeyError(field)

    def reset_peak():
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            return True
        except OSError:
            return False
""")

_OURS = _MEMORY_PRELUDE + textwrap.dedent("""
    sys.path.insert(0, {root!r})
    import numpy as np
    from daskpatch.data import RandomPatchDataset
    label = {label!r}
    def build_index():
        return RandomPatchDataset(label, {patch}, samples_per_epoch=1000, labels=label,
                                  pos_fraction=0.5, cache_index="off")
    t0 = time.perf_counter()
    del_me = build_index()                      # timed without tracemalloc (it slows Dask)
    build = time.perf_counter() - t0
    del del_me
    base = rss_kb("VmRSS"); peak_reset = reset_peak()
    tracemalloc.start()
    ds = build_index()
    traced_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    t0 = time.perf_counter()
    centers = [ds[i]["center"] for i in range(8)]
    draw = (time.perf_counter() - t0) / 8
    print(json.dumps(dict(index_bytes=ds.index_nbytes, cells=ds.index_cells, build_s=build,
                          traced_peak=traced_peak,
                          rss_rise=(rss_kb("VmHWM") - base) * 1024 if peak_reset else None,
                          sample_s=draw)))
""")

_TORCHIO = _MEMORY_PRELUDE + textwrap.dedent("""
    import numpy as np, torch, torchio as tio, zarr
    label = np.asarray(zarr.open_array({label!r}, mode="r")[...])
    subject = tio.Subject(label=tio.LabelMap(tensor=torch.from_numpy(label[None])))
    sampler = tio.LabelSampler({patch}, label_name="label", label_probabilities={{0: 1, 1: 1}})
    t0 = time.perf_counter()
    patches = list(sampler(subject, num_patches=8))     # builds the map and CDF, draws 8 patches
    build = time.perf_counter() - t0
    del patches
    base = rss_kb("VmRSS"); peak_reset = reset_peak()
    tracemalloc.start()
    patches = list(sampler(subject, num_patches=8))
    traced_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    rss_rise = (rss_kb("VmHWM") - base) * 1024 if peak_reset else None
    del patches
    # what the patch generator holds while it samples: the probability map and its CDF
    pmap = sampler.process_probability_map(sampler.get_probability_map(subject), subject)
    cdf = sampler.get_cumulative_distribution_function(pmap)
    print(json.dumps(dict(index_bytes=int(pmap.nbytes + cdf.nbytes), build_s=build,
                          traced_peak=traced_peak, rss_rise=rss_rise,
                          version=tio.__version__)))
""")

_MONAI = _MEMORY_PRELUDE + textwrap.dedent("""
    import numpy as np, zarr, monai
    from monai.transforms import RandCropByPosNegLabel
    from monai.transforms.utils import map_binary_to_indices
    label = np.asarray(zarr.open_array({label!r}, mode="r")[...])[None]
    crop = RandCropByPosNegLabel(spatial_size={patch}, pos=1, neg=1, num_samples=8)
    crop.set_random_state(0)
    t0 = time.perf_counter()
    patches = crop(label, label=label)                   # computes fg/bg indices, crops 8
    build = time.perf_counter() - t0
    del patches
    base = rss_kb("VmRSS"); peak_reset = reset_peak()
    tracemalloc.start()
    patches = crop(label, label=label)
    traced_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    rss_rise = (rss_kb("VmHWM") - base) * 1024 if peak_reset else None
    del patches
    fg, bg = map_binary_to_indices(label)                # the index MONAI caches (FgBgToIndicesd)
    print(json.dumps(dict(index_bytes=int(fg.nbytes + bg.nbytes), build_s=build,
                          traced_peak=traced_peak, rss_rise=rss_rise,
                          version=monai.__version__)))
""")


# ----------------------------------------------------------------------------------------------
# Synthetic data, written slab by slab (never a full volume in memory)
# ----------------------------------------------------------------------------------------------
def _balls(edge: int, seed: int) -> list[tuple[np.ndarray, float]]:
    rng = np.random.default_rng(seed)
    n = max(4, edge // 16)
    return [(rng.uniform(0, edge, 3), float(rng.uniform(edge / 40, edge / 16))) for _ in range(n)]


def _label_slab(edge: int, z0: int, z1: int, balls) -> np.ndarray:
    z, y, x = np.ogrid[z0:z1, 0:edge, 0:edge]
    out = np.zeros((z1 - z0, edge, edge), np.uint8)
    for c, r in balls:
        if c[0] + r < z0 or c[0] - r >= z1:
            continue
        out |= ((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= r * r).astype(np.uint8)
    return out


def make_label(path: Path, edge: int, seed: int = 0) -> float:
    """Write an ``edge^3`` uint8 label (foreground balls); return the foreground fraction."""
    z = zarr.create_array(str(path), shape=(edge,) * 3, chunks=(CHUNK,) * 3, dtype="u1",
                          overwrite=True)
    balls = _balls(edge, seed)
    fg = 0
    for z0 in range(0, edge, CHUNK):
        slab = _label_slab(edge, z0, min(edge, z0 + CHUNK), balls)
        fg += int(slab.sum())
        z[z0:z0 + slab.shape[0]] = slab
    return fg / edge**3


def make_image(path: Path, label_path: Path, edge: int, seed: int = 1) -> None:
    """Write an ``edge^3`` float32 image: label-dependent intensity plus quantised noise."""
    z = zarr.create_array(str(path), shape=(edge,) * 3, chunks=(CHUNK,) * 3, dtype="f4",
                          overwrite=True)
    label = zarr.open_array(str(label_path), mode="r")
    rng = np.random.default_rng(seed)
    for z0 in range(0, edge, CHUNK):
        lab = label[z0:z0 + CHUNK]
        noise = np.round(rng.standard_normal(lab.shape, dtype=np.float32) * 8)
        z[z0:z0 + lab.shape[0]] = 100 * lab.astype(np.float32) + noise


# ----------------------------------------------------------------------------------------------
# 1. Throughput
# ----------------------------------------------------------------------------------------------
def _loader_pass(ds, workers: int) -> float:
    import torch

    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=workers)
    t0 = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - t0


def _dataset_pass(ds) -> tuple[float, list[tuple[int, ...]]]:
    t0 = time.perf_counter()
    locs = [tuple(int(v) for v in ds[i]["location"]) for i in range(len(ds))]
    return time.perf_counter() - t0, locs


def _plain_pass(image_path: Path, label_path: Path, locs) -> float:
    t0 = time.perf_counter()
    image = zarr.open_array(str(image_path), mode="r")
    label = zarr.open_array(str(label_path), mode="r")
    for loc in locs:
        sl = tuple(slice(a, a + PATCH) for a in loc)
        image[sl]
        label[sl]
    return time.perf_counter() - t0


class _InMemory:
    """Patches of the same shapes already in RAM: what the DataLoader itself costs."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.image = np.ones((1,) + (PATCH,) * 3, np.float32)
        self.label = np.ones((1,) + (PATCH,) * 3, np.uint8)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"image": self.image.copy(), "label": self.label.copy(),
                "location": np.zeros(3, np.int64), "volume": np.asarray(0)}


READERS = ("ours, DataLoader 2 workers", "ours, DataLoader 0 workers", "ours, ds[i] loop",
           "plain zarr slicing", "(DataLoader alone, in-RAM patches, 0 workers)")


def throughput(image_path: Path, label_path: Path, repeats: int, samples: int) -> list[dict]:
    try:
        import torch  # noqa: F401
    except ImportError:
        print("throughput: skipped, torch is not installed (pip install torch==2.13.0)")
        return []
    from daskpatch.data import PatchDataset, RandomPatchDataset

    rows = []
    cases = {
        "grid (PatchDataset)": PatchDataset(str(image_path), PATCH, labels=str(label_path)),
        "label-balanced (RandomPatchDataset)": RandomPatchDataset(
            str(image_path), PATCH, samples_per_epoch=samples, labels=str(label_path),
            pos_fraction=0.5),
    }
    for name, ds in cases.items():
        n = len(ds)
        times: dict[str, list[float]] = {how: [] for how in READERS}
        ds[0]  # warm up: zarr codecs, handles, page cache
        _plain_pass(image_path, label_path, [(0, 0, 0)])
        for r in range(repeats):
            if hasattr(ds, "set_epoch"):
                ds.set_epoch(r)
            t, locs = _dataset_pass(ds)  # also gives the regions for plain slicing
            times["ours, ds[i] loop"].append(t)
            others = {
                "ours, DataLoader 2 workers": lambda: _loader_pass(ds, 2),
                "ours, DataLoader 0 workers": lambda: _loader_pass(ds, 0),
                "plain zarr slicing": lambda: _plain_pass(image_path, label_path, locs),
                READERS[-1]: lambda: _loader_pass(_InMemory(n), 0),
            }
            order = list(others)
            k = r % len(order)
            for how in order[k:] + order[:k]:  # rotate: no reader always goes first
                times[how].append(others[how]())
        plain = statistics.median(times["plain zarr slicing"])
        for how in READERS:
            med = statistics.median(times[how])
            rows.append(dict(case=name, how=how, patches=n, median_s=med,
                             patches_per_s=n / med, vs_plain=plain / med))
        print(f"  {name}: done", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------
# 2. Index memory
# ----------------------------------------------------------------------------------------------
def _run(python: str, code: str) -> dict | str:
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        return "failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def index_memory(label_paths: dict[int, Path], peer_python: str | None) -> list[dict]:
    rows = []
    root = str(HERE.parent)
    for edge, path in sorted(label_paths.items()):
        res = _run(sys.executable, _OURS.format(root=root, label=str(path), patch=PATCH))
        rows.append(dict(edge=edge, library="daskpatch RandomPatchDataset", res=res))
        print(f"  index memory, ours, {edge}^3: done", flush=True)
    edge = 512 if 512 in label_paths else min(label_paths)
    path = label_paths[edge]
    if peer_python is None or not Path(peer_python).exists():
        print(f"index memory: TorchIO/MONAI skipped, no peer interpreter at {peer_python!r}")
        return rows
    for lib, code, mod in [("TorchIO LabelSampler", _TORCHIO, "torchio"),
                           ("MONAI RandCropByPosNegLabel", _MONAI, "monai")]:
        probe = subprocess.run([peer_python, "-c", f"import {mod}, zarr"], capture_output=True)
        if probe.returncode != 0:
            print(f"index memory: {lib} skipped, `import {mod}, zarr` fails in {peer_python}")
            continue
        rows.append(dict(edge=edge, library=lib,
                         res=_run(peer_python, code.format(label=str(path), patch=PATCH))))
        print(f"  index memory, {lib}, {edge}^3: done", flush=True)
    return sorted(rows, key=lambda r: (r["edge"], not r["library"].startswith("daskpatch")))


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def _mb(n: float | None) -> str:
    if n is None:
        return "n/a"
    if n < 1e6:
        return f"{n / 1e3:.1f} kB"
    return f"{n / 1e6:,.1f} MB"


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    return "\n".join([line, sep, *body])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--edge", type=int, default=512, help="image/label edge (default 512)")
    p.add_argument("--big", type=int, default=1024, help="edge of the big label, ours only "
                   "(default 1024; 0 to skip)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--samples", type=int, default=64, help="random patches per epoch")
    p.add_argument("--peer-python", default="/work/peers/bin/python",
                   help="interpreter with torchio and monai (and zarr)")
    p.add_argument("--workdir", default=None, help="where to write the stores (default: a "
                   "temporary directory, removed at the end)")
    p.add_argument("--parts", default="throughput,memory",
                   help="comma-separated parts to run: throughput, memory (default both)")
    p.add_argument("--quick", action="store_true", help="smoke run: 256^3, no big label")
    args = p.parse_args()
    if args.quick:
        args.edge, args.big, args.repeats, args.samples = 256, 0, 1, 16
    parts = {part.strip() for part in args.parts.split(",")}
    if not parts <= {"throughput", "memory"}:
        p.error(f"--parts takes throughput and/or memory; got {args.parts!r}")
    if "memory" not in parts:
        args.big = 0

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_loader_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        image, label = work / "image.zarr", work / "label.zarr"
        fg = make_label(label, args.edge)
        make_image(image, label, args.edge)
        labels = {args.edge: label}
        if args.big:
            labels[args.big] = work / "label_big.zarr"
            fg_big = make_label(labels[args.big], args.big, seed=2)
        print(f"data: {args.edge}^3 float32 image + uint8 label ({fg:.1%} foreground), chunks "
              f"{CHUNK}^3, patches {PATCH}^3"
              + (f"; {args.big}^3 label ({fg_big:.1%} foreground)" if args.big else "")
              + f"; written in {time.perf_counter() - t0:.0f} s; {os.cpu_count()} CPUs", flush=True)

        rows = throughput(image, label, args.repeats, args.samples) if "throughput" in parts else []
        if rows:
            print(f"\nThroughput (median of {args.repeats}, image+label per patch, batch_size=2, "
                  "worker start-up included; vs plain = plain time / our time)")
            print(table(["case", "reader", "patches", "median s", "patches/s", "vs plain"],
                        [[r["case"], r["how"], str(r["patches"]), f"{r['median_s']:.2f}",
                          f"{r['patches_per_s']:.1f}", f"{r['vs_plain']:.2f}x"] for r in rows]))

        if "memory" not in parts:
            return
        mem = index_memory(labels, args.peer_python)
        ref = {r["edge"]: r["res"] for r in mem
               if r["library"].startswith("TorchIO") and isinstance(r["res"], dict)}
        out = []
        for r in mem:
            res = r["res"]
            if isinstance(res, str):
                out.append([f"{r['edge']}^3", r["library"], res, "", "", "", "", ""])
                continue
            tio = ref.get(r["edge"])
            ratio = (f"{res['index_bytes'] / tio['index_bytes']:.4%}" if tio else "n/a")
            out.append([f"{r['edge']}^3", r["library"], _mb(res["index_bytes"]),
                        ratio, _mb(res["traced_peak"]), _mb(res["rss_rise"]),
                        f"{res['build_s']:.1f}",
                        str(res.get("cells", "")) or res.get("version", "")])
        print("\nLabel index memory (pos/neg 1:1, patch 128^3; each in a fresh process; build s "
              "timed on a first, untraced build)")
        print(table(["volume", "library", "index bytes", "vs TorchIO", "traced peak",
                     "peak RSS rise", "build s", "chunks / version"], out))
        if args.big:
            print(f"\nTorchIO on {args.big}^3: not run (its map + CDF alone are 16 bytes per "
                  f"voxel = {16 * args.big**3 / 1e9:.0f} GB, by its code).")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
