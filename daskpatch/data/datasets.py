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

import math
import os
from collections.abc import Callable, Sequence
from typing import Any, Literal, Union

import dask.array as da
import numpy as np
import zarr

from daskpatch.data.sampling import (INDEX_ATTR, _ChunkIndex, _parse_fraction, _SharedEpoch,
                                     _takes_rng, draw)
from daskpatch.data.volumes import VolumeSet
from daskpatch.geometry.parse import (
    BORDERS,
    PAD_MODES,
    BorderMode,
    PadMode,
    _describe,
    parse_choice,
    parse_int,
    parse_pad_value,
)
from daskpatch.geometry.grid import PatchGrid

__all__ = ["CACHE_MODES", "INDEX_ATTR", "PatchDataset", "RandomPatchDataset"]

#: What a volume may be: a Zarr store path (or URL), a Zarr array, a Dask array or a NumPy array.
VolumeLike = Union[str, "os.PathLike[str]", zarr.Array, da.Array, np.ndarray]

CacheMode = Literal["auto", "refresh", "off"]
#: Accepted ``cache_index`` values: ``"auto"`` reads a valid cached index and writes a fresh one
#: when the store is writable; ``"refresh"`` recounts and rewrites; ``"off"`` neither reads nor
#: writes the store's attributes.
CACHE_MODES: tuple[str, ...] = ("auto", "refresh", "off")

#: Last entry of the seed of a transform's generator, ``[seed, epoch, index, 1]``: a stream
#: apart from the sample draws of :class:`RandomPatchDataset` (``[seed, epoch, index]``).
_TRANSFORM_STREAM = 1


def _check_item(index: Any, n: int) -> int:
    i = parse_int(index, "index")
    if not -n <= i < n:
        raise IndexError(f"sample index {index} is out of range for a dataset of {n} samples")
    return i % n


#: The largest epoch :meth:`_Dataset.set_epoch` takes: the epoch is a shared 64-bit integer.
MAX_EPOCH = 2**63 - 1


def _labels_as(label: np.ndarray, dtype: np.dtype, index: int) -> np.ndarray:
    """``label`` as ``dtype``, refusing a value the dtype cannot hold (a class id that would
    wrap, as 300 -> 44 in uint8, or NaN in an integer dtype) rather than changing it."""
    if dtype.kind in "iub" and label.size and label.dtype != dtype:
        if label.dtype.kind == "f" and np.isnan(label).any():
            raise ValueError(f"label_dtype={dtype} cannot hold NaN, found in the label of "
                             f"sample {index}")
        lo, hi = (0, 1) if dtype.kind == "b" else (np.iinfo(dtype).min, np.iinfo(dtype).max)
        found = (label.min(), label.max())
        bad = [v for v in found if not lo <= v <= hi]
        if bad:
            raise ValueError(f"label_dtype={dtype} holds {lo} to {hi}, but the label of sample "
                             f"{index} has {bad[0].item()}: pass a wider label_dtype (or none)")
    return label.astype(dtype, copy=False)


class _Dataset:
    """What both datasets share: a set of volumes, a seed and an epoch, the item's finish."""

    _set: VolumeSet

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
            if self.label_dtype.kind not in "biuf":
                raise TypeError(f"label_dtype must be a boolean, integer or floating dtype; "
                                f"got {self.label_dtype}")

    @property
    def epoch(self) -> int:
        """The current epoch (see :meth:`set_epoch`)."""
        return self._epoch.get()

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` (an int from 0 to ``2**63 - 1``) from now on, in this process and in the
        DataLoader workers that hold copies of the dataset (persistent ones too)."""
        value = parse_int(epoch, "epoch", minimum=0)
        if value > MAX_EPOCH:
            raise ValueError(f"epoch must be an int from 0 to 2**63 - 1 (it is kept as a 64-bit "
                             f"integer shared with the DataLoader workers); got {value}")
        self._epoch.set(value)

    def _finish(self, item: dict[str, Any], index: int, epoch: int) -> dict[str, Any]:
        """Convert the label dtype, then apply the transform."""
        if self.label_dtype is not None and "label" in item:
            item["label"] = _labels_as(item["label"], self.label_dtype, index)
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


# ----------------------------------------------------------------------------------------------
# Grid patches
# ----------------------------------------------------------------------------------------------
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
        ``torch.nn.CrossEntropyLoss``); a plain cast, so float labels are truncated. A label
        the dtype cannot hold (300 or -1 in ``uint8``, NaN in an integer dtype) is an error
        naming the sample, never a wrapped class id.
    storage_options : dict, optional
        fsspec options for volumes given as URLs (``"s3://bucket/vol.zarr"``): credentials,
        ``endpoint_url``; each loader worker opens the store with them.

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
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.border: BorderMode = parse_choice(  # type: ignore[assignment]
            border, "border", BORDERS)
        self.pad_mode = parse_choice(pad_mode, "pad_mode", PAD_MODES)
        self._set = VolumeSet(images, size, labels, channel_axis,
                              storage_options=storage_options)
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
# Random patches
# ----------------------------------------------------------------------------------------------
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
        ``torch.nn.CrossEntropyLoss``); a plain cast, so float labels are truncated. A label
        the dtype cannot hold (300 or -1 in ``uint8``, NaN in an integer dtype) is an error
        naming the sample, never a wrapped class id.
    storage_options : dict, optional
        fsspec options for volumes given as URLs (``"s3://bucket/vol.zarr"``): credentials,
        ``endpoint_url``; each loader worker opens the store with them.

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
        storage_options: dict[str, Any] | None = None,
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
        self._set = VolumeSet(images, size, labels, channel_axis, weights,
                              storage_options=storage_options)
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
        return draw(rng, self._set, self.mode, self._index, self.pos_fraction, self._voxel_cdf)
