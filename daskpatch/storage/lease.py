"""One writer at a time per output: a lease kept in the store beside the array.

:func:`acquire` writes ``<array>/.daskpatch-lease`` (a token, the writer's host and process, and
an expiry) before :func:`daskpatch.to_zarr` creates, clears or resumes anything, and refuses a
second writer while another's lease is live (:class:`~daskpatch.errors.WriterConflictError`).
Every chunk task checks the token before it records its chunk as done (:func:`check`) and
refreshes the expiry once half of it has passed, so a writer whose lease another took over
stops before its next chunk. The lease is released when the array is complete.

Limits. A store is not a lock server: two writers starting in the same instant can both write
a lease; each reads it back and only the one whose token stands goes on (the other is refused
then, or stops at its first chunk). A lease whose writer died is taken over once it expires
(``daskpatch.lease-seconds``, default 600), at once when that writer was a process on this host
that no longer runs. A chunk may be written by a writer that lost its lease in the moment
between its check and its write; it is never recorded as done by it.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

from daskpatch.config import get_int
from daskpatch.errors import WriterConflictError
from daskpatch.storage.storeio import delete, get, put
from daskpatch.storage.stores import LEASE_KEY, _join


@dataclass(frozen=True)
class Lease:
    """This writer's lease on the array at ``path`` of ``store`` (``where`` names it)."""

    store: Any
    path: str | None
    token: str
    where: str

    @property
    def key(self) -> str:
        return _join(self.path, LEASE_KEY)


def _read(store: Any, key: str) -> dict[str, Any] | None:
    raw = get(store, key)
    if raw is None:
        return None
    try:
        out = json.loads(raw)
    except ValueError:
        return None
    return out if isinstance(out, dict) else None


def _holder(record: dict[str, Any]) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("since", 0)))
    return f"process {record.get('pid')} on {record.get('host')!r}, since {since}"


def _live(record: dict[str, Any]) -> bool:
    """Whether another writer's lease still holds: not expired, and not of a process of this
    host that has ended."""
    if float(record.get("expires", 0)) < time.time():
        return False
    if record.get("host") == socket.gethostname():
        try:
            os.kill(int(record.get("pid", -1)), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, ValueError, OverflowError):
            return True
    return True


def _write(lease: Lease, since: float) -> None:
    record = {"token": lease.token, "host": socket.gethostname(), "pid": os.getpid(),
              "since": since, "expires": time.time() + get_int("lease-seconds")}
    put(lease.store, lease.key, json.dumps(record).encode())


def acquire(store: Any, path: str | None, where: str) -> Lease:
    """Take the lease on the array at ``path`` of ``store``, or refuse: another writer's live
    lease there raises :class:`~daskpatch.errors.WriterConflictError` (nothing written)."""
    lease = Lease(store, path, uuid.uuid4().hex, where)
    record = _read(store, lease.key)
    if record is not None and _live(record):
        raise WriterConflictError(
            f"to_zarr: another writer is writing {where} ({_holder(record)}); run one writer "
            "at a time per array: wait for it to finish (or stop it), then resume=True. A lease "
            "whose writer died expires after the daskpatch.lease-seconds setting",
            holder=_holder(record), value=where)
    _write(lease, time.time())
    check(lease, renew=False)  # two writers at the same instant: the one whose token stands
    return lease


def check(lease: Lease, renew: bool = True) -> None:
    """Refuse to go on when the lease is no longer this writer's (another took it over, or it
    was deleted with the array); refresh it once half its time has passed."""
    record = _read(lease.store, lease.key)
    if record is None or record.get("token") != lease.token:
        who = _holder(record) if record is not None else "the lease is gone"
        raise WriterConflictError(
            f"to_zarr: {lease.where} was taken over by another writer ({who}) while this one "
            "ran; this write stops here and does not record its chunk. Run one writer at a time "
            "per array", holder=who, value=lease.where)
    if renew and float(record.get("expires", 0)) - time.time() < get_int("lease-seconds") / 2:
        _write(lease, float(record.get("since", time.time())))


def rewrite(lease: Lease) -> None:
    """Write the lease again (after the array's old entries were cleared with it)."""
    _write(lease, time.time())


def release(lease: Lease) -> None:
    """Give the lease up (if it is still this writer's)."""
    record = _read(lease.store, lease.key)
    if record is not None and record.get("token") == lease.token:
        delete(lease.store, lease.key)
