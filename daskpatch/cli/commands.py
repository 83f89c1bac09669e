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
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

import dask
import zarr.codecs

from daskpatch import __version__
from daskpatch.storage import stores as _store
from daskpatch.cli.args import (byte_count, csv, float_list, fraction, int_list, numpy_dtype,
                                out_scale_value, positive_int, scheduler_name, storage_option)
from daskpatch.cli.errors import UsageError, in_flags
from daskpatch.cli.info import axes_line, cmd_info
from daskpatch.cli.info import shape_text as _x
from daskpatch.adapters.torch import check_static_shape
from daskpatch.cli.model import TORCH_FILES, SpecModel, resolve_spec
from daskpatch.geometry.parse import parse_per_axis
from daskpatch.storage.stores import open_array as _open_array
from daskpatch.storage.stores import parse_path as _parse_path
from daskpatch.storage.stores import probe as _probe
from daskpatch.storage.stores import resolve_store as _resolve_store
from daskpatch.storage.stores import store_of as _store_of
from daskpatch.storage.stores import where as _where
from daskpatch.geometry.parse import BORDERS, PAD_MODES
from daskpatch.patches import apply_patches
from daskpatch.geometry.layout import parse_layout
from daskpatch.graph.inputs import DEFAULT_TARGET_BYTES
from daskpatch.io import open_volume
from daskpatch.adapters.heads import TTA_MODES
from daskpatch.pipeline import write_array, write_group
from daskpatch.rechunk import is_stride_aligned, rechunk_to_stride
from daskpatch.geometry.windows import BLENDS

__all__ = ["main"]

PROG = "daskpatch"

_logger = logging.getLogger("daskpatch")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, raised to :func:`main` (not printed)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


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
buffer (the same extent, float32 -- float64 for float64 output, the output dtype itself for
--blend crop -- times output channels), plus
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
    g.add_argument("--size", type=int_list, metavar="S", required=apply,
                   help="patch size: an int for every spatial axis, or one per axis (32,64,64)"
                        + ("" if apply else "; with it, info estimates a run"))
    g.add_argument("--stride", type=int_list, metavar="T",
                   help="patch stride (default: the size, no overlap); overlap is size - stride")
    g.add_argument("--overlap", type=fraction, metavar="F",
                   help="overlap as a fraction of the size, as MONAI's overlap= (0.5: stride = "
                        "size - round(0.5 * size)); instead of --stride")
    g.add_argument("--channel-axis", type=int, metavar="A",
                   help="the volume's channel axis: 0 (channel-first) or -1 (channel-last); "
                        "default: none, every axis is spatial (or a batch axis, when --size has "
                        "fewer entries than the volume has axes)")
    g.add_argument("--border", choices=BORDERS, default="shift",
                   help="the last patch on an axis: shift it back flush with the volume "
                        "(default), pad past the end, or drop it")
    g.add_argument("--batch-size", type=positive_int, metavar="N",
                   help="patches per model call (default 1; for a torch file exported or "
                        "traced for a fixed batch size, that size: the last batch is padded)")
    g.add_argument("--out-channels", type=positive_int, metavar="C",
                   help="channels the model returns (default: the volume's)")
    g.add_argument("--out-scale", type=out_scale_value, metavar="F",
                   help="the model's output patch is its input patch scaled by F (2: a 2x "
                        "super-resolution model; 1,0.5,0.5: half resolution on the last two "
                        "axes; 'infer': read it off the model's output for one patch); the "
                        "result has the volume's spatial shape times F")
    g.add_argument("--dtype", type=numpy_dtype, metavar="D",
                   help="result dtype (default: the volume's when floating, else float32)")
    g.add_argument("--block-shape", type=int_list, metavar="B",
                   help="work block (and output chunk) shape, a multiple of the stride "
                        "(default: the input chunks when aligned, else a block near 64 MiB)")


#: ``--compressor`` choices: what each gives ``to_zarr(compressors=...)``.
COMPRESSORS: dict[str, Callable[[], Any]] = {
    "zstd": lambda: "auto",
    "blosc-lz4": lambda: zarr.codecs.BloscCodec(cname="lz4", shuffle="shuffle"),
    "blosc-zstd": lambda: zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"),
    "none": lambda: None,
}


def _overlap_stride(args: argparse.Namespace) -> None:
    """``--overlap F`` as the stride it means (per axis ``size - round(F * size)``, at least 1)."""
    overlap = getattr(args, "overlap", None)
    if overlap is None:
        return
    if args.stride is not None:
        raise UsageError("--overlap and --stride both set the stride; pass one of them")
    if args.size is None:
        raise UsageError("--overlap needs --size")
    sizes = (args.size,) if isinstance(args.size, int) else tuple(args.size)
    strides = tuple(max(1, s - round(overlap * s)) for s in sizes)
    args.stride = strides[0] if isinstance(args.size, int) else strides


