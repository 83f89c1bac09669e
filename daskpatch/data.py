"""Training loaders: grid and random patches read straight from Zarr (or Dask/NumPy) volumes.

Two map-style datasets that a ``torch.utils.data.DataLoader`` consumes as they are (it only needs
``__len__`` and ``__getitem__``, and it turns NumPy arrays into tensors); this module never imports
PyTorch.

- :class:`PatchDataset` walks a regular :class:`~daskpatch.grid.PatchGrid` over every volume:
  validation, inference, or exhaustive training.
- :class:`RandomPatchDataset` draws ``samples_per_epoch`` random patches per epoch: uniform,
  weight-map, or label-balanced (a patch centred on a foreground voxel with probability
  ``pos_fraction``, as MONAI's ``RandCropByPosNegLabel`` and nnU-Net's foreground oversampling).

The sampling index is O(number of chunks): one count (foreground voxels, or the weight sum) per
storage chunk, computed once with one Dask reduction per chunk and cached in the Zarr array's
attributes. A draw picks a chunk from that small table, reads that one chunk, and picks a voxel in
it. No full-volume probability map or CDF is ever built (TorchIO's ``LabelSampler`` builds a
float64 CDF over every voxel, TorchIO issue #397).

Every sample ``i`` of epoch ``e`` draws from its own generator ``np.random.default_rng([seed, e,
i])``, so the patches do not depend on ``num_workers`` or on which worker reads them. A
``transform=`` runs on each item after reading, with a generator of its own (``[seed, e, i, 1]``)
when it takes an ``rng`` parameter: augmentations are reproducible the same way. ``set_epoch``
writes the epoch to shared memory, which DataLoader workers (persistent ones too) read.
Datasets keep paths and small tables, not open handles: a store given by path is opened on first
use in each process (and reopened after a fork), so datasets pickle cheaply to spawned workers.

Both datasets return a dict of NumPy arrays per sample:

``"image"``
    ``(C, *size)``, always channel-first (``C = 1`` when ``channel_axis`` is None), in the
    image's dtype.
``"label"``
    ``(C_label, *size)``, only when ``labels`` are given; a label without a channel axis gives
    ``C_label = 1``.
``"location"``
    int64 ``(ndim,)``: the patch start in the spatial axes of its volume.
``"volume"``
    int64 scalar: which volume the patch comes from, an index into :attr:`PatchDataset.volumes`.
``"center"``
    int64 ``(ndim,)`` (random patches only): the sampled voxel. It always lies inside the patch;
    it is the patch centre (``location + size // 2``) unless the patch was shifted to stay inside
    the volume.
"""

from __future__ import annotations

import inspect
import math
import multiprocessing
import multiprocessing.context
import numbers
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

import dask
import dask.array as da
import numpy as np
import zarr

from ._validate import (
    BORDERS,
    PAD_MODES,
    BorderMode,
    PadMode,
    _describe,
    parse_choice,
    parse_int,
    parse_pad_value,
    parse_per_axis,
    split_axes,
)
from ._regions import _direct_source
from .grid import PatchGrid

__all__ = ["CACHE_MODES", "INDEX_ATTR", "PatchDataset", "RandomPatchDataset"]

#: What a volume may be: a Zarr store path (or URL), a Zarr array, a Dask array or a NumPy array.
VolumeLike = Union[str, "os.PathLike[str]", zarr.Array, da.Array, np.ndarray]

CacheMode = Literal["auto", "refresh", "off"]
#: Accepted ``cache_index`` values: ``"auto"`` reads a valid cached index and writes a fresh one
#: when the store is writable; ``"refresh"`` recounts and rewrites; ``"off"`` neither reads nor
#: writes the store's attributes.
CACHE_MODES: tuple[str, ...] = ("auto", "refresh", "off")

#: Name of the Zarr attribute that caches the per-chunk counts of a label or weight array.
INDEX_ATTR = "daskpatch_index"
_INDEX_VERSION = 1

#: Largest number of per-chunk counts cached in a Zarr attribute (larger indexes are recounted).
_MAX_CACHED_COUNTS = 2**17

#: Voxels per index cell for sources without storage chunks (NumPy arrays): 64^3 in 3-D.
_DEFAULT_CELL_VOXELS = 2**18

#: Last entry of the seed of a transform's generator, ``[seed, epoch, index, 1]``: a stream
#: apart from the sample draws of :class:`RandomPatchDataset` (``[seed, epoch, index]``).
_TRANSFORM_STREAM = 1


# ----------------------------------------------------------------------------------------------
# Sources: one user array, opened lazily in each process
# ----------------------------------------------------------------------------------------------
def _open_zarr(path: str, param: str, mode: str = "r") -> zarr.Array:
    try:
        return zarr.open_array(path, mode=mode)  # type: ignore[arg-type]
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{param}: no Zarr array at {path!r}") from e
    except zarr.errors.NodeTypeValidationError as e:
        raise ValueError(
            f"{param}: {path!r} is a Zarr group, not an array; pass the array itself, e.g. "
            "zarr.open_array(store, path='name', mode='r')"
        ) from e


