"""``daskpatch info``: what a Zarr store holds, and what ``apply`` over it would cost.

The store's description (shape, dtype, chunks, codecs), the OME-Zarr axes and levels of an
image group, the members of a plain group, whether daskpatch wrote it completely (its
done-markers), stride alignment, and the plan of a run: patches, blocks, tasks and an estimated
peak memory (the graph is built, never run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import dask
import numpy as np
import zarr
from dask.utils import format_bytes

from daskpatch.storage import markers as _markers
from daskpatch.storage.fingerprint import jsonable
from daskpatch.cli.errors import UsageError as _UsageError
from daskpatch.adapters.threads import thread_plan
from daskpatch.engine.numbers import acc_dtype
from daskpatch.patches import apply_patches
from daskpatch.geometry.layout import describe_axes, full_grid, parse_layout
from daskpatch.storage.stores import parse_path as _parse_path
from daskpatch.storage.stores import probe as _probe
from daskpatch.storage.stores import resolve_store as _resolve_store
from daskpatch.storage.stores import where as _where
from daskpatch.io import open_volume
from daskpatch.rechunk import aligned_chunks, is_stride_aligned

__all__ = ["axes_line", "cmd_info", "shape_text"]


def axes_line(shape: Sequence[int], size: Any, channel_axis: Any,
              out_channels: int | None = None, out_scale: Any = None) -> str:
    """The one line ``apply`` (and ``info``) prints before any work: how the volume's axes are
    read (channel, batch, spatial), the patch dimensionality, and what the model gets and
    returns where that differs from the volume.

    Examples
    --------
    >>> axes_line((40, 36, 32), 16, None)
    'daskpatch: the 3-D volume of shape (40, 36, 32) is read as spatial axes 0, 1, 2 (40, 36, 32) (no channel axis): 3-D patches'
    >>> axes_line((40, 36), 16, None, out_channels=3, out_scale=2).split(": ", 2)[2]
    '2-D patches; the model gets 1 channel and returns 3; output patches at out_scale=2'
    """
    layout = parse_layout(len(shape), size, channel_axis, shape=tuple(shape))
    axes = describe_axes(len(shape), layout.channel_axis, layout.n_batch, tuple(shape))
    extra = ""
    if layout.channel_axis is None and (out_channels or 1) > 1:
        extra = f"; the model gets 1 channel and returns {out_channels}"
    if out_scale is not None:
        values = out_scale if isinstance(out_scale, (tuple, list)) else (out_scale,)
        text = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)
        extra += f"; output patches at out_scale={text}"
    return f"daskpatch: {axes}: {len(layout.spatial_axes)}-D patches{extra}"


def _open_node(store: str, path: str | None) -> zarr.Array | zarr.Group:
    base, full = _resolve_store(store, _parse_path(path))
    node = _probe(base, full)
    if node is None:
        raise _UsageError(f"no Zarr array or group at {_where(base, full)}")
    return node


def _write_status(z: zarr.Array) -> dict[str, Any]:
    """Whether :func:`daskpatch.to_zarr` wrote ``z`` completely, from its fingerprint and
    done-markers.

    ``status`` is ``"complete"``, ``"incomplete"`` (with ``chunks_done`` of ``chunks_total``)
    or ``"not-daskpatch"`` (no fingerprint: written by something else).
    """
    grid = _markers.numblocks(z)
    total = math.prod(grid)
    if _markers.stored_fingerprint(z) is None:
        return {"status": "not-daskpatch", "chunks_done": None, "chunks_total": total}
    done = _markers.done_chunks(z, grid)
    if done is None:
        return {"status": "complete", "chunks_done": total, "chunks_total": total}
    return {"status": "incomplete", "chunks_done": len(done), "chunks_total": total}



def _codecs(z: zarr.Array) -> list[dict[str, Any]]:
    out = []
    for c in (*z.filters, z.serializer, *z.compressors):
        if c is None:
            continue
        if hasattr(c, "to_dict"):
            d = c.to_dict()
            out.append({"name": d.get("name"), "configuration": d.get("configuration", {})})
        elif hasattr(c, "get_config"):  # numcodecs (Zarr format 2)
            conf = dict(c.get_config())
            out.append({"name": conf.pop("id", type(c).__name__), "configuration": conf})
        else:
            out.append({"name": type(c).__name__, "configuration": {}})
    return jsonable(out)


def _array_report(z: zarr.Array) -> dict[str, Any]:
    dtype = np.dtype(z.dtype)
    chunk_bytes = math.prod(z.chunks) * dtype.itemsize
    dims = getattr(z.metadata, "dimension_names", None)
    return jsonable({
        "shape": list(z.shape), "dtype": str(dtype), "chunks": list(z.chunks),
        "shards": None if z.shards is None else list(z.shards),
        "zarr_format": z.metadata.zarr_format, "codecs": _codecs(z),
        "fill_value": z.fill_value, "dimension_names": None if dims is None else list(dims),
        "nbytes": math.prod(z.shape) * dtype.itemsize, "chunk_bytes": chunk_bytes,
        "nchunks": math.prod(-(-s // c) for s, c in zip(z.shape, z.chunks)),
    })


def _ome(group: zarr.Group) -> dict[str, Any] | None:
    """OME-Zarr multiscales metadata of an image group (NGFF 0.4 or 0.5), or ``None``."""
    attrs: dict[str, Any] = dict(group.attrs.asdict())
    meta: dict[str, Any] = attrs["ome"] if isinstance(attrs.get("ome"), dict) else attrs  # 0.5
    multiscales = meta.get("multiscales")
    if not multiscales or not isinstance(multiscales, list):
        return None
    ms = multiscales[0]
    axes = [a if isinstance(a, dict) else {"name": a} for a in ms.get("axes", [])]
    levels = []
    for ds in ms.get("datasets", []):
        level: dict[str, Any] = {"path": ds.get("path")}
        for t in ds.get("coordinateTransformations", []):
            if t.get("type") in ("scale", "translation"):
                level[t["type"]] = t.get(t["type"])
        node = _probe(group.store, "/".join(p for p in (group.path, ds.get("path")) if p))
        if isinstance(node, zarr.Array):
            level.update(shape=list(node.shape), dtype=str(np.dtype(node.dtype)),
                         chunks=list(node.chunks))
        levels.append(level)
    return jsonable({"version": meta.get("version", ms.get("version")), "name": ms.get("name"),
                      "axes": axes, "levels": levels})


def _members(group: zarr.Group) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for name, node in sorted(group.members(), key=lambda m: m[0]):
        if isinstance(node, zarr.Array):
            out.append({"name": name, "kind": "array", "shape": list(node.shape),
                        "dtype": str(np.dtype(node.dtype)), "chunks": list(node.chunks)})
        else:
            out.append({"name": name, "kind": "group"})
    return out


def _identity(batch: np.ndarray) -> np.ndarray:
    return batch


def _threads(workers: int | None) -> int:
    return workers or dask.config.get("num_workers", None) or os.cpu_count() or 1


def _plan_report(z: zarr.Array, args: argparse.Namespace) -> dict[str, Any]:
    """What ``apply`` with the same options would build: the graph is built, never run."""
    if args.out_scale == "infer":
        raise _UsageError("info runs no model, so it cannot infer the scale: give --out-scale "
                          "as numbers (2, or 1,0.5,0.5)")
    layout = parse_layout(z.ndim, args.size, args.channel_axis)
    ch = layout.channel_axis
    shape = tuple(z.shape)
    grid_shape = shape if ch is None else shape[:ch] + shape[ch + 1:]
    grid = full_grid(grid_shape, layout.n_batch, args.size, args.stride, args.border)
    result = apply_patches(
        open_volume(z), _identity, args.size, args.stride, border=args.border, blend=args.blend,
        batch_size=args.batch_size or 1, channel_axis=args.channel_axis,
        out_channels=args.out_channels, dtype=args.dtype, block_shape=args.block_shape,
        fill_value=0.0 if grid.uncovered else None, out_scale=args.out_scale,
    )
    if ch is None and (args.out_channels or 1) > 1:
        ch = 0  # one channel in, K out: the result has a channel axis in front
    chunks = [c for a, c in enumerate(result.chunks) if a != ch]
    block = tuple(c[0] for c in chunks)  # in output voxels
    nblocks = tuple(len(c) for c in chunks)
    # per non-channel axis, output voxels per input voxel (1 on batch axes)
    out_grid = tuple(n for a, n in enumerate(result.shape) if a != ch)
    scale = tuple(o / n for o, n in zip(out_grid, grid.shape))
    cin = 1 if layout.channel_axis is None else shape[layout.channel_axis]
    cout = args.out_channels or cin
    in_bytes = np.dtype(z.dtype).itemsize
    acc_bytes = acc_dtype(result.dtype, copy=args.blend == "crop").itemsize  # as the engine
    halo = [z_ - s for z_, s in zip(grid.size, grid.stride)]
    ext_in = math.prod(min(round(b / f) + h, n)
                       for b, f, h, n in zip(block, scale, halo, grid.padded_shape))
    ext_out = math.prod(min(b + round(h * f), round(n * f))
                        for b, f, h, n in zip(block, scale, halo, grid.padded_shape))
    out_patch = math.prod(round(z_ * f) for z_, f in zip(grid.size, scale))
    per_task = {
        "input": ext_in * cin * in_bytes,
        "buffer": ext_out * cout * acc_bytes,
        "batch": (args.batch_size or 1) * (math.prod(grid.size) * cin * in_bytes
                                    + out_patch * cout * 4),
    }
    threads = _threads(args.workers)
    n_chunks = math.prod(nblocks)
    return jsonable({
        "size": list(grid.size[layout.n_batch:]), "stride": list(grid.stride[layout.n_batch:]),
        "border": args.border, "patches": len(grid), "patch_grid": list(grid.grid_shape),
        "uncovered_voxels": grid.uncovered, "block_shape": list(block), "blocks": n_chunks,
        "block_grid": list(nblocks), "tasks": len(result.dask) + n_chunks + 1,
        "out_dtype": str(result.dtype), "out_channels": cout, "threads": threads,
        "out_shape": list(result.shape), "out_scale": list(scale[layout.n_batch:]),
        "memory_per_thread": per_task, "peak_memory": threads * sum(per_task.values()),
        "memory_formula": "threads x (input block+halo + extended accumulation buffer + batch)",
        "thread_plan": thread_plan(threads),
    })


def cmd_info(args: argparse.Namespace) -> int:
    node = _open_node(args.store, args.path)
    report: dict[str, Any] = {"store": getattr(args, "store_given", args.store),
                              "path": args.path}
    array: zarr.Array | None = None
    if isinstance(node, zarr.Array):
        report["node"] = "array"
        array = node
    else:
        ome = _ome(node)
        if ome is not None and ome["levels"]:
            report["node"] = "ome-zarr image"
            report["ome"] = ome
            first = ome["levels"][0]["path"]
            level0 = _probe(node.store, "/".join(p for p in (node.path, first) if p))
            array = level0 if isinstance(level0, zarr.Array) else None
            report["level"] = first
        else:
            report["node"] = "group"
            report["members"] = _members(node)
            marker = node.attrs.get("daskpatch")
            if isinstance(marker, dict) and marker.get("complete") is False:
                report["node"] = "incomplete ome-zarr image"
                report["write"] = {"complete": False, "levels": marker.get("levels")}
    if array is not None:  # how apply would read the axes, before any work
        line = axes_line(array.shape, args.size, args.channel_axis, args.out_channels,
                         args.out_scale)
        if args.json:
            report["axes"] = line.removeprefix("daskpatch: ")
        else:
            print(line, flush=True)
    if array is None:
        if args.size is not None or args.stride is not None:
            names = [m["name"] for m in report.get("members", []) if m["kind"] == "array"]
            raise _UsageError(f"{args.store!r} holds a group; pass --path naming an array "
                              f"(one of {names})")
        report.update(shape=None, dtype=None, chunks=None)
    else:
        report.update(_array_report(array))
        report.update(_write_status(array))
        stride = args.stride if args.stride is not None else args.size
        if stride is not None:
            ch = args.channel_axis
            report["stride_aligned"] = is_stride_aligned(array.chunks, stride, shape=array.shape,
                                                         channel_axis=ch)
            report["aligned_chunks"] = list(aligned_chunks(
                array.shape, stride, np.dtype(array.dtype).itemsize, channel_axis=ch))
        if args.size is not None:
            report["plan"] = _plan_report(array, args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(_format_info(report, args))
    return 0


def shape_text(values: Sequence[Any]) -> str:
    """``(64, 32)`` -> ``"64 x 32"``."""
    return " x ".join(str(v) for v in values)


_x = shape_text


def _codec_text(codecs: list[dict[str, Any]]) -> str:
    parts = []
    for c in codecs:
        conf = ", ".join(f"{k}={v}" for k, v in (c.get("configuration") or {}).items())
        parts.append(f"{c['name']}({conf})")
    return " -> ".join(parts) or "none"


def _format_info(r: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [f"{r['store']}" + (f" (path {r['path']!r})" if r["path"] else "") + f": {r['node']}"]
    row = "  {:<13}{}".format
    if "ome" in r:
        ome = r["ome"]
        axes = ", ".join(
            a.get("name", "?") + (f" ({a['type']}" + (f", {a['unit']}" if a.get("unit") else "")
                                  + ")" if a.get("type") else "")
            for a in ome["axes"])
        lines.append(row("OME-Zarr", f"version {ome['version']}"
                         + (f", name {ome['name']!r}" if ome.get("name") else "")))
        lines.append(row("axes", axes or "(none given)"))
        for lv in ome["levels"]:
            desc = [f"{lv['path']}:"]
            if "shape" in lv:
                desc.append(f"{_x(lv['shape'])} {lv['dtype']}, chunks {_x(lv['chunks'])}")
            if "scale" in lv:
                desc.append(f"scale {lv['scale']}")
            if "translation" in lv:
                desc.append(f"translation {lv['translation']}")
            lines.append(row("level", " ".join(desc)))
        channel = [i for i, a in enumerate(ome["axes"]) if a.get("type") == "channel"]
        if channel and args.channel_axis is None:
            lines.append(row("hint", f"axis {channel[0]} is a channel axis: pass "
                                     f"--channel-axis {channel[0]}"))
        lines.append(f"level {r['level']!r}:")
    if "members" in r:
        for m in r["members"]:
            if m["kind"] == "array":
                lines.append(row(m["name"], f"array {_x(m['shape'])} {m['dtype']}, chunks "
                                            f"{_x(m['chunks'])}"))
            else:
                lines.append(row(m["name"], "group"))
        if not r["members"]:
            lines.append("  (empty)")
        if r.get("write", {}).get("complete") is False:
            lines.append(row("write", f"INCOMPLETE: an OME-Zarr image of {r['write']['levels']} "
                                      "levels whose write stopped before its metadata was "
                                      "written; finish it with --resume (or "
                                      "to_zarr(..., ome=True, resume=True))"))
        lines.append("  pass --path NAME to describe an array")
        return "\n".join(lines)
    if r["shape"] is None:
        return "\n".join(lines)
    lines.append(row("shape", f"{_x(r['shape'])}  ({format_bytes(r['nbytes'])})"))
    lines.append(row("dtype", r["dtype"]))
    lines.append(row("chunks", f"{_x(r['chunks'])}  ({r['nchunks']} chunks of "
                               f"{format_bytes(r['chunk_bytes'])})"))
    if r["shards"] is not None:
        lines.append(row("shards", _x(r["shards"])))
    if r["dimension_names"]:
        lines.append(row("dimensions", ", ".join(str(d) for d in r["dimension_names"])))
    lines.append(row("zarr format", r["zarr_format"]))
    lines.append(row("codecs", _codec_text(r["codecs"])))
    lines.append(row("fill value", r["fill_value"]))
    status = {
        "complete": "complete (daskpatch done-markers)",
        "incomplete": f"INCOMPLETE: {r['chunks_done']} of {r['chunks_total']} chunks done "
                      "(finish with --resume)",
        "not-daskpatch": "not by daskpatch, or interrupted before its first chunk (no "
                         "done-markers)",
    }[r["status"]]
    lines.append(row("written", status))
    if "stride_aligned" in r:
        stride = args.stride if args.stride is not None else args.size
        text = "yes" if r["stride_aligned"] else (
            f"NO: run 'daskpatch rechunk {r['store']} OUT --stride {_csv(stride)}' (chunks "
            f"{_x(r['aligned_chunks'])})")
        lines.append(row("aligned", f"stride {_csv(stride)}: {text}"))
    plan = r.get("plan")
    if plan:
        lines.append(f"apply with size {_x(plan['size'])}, stride {_x(plan['stride'])}, border "
                     f"{plan['border']}:")
        lines.append(row("patches", f"{plan['patches']}  ({_x(plan['patch_grid'])})"))
        if any(f != 1 for f in plan["out_scale"]):
            lines.append(row("result", f"{_x(plan['out_shape'])} {plan['out_dtype']}  (out_scale "
                                       f"{','.join(f'{f:g}' for f in plan['out_scale'])})"))
        if plan["uncovered_voxels"]:
            lines.append(row("uncovered", f"{plan['uncovered_voxels']} voxels no patch covers "
                                          "(apply needs --fill-value)"))
        lines.append(row("blocks", f"{plan['blocks']} of {_x(plan['block_shape'])}  "
                                   f"({_x(plan['block_grid'])})"))
        lines.append(row("tasks", f"{plan['tasks']}"))
        lines.append(row("threads", _thread_text(plan["thread_plan"])))
        mem = plan["memory_per_thread"]
        lines.append(row("peak memory", f"~{format_bytes(plan['peak_memory'])} = "
                                        f"{plan['threads']} threads x "
                                        f"{format_bytes(sum(mem.values()))}"))
        lines.append(row("", f"(per thread: input block+halo {format_bytes(mem['input'])} + "
                             f"buffer {format_bytes(mem['buffer'])} + batch "
                             f"{format_bytes(mem['batch'])})"))
    return "\n".join(lines)


def _thread_text(plan: dict[str, Any]) -> str:
    """``2 dask x 1 torch = 2 of 2 cores (auto)``: the threads a torch model's tasks use.

    Examples
    --------
    >>> _thread_text({"cores": 8, "dask_threads": 2, "torch_threads": 4, "by": "auto"})
    '2 dask x 4 torch = 8 of 8 cores (torch threads: auto, daskpatch.torch-threads)'
    >>> _thread_text({"cores": 2, "dask_threads": 2, "torch_threads": None,
    ...               "by": "OMP_NUM_THREADS=1"})
    '2 dask x torch as OMP_NUM_THREADS=1 sets'
    """
    d, t, by = plan["dask_threads"], plan["torch_threads"], plan["by"]
    if t is None:
        return f"{d} dask x torch as {by} sets"
    how = {"auto": "auto, daskpatch.torch-threads",
           "setting": "the daskpatch.torch-threads setting"}.get(by, by)
    return f"{d} dask x {t} torch = {d * t} of {plan['cores']} cores (torch threads: {how})"


def _csv(value: int | Sequence[int]) -> str:
    return str(value) if isinstance(value, int) else ",".join(map(str, value))

