"""Spilled halos (issue 12, out of core): only the halo faces reach the store, each is deleted
once its chunk has read it, and the results are identical to the in-memory path."""

from __future__ import annotations

import itertools
import math

import dask
import numpy as np
import pytest
import zarr

import daskpatch as dp
from daskpatch import PatchGrid

SPILL = ".daskpatch-spill/"


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
