#!/usr/bin/env python
"""Bytes an ``apply_patches -> to_zarr`` job fetches from its input store, over the input's
size, with the chunk cache off (``daskpatch.chunk-cache-bytes`` 0) and on (the default): a
384^3 float32 input with stride-aligned chunks on a local S3 server (moto's, on 127.0.0.1,
through zarr's ``FsspecStore`` over s3fs), written back to it; and the same job from a local
disk store, where what is counted is chunk decodes. Target: fetched <= 2x the input.

What is counted: every ``get`` of the input's store (a wrapper around it; each is one GET
request of a chunk, or of a metadata document) and the bytes it returned (compressed, as
stored); ``decodes`` are the chunk gets (each returned chunk is decoded once).

Usage: ``python benchmarks/bytes_moved.py [--n 384] [--cases 64/32/128,64/48/96]
[--json out.json]`` (a case: patch size / stride / input chunk, optionally ``/block``).

``--job DIR`` instead runs one local job and exits, for timing whole processes (cache off:
``DASK_DASKPATCH__CHUNK_CACHE_BYTES=0`` in the environment): ``DIR/in.zarr`` (made on the first
call, outside any timing: ``--prepare``) -> ``apply_patches(64, 32)`` -> ``DIR/out.zarr``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from typing import Any

import numpy as np
import zarr
from zarr.storage import FsspecStore, LocalStore, WrapperStore

import dask
import daskpatch as dp
from daskpatch.storage.chunkcache import CACHE


class Counting(WrapperStore):
    """A store that counts its gets and the bytes they return (metadata apart)."""

    def __init__(self, store: Any) -> None:
        super().__init__(store)
        self.lock = threading.Lock()
        self.gets = self.meta_gets = self.bytes = 0

    def _count(self, key: str, buf: Any) -> None:
        with self.lock:
            if key.endswith(("zarr.json", ".zarray", ".zattrs", ".zgroup")):
                self.meta_gets += 1
            else:
                self.gets += 1
                self.bytes += 0 if buf is None else len(buf)

    async def get(self, key: str, *args: Any, **kwargs: Any) -> Any:
        buf = await self._store.get(key, *args, **kwargs)
        self._count(key, buf)
        return buf

    async def get_partial_values(self, prototype: Any, key_ranges: Any) -> Any:
        out = await self._store.get_partial_values(prototype, key_ranges)
        for (key, _), buf in zip(key_ranges, out):
            self._count(key, buf)
        return out


def stored_bytes(store: Any) -> int:
    """The bytes of the input's chunks as stored (read once, through a fresh counter)."""
    z = zarr.open_array(c := Counting(store), mode="r")
    z[...]
    return c.bytes


def run(open_store: Any, out: Any, size: int, stride: int, block: int | None,
        cache: Any) -> dict:
    inp = Counting(open_store())
    vol = zarr.open_array(inp, mode="r")
    CACHE.reset_stats()
    t0 = time.perf_counter()
    with dask.config.set({"daskpatch.chunk-cache-bytes": cache}):
        dp.to_zarr(dp.apply_patches(vol, lambda b: b * 2, size, stride, block_shape=block),
                   out(), overwrite=True)
    wall = time.perf_counter() - t0
    return {"cache": str(cache), "chunk_gets": inp.gets, "meta_gets": inp.meta_gets,
            "bytes": inp.bytes, "wall_s": round(wall, 2), "cache_decodes": CACHE.decodes,
            "cache_hits": CACHE.hits, "evicted": CACHE.evicted, "cache_peak_MiB":
            round(CACHE.peak / 2**20, 1)}