def _add_storage(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage-option", type=storage_option, action="append", default=[],
                   metavar="KEY=VALUE", dest="storage_options",
                   help="an fsspec option for URL stores (s3://..., gs://...), e.g. "
                        "endpoint_url=http://host:9000 or anon=true; repeat for more (credentials "
                        "also come from the usual environment variables)")


def _stores(args: argparse.Namespace) -> None:
    """SRC, DST and STORE as every process reads them: local paths absolute, URLs with the
    --storage-option values as fsspec stores."""
    options = dict(args.storage_options) or None
    for name, read_only in (("src", True), ("store", True), ("dst", False)):
        value = getattr(args, name, None)
        if value is not None:
            setattr(args, f"{name}_given", value)  # as the user typed it, for reports
            setattr(args, name, _store_of(value, options, name.upper(), read_only=read_only))


def _add_run(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("running")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="finish an interrupted run into DST (only the missing chunks)")
    mode.add_argument("--overwrite", action="store_true",
                      help="replace an existing DST array")
    g.add_argument("--compressor", choices=tuple(COMPRESSORS), default="zstd",
                   help="how DST's chunks are compressed: zstd (zarr's default), blosc-lz4 "
                        "(Blosc lz4 with byte shuffle, faster), blosc-zstd, or none")
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
    _add_storage(p)
    p.add_argument("--path", metavar="P", help="the array (or group) inside the store")
    _add_geometry(p, apply=False)
    p.add_argument("--blend", choices=BLENDS, default="gaussian",
                   help="the blend apply would use (default gaussian; crop accumulates in the "
                        "result dtype)")
    p.add_argument("--workers", type=positive_int, metavar="N",
                   help="worker threads the memory estimate assumes (default: the cores)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--debug", action="store_true", help="print the traceback of an error")
    p.set_defaults(run=cmd_info)

    p = sub.add_parser("apply", help="run a model on every patch and blend the result into DST",
                       description=_APPLY_DESCRIPTION, formatter_class=fmt,
                       epilog="example:\n  daskpatch apply volume.zarr pred.zarr --model "
                              "mymodel:predict --size 64 --stride 32 --batch-size 8")
    p.add_argument("src", metavar="SRC", help="input Zarr store (directory or URL)")
    p.add_argument("dst", metavar="DST", help="output Zarr store (written in Zarr format 3)")
    _add_storage(p)
    p.add_argument("--model", required=True, metavar="SPEC",
                   help="package.module:callable, or a .pt/.pth (TorchScript) or .pt2 "
                        "(torch.export) file")
    p.add_argument("--src-path", metavar="P", help="the array inside SRC")
    p.add_argument("--dst-path", metavar="P", help="the array to write inside DST")
    _add_geometry(p, apply=True)
    g = p.add_argument_group("blending")
    g.add_argument("--blend", choices=BLENDS, default="gaussian",
                   help="how overlapping predictions combine (default gaussian)")
    g.add_argument("--sigma-scale", type=float_list, default=0.125, metavar="X",
                   help="gaussian sigma as a fraction of the patch size (default 0.125)")
    g.add_argument("--pad-mode", choices=PAD_MODES, default="reflect",
                   help="how --border pad reads past the end (default reflect)")
    g.add_argument("--fill-value", type=float, metavar="V",
                   help="value of voxels no patch covers (--border drop, stride > size)")
    g = p.add_argument_group("model")
    g.add_argument("--device", metavar="DEV",
                   help="torch device for a torch model: cpu, cuda, cuda:1 (default: where the "
                        "model's parameters are; cpu for a file)")
    g.add_argument("--amp", nargs="?", const=True, default=False,
                   choices=(True, "float16", "bfloat16"), metavar="DTYPE",
                   help="mixed precision for a torch model (torch.autocast): float16 on CUDA, "
                        "bfloat16 on the CPU, or the DTYPE given")
    g.add_argument("--run-id", metavar="NAME",
                   help="a name for the model's version, kept in the output's fingerprint: "
                        "--resume with another is refused")
    g.add_argument("--tta", choices=TTA_MODES,
                   help="test-time augmentation: 'flip' runs the model on every flip of the "
                        "spatial axes (2**n calls per patch), un-flips and averages")
    g.add_argument("--uncertainty", action="store_true",
                   help="write a group DST/--dst-path holding 'mean' and 'std': the weighted "
                        "standard deviation of the predictions covering each voxel (patches "
                        "and flips), from the same model calls")
    _add_run(p)
    g = p.add_argument_group("scheduler")
    g.add_argument("--scheduler", type=scheduler_name, default="threads", metavar="S",
                   help="threads (default), processes, sync, or the address of a "
                        "dask.distributed scheduler (tcp://host:8786)")
    g.add_argument("--workers", type=positive_int, metavar="N",
                   help="threads or processes of a local scheduler (default: the cores)")
    p.set_defaults(run=_cmd_apply)

    p = sub.add_parser("rechunk", help="copy a store into stride-aligned chunks",
                       description=_RECHUNK_DESCRIPTION,
                       formatter_class=fmt,
                       epilog="example:\n  daskpatch rechunk raw.zarr volume.zarr --stride 32")
    p.add_argument("src", metavar="SRC", help="input Zarr store")
    p.add_argument("dst", metavar="DST", help="output Zarr store (Zarr format 3)")
    _add_storage(p)
    p.add_argument("--stride", type=int_list, required=True, metavar="T",
                   help="patch stride: an int, or one per spatial axis")
    p.add_argument("--path", metavar="P", help="the array inside SRC")
    p.add_argument("--dst-path", metavar="P", help="the array to write inside DST")
    p.add_argument("--channel-axis", type=int, metavar="A",
                   help="channel axis, kept whole in every chunk")
    p.add_argument("--target-bytes", type=byte_count, default=DEFAULT_TARGET_BYTES, metavar="N",
                   help="chunk size target (default 8MiB)")
    _add_run(p)
    p.set_defaults(run=_cmd_rechunk)
    return parser


