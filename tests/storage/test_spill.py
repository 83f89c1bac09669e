"""Spilled halos (out of core): only the halo faces reach the store, each is deleted once its
chunk has read it, to_zarr spills into the output store (never into memory), resumes a spilled
run, and the results are identical to the in-memory path."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import dask
import numpy as np
import pytest
import zarr

import daskpatch as dp
from daskpatch import PatchGrid
from daskpatch.io import to_zarr
from daskpatch.storage.spill import Spill

from ..conftest import same_task

SPILL = ".daskpatch-spill/"
SMALL = np.random.default_rng(3).random((16, 16, 16)).astype(np.float32)


class Recording(zarr.storage.WrapperStore):
    """Records the spilled parts written and deleted through it, and their bytes (class-level
    state: zarr re-wraps stores)."""

    live: dict[str, int] = {}
    written = 0
    peak = 0
    keys: list[str] = []

    @classmethod
    def reset(cls) -> None:
        cls.live, cls.written, cls.peak, cls.keys = {}, 0, 0, []

    async def set(self, key, value, *args, **kwargs):
        if key.startswith(SPILL):
            cls = Recording
            cls.keys.append(key)
            cls.live[key] = len(value)
            cls.written += len(value)
            cls.peak = max(cls.peak, sum(cls.live.values()))
        return await self._store.set(key, value, *args, **kwargs)

    async def delete(self, key):
        Recording.live.pop(key, None)
        return await self._store.delete(key)


def _halo_bytes(shape, size, stride, block, channels=1, itemsize=4):
    """The bytes of every block's buffer that fall outside its own chunk (the halo faces)."""
    plan = PatchGrid(shape, size, stride).block_plan(block)
    total = 0
    for bidx in itertools.product(*[range(n) for n in plan.nblocks]):
        if not plan.has_patches(bidx):
            continue
        ext = [plan.ext[a][b] for a, b in enumerate(bidx)]
        own = [(max(lo, b * k), min(hi, (b + 1) * k)) for (lo, hi), b, k in zip(ext, bidx, block)]
        total += math.prod(hi - lo for lo, hi in ext) - math.prod(hi - lo for lo, hi in own)
    return total * channels * itemsize


def test_to_zarr_spills_only_the_halo_faces_and_deletes_each_once_read(tmp_path, setting):
    vol = np.random.default_rng(3).random((96, 96, 64)).astype(np.float32)  # 6 x 6 x 4 blocks
    expected = dp.apply_patches(vol, np.sqrt, 16, 8, block_shape=16, spill=False).compute()
    setting("daskpatch.spill-bytes", 0)
    Recording.reset()
    store = Recording(zarr.storage.LocalStore(str(tmp_path / "o.zarr")))
    with dask.config.set(scheduler="sync"):
        z = dp.to_zarr(dp.apply_patches(vol, np.sqrt, 16, 8, block_shape=16), store)
    np.testing.assert_array_equal(z[...], expected)
    halo = _halo_bytes(vol.shape, 16, 8, (16, 16, 16))
    # the halo faces, nothing of a block's own chunk (each part is "<block>-<target chunk>")
    assert Recording.written == halo
    assert all(k.rsplit("/", 1)[1].split("-")[0] != k.rsplit("/", 1)[1].split("-")[1]
               for k in Recording.keys)
    # parts are deleted as their chunks are summed, and blocks run in the order of the chunks:
    # what waits on disk is a wave of blocks' halos, not the volume's (here 1/8 of it)
    assert Recording.peak <= halo / 4
    assert not [p for p in (tmp_path / "o.zarr").rglob("*") if p.is_file()
                and SPILL in str(p.relative_to(tmp_path / "o.zarr")) + "/"]


def test_an_explicit_spill_directory_is_empty_after_compute(tmp_path):
    vol = np.random.default_rng(4).random((40, 36, 28)).astype(np.float32)
    in_memory = dp.apply_patches(vol, np.sqrt, 16, 8, block_shape=16, spill=False).compute()
    spill = tmp_path / "halos"
    out = dp.apply_patches(vol, np.sqrt, 16, 8, block_shape=16, spill=spill)
    np.testing.assert_array_equal(out.compute(), in_memory)
    np.testing.assert_array_equal(out.compute(), in_memory)  # again: the blocks rewrite them
    assert not [p for p in spill.rglob("*") if p.is_file()]


def _identity_scaled(b):
    return (b * 1.5).astype(np.float32)