def job(where: str, n: int, prepare: bool) -> None:
    """One local ``to_zarr`` job (or, with ``prepare``, only its input)."""
    src = os.path.join(where, "in.zarr")
    if prepare:
        data = np.random.default_rng(0).random((n, n, n), dtype=np.float32)
        z = zarr.create_array(src, shape=data.shape, chunks=(128,) * 3, dtype=data.dtype,
                              overwrite=True)
        z[...] = data
        return
    vol = dp.open_volume(src)
    dp.to_zarr(dp.apply_patches(vol, lambda b: b * 2, 64, 32), os.path.join(where, "out.zarr"),
               overwrite=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--job", metavar="DIR", help="run one local job from DIR/in.zarr and exit")
    ap.add_argument("--prepare", action="store_true", help="with --job: write DIR/in.zarr")
    ap.add_argument("--n", type=int, default=384)
    ap.add_argument("--cases", default="64/32/128,64/48/96")
    ap.add_argument("--caches", default="0,256 MiB",
                    help="chunk-cache-bytes settings, comma-separated")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.job:
        return job(args.job, args.n, args.prepare)
    from moto.server import ThreadedMotoServer
    import s3fs

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the server's line per request

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test")
    opts = {"endpoint_url": f"http://{host}:{port}", "key": "test", "secret": "test"}
    s3fs.S3FileSystem(**opts).mkdir("bench")
    n = args.n
    data = np.random.default_rng(0).random((n, n, n), dtype=np.float32)
    input_mib = data.nbytes / 2**20
    rows = []
    tmp = tempfile.mkdtemp(prefix="bytes-moved-")
    try:
        for case in args.cases.split(","):
            parts = [int(p) for p in case.split("/")]
            size, stride, chunk = parts[:3]
            block = parts[3] if len(parts) > 3 else None
            url = f"s3://bench/in-{chunk}.zarr"
            z = zarr.create_array(FsspecStore.from_url(url, storage_options=opts), shape=data.shape,
                                  chunks=(chunk,) * 3, dtype=data.dtype, overwrite=True)
            z[...] = data
            local = os.path.join(tmp, f"in-{chunk}.zarr")
            zl = zarr.create_array(local, shape=data.shape, chunks=(chunk,) * 3,
                                   dtype=data.dtype, overwrite=True)
            zl[...] = data
            nchunks = (-(-n // chunk)) ** 3

            def s3_in(url: str = url) -> Any:
                return FsspecStore.from_url(url, storage_options=opts, read_only=True)

            def s3_out() -> Any:
                return FsspecStore.from_url("s3://bench/out.zarr", storage_options=opts)

            def disk_in(local: str = local) -> Any:
                return LocalStore(local, read_only=True)

            def disk_out() -> Any:
                return os.path.join(tmp, "out.zarr")

            stored = stored_bytes(s3_in())
            for where, src, dst in (("s3", s3_in, s3_out), ("disk", disk_in, disk_out)):
                for cache in args.caches.split(","):
                    cache_v: Any = int(cache) if cache.isdigit() else cache
                    r = run(src, dst, size, stride, block, cache_v)
                    r.update(store=where, size=size, stride=stride, chunk=chunk,
                             block=block or "auto", input_chunks=nchunks,
                             input_stored_MiB=round(stored / 2**20, 1),
                             fetched_over_input=round(r["bytes"] / stored, 2),
                             gets_per_chunk=round(r["chunk_gets"] / nchunks, 2))
                    rows.append(r)
                    print(f"{where:4} patch {size} stride {stride} chunks {chunk}^3 "
                          f"({nchunks}) block {block or 'auto'} cache {cache:>8}: "
                          f"fetched {r['fetched_over_input']:.2f}x the input "
                          f"({r['bytes'] / 2**20:.0f} of {stored / 2**20:.0f} MiB), "
                          f"{r['chunk_gets']} chunk gets ({r['gets_per_chunk']:.2f} per chunk) "
                          f"+ {r['meta_gets']} metadata, {r['wall_s']:.1f} s; cache: "
                          f"{r['cache_decodes']} decodes, {r['cache_hits']} hits, "
                          f"{r['evicted']} evicted, peak {r['cache_peak_MiB']} MiB", flush=True)
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n": n, "input_MiB": input_mib, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
