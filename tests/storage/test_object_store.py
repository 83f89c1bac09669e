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