class _Source:
    """One user array: keeps a path (reopened per process) or the array object itself."""

    def __init__(self, obj: Any, param: str) -> None:
        self.param = param
        self.path: str | None = None
        self._obj: Any = None
        self._handle: zarr.Array | None = None
        self._pid: int | None = None
        self.is_dask = False
        if isinstance(obj, (str, os.PathLike)):
            self.path = os.fspath(obj)
            arr: Any = _open_zarr(self.path, param)
            self._handle, self._pid = arr, os.getpid()
        else:
            if isinstance(obj, da.Array):
                if any(math.isnan(c) for c in obj.shape):
                    raise ValueError(f"{param} must have a known shape; got {obj.shape}")
                direct = _direct_source(obj)
                if direct is not None:
                    obj = direct
                else:
                    self.is_dask = True
            if not self.is_dask and not (
                hasattr(obj, "shape") and hasattr(obj, "dtype") and hasattr(obj, "__getitem__")
            ):
                raise TypeError(
                    f"{param} must be a Zarr store path, or a Zarr, Dask or NumPy array; "
                    f"got {_describe(obj)}"
                )
            self._obj = arr = obj
        self.shape: tuple[int, ...] = tuple(int(s) for s in arr.shape)
        self.dtype = np.dtype(arr.dtype)
        if len(self.shape) == 0:
            raise ValueError(f"{param} must have at least one axis; got a 0-d array")
        self.zarr_backed = isinstance(arr, zarr.Array)
        if self.zarr_backed:
            self.chunks: tuple[Any, ...] | None = tuple(int(c) for c in arr.chunks)
        elif self.is_dask:
            self.chunks = tuple(tuple(int(c) for c in cs) for cs in arr.chunks)
        else:
            self.chunks = None

    # -- lazy, fork-safe access ----------------------------------------------------------------
    @property
    def array(self) -> Any:
        """The array to read from, (re)opened in this process if it was given by path."""
        if self.path is None:
            return self._obj
        if self._handle is None or self._pid != os.getpid():
            self._handle, self._pid = _open_zarr(self.path, self.param), os.getpid()
        return self._handle

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self.path is not None:  # never ship an open handle: the worker reopens the path
            state["_handle"] = None
            state["_pid"] = None
        return state

    def read(self, index: tuple[Any, ...]) -> np.ndarray:
        part = self.array[index]
        if self.is_dask:
            # local, single-threaded: a loader worker must not start thread pools or use a client
            part = part.compute(scheduler="synchronous")
        return np.asarray(part)

    def describe(self) -> str:
        return f"{self.param} ({self.path!r})" if self.path else self.param


@dataclass(frozen=True)
class _Layout:
    """Axes of one array: channel axis, batch axes, spatial axes (all as plain ints)."""

    ndim: int
    channel_axis: int | None
    n_batch: int
    batch_shape: tuple[int, ...]
    spatial_shape: tuple[int, ...]
    channels: int

    @classmethod
    def of(cls, shape: tuple[int, ...], size: Any, channel_axis: Any, name: str) -> _Layout:
        ch, n_batch, k = split_axes(len(shape), size, channel_axis, name=name, shape=shape)
        rest = [n for a, n in enumerate(shape) if a != ch]
        return cls(len(shape), ch, n_batch, tuple(rest[:n_batch]), tuple(rest[n_batch:]),
                   1 if ch is None else shape[ch])

    @property
    def spatial_axes(self) -> tuple[int, ...]:
        """Axis numbers of the spatial axes in the full array."""
        axes = [a for a in range(self.ndim) if a != self.channel_axis]
        return tuple(axes[self.n_batch:])

    def index(self, batch: tuple[int, ...], spatial: Sequence[slice]) -> tuple[Any, ...]:
        """Full index tuple: batch ints, spatial slices, the whole channel axis."""
        idx: list[Any] = list(batch) + list(spatial)
        if self.channel_axis is not None:
            idx.insert(self.channel_axis, slice(None))
        return tuple(idx)

    def channel_first(self, a: np.ndarray) -> np.ndarray:
        """A region read with :meth:`index` as ``(C, *spatial)``."""
        if self.channel_axis is None:
            return a[None]
        if self.channel_axis == self.ndim - 1:
            return np.moveaxis(a, -1, 0)
        return a


def _companion_layout(shape: tuple[int, ...], image: _Layout, size: Any, channel_axis: Any,
                      name: str, image_name: str) -> _Layout:
    """Layout of a label or weight array that goes with an image of layout ``image``."""
    if len(shape) == image.ndim:
        layout = _Layout.of(shape, size, channel_axis, name)
    elif channel_axis is not None and len(shape) == image.ndim - 1:
        layout = _Layout.of(shape, size, None, name)
    else:
        allowed = f"{image.ndim}" if channel_axis is None else f"{image.ndim} or {image.ndim - 1}"
        raise ValueError(
            f"{name} must have {allowed} axes to match the {image.ndim}-D {image_name} "
            f"(channel_axis={channel_axis}); got shape {shape}"
        )
    if (layout.batch_shape, layout.spatial_shape) != (image.batch_shape, image.spatial_shape):
        raise ValueError(
            f"{name} must have the same batch and spatial shape as {image_name}: "
            f"{image.batch_shape + image.spatial_shape}; got "
            f"{layout.batch_shape + layout.spatial_shape} (shape {shape})"
        )
    return layout


def _as_list(value: Any, name: str) -> list[Any]:
    if isinstance(value, (list, tuple)):
        if len(value) == 0:
            raise ValueError(f"{name} must be a volume or a non-empty list of volumes; got "
                             f"an empty {type(value).__name__}")
        return list(value)
    return [value]


def _pad_index(n: int, start: int, size: int, mode: str) -> np.ndarray:
    """Source index of each position of ``[start, start + size)`` padded past ``n`` (-1: zero)."""
    if mode == "constant":
        idx = np.arange(start, start + size)
        return np.where(idx < n, idx, -1)
    pad = max(0, start + size - n)
    padded = np.pad(np.arange(n), (0, pad), mode=mode)  # type: ignore[call-overload]
    return padded[start:start + size]


