"""daskpatch.io: open_volume reads Zarr, to_zarr writes resumable chunk-aligned arrays (overwrite,
resume, compressors, errors) on the local scheduler and on a cluster."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
import zarr
import zarr.storage
from dask.delayed import Delayed

from daskpatch.io import open_volume, to_zarr

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _no_compute(dsk, keys, **kwargs):
    raise AssertionError("a graph was computed while building")


class CountingStore(zarr.storage.WrapperStore):
    """Records every key read through it (class-level list: zarr re-wraps stores)."""

    reads: list[str] = []

    async def get(self, key, prototype=None, byte_range=None):
        CountingStore.reads.append(key)
        return await self._store.get(key, prototype, byte_range)

    async def get_partial_values(self, prototype, key_ranges):
        key_ranges = list(key_ranges)
        CountingStore.reads.extend(k for k, _ in key_ranges)
        return await self._store.get_partial_values(prototype, key_ranges)


class WritesStore(zarr.storage.WrapperStore):
    """Records every key written through it (class-level list: zarr re-wraps stores)."""

    written: list[str] = []

    async def set(self, key, value, *args, **kwargs):
        WritesStore.written.append(key)
        return await self._store.set(key, value, *args, **kwargs)


def _chunk_reads() -> list[str]:
    meta = ("zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata")
    return [k for k in CountingStore.reads if not k.endswith(meta)]


class Flaky:
    """A block function that counts its successful calls per block and fails once on one block."""

    def __init__(self, fail_at: tuple[int, ...] | None) -> None:
        self.fail_at = fail_at
        self.lock = threading.Lock()
        self.calls: Counter[tuple[int, ...]] = Counter()

    def __call__(self, block: np.ndarray, block_info=None) -> np.ndarray:
        loc = tuple(block_info[0]["chunk-location"])
        with self.lock:
            if loc == self.fail_at:
                self.fail_at = None
                raise RuntimeError(f"simulated crash in block {loc}")
            self.calls[loc] += 1
        return block * 3


def _source(shape=(20, 24), chunks=(5, 6)) -> da.Array:
    data = np.random.default_rng(42).integers(0, 1000, size=shape).astype("int32")
    data[5:10, 6:12] = 0  # block (1, 1) writes all fill: Zarr 3 stores no chunk for it
    return da.from_array(data, chunks=chunks)


def _chunk_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted((root / "c").rglob("*"))
        if p.is_file()
    }


# --------------------------------------------------------------------------------------------
# open_volume
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_open_volume_reads_both_formats(tmp_path, zarr_format):
    data = np.arange(7 * 9, dtype="float32").reshape(7, 9)
    z = zarr.create_array(
        tmp_path / "v.zarr", name="img", shape=data.shape, chunks=(3, 4), dtype=data.dtype,
        zarr_format=zarr_format,
    )
    z[:] = data
    vol = open_volume(tmp_path / "v.zarr", path="img")
    assert isinstance(vol, da.Array)
    assert vol.chunks == ((3, 3, 1), (4, 4, 1))
    np.testing.assert_array_equal(vol.compute(), data)
    # the same array through a group, an open array, a str path and a store object
    group = zarr.open_group(tmp_path / "v.zarr", mode="r")
    np.testing.assert_array_equal(open_volume(group, "img").compute(), data)
    np.testing.assert_array_equal(open_volume(z).compute(), data)
    np.testing.assert_array_equal(open_volume(str(tmp_path / "v.zarr"), "/img/").compute(), data)
    store = zarr.storage.LocalStore(tmp_path / "v.zarr")
    np.testing.assert_array_equal(open_volume(store, "img").compute(), data)


def test_open_volume_fsspec_url(tmp_path):
    data = np.arange(12, dtype="uint8").reshape(3, 4)
    zarr.create_array(tmp_path / "u.zarr", data=data, chunks=(2, 2))
    vol = open_volume(f"file://{tmp_path}/u.zarr")
    np.testing.assert_array_equal(vol.compute(), data)


def test_open_volume_reads_no_chunk_while_building(tmp_path):
    z = zarr.create_array(tmp_path / "c.zarr", shape=(12, 12), chunks=(4, 4), dtype="int16")
    z[:] = 5
    CountingStore.reads.clear()
    store = CountingStore(zarr.storage.LocalStore(tmp_path / "c.zarr"))
    with dask.config.set(scheduler=_no_compute):
        vol = open_volume(store)
        vol2 = (vol + 1)[2:10].sum(axis=0)
    assert _chunk_reads() == []
    assert int(vol2.sum().compute(scheduler="sync")) == 6 * 8 * 12
    assert sorted(set(_chunk_reads())) == [f"c/{i}/{j}" for i in range(3) for j in range(3)]


# --------------------------------------------------------------------------------------------
# to_zarr: round trips and chunks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, dtype, chunks",
    [((10,), "uint8", 4), ((7, 9), "float32", (3, 4)), ((5, 6, 7), "int64", (2, 6, 3))],
)
def test_numpy_round_trip(tmp_path, shape, dtype, chunks):
    data = (np.random.default_rng(0).random(shape) * 100).astype(dtype)
    z = to_zarr(data, tmp_path / "r.zarr", chunks=chunks)
    assert isinstance(z, zarr.Array)
    assert z.metadata.zarr_format == 3
    expected = (chunks,) * len(shape) if isinstance(chunks, int) else chunks
    assert z.chunks == expected
    vol = open_volume(tmp_path / "r.zarr")
    assert vol.dtype == data.dtype
    np.testing.assert_array_equal(vol.compute(), data)


def test_numpy_default_chunks_and_zero_chunks(tmp_path):
    data = np.zeros((30, 40), dtype="float64")
    data[10:, 20:] = 1.5
    z = to_zarr(data, tmp_path / "n.zarr")
    np.testing.assert_array_equal(z[:], data)
    # all-zero data: no chunk is stored (Zarr 3), yet the write is recorded complete
    z0 = to_zarr(np.zeros((8, 8)), tmp_path / "zeros.zarr", chunks=4)
    assert not (tmp_path / "zeros.zarr" / "c").exists()
    assert (tmp_path / "zeros.zarr" / ".daskpatch-done" / "complete").exists()
    np.testing.assert_array_equal(z0[:], 0)


def test_chunks_equal_to_the_fill_value_follow_zarrs_rule(tmp_path):
    # the written chunks skip zarr's byte comparison once they differ from the fill value;
    # which chunks are stored must stay zarr's choice: all but the chunk of +0.0
    data = np.zeros((4, 10), dtype="float32")
    data[:, 2:4] = -0.0
    data[0, 4] = np.nan
    data[1, 6] = 1e-30
    data[:, 8:] = np.inf
    z = to_zarr(data, tmp_path / "f.zarr", chunks=2)
    keys = sorted(p.relative_to(tmp_path / "f.zarr").as_posix()
                  for p in (tmp_path / "f.zarr" / "c").rglob("*") if p.is_file())
    # -0.0 in column chunk 1; NaN, 1e-30 in chunks (0, 2), (0, 3); inf in column chunk 4
    assert keys == ["c/0/1", "c/0/2", "c/0/3", "c/0/4", "c/1/1", "c/1/4"]
    np.testing.assert_array_equal(z[:], data)
    assert np.signbit(z[:, 2:4]).all()

    # integers; a chunk written before and now equal to the fill value is deleted, as zarr does
    from daskpatch.storage.writes import write_chunk

    zi = zarr.create_array(tmp_path / "i.zarr", shape=(4,), chunks=(2,), dtype="int16",
                           fill_value=7)
    write_chunk(zi, (slice(0, 2),), np.array([7, 8], "int16"))
    write_chunk(zi, (slice(2, 4),), np.array([7, 7], "int16"))
    assert zi.nchunks_initialized == 1
    write_chunk(zi, (slice(0, 2),), np.array([7, 7], "int16"))
    assert zi.nchunks_initialized == 0
    np.testing.assert_array_equal(zi[:], 7)

    # a fill value of -0.0: a chunk of -0.0 equals it, one of +0.0 does not (zarr: bit for bit)
    zn = zarr.create_array(tmp_path / "n.zarr", shape=(4,), chunks=(2,), dtype="f4",
                           fill_value=-0.0)
    write_chunk(zn, (slice(0, 2),), np.array([-0.0, -0.0], "f4"))
    write_chunk(zn, (slice(2, 4),), np.array([0.0, 0.0], "f4"))
    assert zn.nchunks_initialized == 1
    assert np.signbit(zn[:]).tolist() == [True, True, False, False]

    # an array configured to write empty chunks stores them
    with zarr.config.set({"array.write_empty_chunks": True}):
        zz = to_zarr(np.zeros((4,), "float32"), tmp_path / "e.zarr", chunks=2)
    assert zz.nchunks_initialized == 2


@pytest.mark.needs_dask("Array.reshape")
def test_regular_dask_chunks_are_kept(tmp_path):
    x = da.arange(100, dtype="int32").reshape(10, 10).rechunk((4, 3))
    z = to_zarr(x, tmp_path / "k.zarr", path="a/b")
    assert z.chunks == (4, 3)
    assert open_volume(tmp_path / "k.zarr", "a/b").chunks == x.chunks
    np.testing.assert_array_equal(z[:], x.compute())


@pytest.mark.needs_dask("Array.reshape")
def test_irregular_dask_chunks_use_largest_chunk_one_task_each(tmp_path):
    x = da.arange(20 * 12, dtype="int32").reshape(20, 12).rechunk(((3, 7, 5, 5), (4, 4, 4)))
    job = to_zarr(x, tmp_path / "i.zarr", compute=False)
    z = zarr.open_array(tmp_path / "i.zarr", mode="r")
    assert z.chunks == (7, 4)
    assert z.nchunks == 9
    WritesStore.written = []
    to_zarr(x, WritesStore(zarr.storage.LocalStore(str(tmp_path / "counted.zarr"))))
    chunk_writes = Counter(k for k in WritesStore.written if k.startswith("c/"))
    assert sorted(chunk_writes) == [f"c/{i}/{j}" for i in range(3) for j in range(3)]
    assert set(chunk_writes.values()) == {1}  # each chunk written whole, once
    job.compute()
    np.testing.assert_array_equal(z[:], x.compute())


def test_explicit_chunks_rechunk(tmp_path):
    x = da.ones((9, 9), chunks=2, dtype="uint16")
    z = to_zarr(x, tmp_path / "e.zarr", chunks=(5, 9))
    assert z.chunks == (5, 9)
    assert open_volume(tmp_path / "e.zarr").chunks == ((5, 4), (9,))
    assert int(z[:].sum()) == 81


def test_write_into_group_and_memory_store(tmp_path):
    group = zarr.open_group(tmp_path / "g.zarr", mode="w")
    group.create_array("existing", shape=(2,), dtype="int8")
    z = to_zarr(np.arange(6).reshape(2, 3), group, "sub/new")
    assert z.path == "sub/new"
    np.testing.assert_array_equal(open_volume(group, "sub/new").compute(), z[:])
    np.testing.assert_array_equal(z[:], np.arange(6).reshape(2, 3))
    store = zarr.storage.MemoryStore()
    to_zarr(np.arange(5), store, "m")
    np.testing.assert_array_equal(open_volume(store, "m").compute(), np.arange(5))


def test_zarr_array_input_v2_to_v3(tmp_path):
    src = zarr.create_array(tmp_path / "v2.zarr", shape=(6, 6), chunks=(3, 3), dtype="int32",
                            zarr_format=2)
    src[:] = np.arange(36).reshape(6, 6)
    z = to_zarr(src, tmp_path / "v3.zarr")
    assert z.metadata.zarr_format == 3 and z.chunks == (3, 3)
    np.testing.assert_array_equal(z[:], src[:])


# --------------------------------------------------------------------------------------------
# to_zarr: overwrite, compute=False, progress
# --------------------------------------------------------------------------------------------


def test_overwrite_refused_then_allowed(tmp_path):
    target = tmp_path / "o.zarr"
    to_zarr(np.full((4, 4), 7, dtype="int8"), target, "x", chunks=2)
    before = _chunk_files(target / "x")
    match = r"already exists at path 'x'.*overwrite=True.*resume=True"
    with pytest.raises(FileExistsError, match=match):
        to_zarr(np.zeros((4, 4), dtype="int8"), target, "x")
    assert _chunk_files(target / "x") == before
    z = to_zarr(np.arange(10, dtype="float32"), target, "x", overwrite=True)
    assert z.shape == (10,) and z.dtype == np.float32
    np.testing.assert_array_equal(open_volume(target, "x").compute(), np.arange(10))


def test_root_array_overwrite_and_group_refusal(tmp_path):
    to_zarr(np.ones(4), tmp_path / "root.zarr")
    with pytest.raises(FileExistsError, match="the root of store"):
        to_zarr(np.ones(4), tmp_path / "root.zarr")
    with pytest.raises(ValueError, match=r"parent '\(the root\)' is an array"):
        to_zarr(np.ones(4), tmp_path / "root.zarr", "child")
    zarr.open_group(tmp_path / "grp.zarr", mode="w").create_array("a", shape=(2,), dtype="i1")
    with pytest.raises(ValueError, match="is a group; to_zarr never replaces a group"):
        to_zarr(np.ones(4), tmp_path / "grp.zarr", overwrite=True)
    assert list(zarr.open_group(tmp_path / "grp.zarr", mode="r").array_keys()) == ["a"]


def test_refuses_to_write_the_array_it_reads(tmp_path):
    to_zarr(np.arange(4), tmp_path / "self.zarr", "a")
    match = "the input array reads from path 'a'.*which this call would write"
    with pytest.raises(ValueError, match=match):
        to_zarr(open_volume(tmp_path / "self.zarr", "a") + 1, str(tmp_path / "self.zarr"), "a",
                overwrite=True)
    np.testing.assert_array_equal(open_volume(tmp_path / "self.zarr", "a").compute(), np.arange(4))


def test_dict_store_and_empty_array(tmp_path):
    mapping: dict = {}
    to_zarr(np.arange(4), mapping, "a")
    np.testing.assert_array_equal(open_volume(mapping, "a").compute(), np.arange(4))
    z = to_zarr(np.zeros((0, 4)), tmp_path / "empty.zarr", chunks=2)
    assert z.shape == (0, 4) and z.chunks == (2, 2)


@pytest.mark.needs_dask("map_blocks of a callable that cannot be tokenized deterministically")
def test_compute_false_computes_nothing_until_asked(tmp_path):
    fn = Flaky(fail_at=None)
    x = _source().map_blocks(fn, dtype="int32")
    with dask.config.set(scheduler=_no_compute):
        job = to_zarr(x, tmp_path / "lazy.zarr", compute=False)
    assert isinstance(job, Delayed)
    assert sum(fn.calls.values()) == 0
    z = zarr.open_array(tmp_path / "lazy.zarr", mode="r")  # metadata exists already
    assert z.shape == (20, 24) and not (tmp_path / "lazy.zarr" / "c").exists()
    (result,) = dask.compute(job)
    assert isinstance(result, zarr.Array)
    np.testing.assert_array_equal(z[:], _source().compute() * 3)
    assert set(fn.calls.values()) == {1}


def test_progress_local(tmp_path, capsys):
    to_zarr(da.ones((8, 8), chunks=4), tmp_path / "p.zarr", progress=True)
    out = capsys.readouterr().out
    assert "100% Completed" in out


# --------------------------------------------------------------------------------------------
# to_zarr: resume
# --------------------------------------------------------------------------------------------


def _markers(target: Path) -> set[tuple[int, ...]]:
    folder = target / ".daskpatch-done" / "chunks"
    # (skip LocalStore's "<name>.<uuid>.partial" files of writes still in flight)
    names = [p.name for p in folder.iterdir() if not p.name.endswith(".partial")]
    return {tuple(int(i) for i in name.split(".")) for name in names}


@pytest.mark.needs_dask("map_blocks of a callable that cannot be tokenized deterministically")
@pytest.mark.parametrize("scheduler", ["synchronous", "threads"])
def test_resume_finishes_without_recomputing(tmp_path, scheduler):
    clean = tmp_path / "clean.zarr"
    to_zarr(_source().map_blocks(Flaky(None), dtype="int32"), clean)
    everything = {(i, j) for i in range(4) for j in range(4)}

    fail_at = (2, 1)
    fn = Flaky(fail_at)
    x = _source().map_blocks(fn, dtype="int32")
    target = tmp_path / "resumed.zarr"
    with dask.config.set(scheduler=scheduler):
        with pytest.raises(RuntimeError, match="simulated crash"):
            to_zarr(x, target)
        # (threads: tasks already running when the crash surfaced may still finish meanwhile)
        done = _markers(target)
        assert fail_at not in done and 0 < len(done) < 16
        assert not (target / ".daskpatch-done" / "complete").exists()
        with pytest.raises(FileExistsError, match="resume=True"):
            to_zarr(x, target)
        first = fn.calls.copy()
        z = to_zarr(x, target, resume=True)
    recomputed = {loc for loc in everything if fn.calls[loc] > first[loc]}

    assert recomputed.isdisjoint(done)  # chunks marked done were not computed again
    assert fail_at in recomputed
    assert set(fn.calls) == everything
    if scheduler == "synchronous":  # deterministic: each block computed exactly once overall
        assert done == set(first) and recomputed == everything - done
        assert set(fn.calls.values()) == {1}
    assert (target / ".daskpatch-done" / "complete").exists()
    assert not (target / ".daskpatch-done" / "chunks").exists()
    np.testing.assert_array_equal(z[:], zarr.open_array(clean, mode="r")[:])
    assert not (target / "c" / "1" / "1").exists()  # the all-fill chunk is not stored ...
    assert _chunk_files(target) == _chunk_files(clean)  # ... and the rest is bit-identical

    # resuming a complete array computes nothing
    again = Flaky(None)
    to_zarr(_source().map_blocks(again, dtype="int32"), target, resume=True)
    assert sum(again.calls.values()) == 0


def test_resume_without_target_is_a_fresh_write(tmp_path):
    z = to_zarr(np.arange(10), tmp_path / "f.zarr", "a", resume=True, chunks=3)
    np.testing.assert_array_equal(z[:], np.arange(10))


@pytest.mark.parametrize(
    "array, chunks, match",
    [
        (np.zeros((8, 9), dtype="int32"), 4, r"shape \(8, 8\) \(this write: \(8, 9\)\)"),
        (np.zeros((8, 8), dtype="float32"), 4, r"dtype int32 \(this write: float32\)"),
        (np.zeros((8, 8), dtype="int32"), 2, r"chunks \(4, 4\) \(this write: \(2, 2\); pass"),
        (np.zeros((8, 8), dtype="int32"), {"chunks": 4, "compressors": None},
         r"compressors \[zstd\(level=0, checksum=False\)\] \(this write: \[\]; pass"),
    ],
)
def test_resume_mismatch(tmp_path, array, chunks, match):
    to_zarr(np.ones((8, 8), dtype="int32"), tmp_path / "m.zarr", chunks=4)
    before = _chunk_files(tmp_path / "m.zarr")
    kwargs = chunks if isinstance(chunks, dict) else {"chunks": chunks}
    with pytest.raises(ValueError, match=match):
        to_zarr(array, tmp_path / "m.zarr", resume=True, **kwargs)
    assert _chunk_files(tmp_path / "m.zarr") == before


def test_compressors_are_chosen_checked_and_kept_on_resume(tmp_path):
    from zarr.codecs import BloscCodec

    data = np.linspace(0, 1, 32 * 32, dtype="float32").reshape(32, 32)
    raw = to_zarr(data, tmp_path / "raw.zarr", chunks=16, compressors=None)
    assert raw.compressors == ()
    assert {p.stat().st_size for p in (tmp_path / "raw.zarr" / "c").rglob("*")
            if p.is_file()} == {16 * 16 * 4}  # stored as they are
    blosc = BloscCodec(cname="lz4", shuffle="shuffle")
    z = to_zarr(data, tmp_path / "b.zarr", chunks=16, compressors=blosc)
    assert [c.to_dict()["name"] for c in z.compressors] == ["blosc"]
    np.testing.assert_array_equal(z[:], data)
    # the same compressors resume; the default ("auto", zstd) does not match them
    to_zarr(data, tmp_path / "b.zarr", chunks=16, compressors=[blosc], resume=True)
    with pytest.raises(ValueError, match=r"compressors \[blosc\(.*\)\] \(this write: \[zstd"):
        to_zarr(data, tmp_path / "b.zarr", chunks=16, resume=True)
    # an OME-Zarr image compresses every level so
    img = to_zarr(da.from_array(np.ones((16, 16, 16), "float32"), chunks=8),
                  tmp_path / "img.zarr", ome=True, levels=2, compressors=None)
    assert [img[k].compressors for k in ("0", "1")] == [(), ()]


@pytest.mark.parametrize("ome", [False, True])
def test_bad_compressors_write_nothing(tmp_path, ome):
    with pytest.raises(ValueError, match=r"compressors='lz4' is not something zarr compresses "
                                         r"with .*; pass \"auto\""):
        to_zarr(np.ones((8, 8), "float32"), tmp_path / "x.zarr", compressors="lz4", ome=ome)
    assert not (tmp_path / "x.zarr").exists()


# --------------------------------------------------------------------------------------------
# errors: bad calls leave nothing behind
# --------------------------------------------------------------------------------------------

_X = da.ones((4, 4), chunks=2)


def _unknown_shape() -> da.Array:
    """A Dask array of unknown shape (made in the test: building it needs boolean-mask
    indexing, which dask's array query planning lacks)."""
    return da.ones(4)[da.ones(4) > 0]


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(array=[1, 2, 3]), TypeError, "array must be a NumPy, Dask or Zarr array; got .*list"),
        (dict(array=np.float64(3.0)), ValueError, "at least one axis; got a 0-d array"),
        (dict(array=np.array(3.0)), ValueError, "at least one axis; got a 0-d array"),
        pytest.param(dict(array=_unknown_shape), ValueError, r"known shape; got \(nan,\)",
                     marks=pytest.mark.needs_dask("boolean-mask indexing (unknown chunk sizes)")),
        (dict(store=3), TypeError, "store must be a path or URL string.*got 3 of type int"),
        (dict(path=5), TypeError, "path must be None or a string.*got 5 of type int"),
        (dict(chunks=2.5), TypeError, "chunks must be an integer or a sequence of int.*got 2.5"),
        (dict(chunks=(2, 2, 2)), ValueError, r"chunks must be .* of 2 integers.*\(2, 2, 2\)"),
        (dict(chunks=(2, 0)), ValueError, r"chunks must be >= 1 on every axis; got \(2, 0\)"),
        (dict(overwrite="yes"), TypeError, "overwrite must be True or False; got 'yes' of type"),
        (dict(resume=1), TypeError, "resume must be True or False; got 1 of type int"),
        (dict(progress=None), TypeError, "progress must be True or False; got None"),
        (dict(compute="no"), TypeError, "compute must be True or False"),
        (dict(overwrite=True, resume=True), ValueError, "exclude each other"),
        (dict(progress=True, compute=False), ValueError, "progress=True needs compute=True"),
    ],
)
def test_to_zarr_errors(tmp_path, kwargs, exc, match):
    args = dict(array=_X, store=tmp_path / "bad.zarr", path=None) | kwargs
    if args["array"] is _unknown_shape:
        args["array"] = _unknown_shape()
    with pytest.raises(exc, match=match):
        to_zarr(args.pop("array"), args.pop("store"), args.pop("path"), **args)
    assert not (tmp_path / "bad.zarr").exists()