def _check_apart(src: str, src_path: str | None, dst: str, dst_path: str | None) -> None:
    """Refuse a DST that is SRC, contains it or lies inside it (before anything runs)."""
    if _store.overlaps(_node_location(dst, dst_path), _node_location(src, src_path)):
        raise UsageError(
            "DST must differ from SRC, and neither contain it nor lie inside it (the run reads "
            f"SRC while it writes DST); SRC is {_where(src, _parse_path(src_path))}, "
            f"DST is {_where(dst, _parse_path(dst_path))}")


def _node_location(store: str, path: str | None) -> tuple[str, str]:
    """Where ``store``/``path`` is, comparable by containment (:func:`_store.overlaps`)."""
    base, full = _resolve_store(store, _parse_path(path))
    target, prefix = _store.as_store(base, read_only=True)
    return _store.location(target, "/".join(p for p in (prefix, full) if p) or None)




# -- apply and rechunk ---------------------------------------------------------------------------
def _check_target(dst: str, path: str | None, args: argparse.Namespace) -> None:
    """Refuse an existing DST before anything runs (unless --overwrite or --resume), and a DST
    whose result would vanish with this process."""
    if isinstance(dst, str) and dst.startswith("memory://"):
        raise UsageError(f"DST {dst!r} is an in-memory store: the result would vanish when this "
                         "command exits; write to a directory or an object store URL")
    base, full = _resolve_store(dst, _parse_path(path))
    node = _probe(base, full)
    if node is not None and not (args.overwrite or args.resume):
        raise UsageError(f"{_where(base, full)} already exists; pass --overwrite to replace "
                          "it, or --resume to finish an interrupted run")
    if node is None and full is None and isinstance(dst, str) and "://" not in dst and \
            os.path.exists(dst) and (
            not os.path.isdir(dst) or os.listdir(dst)):
        raise UsageError(f"{dst!r} exists and is not a Zarr array; choose another DST")


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
        raise UsageError("--scheduler ADDRESS needs dask.distributed (pip install "
                          "'daskpatch[distributed]')") from err
    try:
        client = Client(name)
    except OSError as err:
        raise UsageError(f"cannot connect to the dask scheduler at {name}: {err}") from err
    with client:
        yield


def _progress(args: argparse.Namespace) -> bool:
    return sys.stdout.isatty() if args.progress is None else args.progress


