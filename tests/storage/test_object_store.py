"""Writing to and reading from an object store: a real S3-compatible server (moto's, on
127.0.0.1) and zarr's ``FsspecStore`` over s3fs, as a cluster with object storage uses them."""

from __future__ import annotations

import os

import dask
import numpy as np
import pytest
import zarr

import daskpatch as dp

moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed")
s3fs = pytest.importorskip("s3fs", reason="s3fs is not installed")

V = np.random.default_rng(0).random((32, 32, 32), dtype=np.float32)


@pytest.fixture(scope="module")
def s3():
    """A local S3 server; yields the storage options that reach it (a fresh bucket each)."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test")
    try:
        yield {"endpoint_url": f"http://{host}:{port}", "key": "test", "secret": "test"}
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def bucket(s3, request):
    fs = s3fs.S3FileSystem(**s3)
    name = "b" + str(abs(hash(request.node.name)) % 10**9)
    fs.mkdir(name)
    return fs, name


def _store(s3, url, **kw):
    return zarr.storage.FsspecStore.from_url(url, storage_options=s3, **kw)


def test_write_read_back_and_open_on_s3(s3, bucket):
    fs, name = bucket
    url = f"s3://{name}/o.zarr"
    z = dp.to_zarr(dp.apply_patches(V, lambda b: 2 * b, 16, 8), _store(s3, url))
    np.testing.assert_allclose(z[...], 2 * V, rtol=1e-6)
    back = dp.open_volume(_store(s3, url, read_only=True))
    np.testing.assert_allclose(back.compute(), 2 * V, rtol=1e-6)
    assert fs.exists(f"{name}/o.zarr/.daskpatch-done/complete")
    assert not fs.exists(f"{name}/o.zarr/.daskpatch-lease")  # given up once complete


def test_spilled_overwrite_and_resume_on_s3(s3, bucket):
    fs, name = bucket
    url = f"s3://{name}/o.zarr"
    dp.to_zarr(dp.apply_patches(V, lambda b: b, 16, 8), _store(s3, url))
    with dask.config.set({"daskpatch.spill-bytes": 0}):  # halos go to the output store
        z = dp.to_zarr(dp.apply_patches(V, lambda b: 3 * b, 16, 8), _store(s3, url),
                       overwrite=True)
    np.testing.assert_allclose(z[...], 3 * V, rtol=1e-6)
    assert not fs.exists(f"{name}/o.zarr/.daskpatch-spill")
    again = dp.to_zarr(dp.apply_patches(V, lambda b: 3 * b, 16, 8), _store(s3, url),
                       resume=True)  # complete: nothing to do, the fingerprint still checked
    np.testing.assert_array_equal(again[...], z[...])


def test_a_second_writer_is_refused_on_s3(s3, bucket):
    from daskpatch.errors import WriterConflictError

    _, name = bucket
    url = f"s3://{name}/o.zarr"
    first = dp.to_zarr(dp.apply_patches(V, lambda b: b, 16, 8), _store(s3, url), compute=False)
    with pytest.raises(WriterConflictError, match="another writer is writing"):
        dp.to_zarr(dp.apply_patches(V, lambda b: b, 16, 8), _store(s3, url), overwrite=True)
    first.compute()
    np.testing.assert_allclose(dp.open_volume(_store(s3, url, read_only=True)).compute(), V,
                               rtol=1e-6)


def test_storage_options_reach_s3_from_every_front_door(s3, bucket, tmp_path):
    fs, name = bucket
    url = f"s3://{name}/vol.zarr"
    dp.to_zarr(V, url, chunks=16, storage_options=s3)  # a URL and its options
    vol = dp.open_volume(url, storage_options=s3)
    np.testing.assert_array_equal(vol.compute(), V)
    out = dp.rechunk_to_stride(url, 12, f"s3://{name}/aligned.zarr", storage_options=s3)
    assert dp.is_stride_aligned(out.chunks, 12, shape=out.shape)
    np.testing.assert_array_equal(out[...], V)
    with pytest.raises(ValueError, match="storage_options needs store to be an fsspec URL"):
        dp.open_volume(str(tmp_path / "local.zarr"), storage_options=s3)


def test_the_command_line_with_storage_options(s3, bucket, capsys):
    from daskpatch.cli import main

    fs, name = bucket
    dp.to_zarr(V, f"s3://{name}/vol.zarr", chunks=16, storage_options=s3)
    opts = [f"--storage-option={k}={v}" for k, v in s3.items()]
    assert main(["info", f"s3://{name}/vol.zarr", *opts]) == 0
    report = capsys.readouterr().out
    assert "shape        32 x 32 x 32" in report and "complete" in report
    assert main(["apply", f"s3://{name}/vol.zarr", f"s3://{name}/out.zarr", "--model",
                 "numpy:negative", "--size", "16", "--stride", "8", *opts]) == 0
    out = dp.open_volume(f"s3://{name}/out.zarr", storage_options=s3).compute()
    np.testing.assert_allclose(out, -V, rtol=1e-6)


def test_spill_to_an_object_store_url(s3, bucket, monkeypatch):
    fs, name = bucket
    for key, env in (("key", "AWS_ACCESS_KEY_ID"), ("secret", "AWS_SECRET_ACCESS_KEY"),
                     ("endpoint_url", "AWS_ENDPOINT_URL")):
        monkeypatch.setenv(env, s3[key])  # a spill URL takes its credentials from the env
    res = dp.apply_patches(V, lambda b: b, 16, 8, spill=f"s3://{name}/spill")
    np.testing.assert_allclose(res.compute(), V, rtol=1e-6)
    with pytest.raises(ValueError, match=r"spill='nosuchfs://x/y' names no filesystem fsspec "
                                         r"knows"):
        dp.apply_patches(V, lambda b: b, 16, 8, spill="nosuchfs://x/y")


@pytest.mark.cluster
def test_a_two_worker_cluster_writes_to_s3(s3, bucket):
    distributed = pytest.importorskip("distributed")
    _, name = bucket
    url = f"s3://{name}/o.zarr"
    src = f"s3://{name}/in.zarr"
    dp.to_zarr(V, src, chunks=16, storage_options=s3)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0", silence_logs=50) as cluster:
        with distributed.Client(cluster):
            vol = dp.open_volume(src, storage_options=s3)
            with dask.config.set({"daskpatch.spill-bytes": 0}):  # halos on S3 as well
                z = dp.to_zarr(dp.apply_patches(vol, np.negative, 16, 8), url,
                               storage_options=s3)
    expected = dp.apply_patches(V, np.negative, 16, 8).compute(scheduler="threads")
    np.testing.assert_array_equal(z[...], expected)
    again = dp.open_volume(url, storage_options=s3)
    np.testing.assert_array_equal(again.compute(), expected)


def test_training_loaders_read_patches_from_s3(s3, bucket):
    _, name = bucket
    labels = (V > 0.5).astype(np.uint8)
    dp.to_zarr(V, f"s3://{name}/img.zarr", chunks=16, storage_options=s3)
    dp.to_zarr(labels, f"s3://{name}/lab.zarr", chunks=16, storage_options=s3)
    grid = dp.PatchDataset(f"s3://{name}/img.zarr", 16, 16, labels=f"s3://{name}/lab.zarr",
                           storage_options=s3)
    item = grid[0]
    np.testing.assert_array_equal(item["image"][0], V[:16, :16, :16])
    np.testing.assert_array_equal(item["label"][0], labels[:16, :16, :16])
    rand = dp.RandomPatchDataset(f"s3://{name}/img.zarr", 8, samples_per_epoch=4,
                                 labels=f"s3://{name}/lab.zarr", pos_fraction=0.5,
                                 storage_options=s3, seed=1)
    assert [rand[i]["image"].shape for i in range(4)] == [(1, 8, 8, 8)] * 4


def test_the_chunk_cache_fetches_each_input_chunk_once_from_s3(s3, bucket):
    """A block's halo reaches into its neighbours' chunks: without the cache every block fetches
    them again (125 GETs for 27 chunks here), with it each is fetched once per job."""
    from ..conftest import CountingStore

    fs, name = bucket
    data = np.random.default_rng(5).random((48, 48, 48), dtype=np.float32)
    dp.to_zarr(data, _store(s3, f"s3://{name}/in.zarr"), chunks=16)
    store = CountingStore(_store(s3, f"s3://{name}/in.zarr", read_only=True))
    vol = zarr.open_array(store, mode="r")
    results, reads = [], []
    for cache in (0, "256 MiB"):
        with dask.config.set({"daskpatch.chunk-cache-bytes": cache}):
            before = store.chunk_reads
            out = dp.to_zarr(dp.apply_patches(vol, np.sqrt, 16, 8, block_shape=16),
                             _store(s3, f"s3://{name}/out.zarr"), overwrite=True)
            reads.append(store.chunk_reads - before)
            results.append(out[...])
    np.testing.assert_array_equal(results[1], results[0])
    np.testing.assert_allclose(results[1], np.sqrt(data), rtol=1e-6)
    assert reads == [125, 27]


@pytest.mark.processes
@pytest.mark.needs_dask("chunk tasks writing their chunk (the written path)")
def test_a_write_killed_on_s3_resumes_bit_for_bit(s3, bucket):
    """A writer SIGKILLed half way through a write to S3 (its halos spilled there), then
    resumed in another process: the same chunks as an uninterrupted write, nothing left over,
    and the model runs only on the blocks of the chunks the kill left missing."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from daskpatch.storage import markers

    from .._child_write import Same, build, model

    fs, name = bucket
    src = f"s3://{name}/in.zarr"
    data = np.random.default_rng(3).random((48, 48, 48), dtype=np.float32)
    z = zarr.create_array(_store(s3, src), shape=data.shape, chunks=(16, 16, 16),
                          dtype="f4")
    z[...] = data
    options = [f"--storage-option={k}={v}" for k, v in s3.items()]
    child = Path(__file__).resolve().parents[1] / "_child_write.py"
    env = dict(os.environ, PYTHONPATH=str(Path(dp.__file__).parent.parent))

    def run(target: str, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(child), src, target, "--spill-bytes", "0",
                               *options, *extra], env=env, capture_output=True, text=True,
                              timeout=600)

    clean = run(f"s3://{name}/clean.zarr")
    assert clean.returncode == 0, clean.stderr
    target = f"s3://{name}/o.zarr"
    killed = run(target, "--kill-at", "20")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    out = zarr.open_array(_store(s3, target, read_only=True), mode="r")
    done = markers.done_chunks(out, markers.numblocks(out))
    assert done and len(done) < 27
    volume = dp.open_volume(src, storage_options=s3)
    patches = build(volume)
    counts = next(iter(dp.graph.engine.find_engines(patches).values())).block_patches()
    owned = {b: int(np.prod([c[i] for c, i in zip(counts, b)])) for b in np.ndindex(3, 3, 3)}
    calls = []

    def counted(batch):
        calls.append(batch.shape[0])
        return model(batch)

    with dask.config.set({"daskpatch.spill-bytes": 0}):
        z = dp.to_zarr(build(volume, fn=Same(counted)), target, resume=True, storage_options=s3)
    assert sum(calls) == sum(n for b, n in owned.items() if b not in done)
    expected = zarr.open_array(_store(s3, f"s3://{name}/clean.zarr", read_only=True))
    assert [fs.cat(f"{name}/o.zarr/c/{k}") for k in ("0/0/0", "1/1/1", "2/2/2")] == \
        [fs.cat(f"{name}/clean.zarr/c/{k}") for k in ("0/0/0", "1/1/1", "2/2/2")]
    np.testing.assert_array_equal(z[...], expected[...])
    assert fs.exists(f"{name}/o.zarr/.daskpatch-done/complete")
    assert not fs.find(f"{name}/o.zarr/.daskpatch-spill")