def test_to_zarr_rejects_zarr_array_as_store(tmp_path):
    z = zarr.create_array(tmp_path / "t.zarr", shape=(4, 4), dtype="f8")
    with pytest.raises(TypeError, match="got a zarr.Array.*pass its store and path"):
        to_zarr(_X, z)


@pytest.mark.parametrize(
    "store, path, exc, match",
    [
        ("missing.zarr", None, FileNotFoundError, "no Zarr array or group at the root of store"),
        ("grp.zarr", "nope", FileNotFoundError, "no Zarr array or group at path 'nope'"),
        ("grp.zarr", None, ValueError, r"holds a group; pass path= one of \['a', 'b'\]"),
        ("grp.zarr", "sub", ValueError, "holds a group; pass path= naming an array"),
        ("grp.zarr", 3, TypeError, "path must be None or a string.*got 3 of type int"),
        (1.5, None, TypeError, "store must be .*got 1.5 of type float"),
        ("array", "a", ValueError, "path must be None when store is a zarr.Array"),
    ],
)
def test_open_volume_errors(tmp_path, store, path, exc, match):
    group = zarr.open_group(tmp_path / "grp.zarr", mode="w")
    a = group.create_array("a", shape=(2,), dtype="i1")
    group.create_array("b", shape=(2,), dtype="i1")
    group.create_group("sub")
    if store == "array":
        store = a
    elif isinstance(store, str):
        store = tmp_path / store
    with pytest.raises(exc, match=match):
        open_volume(store, path)
    assert not (tmp_path / "missing.zarr").exists()