def _cmd_apply(args: argparse.Namespace) -> int:
    if args.workers is not None and "://" in args.scheduler:
        raise UsageError("--workers sets the threads or processes of a local scheduler; a "
                          f"cluster ({args.scheduler}) has its own workers")
    volume = open_volume(args.src, args.src_path)
    _check_target(args.dst, args.dst_path, args)
    _check_apart(args.src, args.src_path, args.dst, args.dst_path)
    layout = parse_layout(volume.ndim, args.size, args.channel_axis)
    channels = "none" if layout.channel_axis is None else (
        "first" if layout.channels_first else "last")
    if layout.channel_axis is None and (args.out_channels or 1) > 1:
        channels = "first"  # one channel in, K out: apply_patches adds the channel axis
    print(axes_line(volume.shape, args.size, args.channel_axis, args.out_channels,
                    args.out_scale), flush=True)  # before any work
    model = SpecModel(args.model, args.device, channels, args.amp)
    # A bad SPEC fails here, before anything is written. Local schedulers run the model in this
    # process: build it now; worker processes build their own (this one may have no GPU).
    # A torch file is read here on the CPU with any scheduler (worker processes read their
    # own): an exported program's fixed input shape is checked, and a TorchScript file run on
    # one patch (see SpecModel.probe), before anything is written. A model exported or traced
    # for a fixed batch size gets that size by default; the last batch is padded to it.
    torch_file = args.model.endswith(TORCH_FILES)
    if torch_file or args.scheduler in ("threads", "sync"):
        loaded = model.load()
    else:
        resolve_spec(args.model)
        loaded = None
    given = (1, 1 if layout.channel_axis is None else volume.shape[layout.channel_axis])
    spatial = parse_per_axis(args.size, len(layout.spatial_axes), "size")
    check_static_shape(getattr(loaded, "input_shape", None), given + spatial,
                       f"daskpatch gives it batches {('B',) + given[1:] + spatial} (--size "
                       f"{csv(args.size)}, --channel-axis {args.channel_axis})")
    if torch_file:
        patch = layout.patch_shape(spatial, given[1]) if layout.channel_axis is not None \
            else spatial
        model.probe(patch, volume.dtype, args.batch_size or 1)
    batch_size = args.batch_size or model.batch_size or 1
    result = apply_patches(
        volume, model, args.size, args.stride, border=args.border, pad_mode=args.pad_mode,
        blend=args.blend, batch_size=batch_size, channel_axis=args.channel_axis,
        out_channels=args.out_channels, dtype=args.dtype, block_shape=args.block_shape,
        fill_value=args.fill_value, sigma_scale=args.sigma_scale, out_scale=args.out_scale,
        tta=args.tta, uncertainty=args.uncertainty,
    )
    if args.uncertainty:  # (mean, std): a group of two arrays, written in one pass
        with _scheduler(args.scheduler, args.workers):
            g = write_group(result, args.dst, args.dst_path, chunks=None, resume=args.resume,
                            run_id=args.run_id, compressors=COMPRESSORS[args.compressor](),
                            overwrite=args.overwrite, progress=_progress(args), compute=True,
                            started=lambda: setattr(args, "started", True))  # creates DST
        assert isinstance(g, zarr.Group)  # compute=True
        mean = g["mean"]
        assert isinstance(mean, zarr.Array)
        print(f"{PROG}: wrote {_where(args.dst, g.path or None)}: mean and std, "
              f"{_x(mean.shape)} {mean.dtype}, chunks {_x(mean.chunks)}")
        return 0
    with _scheduler(args.scheduler, args.workers):
        z = write_array(result, args.dst, args.dst_path, chunks=None, resume=args.resume,
                        run_id=args.run_id, compressors=COMPRESSORS[args.compressor](),
                        overwrite=args.overwrite, progress=_progress(args), compute=True,
                        started=lambda: setattr(args, "started", True))  # checks, creates DST
    print(f"{PROG}: wrote {_where(args.dst, z.path or None)}: {_x(z.shape)} {z.dtype}, chunks "
          f"{_x(z.chunks)}")
    return 0


def _cmd_rechunk(args: argparse.Namespace) -> int:
    src = _open_array(args.src, args.path, name="SRC")
    if not is_stride_aligned(src.chunks, args.stride, shape=src.shape,
                             channel_axis=args.channel_axis):
        _check_target(args.dst, args.dst_path, args)
        _check_apart(args.src, args.path, args.dst, args.dst_path)
    args.started = True
    rechunk_to_stride(  # logs what it did (INFO: on stderr here)
        src, args.stride, args.dst, target_path=args.dst_path, channel_axis=args.channel_axis,
        target_bytes=args.target_bytes, compressors=COMPRESSORS[args.compressor](),
        overwrite=args.overwrite, resume=args.resume, progress=_progress(args),
    )
    return 0


# -- main ----------------------------------------------------------------------------------------
def _one_line(err: BaseException, message: str | None = None) -> str:
    text = " ".join((str(err) if message is None else message).split()) or type(err).__name__
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
        _stores(args)
        _overlap_stride(args)
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
        if started and not isinstance(err, (UsageError, FileExistsError)):
            put_back = any("was put back unchanged" in str(n)
                           for n in getattr(err, "__notes__", ()))
            advice = ("fix the cause and run the --overwrite again" if put_back else
                      "fix the cause and run again with --resume to keep the chunks already "
                      "written")
            print(f"{PROG}: error: the run failed: {type(err).__name__}: {_one_line(err)} "
                  f"({advice}" + ("" if getattr(args, "debug", False) else "; --debug shows the "
                                                                         "traceback") + ")",
                  file=sys.stderr)
            return 1
        # the library's words, with the parameters its error names (by attribute) as flags
        text = _one_line(err, in_flags(err, getattr(args, "command", None)))
        print(f"{PROG}: error: {text}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
