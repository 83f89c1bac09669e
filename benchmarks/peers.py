"""Peer baselines for sliding-window patch/merge on one 3D volume (CPU).

Usage: python peers.py NAME [--n 384] [--p 128] [--s 64]
Prints one line: name, seconds, peak RSS (MiB).
Each peer runs in its own process so peak RSS is its own.

The team's measurement script (``../shared/bench/peers.py``), kept here as it is except that
``seed`` runs daskpatch's compatible ``get_patches``/``reconstruct_patch`` and the Zarr entries
share one input writer.
``peers_table.py`` runs several entries side by side.
"""
import argparse, resource, sys, time, tempfile, os
import numpy as np

ap = argparse.ArgumentParser()
ap.add_argument("name")
ap.add_argument("--n", type=int, default=384)
ap.add_argument("--p", type=int, default=128)
ap.add_argument("--s", type=int, default=64)
ap.add_argument("--store", default=None)
a = ap.parse_args()
n, p, s = a.n, a.p, a.s
rng = np.random.default_rng(0)


def vol():
    return rng.random((n, n, n), dtype=np.float32)


def zarr_input():
    """A temporary directory holding the volume as ``in.zarr`` (chunks ``s``^3), and that array."""
    import zarr
    d = tempfile.mkdtemp(dir=a.store)
    zi = zarr.create_array(d + "/in.zarr", shape=(n, n, n), chunks=(s,) * 3, dtype="f4")
    zi[:] = vol()
    return d, zi


def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


t0 = None
check = None  # (result, expected): compared after timing, slab by slab, so it costs neither time nor memory
if a.name == "memcpy":
    x = vol(); t0 = time.perf_counter(); y = x.copy(); y *= 1.0
elif a.name == "monai_gauss" or a.name == "monai_const":
    import torch
    from monai.inferers import sliding_window_inference
    torch.set_num_threads(os.cpu_count())
    x = torch.from_numpy(vol())[None, None]
    mode = "gaussian" if a.name.endswith("gauss") else "constant"
    t0 = time.perf_counter()
    with torch.no_grad():
        y = sliding_window_inference(x, (p, p, p), 8, lambda t: t, overlap=1 - s / p, mode=mode)
    check = (y[0, 0].numpy(), x[0, 0].numpy())
elif a.name == "torchio_hann" or a.name == "torchio_avg":
    import torch, torchio as tio
    x = vol()
    subj = tio.Subject(img=tio.ScalarImage(tensor=torch.from_numpy(x)[None]))
    t0 = time.perf_counter()
    sampler = tio.inference.GridSampler(subj, p, p - s)
    agg = tio.inference.GridAggregator(sampler, overlap_mode="hann" if "hann" in a.name else "average")
    loader = torch.utils.data.DataLoader(sampler, batch_size=8)
    for batch in loader:
        agg.add_batch(batch["img"][tio.DATA], batch[tio.LOCATION])
    y = agg.get_output_tensor()
    check = (y[0].numpy(), x)
elif a.name == "tiler_hann":
    from tiler import Tiler, Merger
    x = vol()
    t0 = time.perf_counter()
    tl = Tiler(data_shape=x.shape, tile_shape=(p, p, p), overlap=p - s)
    m = Merger(tl, window="hann")
    for tid, tile in tl(x, batch_size=8):
        m.add_batch(tid, 8, tile)
    y = m.merge(unpad=True)
    check = (y, x)
elif a.name == "daskpatch":
    import daskpatch as dp
    x = vol()
    t0 = time.perf_counter()
    y = dp.apply_patches(x, lambda b: b, p, s, blend="gaussian", batch_size=8).compute()
    check = (y, x)
elif a.name == "daskpatch_np":
    import daskpatch as dp
    x = vol()
    t0 = time.perf_counter()
    y = dp.to_numpy(dp.apply_patches(x, lambda b: b, p, s, blend="gaussian", batch_size=8))
    check = (y, x)
elif a.name == "daskpatch_zarr":
    import zarr, daskpatch as dp
    d, zi = zarr_input()
    t0 = time.perf_counter()
    dp.to_zarr(dp.apply_patches(dp.open_volume(d + "/in.zarr"), lambda b: b, p, s, blend="gaussian", batch_size=8), d + "/out.zarr")
elif a.name == "seed":
    # seed functions, non-overlapping only (stride == size is the case they handle)
    from daskpatch import get_patches, reconstruct_patch
    x = vol()
    t0 = time.perf_counter()
    pt = get_patches(x, size=p, stride=p)
    y = np.squeeze(reconstruct_patch(pt[..., None], (n, n, n), stride=p, size=p))
elif a.name == "zarr_copy":
    import zarr
    d, zi = zarr_input()
    t0 = time.perf_counter()
    zo = zarr.create_array(d + "/out.zarr", shape=zi.shape, chunks=(s,) * 3, dtype="f4")
    zo[:] = zi[:]
elif a.name == "dask_zarr_copy":
    import zarr, dask.array as da
    d, zi = zarr_input()
    t0 = time.perf_counter()
    da.from_zarr(d + "/in.zarr").to_zarr(d + "/out.zarr")
else:
    raise SystemExit("unknown " + a.name)
dt = time.perf_counter() - t0
pk = peak()
if check is not None:
    got, want = check
    err = max(float(np.abs(np.asarray(got[i:i + 16]) - want[i:i + 16]).max()) for i in range(0, want.shape[0], 16))
    print("maxerr", err, file=sys.stderr)
print(f"{a.name} n={n} p={p} s={s} seconds={dt:.2f} peak_rss_mib={pk:.0f}")