# ----------------------------------------------------------------------------------------------
# Shared base: volumes, layouts, reading patches
# ----------------------------------------------------------------------------------------------
class _VolumeSet:
    """Images (and optional labels/weights) as a flat list of volumes."""

    def __init__(self, images: Any, size: Any, labels: Any, channel_axis: Any,
                 weights: Any = None) -> None:
        items = _as_list(images, "images")
        self.images = [_Source(obj, f"images[{i}]") for i, obj in enumerate(items)]
        self.image_layouts = [
            _Layout.of(s.shape, size, channel_axis, s.param) for s in self.images
        ]
        ndims = {len(lay.spatial_shape) for lay in self.image_layouts}
        if len(ndims) > 1:
            raise ValueError(
                f"all images must have the same number of spatial axes; got {sorted(ndims)}"
            )
        self.ndim = ndims.pop()
        self.size = parse_per_axis(size, self.ndim, "size")
        self.channel_axis = channel_axis

        self.labels = self._companions(labels, "labels", channel_axis)
        self.label_layouts = self._companion_layouts(self.labels, size, channel_axis)
        self.weights = self._companions(weights, "weights", channel_axis)
        self.weight_layouts = self._companion_layouts(self.weights, size, channel_axis)
        for src, lay in zip(self.weights or [], self.weight_layouts or []):
            if lay.channels != 1:
                raise ValueError(
                    f"{src.param} must have one channel (a weight per voxel); got "
                    f"{lay.channels} channels on axis {lay.channel_axis}"
                )

        vols: list[tuple[int, tuple[int, ...]]] = []
        for item, lay in enumerate(self.image_layouts):
            vols.extend((item, tuple(int(b) for b in idx)) for idx in np.ndindex(lay.batch_shape))
        #: per volume: (position in the ``images`` list, batch index within that array)
        self.volumes: tuple[tuple[int, tuple[int, ...]], ...] = tuple(vols)
        self._vol_item = np.array([v[0] for v in vols], dtype=np.int64)

    def _companions(self, value: Any, name: str, channel_axis: Any) -> list[_Source] | None:
        if value is None:
            return None
        items = _as_list(value, name)
        if len(items) != len(self.images):
            raise ValueError(
                f"{name} must be one volume per image: {len(self.images)} images but "
                f"{len(items)} {name}"
            )
        return [_Source(obj, f"{name}[{i}]") for i, obj in enumerate(items)]

    def _companion_layouts(self, sources: list[_Source] | None, size: Any,
                           channel_axis: Any) -> list[_Layout] | None:
        if sources is None:
            return None
        return [
            _companion_layout(s.shape, lay, size, channel_axis, s.param, img.param)
            for s, lay, img in zip(sources, self.image_layouts, self.images)
        ]

    def spatial_shape(self, v: int) -> tuple[int, ...]:
        return self.image_layouts[self.volumes[v][0]].spatial_shape

    def read(self, source: _Source, layout: _Layout, batch: tuple[int, ...],
             start: Sequence[int], pad_mode: str = "constant", pad_value: Any = 0) -> np.ndarray:
        """Patch ``[start, start + size)`` of one volume as a contiguous ``(C, *size)`` array."""
        shape = layout.spatial_shape
        if all(s + z <= n for s, z, n in zip(start, self.size, shape)):
            sl = [slice(int(s), int(s) + z) for s, z in zip(start, self.size)]
            return np.ascontiguousarray(layout.channel_first(source.read(layout.index(batch, sl))))
        maps = [_pad_index(n, int(s), z, pad_mode) for n, s, z in zip(shape, start, self.size)]
        lo = [int(m[m >= 0].min()) if (m >= 0).any() else 0 for m in maps]
        hi = [int(m[m >= 0].max()) + 1 if (m >= 0).any() else 0 for m in maps]
        a = layout.channel_first(
            source.read(layout.index(batch, [slice(l, h) for l, h in zip(lo, hi)]))
        )
        for ax, (m, l) in enumerate(zip(maps, lo)):
            fill = m < 0
            a = np.take(a, np.where(fill, 0, m - l), axis=ax + 1) if a.shape[ax + 1] else (
                np.zeros(a.shape[: ax + 1] + (len(m),) + a.shape[ax + 2:], a.dtype))
            if fill.any():
                sel: list[Any] = [slice(None)] * a.ndim
                sel[ax + 1] = fill
                a[tuple(sel)] = pad_value
        return np.ascontiguousarray(a)

    def sample(self, v: int, start: Sequence[int], pad_mode: str = "constant",
               pad_value: Any = 0) -> dict[str, Any]:
        item, batch = self.volumes[v]
        out = {"image": self.read(self.images[item], self.image_layouts[item], batch, start,
                                  pad_mode, pad_value)}
        if self.labels is not None and self.label_layouts is not None:
            out["label"] = self.read(self.labels[item], self.label_layouts[item], batch, start,
                                     pad_mode)
        out["location"] = np.asarray(start, dtype=np.int64)
        out["volume"] = np.asarray(v, dtype=np.int64)
        return out


def _check_item(index: Any, n: int) -> int:
    i = parse_int(index, "index")
    if not -n <= i < n:
        raise IndexError(f"sample index {index} is out of range for a dataset of {n} samples")
    return i % n


# ----------------------------------------------------------------------------------------------
# Grid patches
# ----------------------------------------------------------------------------------------------
class _SharedEpoch:
    """An epoch number that the copies of a dataset in DataLoader workers see change.

    The number lives in shared memory (a ``multiprocessing.RawValue``), which forked workers
    inherit and spawned workers receive while they start, so ``set_epoch`` in the main process
    reaches workers that outlive an epoch (``persistent_workers=True``). Pickled any other way
    (``copy.deepcopy``, ``pickle.dumps``) the copy gets its own number, starting from the
    current one.
    """

    def __init__(self, value: int = 0) -> None:
        self._value = multiprocessing.RawValue("q", value)

    def get(self) -> int:
        return int(self._value.value)

    def set(self, value: int) -> None:
        self._value.value = value

    def __getstate__(self) -> dict[str, Any]:
        if multiprocessing.context.get_spawning_popen() is not None:  # starting a process
            return {"shared": self._value}
        return {"value": self.get()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "shared" in state:
            self._value = state["shared"]
        else:
            self._value = multiprocessing.RawValue("q", state["value"])


def _takes_rng(transform: Callable) -> bool:
    """Whether ``transform`` has a parameter named ``rng`` (it is then called with one)."""
    try:
        params = inspect.signature(transform).parameters
    except (TypeError, ValueError):  # some builtins and C callables have no signature
        return False
    p = params.get("rng")
    return p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)