@pytest.mark.parametrize("blend", ["gaussian", "constant", "hann", "triangular", "crop", "user"])
@pytest.mark.parametrize("case", ["3d", "2d", "channels", "uint8"])
def test_spilled_results_are_identical_to_the_in_memory_ones(tmp_path, blend, case, setting):
    rng = np.random.default_rng(11)
    kw: dict = {"block_shape": 16}
    if case == "2d":
        vol, size, stride = rng.random((70, 52)).astype(np.float32), (16, 12), (8, 6)
        kw["block_shape"] = (16, 18)
    elif case == "channels":
        vol, size, stride = rng.random((2, 40, 36, 28)).astype(np.float32), 16, 8
        kw.update(channel_axis=0, out_channels=2)
    else:
        vol, size, stride = rng.random((40, 36, 28)).astype(np.float32), 16, (8, 6, 8)
        kw["block_shape"] = (16, 12, 16)
    if case == "uint8":
        kw["dtype"] = "uint8"
        vol = vol * 200
    if blend == "user":
        shape = (size,) * 3 if isinstance(size, int) else size
        window = np.random.default_rng(2).random(shape) + 0.1
        kw["blend"] = window
    else:
        kw["blend"] = blend
    fn = _identity_scaled if case != "channels" else (lambda b: b[:, ::-1] * 2)
    in_memory = dp.apply_patches(vol, fn, size, stride, spill=False, **kw).compute()
    spilled = dp.apply_patches(vol, fn, size, stride, spill=tmp_path / "s", **kw)
    np.testing.assert_array_equal(spilled.compute(scheduler="threads"), in_memory)
    setting("daskpatch.spill-bytes", 0)
    z = dp.to_zarr(dp.apply_patches(vol, fn, size, stride, **kw), tmp_path / "o.zarr")
    np.testing.assert_array_equal(z[...], in_memory)
    assert not [p for p in (tmp_path / "o.zarr").rglob("*") if p.is_file()
                and ".daskpatch-spill" in str(p)]


class WritesStore(zarr.storage.WrapperStore):
    """Records every key written through it (class-level list: zarr re-wraps stores)."""

    written: list[str] = []

    async def set(self, key, value, *args, **kwargs):
        WritesStore.written.append(key)
        return await self._store.set(key, value, *args, **kwargs)


def _engine_case():
    import daskpatch as dp

    vol = np.random.default_rng(7).random((40, 36, 28)).astype(np.float32)
    expected = dp.apply_patches(vol, np.sqrt, 16, 8, block_shape=16, spill=False).compute()
    return dp, vol, expected


@pytest.mark.parametrize("threshold, spills", [(0, True), (None, False)])
def test_to_zarr_spills_large_halos_into_the_output_and_deletes_them(
        tmp_path, threshold, spills, setting):
    dp, vol, expected = _engine_case()
    if threshold is not None:
        setting("daskpatch.spill-bytes", threshold)
    WritesStore.written = []
    store = WritesStore(zarr.storage.LocalStore(str(tmp_path / "o.zarr")))
    out = dp.apply_patches(vol, np.sqrt, 16, 8, block_shape=16)
    graph = dict(out.dask)
    z = to_zarr(out, store, "pred")
    spilled = [k for k in WritesStore.written if k.startswith("pred/.daskpatch-spill/")]
    assert bool(spilled) == spills  # the default threshold (128 MiB) is far above this volume
    if spills:
        assert len(spilled) == 32 - 4  # the parts of the 4 blocks but their own
    assert not (tmp_path / "o.zarr" / "pred" / ".daskpatch-spill").exists() or not any(
        (tmp_path / "o.zarr" / "pred" / ".daskpatch-spill").rglob("*.*"))
    np.testing.assert_array_equal(z[...], expected)
    # the user's array is untouched: the same tasks, and computing it keeps halos in memory
    after = dict(out.dask)
    assert after.keys() == graph.keys() and all(same_task(after[k], graph[k]) for k in graph)
    WritesStore.written = []
    np.testing.assert_array_equal(out.compute(), expected)
    assert WritesStore.written == []


@pytest.mark.needs_dask("NumPy scalar promotion (float32 + 1 stays float32)")
def test_to_zarr_never_spills_with_spill_false_and_deletes_explicit_parts(tmp_path, setting):
    dp, vol, expected = _engine_case()
    setting("daskpatch.spill-bytes", 0)
    WritesStore.written = []
    store = WritesStore(zarr.storage.LocalStore(str(tmp_path / "o.zarr")))
    z = to_zarr(dp.apply_patches(vol, np.sqrt, 16, 8, block_shape=16, spill=False), store)
    assert not [k for k in WritesStore.written if ".daskpatch-spill" in k]
    np.testing.assert_array_equal(z[...], expected)
    # an explicit spill directory: used, then emptied by to_zarr (compute alone leaves it)
    halos = tmp_path / "halos"
    out = dp.apply_patches(vol, np.sqrt, 16, 8, block_shape=16, spill=halos) + 1
    z = to_zarr(out, tmp_path / "e.zarr", compute=False).compute()
    np.testing.assert_array_equal(z[...], expected + 1)
    assert halos.exists() and not [p for p in halos.rglob("*") if p.is_file()]


