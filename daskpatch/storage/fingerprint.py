"""The fingerprint of everything that determines a written result, stored and checked.

:func:`daskpatch.to_zarr` stores a *fingerprint* (made by :func:`daskpatch.graph.inspect.fingerprint`)
in the output's ``attrs["daskpatch"]``: shape, dtype, chunks, the overlap-add parameters of every
engine in the graph, the inputs the graph reads and a user-given ``run_id``. ``resume=True``
refuses an array whose fingerprint differs (naming the first parameter that differs), and every
write task checks that no other writer replaced the array meanwhile.
"""

from __future__ import annotations

import json
import math
from typing import Any

import dask.array as da
import numpy as np
import zarr

from daskpatch.errors import ResumeMismatchError
from daskpatch.storage.storeio import get
from daskpatch.storage.stores import ATTR, _join
from daskpatch.storage.markers import stored_fingerprint


def jsonable(value: Any) -> Any:
    """``value`` as JSON-ready values (NumPy scalars as Python numbers, tuples as lists)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # NaN and inf are not JSON
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)




def _flat(fp: dict[str, Any], other: dict[str, Any]) -> list[tuple[str, Any]]:
    """The fingerprint's parameters in the order a difference is named: the causes (the
    pipeline, its parameters and model, the user's operations, ``run_id``) before what follows
    from them or restates them (the shape and dtype, the inputs, the chunks)."""
    out = [(k, fp.get(k)) for k in ("format", "pipeline")]
    engines = fp.get("engines") or []
    if fp.get("pipeline") == other.get("pipeline"):
        for i, params in enumerate(engines):
            label = "" if len(engines) == 1 else f"{params.get('kind')} #{i + 1} "
            keys = list(params) + [k for k in (other.get("engines") or [{}] * len(engines))[i]
                                   if k not in params]
            out.extend((label + k, params.get(k)) for k in keys if k != "kind")
    out += [("operations", fp.get("operations") or []), ("run_id", fp.get("run_id"))]
    out += [("shape", fp.get("shape")), ("dtype", fp.get("dtype")), ("input", fp.get("inputs")),
            ("chunks", fp.get("chunks"))]
    return out


def _show(value: Any) -> str:
    if isinstance(value, list):
        if value and all(isinstance(v, dict) for v in value):
            return "[" + ", ".join(_show(v) for v in value) + "]"
        return "(" + ", ".join(_show(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    return repr(value)


def first_difference(old: dict[str, Any], new: dict[str, Any]) -> tuple[str, Any, Any] | None:
    # a name may come twice (an engine's dtype, then the array's: they differ when the result
    # is cast after the engine, as each head of a model with several heads is): compare the
    # first with the first, the second with the second
    a, b = _numbered(_flat(old, new)), _numbered(_flat(new, old))
    for key, value in a.items():
        if value != b.get(key):
            return key[0], value, b.get(key)
    for key, value in b.items():  # a parameter only the new fingerprint has
        if key not in a:
            return key[0], None, value
    return None


def _numbered(pairs: list[tuple[str, Any]]) -> dict[tuple[str, int], Any]:
    seen: dict[str, int] = {}
    out = {}
    for name, value in pairs:
        out[name, seen.get(name, 0)] = value
        seen[name] = seen.get(name, 0) + 1
    return out


def record(fp: dict[str, Any]) -> dict[str, Any]:
    """The ``attrs["daskpatch"]`` value of a new output."""
    return {"fingerprint": fp,
            "note": "written by daskpatch.to_zarr; resume=True checks this fingerprint"}


def check_fingerprint(z: zarr.Array, fp: dict[str, Any], where: str,
                      causes_only: bool = False) -> None:
    """Refuse to resume an array written with other parameters, naming the first difference
    (``causes_only``: only a difference in what determines the result -- the pipeline, its
    parameters, model and inputs, ``run_id`` -- not in the shape, dtype or chunks alone)."""
    old = stored_fingerprint(z)
    if old is None:
        raise ResumeMismatchError(
            f"resume=True needs an array written by daskpatch.to_zarr, which records its "
            f"parameters in attrs[{ATTR!r}]; {where} has no such record (written by another "
            "tool, or by an older daskpatch), so its chunks cannot be trusted to match. Pass "
            "overwrite=True to start again", param="resume", value=True
        )
    diff = first_difference(old, fp)
    if diff is not None and not (causes_only and diff[0] in ("shape", "dtype", "chunks")):
        name, was, now = diff
        hint = ""
        if name == "model":
            hint = (" (a model is fingerprinted by what is the same in every process: a torch "
                    "module's class and parameters, a function's name and code, the command "
                    "line's --model file; what cannot be, by run_id)")
        raise ResumeMismatchError(
            f"resume=True: {where} was written with {name}={_show(was)}, but this call has "
            f"{name}={_show(now)} (the first parameter that differs){hint}; resuming would mix "
            "chunks of two different results. Resume with the same parameters (and run_id), or "
            "pass overwrite=True to start again", param=name, stored=was, value=now
        )


def current_fingerprint(z: zarr.Array) -> dict[str, Any] | None:
    """The fingerprint in the store now (one small read of the array's ``zarr.json``)."""
    raw = get(z.store, _join(z.path, "zarr.json"))
    try:
        attrs = json.loads(raw or b"null")["attributes"]
        return attrs[ATTR]["fingerprint"]
    except (ValueError, TypeError, KeyError):
        return None


def check_still_ours(z: zarr.Array, fp: dict[str, Any], where: str) -> None:
    """Refuse to go on when another writer replaced the array (and its fingerprint) since this
    write began: checked before each chunk is written and before the array is marked complete."""
    now = current_fingerprint(z)
    if now != fp:
        diff = first_difference(fp, now) if now is not None else ("fingerprint", fp, None)
        name, mine, theirs = diff or ("fingerprint", fp, now)
        raise ValueError(
            f"to_zarr: {where} was rewritten by another writer while this one ran (its {name} "
            f"is now {_show(theirs)}, this call's is {_show(mine)}); this write stops here and "
            "does not touch it further. Run one writer at a time per array"
        )


def _codecs(codecs: Any) -> str:
    """Codecs as their JSON names and settings, e.g. ``[zstd(level=0, checksum=False)]``."""
    shown = []
    for codec in codecs:
        d = codec.to_dict()
        conf = ", ".join(f"{k}={v}" for k, v in d.get("configuration", {}).items())
        shown.append(f"{d['name']}({conf})")
    return "[" + ", ".join(shown) + "]"


def check_resumable(z: zarr.Array, x: da.Array, chunks: tuple[int, ...], compressors: tuple,
                    where: str) -> None:
    """Refuse to resume an array whose shape, dtype, chunks, compressors or sharding differ
    from this write's."""
    problems = []
    first: list[tuple[str, Any, Any]] = []  # (param, stored, given) of each problem
    if tuple(z.shape) != tuple(x.shape):
        problems.append(f"shape {tuple(z.shape)} (this write: {tuple(x.shape)})")
        first.append(("shape", tuple(z.shape), tuple(x.shape)))
    if np.dtype(z.dtype) != x.dtype:
        problems.append(f"dtype {np.dtype(z.dtype)} (this write: {x.dtype})")
        first.append(("dtype", np.dtype(z.dtype), x.dtype))
    if tuple(z.chunks) != chunks:
        problems.append(f"chunks {tuple(z.chunks)} (this write: {chunks}; pass chunks= to match)")
        first.append(("chunks", tuple(z.chunks), chunks))
    if z.metadata.zarr_format == 3 and tuple(z.compressors) != tuple(compressors):
        problems.append(f"compressors {_codecs(z.compressors)} (this write: "
                        f"{_codecs(compressors)}; pass the same compressors=, or --compressor)")
        first.append(("compressors", tuple(z.compressors), tuple(compressors)))
    if getattr(z, "shards", None) is not None:
        problems.append(f"shards {z.shards} (to_zarr writes unsharded arrays)")
        first.append(("shards", z.shards, None))
    if problems:
        param, stored, given = first[0]
        raise ResumeMismatchError(
            f"resume=True needs the existing array at {where} to match this write, but it has "
            + "; ".join(problems)
            + ". Pass overwrite=True to start again.", param=param, stored=stored, value=given
        )