class _Dataset:
    """What both datasets share: a set of volumes, a seed and an epoch, the item's finish."""

    _set: _VolumeSet

    def _setup(self, seed: Any, transform: Any, label_dtype: Any) -> None:
        self.seed = parse_int(seed, "seed", minimum=0)
        self._epoch = _SharedEpoch()
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be a callable taking the item dict, or None; "
                            f"got {_describe(transform)}")
        #: called on each item dict after reading (see the class docstring)
        self.transform = transform
        self._transform_rng = transform is not None and _takes_rng(transform)
        if label_dtype is None:
            self.label_dtype = None
        else:
            if self._set.labels is None:
                raise ValueError("label_dtype needs labels: there are no labels to convert")
            try:
                self.label_dtype = np.dtype(label_dtype)
            except TypeError as err:
                raise TypeError(f"label_dtype must be a NumPy dtype; got "
                                f"{_describe(label_dtype)}") from err

    @property
    def epoch(self) -> int:
        """The current epoch (see :meth:`set_epoch`)."""
        return self._epoch.get()

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` (an int >= 0) from now on, in this process and in the DataLoader
        workers that hold copies of the dataset (persistent ones too)."""
        self._epoch.set(parse_int(epoch, "epoch", minimum=0))

    def _finish(self, item: dict[str, Any], index: int, epoch: int) -> dict[str, Any]:
        """Convert the label dtype, then apply the transform."""
        if self.label_dtype is not None and "label" in item:
            item["label"] = item["label"].astype(self.label_dtype, copy=False)
        if self.transform is None:
            return item
        if self._transform_rng:
            rng = np.random.default_rng([self.seed, epoch, index, _TRANSFORM_STREAM])
            out = self.transform(item, rng=rng)
        else:
            out = self.transform(item)
        if not isinstance(out, dict):
            raise TypeError(f"transform must return the item dict; got {_describe(out)} from "
                            f"{self.transform!r}")
        return out

    @property
    def size(self) -> tuple[int, ...]:
        """Patch shape (spatial)."""
        return self._set.size

    @property
    def volumes(self) -> tuple[tuple[int, tuple[int, ...]], ...]:
        """Per volume: its position in the ``images`` list and its batch index in that array."""
        return self._set.volumes


class PatchDataset(_Dataset):
    """Map-style dataset of the patches of a regular grid over one or many volumes.

    Parameters
    ----------
    images : str, os.PathLike, zarr.Array, dask.array.Array, numpy.ndarray, or a list of them
        The volume(s). A string or path is a Zarr array store (opened read-only, lazily in each
        process). A Dask array that is a plain ``from_zarr``/``from_array`` is read through its
        source directly; any other Dask array is computed region by region with the synchronous
        scheduler. An array whose ``size`` names fewer axes than it has non-channel axes holds a
        batch of volumes along its leading axes: each is a separate volume.
    size : int or sequence of int
        Patch shape on the spatial axes (the last ``len(size)`` non-channel axes).
    stride : int or sequence of int, optional
        Step between patch starts; ``None`` means ``stride = size``.
    labels : same kinds as ``images``, optional
        One label volume per image, with the same batch and spatial shape; it may have the
        image's channel axis or none. Its patches are cut at the same places.
    border : {"shift", "pad", "drop"}
        Grid placement at the end of each axis, as in :class:`~daskpatch.grid.PatchGrid`.
    channel_axis : {None, 0, -1}
        Channel axis of the images (and of labels that have the images' number of axes).
    pad_mode : {"reflect", "symmetric", "edge", "wrap", "constant"}
        How patches that run past the end are filled when ``border="pad"`` (``numpy.pad`` modes;
        ``"constant"`` fills ``pad_value``). Images and labels are padded the same way, except
        that ``"constant"`` fills labels with 0.
    pad_value : number
        The fill of ``pad_mode="constant"`` in images (MONAI's ``cval``; e.g. -1024 for CT in
        Hounsfield units); it must fit the images' dtype.
    seed : int
        Seed (>= 0) of the ``transform``'s generator.
    transform : callable, optional
        Called on each item dict after reading (and after ``label_dtype``); returns the item dict
        (the same or a new one). A transform with a parameter named ``rng`` is called
        ``transform(item, rng=generator)`` with a ``numpy.random.Generator`` seeded from
        ``[seed, epoch, index, 1]``, so its augmentations are the same for a given seed, epoch
        and sample whatever the number of loader workers; any other transform is called
        ``transform(item)`` and its own randomness (torch's, MONAI's ``set_random_state``) is its
        own business. It must pickle to reach spawned workers (a module-level function or
        object, not a lambda).
    label_dtype : dtype, optional
        Convert labels to this dtype when read (e.g. ``np.int64`` for
        ``torch.nn.CrossEntropyLoss``); a plain cast, so float labels are truncated.

    Notes
    -----
    Call :meth:`set_epoch` before each epoch when the transform draws random augmentations; it
    reaches DataLoader workers, persistent ones too.

    ``len(dataset)`` is the total number of grid patches; patches are numbered volume by volume,
    in C order over the grid of each volume (``dataset.grids[v]``). ``dataset[i]`` is a dict of
    NumPy arrays (see :mod:`daskpatch.data`): ``"image"`` ``(C, *size)``, ``"label"`` when given,
    ``"location"`` (the patch start) and ``"volume"``. A ``torch.utils.data.DataLoader`` collates
    them into tensors with a leading batch axis.

    Examples
    --------
    >>> import numpy as np
    >>> image = np.arange(6 * 8, dtype=np.float32).reshape(6, 8)
    >>> ds = PatchDataset(image, size=4, labels=image > 20)
    >>> len(ds), ds.grids[0].grid_shape
    (4, (2, 2))
    >>> s = ds[3]
    >>> s["image"].shape, s["label"].shape, s["location"].tolist(), int(s["volume"])
    ((1, 4, 4), (1, 4, 4), [2, 4], 0)
    >>> bool((s["image"] == image[2:6, 4:8]).all())
    True

    Two volumes of different shapes, one after the other:

    >>> ds = PatchDataset([image, np.zeros((4, 4), np.float32)], size=4)
    >>> len(ds), int(ds[4]["volume"])
    (5, 1)
    """

    def __init__(
        self,
        images: VolumeLike | Sequence[VolumeLike],
        size: int | Sequence[int],
        stride: int | Sequence[int] | None = None,
        *,
        labels: VolumeLike | Sequence[VolumeLike] | None = None,
        border: BorderMode = "shift",
        channel_axis: int | None = None,
        pad_mode: PadMode = "reflect",
        pad_value: float = 0,
        seed: int = 0,
        transform: Callable[..., dict[str, Any]] | None = None,
        label_dtype: Any = None,
    ) -> None:
        self.border = parse_choice(border, "border", BORDERS)
        self.pad_mode = parse_choice(pad_mode, "pad_mode", PAD_MODES)
        self._set = _VolumeSet(images, size, labels, channel_axis)
        for src in self._set.images:
            pad_value = parse_pad_value(pad_value, self.pad_mode, src.dtype)
        self.pad_value = pad_value
        self._setup(seed, transform, label_dtype)
        by_shape: dict[tuple[int, ...], PatchGrid] = {}
        grids = []
        for v in range(len(self._set.volumes)):
            shape = self._set.spatial_shape(v)
            if shape not in by_shape:
                by_shape[shape] = PatchGrid(shape, self._set.size, stride, border=self.border)
            grids.append(by_shape[shape])
        #: one :class:`~daskpatch.grid.PatchGrid` per volume
        self.grids: tuple[PatchGrid, ...] = tuple(grids)
        self._offsets = np.cumsum([0] + [len(g) for g in grids], dtype=np.int64)


    def __len__(self) -> int:
        return int(self._offsets[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """``(volume, patch index in that volume's grid)`` of sample ``index``."""
        i = _check_item(index, len(self))
        v = int(np.searchsorted(self._offsets, i, side="right")) - 1
        return v, i - int(self._offsets[v])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        v, j = self.locate(index)
        epoch = self.epoch
        item = self._set.sample(v, self.grids[v].start(j), self.pad_mode, self.pad_value)
        return self._finish(item, int(self._offsets[v]) + j, epoch)

    def __repr__(self) -> str:
        return (f"PatchDataset({len(self)} patches of {self.size} from "
                f"{len(self.volumes)} volume(s), labels={self._set.labels is not None})")


# ----------------------------------------------------------------------------------------------
# The chunk index: one count per storage chunk
# ----------------------------------------------------------------------------------------------
IndexKind = Literal["foreground", "weight"]


def _cell_chunks(source: _Source, layout: _Layout) -> tuple[tuple[int, ...], ...]:
    """Index cells along each spatial axis: the storage chunks, or a default for NumPy."""
    out = []
    default = max(1, round(_DEFAULT_CELL_VOXELS ** (1 / len(layout.spatial_shape))))
    for ax, n in zip(layout.spatial_axes, layout.spatial_shape):
        c: Any = source.chunks[ax] if source.chunks is not None else default
        if isinstance(c, tuple):
            out.append(c)
        else:
            c = min(int(c), n)
            out.append((c,) * (n // c) + ((n % c,) if n % c else ()))
    return tuple(out)


def _count_block(block: np.ndarray, kind: str, channel_axis: int | None,
                 param: str) -> np.ndarray:
    """Reduce one chunk to its count: foreground voxels, or the weight sum."""
    out_shape = (1,) * block.ndim
    if kind == "foreground":
        mask = block > 0
        if channel_axis is not None:
            mask = mask.any(axis=channel_axis)
        return np.full(out_shape, np.count_nonzero(mask), dtype=np.int64)
    w = block.astype(np.float64, copy=False)
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"{param} must be finite and >= 0 everywhere; found a negative, NaN or "
                         "infinite weight")
    return np.full(out_shape, w.sum(), dtype=np.float64)


def _count_graph(source: _Source, layout: _Layout, cells: tuple[tuple[int, ...], ...],
                 kind: str) -> da.Array:
    """Lazy per-cell counts with shape ``batch_shape + cell grid``: one task per chunk."""
    chunks: list[Any] = [None] * layout.ndim
    for ax in range(layout.ndim):
        if ax == layout.channel_axis:
            chunks[ax] = (source.shape[ax],)
        elif ax not in layout.spatial_axes:
            chunks[ax] = (1,) * source.shape[ax]
    for ax, c in zip(layout.spatial_axes, cells):
        chunks[ax] = c
    if source.is_dask:
        x = source.array.rechunk(tuple(chunks))
    else:
        x = da.from_array(source.array, chunks=tuple(chunks), asarray=False, lock=False,
                          inline_array=True, name=False)
    dtype = np.int64 if kind == "foreground" else np.float64
    counts = x.map_blocks(
        _count_block, kind, layout.channel_axis, source.param,
        chunks=tuple((1,) * len(c) for c in x.chunks), dtype=dtype,
        meta=np.empty((0,) * x.ndim, dtype=dtype),
    )
    if layout.channel_axis is not None:
        counts = counts.squeeze(axis=layout.channel_axis)
    return counts


def _cache_spec(source: _Source, layout: _Layout, cells: tuple[tuple[int, ...], ...],
                kind: str) -> dict[str, Any]:
    return {
        "version": _INDEX_VERSION, "kind": kind, "shape": list(source.shape),
        "dtype": source.dtype.str, "channel_axis": layout.channel_axis,
        "n_batch": layout.n_batch, "cells": [list(c) for c in cells],
    }


def _read_cache(source: _Source, spec: dict[str, Any],
                expected: tuple[int, ...]) -> np.ndarray | None:
    if not source.zarr_backed:
        return None
    cached = source.array.attrs.get(INDEX_ATTR)
    if not isinstance(cached, dict):
        return None
    if any(cached.get(k) != v for k, v in spec.items()):
        return None
    counts = cached.get("counts")
    if not isinstance(counts, list) or len(counts) != math.prod(expected):
        return None
    dtype = np.int64 if spec["kind"] == "foreground" else np.float64
    return np.asarray(counts, dtype=dtype).reshape(expected)


def _write_cache(source: _Source, spec: dict[str, Any], counts: np.ndarray) -> bool:
    """Store the counts in the Zarr array's attributes; ``False`` when it is not writable."""
    if not source.zarr_backed or counts.size > _MAX_CACHED_COUNTS:
        return False
    value = dict(spec, counts=counts.ravel().tolist())
    try:
        if source.path is not None:
            target = _open_zarr(source.path, source.param, mode="r+")
        else:
            target = source.array
            if getattr(target.store, "read_only", False):
                return False
        target.update_attributes({INDEX_ATTR: value})
    except (PermissionError, OSError):
        return False
    return True


class _ChunkIndex:
    """Per-chunk counts of every volume, flattened into cumulative tables (O(chunks) memory)."""

    def __init__(self, sources: list[_Source], layouts: list[_Layout], kind: IndexKind,
                 volumes: tuple[tuple[int, tuple[int, ...]], ...], cache: str) -> None:
        self.kind = kind
        #: per item: spatial chunk boundaries along each axis
        self.bounds: list[tuple[np.ndarray, ...]] = []
        per_item: list[np.ndarray | None] = []
        todo: dict[int, da.Array] = {}
        specs = []
        for item, (src, lay) in enumerate(zip(sources, layouts)):
            cells = _cell_chunks(src, lay)
            self.bounds.append(tuple(np.cumsum((0,) + c, dtype=np.int64) for c in cells))
            spec = _cache_spec(src, lay, cells, kind)
            specs.append(spec)
            expected = lay.batch_shape + tuple(len(c) for c in cells)
            counts = _read_cache(src, spec, expected) if cache == "auto" else None
            per_item.append(counts)
            if counts is None:
                todo[item] = _count_graph(src, lay, cells, kind)
        #: items whose counts were computed (not read from a cache) by this call
        self.computed = tuple(todo)
        self.cached: tuple[int, ...] = ()
        if todo:
            results = dask.compute(*todo.values())
            written = []
            for item, counts in zip(todo, results):
                counts = np.asarray(counts)
                per_item[item] = counts
                if cache != "off" and _write_cache(sources[item], specs[item], counts):
                    written.append(item)
            self.cached = tuple(written)

        self.grid_shapes = [tuple(len(b) - 1 for b in bounds) for bounds in self.bounds]
        flat: list[np.ndarray] = []
        for item, batch in volumes:
            counts = per_item[item]
            assert counts is not None
            flat.append(np.asarray(counts[batch]).ravel())
        self.offsets = np.cumsum([0] + [f.size for f in flat], dtype=np.int64)
        self.volume_items = np.array([item for item, _ in volumes], dtype=np.int64)
        counts = np.concatenate(flat)
        self.cdf = np.cumsum(counts)
        if kind == "foreground":
            cell_voxels = np.concatenate([
                self._cell_voxels(item) for item, _ in volumes
            ])
            self.bg_cdf = np.cumsum(cell_voxels - counts)
        else:
            positive = np.flatnonzero(counts > 0)
            self.last_positive = int(positive[-1]) if positive.size else -1

    def _cell_voxels(self, item: int) -> np.ndarray:
        sizes = [np.diff(b) for b in self.bounds[item]]
        out = sizes[0]
        for s in sizes[1:]:
            out = np.multiply.outer(out, s)
        return np.asarray(out, dtype=np.int64).ravel()

    @property
    def n_cells(self) -> int:
        return int(self.offsets[-1])

    @property
    def nbytes(self) -> int:
        """Bytes held by the index tables."""
        arrays = [self.cdf, self.offsets, self.volume_items]
        arrays += [b for bounds in self.bounds for b in bounds]
        if self.kind == "foreground":
            arrays.append(self.bg_cdf)
        return sum(a.nbytes for a in arrays)

    def cell(self, c: int) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
        """Volume and spatial bounds ``[lo, hi)`` of flat cell ``c``."""
        v = int(np.searchsorted(self.offsets, c, side="right")) - 1
        item = int(self.volume_items[v])
        multi = np.unravel_index(c - int(self.offsets[v]), self.grid_shapes[item])
        bounds = self.bounds[item]
        lo = tuple(int(b[m]) for b, m in zip(bounds, multi))
        hi = tuple(int(b[m + 1]) for b, m in zip(bounds, multi))
        return v, lo, hi


# ----------------------------------------------------------------------------------------------
# Random patches
# ----------------------------------------------------------------------------------------------
def _parse_fraction(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number between 0 and 1; got {_describe(value)}")
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be between 0 and 1; got {value}")
    return value


class RandomPatchDataset(_Dataset):
    """Map-style dataset of ``samples_per_epoch`` random patches, re-drawn every epoch.

    Each sample picks a voxel, then the patch of shape ``size`` centred on it (start
    ``voxel - size // 2``), shifted where needed so that it lies inside the volume; the voxel
    always lies inside the patch. The voxel is drawn over all volumes together:

    - uniformly (default): every voxel equally likely, so larger volumes give more patches;
    - by ``weights``: with probability proportional to the weight map's value (>= 0);
    - label-balanced, when ``pos_fraction`` is given: a foreground voxel (``label > 0``, on any
      label channel) with probability ``pos_fraction``, else a background voxel, uniformly within
      each class (MONAI's ``RandCropByPosNegLabel`` with ``pos / (pos + neg) = pos_fraction``;
      nnU-Net oversamples foreground with ``pos_fraction=0.33``). A one-hot label whose first
      channel marks the background would make every voxel foreground: give a label map, or the
      foreground channels only.

    Weighted and label-balanced draws use an index of one count per storage chunk (foreground
    voxels, or the weight sum), computed once with Dask (one reduction task per chunk) and
    cached in the Zarr array's attributes (:data:`INDEX_ATTR`; up to 131072 chunks): a draw
    picks a chunk from this small table, reads that one chunk and picks a voxel in it. Memory is
    O(number of chunks), never O(voxels). Sources without storage chunks (NumPy arrays) are
    indexed in cells of about 64^3 voxels (512^2 in 2-D).

    Parameters
    ----------
    images : str, os.PathLike, zarr.Array, dask.array.Array, numpy.ndarray, or a list of them
        The volume(s), as in :class:`PatchDataset`.
    size : int or sequence of int
        Patch shape on the spatial axes; it must fit inside every volume.
    samples_per_epoch : int
        ``len(dataset)``: the number of patches per epoch.
    labels : same kinds as ``images``, optional
        One label volume per image (same batch and spatial shape); returned as ``"label"`` and,
        with ``pos_fraction``, used for label-balanced sampling.
    pos_fraction : float in [0, 1], optional
        Probability that a patch is centred on a foreground voxel. Needs ``labels``.
    weights : same kinds as ``images``, optional
        One weight map per image (same batch and spatial shape, at most one channel), finite and
        >= 0. Excludes ``pos_fraction``.
    seed : int
        Seed (>= 0). Sample ``i`` of epoch ``e`` is drawn by ``np.random.default_rng([seed, e,
        i])``, whatever the number of loader workers and whoever reads it.
    channel_axis : {None, 0, -1}
        Channel axis of the images (and of labels/weights that have the images' number of axes).
    cache_index : {"auto", "refresh", "off"}
        ``"auto"`` (default) reuses counts cached in a Zarr label/weight array's attributes when
        they match its shape, dtype and chunks, else counts and stores them if the store is
        writable; ``"refresh"`` recounts and rewrites (use it after rewriting a label array in
        place: the cache cannot see that); ``"off"`` never touches the attributes.
    transform : callable, optional
        Called on each item dict after reading (and after ``label_dtype``); returns the item dict
        (the same or a new one). A transform with a parameter named ``rng`` is called
        ``transform(item, rng=generator)`` with a ``numpy.random.Generator`` seeded from
        ``[seed, epoch, index, 1]``, so its augmentations are the same for a given seed, epoch
        and sample whatever the number of loader workers; any other transform is called
        ``transform(item)`` and its own randomness (torch's, MONAI's ``set_random_state``) is its
        own business. It must pickle to reach spawned workers (a module-level function or
        object, not a lambda).
    label_dtype : dtype, optional
        Convert labels to this dtype when read (e.g. ``np.int64`` for
        ``torch.nn.CrossEntropyLoss``); a plain cast, so float labels are truncated.

    Notes
    -----
    A weighted or label-balanced draw reads one chunk of the label/weight array besides the
    patch itself: keep those chunks small (Zarr's advice is 1-16 MB; a Dask array that is not a
    plain ``from_zarr`` is computed chunk by chunk, so its chunks should be small too).

    Call :meth:`set_epoch` before each epoch to draw new patches. The epoch lives in shared
    memory, so it reaches the DataLoader's workers, persistent ones
    (``persistent_workers=True``) too.

    Examples
    --------
    >>> import numpy as np
    >>> label = np.zeros((32, 32), np.uint8)
    >>> label[20:22, 5:7] = 1                       # 4 foreground voxels out of 1024
    >>> image = label.astype(np.float32) * 10
    >>> ds = RandomPatchDataset(image, 8, samples_per_epoch=100, labels=label, pos_fraction=0.5)
    >>> s = ds[0]
    >>> s["image"].shape, s["label"].shape, s["location"].dtype
    ((1, 8, 8), (1, 8, 8), dtype('int64'))
    >>> centred_on_fg = [label[tuple(ds[i]["center"])] > 0 for i in range(len(ds))]
    >>> bool(0.35 < np.mean(centred_on_fg) < 0.65)
    True
    >>> again = RandomPatchDataset(image, 8, samples_per_epoch=100, labels=label, pos_fraction=0.5)
    >>> ds[7]["location"].tolist() == again[7]["location"].tolist()     # same seed, same patch
    True
    >>> ds.index_nbytes < 1024                       # a few counts, not a per-voxel map
    True
    """

    def __init__(
        self,
        images: VolumeLike | Sequence[VolumeLike],
        size: int | Sequence[int],
        *,
        samples_per_epoch: int,
        labels: VolumeLike | Sequence[VolumeLike] | None = None,
        pos_fraction: float | None = None,
        weights: VolumeLike | Sequence[VolumeLike] | None = None,
        seed: int = 0,
        channel_axis: int | None = None,
        cache_index: CacheMode = "auto",
        transform: Callable[..., dict[str, Any]] | None = None,
        label_dtype: Any = None,
    ) -> None:
        self.samples_per_epoch = parse_int(samples_per_epoch, "samples_per_epoch", minimum=1)
        cache = parse_choice(cache_index, "cache_index", CACHE_MODES)
        self.pos_fraction = None if pos_fraction is None else _parse_fraction(pos_fraction,
                                                                             "pos_fraction")
        if self.pos_fraction is not None and labels is None:
            raise ValueError("pos_fraction needs labels: label-balanced sampling centres "
                             "patches on label > 0 voxels; pass labels=...")
        if self.pos_fraction is not None and weights is not None:
            raise ValueError("pass either pos_fraction (label-balanced sampling) or weights "
                             "(weight-map sampling), not both")
        self._set = _VolumeSet(images, size, labels, channel_axis, weights)
        for v in range(len(self._set.volumes)):
            shape = self._set.spatial_shape(v)
            item = self._set.volumes[v][0]
            if any(z > n for z, n in zip(self._set.size, shape)):
                raise ValueError(
                    f"size {self._set.size} does not fit in {self._set.images[item].describe()} "
                    f"of spatial shape {shape}: random patches must lie inside the volume"
                )
        self._setup(seed, transform, label_dtype)
        self._index: _ChunkIndex | None = None
        if self.pos_fraction is not None:
            self.mode = "label"
            assert self._set.labels is not None and self._set.label_layouts is not None
            self._index = _ChunkIndex(self._set.labels, self._set.label_layouts, "foreground",
                                      self._set.volumes, cache)
            n_fg, n_bg = int(self._index.cdf[-1]), int(self._index.bg_cdf[-1])
            if self.pos_fraction > 0 and n_fg == 0:
                raise ValueError(f"pos_fraction={self.pos_fraction} needs foreground voxels "
                                 "(label > 0) but the labels have none")
            if self.pos_fraction < 1 and n_bg == 0:
                raise ValueError(f"pos_fraction={self.pos_fraction} needs background voxels "
                                 "(label <= 0) but the labels have none; use pos_fraction=1")
        elif weights is not None:
            self.mode = "weights"
            assert self._set.weights is not None and self._set.weight_layouts is not None
            self._index = _ChunkIndex(self._set.weights, self._set.weight_layouts, "weight",
                                      self._set.volumes, cache)
            if self._index.last_positive < 0:
                raise ValueError("weights are zero everywhere: no voxel can be drawn")
        else:
            self.mode = "uniform"
        voxels = [math.prod(self._set.spatial_shape(v)) for v in range(len(self._set.volumes))]
        self._voxel_cdf = np.cumsum(voxels, dtype=np.int64)

    # -- public --------------------------------------------------------------------------------
    @property
    def index_nbytes(self) -> int:
        """Bytes held by the sampling index: O(number of chunks); 0 for uniform sampling."""
        extra = self._voxel_cdf.nbytes
        return extra + (self._index.nbytes if self._index is not None else 0)

    @property
    def index_cells(self) -> int:
        """Number of chunks in the sampling index (0 for uniform sampling)."""
        return self._index.n_cells if self._index is not None else 0

    def __len__(self) -> int:
        return self.samples_per_epoch

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        i = _check_item(index, len(self))
        epoch = self.epoch
        rng = np.random.default_rng([self.seed, epoch, i])
        v, center = self._draw(rng)
        shape = self._set.spatial_shape(v)
        start = [min(max(c - z // 2, 0), n - z) for c, z, n in zip(center, self.size, shape)]
        out = self._set.sample(v, start)
        out["center"] = np.asarray(center, dtype=np.int64)
        return self._finish(out, i, epoch)

    def __repr__(self) -> str:
        return (f"RandomPatchDataset({self.samples_per_epoch} patches of {self.size} per epoch "
                f"from {len(self.volumes)} volume(s), mode={self.mode!r}, seed={self.seed}, "
                f"epoch={self.epoch})")

    # -- drawing -------------------------------------------------------------------------------
    def _draw(self, rng: np.random.Generator) -> tuple[int, list[int]]:
        if self._index is None:
            g = int(rng.integers(int(self._voxel_cdf[-1])))
            v = int(np.searchsorted(self._voxel_cdf, g, side="right"))
            local = g - (int(self._voxel_cdf[v - 1]) if v else 0)
            return v, [int(c) for c in np.unravel_index(local, self._set.spatial_shape(v))]
        index = self._index
        if self.mode == "label":
            assert self.pos_fraction is not None
            positive = bool(rng.random() < self.pos_fraction)
            cdf = index.cdf if positive else index.bg_cdf
            target = int(rng.integers(int(cdf[-1])))
            c = int(np.searchsorted(cdf, target, side="right"))
            rank = target - (int(cdf[c - 1]) if c else 0)
        else:
            c = int(np.searchsorted(index.cdf, rng.random() * index.cdf[-1], side="right"))
            c = min(c, index.last_positive)
        v, lo, hi = index.cell(c)
        item, batch = self._set.volumes[v]
        if self.mode == "label":
            assert self._set.labels is not None and self._set.label_layouts is not None
            src, lay = self._set.labels[item], self._set.label_layouts[item]
        else:
            assert self._set.weights is not None and self._set.weight_layouts is not None
            src, lay = self._set.weights[item], self._set.weight_layouts[item]
        block = lay.channel_first(
            src.read(lay.index(batch, [slice(l, h) for l, h in zip(lo, hi)]))
        )
        if self.mode == "label":
            mask = (block > 0).any(axis=0)
            flat = np.flatnonzero(mask if positive else ~mask)
            if rank >= flat.size:
                self._stale(src)
            k = int(flat[rank])
        else:
            cs = np.cumsum(block[0].ravel(), dtype=np.float64)
            if not cs.size or not cs[-1] > 0:
                self._stale(src)
            k = min(int(np.searchsorted(cs, rng.random() * cs[-1], side="right")), cs.size - 1)
        offset = np.unravel_index(k, tuple(h - l for l, h in zip(lo, hi)))
        return v, [l + int(o) for l, o in zip(lo, offset)]

    @staticmethod
    def _stale(src: _Source) -> None:
        raise ValueError(
            f"{src.describe()} no longer matches its chunk index (the data changed after the "
            "counts were computed or cached); rebuild the dataset with cache_index='refresh'"
        )
