"""The volumes of a training dataset: images with their labels and weights, one layout each."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from daskpatch.geometry.layout import Layout, parse_layout
from daskpatch.geometry.parse import parse_per_axis
import os

import zarr

from daskpatch.graph.inputs import take
from daskpatch.storage.sources import _apply_maps, open_zarr, pad_axis
from daskpatch.storage.markers import warn_if_incomplete
from daskpatch.storage.stores import where as describe_array_at


# ----------------------------------------------------------------------------------------------
# Layouts of the images and of their labels/weights
# ----------------------------------------------------------------------------------------------
def _layout(shape: tuple[int, ...], size: Any, channel_axis: Any, name: str) -> Layout:
    return parse_layout(len(shape), size, channel_axis, name, shape=shape)


def _companion_layout(shape: tuple[int, ...], image: Layout, size: Any, channel_axis: Any,
                      name: str, image_name: str) -> Layout:
    """Layout of a label or weight array that goes with an image of layout ``image``."""
    if len(shape) == image.ndim:
        layout = _layout(shape, size, channel_axis, name)
    elif channel_axis is not None and len(shape) == image.ndim - 1:
        layout = _layout(shape, size, None, name)
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


# ----------------------------------------------------------------------------------------------
# Shared base: volumes, layouts, reading patches
# ----------------------------------------------------------------------------------------------
class VolumeSet:
    """Images (and optional labels/weights) as a flat list of volumes."""

    def __init__(self, images: Any, size: Any, labels: Any, channel_axis: Any,
                 weights: Any = None, storage_options: dict[str, Any] | None = None) -> None:
        self.storage_options = storage_options
        items = _as_list(images, "images")
        self.images = [Source(obj, f"images[{i}]", storage_options)
                       for i, obj in enumerate(items)]
        self.image_layouts = [
            _layout(s.shape, size, channel_axis, s.param) for s in self.images
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

    def _companions(self, value: Any, name: str, channel_axis: Any) -> list[Source] | None:
        if value is None:
            return None
        items = _as_list(value, name)
        if len(items) != len(self.images):
            raise ValueError(
                f"{name} must be one volume per image: {len(self.images)} images but "
                f"{len(items)} {name}"
            )
        return [Source(obj, f"{name}[{i}]", self.storage_options) for i, obj in enumerate(items)]

    def _companion_layouts(self, sources: list[Source] | None, size: Any,
                           channel_axis: Any) -> list[Layout] | None:
        if sources is None:
            return None
        return [
            _companion_layout(s.shape, lay, size, channel_axis, s.param, img.param)
            for s, lay, img in zip(sources, self.image_layouts, self.images)
        ]

    def spatial_shape(self, v: int) -> tuple[int, ...]:
        return self.image_layouts[self.volumes[v][0]].spatial_shape

    def sample(self, v: int, start: Sequence[int], pad_mode: str = "constant",
               pad_value: Any = 0) -> dict[str, Any]:
        item, batch = self.volumes[v]
        out = {"image": self.images[item].read_patch(self.image_layouts[item], batch, start,
                                                     self.size, pad_mode, pad_value)}
        if self.labels is not None and self.label_layouts is not None:
            out["label"] = self.labels[item].read_patch(self.label_layouts[item], batch, start,
                                                        self.size, pad_mode)
        out["location"] = np.asarray(start, dtype=np.int64)
        out["volume"] = np.asarray(v, dtype=np.int64)
        return out


class Source:
    """One user array of a loader: keeps a path (reopened per process) or the array itself."""

    def __init__(self, obj: Any, param: str,
                 storage_options: dict[str, Any] | None = None) -> None:
        self.param = param
        self.storage_options = storage_options
        self.path: str | None = None
        self._obj: Any = None
        self._handle: zarr.Array | None = None
        self._pid: int | None = None
        self.is_dask = False
        if isinstance(obj, (str, os.PathLike)):
            self.path = os.fspath(obj)
            if "://" not in self.path:  # the same file in every loader worker
                self.path = os.path.abspath(self.path)
            arr: Any = open_zarr(self.path, param, storage_options=storage_options)
            self._handle, self._pid = arr, os.getpid()
        else:
            obj, self.is_dask = take(obj, param, paths=True)
            self._obj = arr = obj
        self.shape: tuple[int, ...] = tuple(int(s) for s in arr.shape)
        self.dtype = np.dtype(arr.dtype)
        if len(self.shape) == 0:
            raise ValueError(f"{param} must have at least one axis; got a 0-d array")
        self.zarr_backed = isinstance(arr, zarr.Array)
        if self.zarr_backed:  # an interrupted daskpatch output reads its missing chunks as fill
            warn_if_incomplete(arr, f"{param} ({describe_array_at(arr.store, arr.path or None)})")
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
            self._handle, self._pid = open_zarr(self.path, self.param,
                                                storage_options=self.storage_options), os.getpid()
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

    def read_patch(self, layout: Layout, batch: tuple[int, ...], start: Sequence[int],
                   size: Sequence[int], pad_mode: str = "constant",
                   pad_value: Any = 0) -> np.ndarray:
        """Patch ``[start, start + size)`` of the volume at ``batch`` as a contiguous
        ``(C, *size)`` array, padded past the end like the engine's reads (:func:`pad_axis`)."""
        axes = [pad_axis(n, int(s), int(s) + z, pad_mode)
                for n, s, z in zip(layout.spatial_shape, start, size)]
        index = layout.index(batch, [slice(s0, s1) for _, s0, s1 in axes])
        a = layout.channel_first(self.read(index))
        return np.ascontiguousarray(_apply_maps(a, [m for m, _, _ in axes], pad_value))

    def describe(self) -> str:
        return f"{self.param} ({self.path!r})" if self.path else self.param
