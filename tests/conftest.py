"""Shared fixtures: oracles, a scheduler that refuses to compute, and a counting Zarr store."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import dask
import numpy as np
import pytest
import zarr
from dask.base import tokenize
from zarr.storage import LocalStore, WrapperStore

from daskpatch import PatchGrid
from daskpatch.geometry.windows import profile


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With dask's array query planning on (``DASK_ARRAY__QUERY_PLANNING=True``), a test marked
    ``needs_dask(feature)`` is expected to fail: dask's array expressions lack ``feature``."""
    import dask.array as da

    if not getattr(da, "array_expr_enabled", lambda: False)():
        return
    for item in items:
        for mark in item.iter_markers("needs_dask"):
            feature = ", ".join(map(str, mark.args)) or "a feature"
            item.add_marker(pytest.mark.xfail(
                reason=f"dask's array query planning lacks {feature}", strict=False))


class ComputeForbidden(AssertionError):
    pass


def _refuse(*args: Any, **kwargs: Any) -> None:
    raise ComputeForbidden("a graph was computed while it was being built")


@pytest.fixture
def setting() -> Iterator[Callable[[str, Any], None]]:
    """``setting("daskpatch.spill-bytes", 0)``: a :mod:`dask.config` setting for the rest of
    the test."""
    with contextlib.ExitStack() as stack:
        yield lambda key, value: stack.enter_context(dask.config.set({key: value}))


@pytest.fixture
def no_compute() -> Iterator[None]:
    """Any compute inside the block fails (the xarray idiom for laziness tests)."""
    with dask.config.set(scheduler=_refuse):
        yield


class CountingStore(WrapperStore):
    """A local store that counts reads of chunk keys (not metadata)."""

    def __init__(self, store: Any) -> None:
        super().__init__(store)
        self.chunk_reads = 0
        self._lock = threading.Lock()

    def _count(self, key: str) -> None:
        if not key.endswith("zarr.json") and not key.endswith((".zarray", ".zattrs", ".zgroup")):
            with self._lock:
                self.chunk_reads += 1

    async def get(self, key: str, *args: Any, **kwargs: Any) -> Any:
        self._count(key)
        return await self._store.get(key, *args, **kwargs)

    async def get_partial_values(self, prototype: Any, key_ranges: Any) -> Any:
        for key, _ in key_ranges:
            self._count(key)
        return await self._store.get_partial_values(prototype, key_ranges)


@pytest.fixture
def counting_zarr(tmp_path: Any) -> Any:
    """Factory: write ``data`` to a Zarr store with ``chunks`` and reopen it through a counter."""

    def make(data: np.ndarray, chunks: tuple[int, ...]) -> tuple[zarr.Array, CountingStore]:
        path = write_zarr(tmp_path / "vol.zarr", data, chunks)
        store = CountingStore(LocalStore(str(path), read_only=True))
        return zarr.open_array(store, mode="r"), store

    return make


def same_task(a: Any, b: Any) -> bool:
    """Two values of graph keys compute the same thing: the same object, or the same token
    (dask's identity of a task), a ``DataNode`` wrapper unwrapped."""
    from dask._task_spec import DataNode

    a, b = (v.value if isinstance(v, DataNode) else v for v in (a, b))
    return a is b or tokenize(a) == tokenize(b)


def shares_only_identical_tasks(graph: Any, other: Any) -> bool:
    """Every key the two graphs both hold has the same task in both (``dict(x.dask)``)."""
    graph, other = dict(graph), dict(other)
    return all(same_task(graph[k], other[k]) for k in graph.keys() & other.keys())


def write_zarr(path: Any, data: np.ndarray, chunks: tuple[int, ...]) -> str:
    """Write ``data`` to a new Zarr array at ``path`` with ``chunks``; return the path."""
    z = zarr.create_array(str(path), shape=data.shape, chunks=chunks, dtype=data.dtype)
    z[...] = data
    return str(path)


# -- NumPy oracles: plain loops over patches, nothing shared with the engine -------------------
def naive_patches(vol: np.ndarray, grid: PatchGrid, pad_mode: str = "reflect") -> np.ndarray:
    padded = np.pad(vol, grid.pad_width, mode=pad_mode)
    return np.stack([padded[sl] for sl in grid])


def _naive_crop_owner(grid: PatchGrid) -> list[np.ndarray]:
    """Per axis, for each voxel, the index of the patch whose centre is nearest (ties: lower)."""
    owners = []
    for a in range(grid.ndim):
        centres = [s + (grid.size[a] - 1) / 2 for s in grid.starts[a]]
        own = []
        for x in range(grid.padded_shape[a]):
            d = [abs(x - c) for c in centres]
            own.append(d.index(min(d)))
        owners.append(np.array(own))
    return owners


def naive_blend(outputs: np.ndarray, grid: PatchGrid, blend: Any, fill: float = np.nan,
                sigma_scale: float = 0.125) -> np.ndarray:
    """sum_i w_i f_i / sum_i w_i over the padded extent with full N-D windows, then cropped.

    ``outputs`` are ``(N, C, *size)``; the result is ``(C, *shape)``.
    """
    channels = outputs.shape[1]
    num = np.zeros((channels,) + grid.padded_shape)
    den = np.zeros(grid.padded_shape)
    owners = _naive_crop_owner(grid) if isinstance(blend, str) and blend == "crop" else None
    for i, sl in enumerate(grid):
        if isinstance(blend, np.ndarray):
            w = blend.astype(np.float64)
        elif blend == "crop":
            gidx = grid.grid_index(i)
            w = np.ones(())
            for a in range(grid.ndim):
                w = np.multiply.outer(w, (owners[a][sl[a]] == gidx[a]).astype(float))
        else:
            w = np.ones(())
            for n in grid.size:
                w = np.multiply.outer(w, profile(blend, n, sigma_scale))
        num[(slice(None),) + sl] += w * outputs[i]
        den[sl] += w
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(den > 0, num / np.where(den > 0, den, 1), fill)
    crop = tuple(slice(0, n) for n in grid.shape)
    return out[(slice(None),) + crop]