def test_to_zarr_resumes_a_spilled_engine(tmp_path, setting):
    dp, vol, expected = _engine_case()
    setting("daskpatch.spill-bytes", 0)
    target = tmp_path / "r.zarr"
    calls = Counter()

    def flaky(batch):
        calls["n"] += 1
        if calls["n"] == 30:  # 48 patches, 12 per block: mid-run
            raise RuntimeError("simulated crash")
        return np.sqrt(batch)

    out = dp.apply_patches(vol, flaky, 16, 8, block_shape=16)
    with dask.config.set(scheduler="synchronous"), pytest.raises(RuntimeError, match="simulated"):
        to_zarr(out, target)
    assert any((target / ".daskpatch-spill").rglob("*"))  # parts of the interrupted run
    with dask.config.set(scheduler="synchronous"):
        z = to_zarr(out, target, resume=True)
    np.testing.assert_array_equal(z[...], expected)
    assert not [p for p in (target / ".daskpatch-spill").rglob("*") if p.is_file()]


def test_to_zarr_does_not_spill_into_a_store_in_memory(monkeypatch, setting):
    dp, vol, expected = _engine_case()
    setting("daskpatch.spill-bytes", 0)
    puts = []
    monkeypatch.setattr(Spill, "put", lambda self, key, data: puts.append(key))
    z = to_zarr(dp.apply_patches(vol, np.sqrt, 16, 8, block_shape=16), zarr.storage.MemoryStore())
    np.testing.assert_array_equal(z[...], expected)
    assert puts == []  # parts in RAM would wait there until the end, instead of being freed


def test_spilled_engine_under_a_rechunk(tmp_path, monkeypatch, setting):
    dp, vol, expected = _engine_case()
    setting("daskpatch.spill-bytes", 0)
    puts = []
    put = Spill.put
    monkeypatch.setattr(Spill, "put",
                        lambda self, key, data: (puts.append(key), put(self, key, data)))
    out = dp.apply_patches(vol, np.sqrt, 16, 8, block_shape=16) * 2
    z = to_zarr(out, tmp_path / "r.zarr", chunks=(10, 12, 7))  # not the engine's chunks
    assert z.chunks == (10, 12, 7) and puts  # the engine under the rechunk still spilled
    np.testing.assert_array_equal(z[...], expected * 2)


def test_spilled_halos_give_the_same_result(tmp_path):
    vol = np.random.default_rng(5).random((40, 36, 28)).astype(np.float32)
    in_memory = dp.apply_patches(vol, np.sqrt, 16, 8, block_shape=16).compute()
    spill = tmp_path / "halos"
    out = dp.apply_patches(vol, np.sqrt, 16, 8, block_shape=16, spill=spill)
    assert not spill.exists()  # nothing written while building
    np.testing.assert_array_equal(out.compute(), in_memory)
    (engine_dir,) = spill.iterdir()
    assert not list(engine_dir.iterdir())  # each halo part deleted once its chunk read it
    p = dp.extract_patches(vol, 16, 8)
    back = dp.reconstruct(p, vol.shape, 16, 8, block_shape=16, spill=True)
    np.testing.assert_allclose(back.compute(), vol, atol=1e-6)


def test_a_spill_directory_that_cannot_be_written_is_refused_when_the_graph_is_built(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"spill must be a directory .*got '.*/file/halos', but "
                                         r"'.*/file' is a file"):
        dp.apply_patches(SMALL, np.sqrt, 8, 4, spill=tmp_path / "file" / "halos")
    with pytest.raises(ValueError, match=r"spill must be a directory .*got '/proc/daskpatch', "
                                         r"but '/proc' cannot be written"):
        dp.reconstruct(dp.extract_patches(SMALL, 8, 4), SMALL.shape, 8, 4,
                       spill="/proc/daskpatch")
    out = dp.apply_patches(SMALL, np.sqrt, 8, 4, spill=tmp_path / "new" / "halos")
    assert not (tmp_path / "new").exists()  # a directory yet to be made is fine; nothing made
    np.testing.assert_allclose(out.compute(), np.sqrt(SMALL), rtol=1e-6)
