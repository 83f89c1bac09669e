"""The ``daskpatch`` command line: ``info``, ``apply``, ``rechunk`` (also ``python -m daskpatch``).

A thin layer over the Python API: every command parses its arguments, checks everything it can
(the source store, the target, the model, the patch geometry) before anything is written, and
then calls :func:`daskpatch.apply_patches`, :func:`daskpatch.to_zarr` or
:func:`daskpatch.rechunk_to_stride`. A bad input prints one line on stderr
(``daskpatch: error: ...``; ``--debug`` adds the traceback) and exits with status 2, having written
nothing; a run that fails after it started exits with status 1 (finish it with ``--resume``).

Examples
--------
>>> import contextlib, io, json, tempfile, numpy as np, zarr
>>> tmp = tempfile.TemporaryDirectory()
>>> z = zarr.create_array(f"{tmp.name}/vol.zarr", shape=(64, 64), chunks=(32, 32), dtype="f4")
>>> out = io.StringIO()
>>> with contextlib.redirect_stdout(out):
...     status = main(["info", f"{tmp.name}/vol.zarr", "--size", "16", "--stride", "8", "--json"])
>>> status
0
>>> report = json.loads(out.getvalue())
>>> report["shape"], report["dtype"], report["chunks"], report["stride_aligned"]
([64, 64], 'float32', [32, 32], True)
>>> tmp.cleanup()
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import inspect
import json
import logging
import math
import os
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import dask
import numpy as np
import zarr
from dask.delayed import Delayed
from dask.utils import format_bytes, parse_bytes

from . import __version__, _store
from .blend import _acc_dtype, apply_patches
from .extract import full_grid, parse_layout
from ._sched import compute as _compute
from ._store import open_array as _open_array
from ._store import parse_path as _parse_path
from ._store import probe as _probe
from ._store import resolve_store as _resolve_store
from ._store import where as _where
from .io import (
    DEFAULT_TARGET_BYTES,
    aligned_chunks,
    is_stride_aligned,
    open_volume,
    rechunk_to_stride,
    to_zarr,
)
from .windows import BLENDS
from ._validate import BORDERS, PAD_MODES

__all__ = ["main"]

PROG = "daskpatch"
#: ``--scheduler`` names of dask's local schedulers (anything with ``://`` is a cluster address).
SCHEDULERS = ("threads", "processes", "sync")
#: Suffixes of model files ``--model`` loads with torch.
TORCH_FILES = (".pt", ".pth", ".pt2")

_logger = logging.getLogger("daskpatch")


class _UsageError(Exception):
    """A bad command line or input, found before anything was written (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, raised to :func:`main` (not printed)."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise _UsageError(f"{message} (see '{self.prog} --help')")


# -- argument types ------------------------------------------------------------------------------
def _int_list(text: str, *, minimum: int = 1) -> int | tuple[int, ...]:
    """``"64"`` -> 64, ``"32,64,64"`` -> (32, 64, 64): an int, or one per spatial axis."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or any(v < minimum for v in values):
        raise argparse.ArgumentTypeError(
            f"expected an integer >= {minimum}, or one per spatial axis separated by commas "
            f"(e.g. 64 or 32,64,64); got {text!r}"
        )
    return values[0] if len(values) == 1 else values


def _float_list(text: str) -> float | tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number, or one per spatial axis separated by commas; got {text!r}"
        ) from None
    return values[0] if len(values) == 1 else values


def _positive_int(text: str) -> int:
    value = _int_list(text)
    if not isinstance(value, int):
        raise argparse.ArgumentTypeError(f"expected one integer >= 1; got {text!r}")
    return value


def _dtype(text: str) -> np.dtype:
    try:
        return np.dtype(text)
    except TypeError:
        raise argparse.ArgumentTypeError(
            f"expected a NumPy dtype name (float32, float16, uint8, ...); got {text!r}"
        ) from None


def _bytes(text: str) -> int:
    try:
        value = parse_bytes(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"expected a positive byte count (8388608, 8MiB, 16MB); got {text!r}"
        )
    return value


def _scheduler_name(text: str) -> str:
    if text in SCHEDULERS or "://" in text:
        return text
    raise argparse.ArgumentTypeError(
        f"expected one of {', '.join(SCHEDULERS)} or a dask.distributed scheduler address "
        f"(tcp://host:8786); got {text!r}"
    )


# -- the parser ----------------------------------------------------------------------------------
_DESCRIPTION = """\
Patch-based processing of N-D volumes larger than RAM, from the command line.

A volume lives in a Zarr store. `apply` cuts it into patches (a size, a stride, overlap when
stride < size), runs a model on every patch exactly once, in batches, blends the predictions
back into a seamless volume and writes it to a Zarr store, block by block: memory depends on
the block size, not on the volume. `info` tells what a store holds and what a run would cost;
`rechunk` copies a store into chunks aligned to the patch stride (what apply reads best).
"""

_EPILOG = """\
examples:
  daskpatch info volume.zarr --size 64 --stride 32
  daskpatch rechunk raw.zarr volume.zarr --stride 32 --progress
  daskpatch apply volume.zarr pred.zarr --model mymodel:predict --size 64 --stride 32 \\
      --batch-size 8
  daskpatch apply volume.zarr pred.zarr --model unet.pt2 --device cuda --size 128 --stride 64
  daskpatch apply volume.zarr pred.zarr --model mymodel:predict --size 64 --resume

Each command has its own --help. Exit status: 0 done, 1 the run failed after it started
(finish it with --resume), 2 a bad command line or input (nothing written).
"""

_APPLY_DESCRIPTION = """\
Run a model on every patch of SRC and write the blended result to DST (Zarr format 3).

The model (--model SPEC) is one of:
  package.module:name   a function on NumPy batches, (B, *size) -> same shape (with a channel
                        axis: (B, C, *size) or (B, *size, C), as in the volume); or a torch
                        nn.Module instance; or a class, or a function that takes no arguments,
                        called once to make either (a factory)
  model.pt, model.pth   a TorchScript file (torch.jit.load)
  model.pt2             a torch.export file (torch.export.load(...).module())

Torch models run under torch.inference_mode() in eval mode, on --device, fed float tensors of
their parameters' dtype, channel-first: a volume without --channel-axis goes in as one channel
(B, 1, *size) and the model must return one channel. The current directory is on the import
path. With --scheduler processes or a cluster address, each worker process loads the model
again from SPEC (once per process), so SPEC must build the same model every time (load weights
from a file, seed any random initialisation) and be importable there.

DST must not exist unless --overwrite (start again) or --resume (finish an interrupted run: only
the chunks not yet recorded as done are computed; the result is bit-identical to an
uninterrupted run).
"""

_INFO_DESCRIPTION = """\
What a Zarr store holds: shape, dtype, chunks, codecs, Zarr format; the OME-Zarr axes, scales
and levels of an image group; the members of a plain group; whether daskpatch wrote it
completely (its done-markers); with --stride, whether the chunks are stride-aligned; with
--size, what `daskpatch apply` with the same options would do: patches, blocks, tasks and an
estimated peak memory.

Peak memory is estimated per worker thread as the input block plus its halo
(block + size - stride per axis, input dtype and channels), plus the extended accumulation
buffer (the same extent, float32 -- float64 for float64 output -- times output channels), plus
one batch (batch size x patch, input dtype, and the model's output as float32), times the
number of worker threads (--workers, else dask's num_workers, else the number of cores).
"""

_RECHUNK_DESCRIPTION = """\
Copy the array SRC into DST (Zarr format 3) with chunks on the patch-stride grid: a multiple of
the stride on each spatial axis, near --target-bytes, the channel axis whole. That is the layout
`daskpatch apply` reads and writes best. Nothing is written when SRC is already aligned.
"""


def _add_geometry(p: argparse.ArgumentParser, *, apply: bool) -> None:
    g = p.add_argument_group("patches")
    g.add_argument("--size", type=_int_list, metavar="S", required=apply,
                   help="patch size: an int for every spatial axis, or one per axis (32,64,64)"
                        + ("" if apply else "; with it, info estimates a run"))
    g.add_argument("--stride", type=_int_list, metavar="T",
                   help="patch stride (default: the size, no overlap); overlap is size - stride")
    g.add_argument("--channel-axis", type=int, metavar="A",
                   help="the volume's channel axis: 0 (channel-first) or -1 (channel-last); "
                        "default: none, every axis is spatial (or a batch axis, when --size has "
                        "fewer entries than the volume has axes)")
    g.add_argument("--border", choices=BORDERS, default="shift",
                   help="the last patch on an axis: shift it back flush with the volume "
                        "(default), pad past the end, or drop it")
    g.add_argument("--batch-size", type=_positive_int, default=1, metavar="N",
                   help="patches per model call (default 1)")
    g.add_argument("--out-channels", type=_positive_int, metavar="C",
                   help="channels the model returns (default: the volume's)")
    g.add_argument("--dtype", type=_dtype, metavar="D",
                   help="result dtype (default: the volume's when floating, else float32)")
    g.add_argument("--block-shape", type=_int_list, metavar="B",
                   help="work block (and output chunk) shape, a multiple of the stride "
                        "(default: the input chunks when aligned, else a block near 64 MiB)")


def _add_run(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("running")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="finish an interrupted run into DST (only the missing chunks)")
    mode.add_argument("--overwrite", action="store_true",
                      help="replace an existing DST array")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show a progress bar (default: when stdout is a terminal)")
    g.add_argument("--debug", action="store_true",
                   help="print the traceback of an error")


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog=PROG, description=_DESCRIPTION, epilog=_EPILOG, formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("info", help="what a store holds, and what a run over it would cost",
                       description=_INFO_DESCRIPTION, formatter_class=fmt,
                       epilog="example:\n  daskpatch info volume.zarr --size 64 --stride 32 --json")
    p.add_argument("store", metavar="STORE", help="a Zarr store (directory or URL)")
    p.add_argument("--path", metavar="P", help="the array (or group) inside the store")
    _add_geometry(p, apply=False)
    p.add_argument("--workers", type=_positive_int, metavar="N",
                   help="worker threads the memory estimate assumes (default: the cores)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--debug", action="store_true", help="print the traceback of an error")
    p.set_defaults(run=_cmd_info)

    p = sub.add_parser("apply", help="run a model on every patch and blend the result into DST",
                       description=_APPLY_DESCRIPTION, formatter_class=fmt,
                       epilog="example:\n  daskpatch apply volume.zarr pred.zarr --model "
                              "mymodel:predict --size 64 --stride 32 --batch-size 8")
    p.add_argument("src", metavar="SRC", help="input Zarr store (directory or URL)")
    p.add_argument("dst", metavar="DST", help="output Zarr store (written in Zarr format 3)")
    p.add_argument("--model", required=True, metavar="SPEC",
                   help="package.module:callable, or a .pt/.pth (TorchScript) or .pt2 "
                        "(torch.export) file")
    p.add_argument("--src-path", metavar="P", help="the array inside SRC")
    p.add_argument("--dst-path", metavar="P", help="the array to write inside DST")
    _add_geometry(p, apply=True)
    g = p.add_argument_group("blending")
    g.add_argument("--blend", choices=BLENDS, default="gaussian",
                   help="how overlapping predictions combine (default gaussian)")
    g.add_argument("--sigma-scale", type=_float_list, default=0.125, metavar="X",
                   help="gaussian sigma as a fraction of the patch size (default 0.125)")
    g.add_argument("--pad-mode", choices=PAD_MODES, default="reflect",
                   help="how --border pad reads past the end (default reflect)")
    g.add_argument("--fill-value", type=float, metavar="V",
                   help="value of voxels no patch covers (--border drop, stride > size)")
    g = p.add_argument_group("model")
    g.add_argument("--device", metavar="DEV",
                   help="torch device for a torch model: cpu, cuda, cuda:1 (default: where the "
                        "model's parameters are; cpu for a file)")
    _add_run(p)
    g = p.add_argument_group("scheduler")
    g.add_argument("--scheduler", type=_scheduler_name, default="threads", metavar="S",
                   help="threads (default), processes, sync, or the address of a "
                        "dask.distributed scheduler (tcp://host:8786)")
    g.add_argument("--workers", type=_positive_int, metavar="N",
                   help="threads or processes of a local scheduler (default: the cores)")
    p.set_defaults(run=_cmd_apply)

    p = sub.add_parser("rechunk", help="copy a store into stride-aligned chunks",
                       description=_RECHUNK_DESCRIPTION,
                       formatter_class=fmt,
                       epilog="example:\n  daskpatch rechunk raw.zarr volume.zarr --stride 32")
    p.add_argument("src", metavar="SRC", help="input Zarr store")
    p.add_argument("dst", metavar="DST", help="output Zarr store (Zarr format 3)")
    p.add_argument("--stride", type=_int_list, required=True, metavar="T",
                   help="patch stride: an int, or one per spatial axis")
    p.add_argument("--path", metavar="P", help="the array inside SRC")
    p.add_argument("--dst-path", metavar="P", help="the array to write inside DST")
    p.add_argument("--channel-axis", type=int, metavar="A",
                   help="channel axis, kept whole in every chunk")
    p.add_argument("--target-bytes", type=_bytes, default=DEFAULT_TARGET_BYTES, metavar="N",
                   help="chunk size target (default 8MiB)")
    _add_run(p)
    p.set_defaults(run=_cmd_rechunk)
    return parser


# -- models --------------------------------------------------------------------------------------
_MODELS: dict[tuple, Callable[[np.ndarray], np.ndarray]] = {}
_MODELS_LOCK = threading.Lock()


class _SpecModel:
    """The model ``--model SPEC`` names, loaded once per process.

    It pickles as its SPEC (torch files and many modules do not pickle, and a model inside
    every task would travel with every task): a worker process loads it again on first use.
    """

    def __init__(self, spec: str, device: str | None, channels: str) -> None:
        self.spec, self.device, self.channels = spec, device, channels

    def __reduce__(self) -> tuple:
        return (_SpecModel, (self.spec, self.device, self.channels))

    def __dask_tokenize__(self) -> tuple:
        return ("daskpatch-cli-model", self.spec, self.device, self.channels)

    @property
    def key(self) -> tuple:
        return (self.spec, self.device, self.channels)

    def load(self) -> Callable[[np.ndarray], np.ndarray]:
        with _MODELS_LOCK:
            fn = _MODELS.get(self.key)
            if fn is None:
                fn = _MODELS[self.key] = _load_model(self.spec, self.device, self.channels)
            return fn

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.load()(batch)


def _is_torch_module(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def _needs_arguments(fn: Callable) -> bool:
    """Whether ``fn`` cannot be called without arguments (or takes ``*args``: a batch)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: a model, not a factory
        return True
    return any(p.kind is p.VAR_POSITIONAL
               or (p.default is p.empty and p.kind is not p.VAR_KEYWORD) for p in params)


def _import_attr(spec: str) -> Any:
    modname, _, attr = spec.rpartition(":")
    if not modname or not attr:
        hint = ""
        if spec.endswith(".py"):
            hint = f" (for a function in {spec}, pass {os.path.basename(spec)[:-3]}:NAME)"
        raise _UsageError(f"--model must be package.module:callable or a .pt, .pth or .pt2 "
                          f"file; got {spec!r}{hint}")
    try:
        module = importlib.import_module(modname)
    except ModuleNotFoundError as err:
        if err.name and (modname == err.name or modname.startswith(err.name + ".")):
            raise _UsageError(
                f"--model {spec!r}: no module named {err.name!r} (the module must be importable: "
                "in the current directory or on PYTHONPATH)"
            ) from err
        raise _UsageError(f"--model {spec!r}: importing {modname!r} failed: "
                          f"{type(err).__name__}: {err}") from err
    except Exception as err:
        raise _UsageError(f"--model {spec!r}: importing {modname!r} failed: "
                          f"{type(err).__name__}: {err}") from err
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise _UsageError(f"--model {spec!r}: {modname!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _load_torch_file(path: str) -> Any:
    import torch

    try:
        if path.endswith(".pt2"):
            return torch.export.load(path).module()
        import warnings

        with warnings.catch_warnings():  # deprecated in torch 2.13, still what .pt files are
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(path, map_location="cpu")
    except Exception as err:
        kind = "torch.export" if path.endswith(".pt2") else "TorchScript"
        first = (str(err).strip().splitlines() or [""])[0].split(". ")[0]
        raise _UsageError(
            f"--model {path!r} is not a {kind} file ({type(err).__name__}: {first}); a pickled "
            "nn.Module needs a package.module:factory that loads it"
        ) from err


def _resolve_spec(spec: str) -> Any:
    """What ``--model SPEC`` names, checked but not built: the module attribute, or the torch
    file's path (checked to exist)."""
    if spec.endswith(TORCH_FILES):
        try:
            import torch  # noqa: F401
        except ImportError as err:
            raise _UsageError(f"--model {spec!r} is a torch file, but torch is not installed "
                              "(pip install 'daskpatch[torch]')") from err
        if not os.path.isfile(spec):
            raise _UsageError(f"--model {spec!r}: no such file")
        return spec
    obj = _import_attr(spec)
    if inspect.isclass(obj) and _needs_arguments(obj):
        raise _UsageError(f"--model {spec!r} is a class whose constructor needs arguments; name "
                          "a function that builds the model instead")
    return obj


def _load_model(spec: str, device: str | None, channels: str
                ) -> Callable[[np.ndarray], np.ndarray]:
    """The NumPy-batch callable ``--model SPEC`` names (see ``daskpatch apply --help``)."""
    obj = _resolve_spec(spec)
    if spec.endswith(TORCH_FILES):
        obj = _load_torch_file(spec)
    elif inspect.isclass(obj):
        obj = obj()
    elif (inspect.isfunction(obj) or inspect.ismethod(obj)) and not _needs_arguments(obj):
        obj = obj()  # a factory
        if inspect.isclass(obj):
            raise _UsageError(f"--model {spec!r}: the factory returned a class ({obj!r}); it "
                              "must return a model")
    if _is_torch_module(obj):
        return _torch_adapter(obj, device, channels)
    if device is not None:
        raise _UsageError(f"--device {device!r} applies to torch models; --model {spec!r} is "
                          f"{type(obj).__name__}")
    if not callable(obj):
        raise _UsageError(f"--model {spec!r} is {type(obj).__name__}, not a callable model")
    return obj


def _torch_adapter(module: Any, device: str | None, channels: str
                   ) -> Callable[[np.ndarray], np.ndarray]:
    """A NumPy-batch function running a torch module.

    The module is put in eval mode (and moved to ``device`` when given). Each call runs under
    :func:`torch.inference_mode` in the calling thread, turns the batch into a tensor of the
    module's floating dtype on its device, channel-first (``channels``: ``"none"`` adds a
    channel axis of 1 and removes it from the output, ``"last"`` moves the channel axis to
    position 1 and back, ``"first"`` passes it as it is), and returns NumPy. The command line
    uses this adapter until ``dp.TorchModel`` (``daskpatch/_torch.py``) is merged; then torch
    models from ``--model`` go through ``dp.TorchModel``.
    """
    import torch

    if device is not None:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise _UsageError(f"--device must be a torch device (cpu, cuda, cuda:1); got "
                              f"{device!r}") from err
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise _UsageError(f"--device {device!r}: torch sees no CUDA device")
        module = module.to(dev)
    with contextlib.suppress(NotImplementedError):  # a torch.export module keeps its mode
        module.eval()
    tensors = list(module.parameters()) + list(module.buffers())
    floats = [t for t in tensors if t.is_floating_point()]
    target_dtype = floats[0].dtype if floats else torch.float32
    target_device = tensors[0].device if tensors else torch.device(device or "cpu")

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch))
            x = x.to(device=target_device, dtype=target_dtype)
            if channels == "none":
                x = x.unsqueeze(1)
            elif channels == "last":
                x = x.movedim(-1, 1)
            y = module(x)
            if not isinstance(y, torch.Tensor):
                raise TypeError(f"the torch model must return a tensor; got "
                                f"{type(y).__name__}")
            if channels == "none":
                if y.ndim != x.ndim or y.shape[1] != 1:
                    raise ValueError(
                        f"the torch model returned shape {tuple(y.shape)} for input "
                        f"{tuple(x.shape)}; a volume without --channel-axis goes in and out as "
                        "one channel (give the volume a channel axis for more output channels)"
                    )
                y = y[:, 0]
            elif channels == "last":
                y = y.movedim(1, -1)
            return y.detach().cpu().numpy()

    return run


# -- info ----------------------------------------------------------------------------------------
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
    grid = _store.numblocks(z)
    total = math.prod(grid)
    if _store.stored_fingerprint(z) is None:
        return {"status": "not-daskpatch", "chunks_done": None, "chunks_total": total}
    done = _store.done_chunks(z, grid)
    if done is None:
        return {"status": "complete", "chunks_done": total, "chunks_total": total}
    return {"status": "incomplete", "chunks_done": len(done), "chunks_total": total}


def _node_location(store: str, path: str | None) -> tuple[str, str]:
    """Where ``store``/``path`` is, comparable by containment (:func:`_store.overlaps`)."""
    base, full = _resolve_store(store, _parse_path(path))
    target, prefix = _store.as_store(base, read_only=True)
    return _store.location(target, "/".join(p for p in (prefix, full) if p) or None)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


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
    return _jsonable(out)


def _array_report(z: zarr.Array) -> dict[str, Any]:
    dtype = np.dtype(z.dtype)
    chunk_bytes = math.prod(z.chunks) * dtype.itemsize
    dims = getattr(z.metadata, "dimension_names", None)
    return _jsonable({
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
    return _jsonable({"version": meta.get("version", ms.get("version")), "name": ms.get("name"),
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
    layout = parse_layout(z.ndim, args.size, args.channel_axis)
    ch = layout.channel_axis
    shape = tuple(z.shape)
    grid_shape = shape if ch is None else shape[:ch] + shape[ch + 1:]
    grid = full_grid(grid_shape, layout.n_batch, args.size, args.stride, args.border)
    result = apply_patches(
        open_volume(z), _identity, args.size, args.stride, border=args.border,
        batch_size=args.batch_size, channel_axis=args.channel_axis,
        out_channels=args.out_channels, dtype=args.dtype, block_shape=args.block_shape,
        fill_value=0.0 if grid.uncovered else None,
    )
    chunks = [c for a, c in enumerate(result.chunks) if a != ch]
    block = tuple(c[0] for c in chunks)
    nblocks = tuple(len(c) for c in chunks)
    cin = 1 if ch is None else shape[ch]
    cout = args.out_channels or cin
    in_bytes = np.dtype(z.dtype).itemsize
    acc_bytes = _acc_dtype(result.dtype).itemsize
    ext = math.prod(min(b + z_ - s, n)
                    for b, z_, s, n in zip(block, grid.size, grid.stride, grid.padded_shape))
    per_task = {
        "input": ext * cin * in_bytes,
        "buffer": ext * cout * acc_bytes,
        "batch": args.batch_size * math.prod(grid.size) * (cin * in_bytes + cout * 4),
    }
    threads = _threads(args.workers)
    n_chunks = math.prod(nblocks)
    return _jsonable({
        "size": list(grid.size[layout.n_batch:]), "stride": list(grid.stride[layout.n_batch:]),
        "border": args.border, "patches": len(grid), "patch_grid": list(grid.grid_shape),
        "uncovered_voxels": grid.uncovered, "block_shape": list(block), "blocks": n_chunks,
        "block_grid": list(nblocks), "tasks": len(result.dask) + n_chunks + 1,
        "out_dtype": str(result.dtype), "out_channels": cout, "threads": threads,
        "memory_per_thread": per_task, "peak_memory": threads * sum(per_task.values()),
        "memory_formula": "threads x (input block+halo + extended accumulation buffer + batch)",
    })


def _cmd_info(args: argparse.Namespace) -> int:
    node = _open_node(args.store, args.path)
    report: dict[str, Any] = {"store": args.store, "path": args.path}
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


def _x(values: Sequence[Any]) -> str:
    return " x ".join(str(v) for v in values)


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
    if r["node"] == "group":
        for m in r["members"]:
            if m["kind"] == "array":
                lines.append(row(m["name"], f"array {_x(m['shape'])} {m['dtype']}, chunks "
                                            f"{_x(m['chunks'])}"))
            else:
                lines.append(row(m["name"], "group"))
        if not r["members"]:
            lines.append("  (empty)")
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
        if plan["uncovered_voxels"]:
            lines.append(row("uncovered", f"{plan['uncovered_voxels']} voxels no patch covers "
                                          "(apply needs --fill-value)"))
        lines.append(row("blocks", f"{plan['blocks']} of {_x(plan['block_shape'])}  "
                                   f"({_x(plan['block_grid'])})"))
        lines.append(row("tasks", f"{plan['tasks']}"))
        mem = plan["memory_per_thread"]
        lines.append(row("peak memory", f"~{format_bytes(plan['peak_memory'])} = "
                                        f"{plan['threads']} threads x "
                                        f"{format_bytes(sum(mem.values()))}"))
        lines.append(row("", f"(per thread: input block+halo {format_bytes(mem['input'])} + "
                             f"buffer {format_bytes(mem['buffer'])} + batch "
                             f"{format_bytes(mem['batch'])})"))
    return "\n".join(lines)


def _csv(value: int | Sequence[int]) -> str:
    return str(value) if isinstance(value, int) else ",".join(map(str, value))


# -- apply and rechunk ---------------------------------------------------------------------------
def _check_target(dst: str, path: str | None, args: argparse.Namespace) -> None:
    """Refuse an existing DST before anything runs (unless --overwrite or --resume)."""
    base, full = _resolve_store(dst, _parse_path(path))
    node = _probe(base, full)
    if node is not None and not (args.overwrite or args.resume):
        raise _UsageError(f"{_where(base, full)} already exists; pass --overwrite to replace "
                          "it, or --resume to finish an interrupted run")
    if node is None and full is None and "://" not in dst and os.path.exists(dst) and (
            not os.path.isdir(dst) or os.listdir(dst)):
        raise _UsageError(f"{dst!r} exists and is not a Zarr array; choose another DST")


@contextlib.contextmanager
def _scheduler(name: str, workers: int | None) -> Iterator[None]:
    if "://" not in name:
        config: dict[str, Any] = {"scheduler": name}
        if workers is not None:
            config["num_workers"] = workers
        with dask.config.set(config):
            yield
        return
    try:
        from distributed import Client
    except ImportError as err:
        raise _UsageError("--scheduler ADDRESS needs dask.distributed (pip install "
                          "'daskpatch[distributed]')") from err
    try:
        client = Client(name)
    except OSError as err:
        raise _UsageError(f"cannot connect to the dask scheduler at {name}: {err}") from err
    with client:
        yield


def _progress(args: argparse.Namespace) -> bool:
    return sys.stdout.isatty() if args.progress is None else args.progress


def _cmd_apply(args: argparse.Namespace) -> int:
    if args.workers is not None and "://" in args.scheduler:
        raise _UsageError("--workers sets the threads or processes of a local scheduler; a "
                          f"cluster ({args.scheduler}) has its own workers")
    volume = open_volume(args.src, args.src_path)
    _check_target(args.dst, args.dst_path, args)
    if _store.overlaps(_node_location(args.dst, args.dst_path),
                       _node_location(args.src, args.src_path)):
        raise _UsageError(
            "DST must differ from SRC, and neither contain it nor lie inside it (the run reads "
            f"SRC while it writes DST); SRC is {_where(args.src, _parse_path(args.src_path))}, "
            f"DST is {_where(args.dst, _parse_path(args.dst_path))}")
    layout = parse_layout(volume.ndim, args.size, args.channel_axis)
    channels = "none" if layout.channel_axis is None else (
        "first" if layout.channels_first else "last")
    model = _SpecModel(args.model, args.device, channels)
    # A bad SPEC fails here, before anything is written. Local schedulers run the model in this
    # process: build it now; worker processes build their own (this one may have no GPU).
    if args.scheduler in ("threads", "sync"):
        model.load()
    else:
        _resolve_spec(args.model)
    result = apply_patches(
        volume, model, args.size, args.stride, border=args.border, pad_mode=args.pad_mode,
        blend=args.blend, batch_size=args.batch_size, channel_axis=args.channel_axis,
        out_channels=args.out_channels, dtype=args.dtype, block_shape=args.block_shape,
        fill_value=args.fill_value, sigma_scale=args.sigma_scale,
    )
    with _scheduler(args.scheduler, args.workers):
        job = to_zarr(result, args.dst, args.dst_path, resume=args.resume,
                      overwrite=args.overwrite, compute=False)  # checks, then creates DST
        args.started = True
        z = _compute(cast(Delayed, job), _progress(args))  # as to_zarr(compute=True) does
    print(f"{PROG}: wrote {_where(args.dst, z.path or None)}: {_x(z.shape)} {z.dtype}, chunks "
          f"{_x(z.chunks)}")
    return 0


def _cmd_rechunk(args: argparse.Namespace) -> int:
    src = _open_array(args.src, args.path, name="SRC")
    if not is_stride_aligned(src.chunks, args.stride, shape=src.shape,
                             channel_axis=args.channel_axis):
        _check_target(args.dst, args.dst_path, args)
    args.started = True
    rechunk_to_stride(  # logs what it did (INFO: on stderr here)
        src, args.stride, args.dst, target_path=args.dst_path, channel_axis=args.channel_axis,
        target_bytes=args.target_bytes, overwrite=args.overwrite, resume=args.resume,
        progress=_progress(args),
    )
    return 0


# -- main ----------------------------------------------------------------------------------------
def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    notes = " ".join(" ".join(str(n).split()) for n in getattr(err, "__notes__", ()))
    return f"{text} ({notes})" if notes else text


@contextlib.contextmanager
def _session() -> Iterator[None]:
    """Log daskpatch's INFO messages to stderr; the current directory on the import path."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    level = _logger.level
    _logger.addHandler(handler)
    _logger.setLevel(logging.INFO)
    added = os.getcwd() not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        yield
    finally:
        _logger.removeHandler(handler)
        _logger.setLevel(level)
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(os.getcwd())
        with _MODELS_LOCK:
            _MODELS.clear()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``daskpatch`` command line with ``argv`` (default ``sys.argv[1:]``).

    Returns the exit status: 0 done, 1 the run failed after it started, 2 a bad command line
    or input (one line on stderr, nothing written), 130 interrupted.
    """
    args: argparse.Namespace | None = None
    try:
        try:
            args = _parser().parse_args(argv)
        except SystemExit as done:  # --help, --version
            return int(done.code or 0)
        args.started = False
        with _session():
            return int(args.run(args))
    except BrokenPipeError:  # stdout closed early (| head): not an error of ours
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted" + ("; finish with --resume" if args is not None
                                        and getattr(args, "started", False) else ""),
              file=sys.stderr)
        return 130
    except Exception as err:
        if args is not None and getattr(args, "debug", False):
            traceback.print_exc()
        started = args is not None and getattr(args, "started", False)
        if started and not isinstance(err, (_UsageError, FileExistsError)):
            print(f"{PROG}: error: the run failed: {type(err).__name__}: {_one_line(err)} "
                  "(fix the cause and run again with --resume to keep the chunks already "
                  "written" + ("" if getattr(args, "debug", False) else "; --debug shows the "
                                                                           "traceback") + ")",
                  file=sys.stderr)
            return 1
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