# --------------------------------------------------------------------------------------------
# schedulers: a LocalCluster, and the local scheduler without importing distributed
# --------------------------------------------------------------------------------------------


@pytest.mark.cluster
@pytest.mark.needs_dask("Array.reshape")
def test_to_zarr_on_local_cluster(tmp_path, capsys):
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0"
    ) as cluster, distributed.Client(cluster):
        x = da.arange(400, dtype="int32").reshape(20, 20).rechunk(5)
        z = to_zarr(x, tmp_path / "d.zarr", "out", progress=True)
        job = to_zarr(x * 2, tmp_path / "d.zarr", "twice", compute=False)
        distributed.get_client().compute(job).result()
    assert "100% Completed" in capsys.readouterr().out
    np.testing.assert_array_equal(z[:], x.compute())
    twice = open_volume(tmp_path / "d.zarr", "twice")
    np.testing.assert_array_equal(twice.compute(), x.compute() * 2)


@pytest.mark.processes
def test_to_zarr_on_the_local_scheduler_does_not_import_distributed(tmp_path):
    """dask's scheduler lookup imports distributed (0.3 s before the first task of a cold run)
    unless it is handed the local scheduler itself."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, numpy as np, daskpatch as dp\n"
        "x = np.ones((16, 16), np.float32)\n"
        f"dp.to_zarr(dp.apply_patches(x, lambda b: b, 8, 4), {str(tmp_path / 'o.zarr')!r})\n"
        "dp.to_numpy(dp.apply_patches(x, lambda b: b, 8, 4))\n"
        "print('distributed' in sys.modules)\n"
    )
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


@pytest.mark.needs_dask("ZipStore writes from array-expression jobs")
def test_to_zarr_into_a_fresh_zip_store(tmp_path):
    store = zarr.storage.ZipStore(str(tmp_path / "o.zip"), mode="w")
    z = to_zarr(np.arange(64, dtype=np.float32).reshape(8, 8), store, chunks=4)
    np.testing.assert_array_equal(z[...], np.arange(64).reshape(8, 8))
    store.close()
    back = open_volume(zarr.storage.ZipStore(str(tmp_path / "o.zip"), mode="r"))
    np.testing.assert_array_equal(back.compute(), np.arange(64).reshape(8, 8))
