"""The tasks of a :func:`daskpatch.to_zarr` job: write a chunk (with zarr's rule for chunks equal
to the fill value, decided quickly), record it as done, and finally mark the array complete."""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr

from daskpatch.storage import fingerprint as _fingerprint
from daskpatch.storage import lease as _lease
from daskpatch.storage import targets as _targets
from daskpatch.storage import markers as _markers
from daskpatch.storage import storeio as _storeio
from daskpatch.storage.lease import Lease


def write_block(block: np.ndarray, z: zarr.Array, fingerprint: dict, where: str,
                lease: Lease | None = None, block_info: Any = None) -> np.ndarray:
    """Write one block (exactly one Zarr chunk) and then record it as done; first check that
    no other writer replaced the array since this write began."""
    info = block_info[0]
    region = tuple(slice(start, stop) for start, stop in info["array-location"])
    write_task(block, info["chunk-location"], region, z, fingerprint, where, lease)
    return np.ones((1,) * block.ndim, dtype=np.uint8)


def write_task(block: np.ndarray, location: tuple[int, ...], region: tuple[slice, ...],
               z: zarr.Array, fingerprint: dict, where: str, lease: Lease | None = None
               ) -> None:
    """:func:`write_block` for the chunk tasks of a spilled engine that write their chunk
    themselves (:func:`daskpatch._graph.written_engine`)."""
    _fingerprint.check_still_ours(z, fingerprint, where)
    write_chunk(z, region, block)
    if lease is not None:  # still this writer's: only then is the chunk recorded as done
        _lease.check(lease)
    _storeio.put(z.store, _markers.chunk_marker(z, location))


def finalize(z: zarr.Array, fingerprint: dict, where: str, spills: list, written: list[Any],
             lease: Lease | None = None) -> zarr.Array:
    """Runs after every write task: check that no other writer replaced the array meanwhile,
    record it as complete, drop the per-chunk markers and every spilled part under it, and the
    parts of the engines that spilled elsewhere."""
    _fingerprint.check_still_ours(z, fingerprint, where)
    if lease is not None:
        _lease.check(lease, renew=False)
    _markers.mark_complete(z)
    for spill, name in spills:
        spill.clear(name)
    _targets.drop_replaced(z, where)  # the array it replaced, kept until now
    if lease is not None:
        _lease.release(lease)
    return z


def wave_done(z: zarr.Array, fingerprint: dict, where: str, written: list[Any],
              lease: Lease | None = None) -> zarr.Array:
    """Runs after every write task of a wave before the last: check that no other writer
    replaced the array meanwhile and that the lease is still this writer's (the spilled parts
    the next waves read stay)."""
    _fingerprint.check_still_ours(z, fingerprint, where)
    if lease is not None:
        _lease.check(lease)
    return z


def write_chunk(z: zarr.Array, region: tuple[slice, ...], block: np.ndarray) -> None:
    """``z[region] = block`` for one whole chunk, with zarr's own rule for chunks equal to the
    fill value (not stored unless the array's config says ``write_empty_chunks``).

    Zarr decides that by comparing the chunk's bytes with the fill value's on its event loop
    thread (10-40 ms for 27 MiB, while the loop serves no other read or write). A chunk that
    differs from a non-NaN fill value somewhere cannot be equal to it, bit for bit or not; one
    pass over it (a few ms) finds that, and the chunk is then written without zarr's check.

    Examples
    --------
    >>> import zarr
    >>> z = zarr.create_array({}, shape=(4, 4), chunks=(2, 2), dtype="f4")
    >>> write_chunk(z, (slice(0, 2), slice(0, 2)), np.ones((2, 2), "f4"))
    >>> write_chunk(z, (slice(2, 4), slice(0, 2)), np.zeros((2, 2), "f4"))
    >>> z.nchunks_initialized  # the chunk of zeros is not stored, as zarr does
    1
    """
    fill = z.fill_value
    if (not z.async_array.config.write_empty_chunks and block.dtype.kind in "biuf"
            and np.asarray(fill).dtype.kind in "biuf" and not np.isnan(fill)
            and _differs(block, fill)):
        z = z.with_config({"write_empty_chunks": True})
    z[region] = block


def _differs(block: np.ndarray, fill: Any) -> bool:
    """Whether ``block`` holds a value other than ``fill`` (a +0.0 fill: other bits, -0.0 too)."""
    plus_zero = fill == 0 and not np.signbit(fill)
    if block.dtype.kind == "f" and plus_zero and block.flags.c_contiguous:
        return bool(block.view(f"u{block.dtype.itemsize}").any())
    return bool((block != fill).any())
