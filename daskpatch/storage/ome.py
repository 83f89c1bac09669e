"""OME-Zarr (NGFF) images in and out: multiscale levels, axes, units, scale, pyramids.

Reading (:func:`open_volume`) understands NGFF 0.4 (Zarr v2, ``multiscales`` in ``.zattrs``) and
0.5 (Zarr v3, under ``attributes["ome"]``) image groups, and the ``bioformats2raw`` layout (its
series ``0``). Writing (:func:`write`, behind ``to_zarr(..., ome=True)``) makes an OME-Zarr 0.5
image: a Zarr v3 group whose levels ``0``, ``1``, ... are each written by :func:`daskpatch.to_zarr`
(so each has its own done-markers and resumes on its own), level ``k`` computed lazily from the
*written* level ``k - 1``. The group's ``ome`` metadata is written last, so an interrupted pyramid
is no OME image yet: its group attributes hold only ``{"daskpatch": {"complete": false, ...}}``,
which :func:`open_volume` names as incomplete and ``resume=True`` finishes.

Pyramid geometry. Each level halves (rounding up) every ``space`` axis that still has at least 2
voxels; ``time`` and ``channel`` axes are kept. A level's voxel size is chosen so that every level
covers the same physical extent (``shape * scale`` is the same on every level, as ome-zarr-py
does), and its translation puts voxel centres at the centres of their footprints:
``scale_k = scale_0 * n_0 / n_k`` and ``translation_k = translation_0 + (scale_k - scale_0) / 2``.
Values: the mean of each 2x block for floats, the most frequent value (mode, the smallest on a
tie) for integers and booleans, which keeps label ids; an odd axis end repeats its last voxel.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import dask.array as da
import numpy as np
import zarr

from daskpatch.errors import (IncompleteOutputError, ParameterError, ResumeMismatchError,
                              TargetExistsError, UnsafeTargetError)
from daskpatch.storage import stores as _store
from daskpatch.storage import targets as _targets
from daskpatch.storage import markers as _markers
from daskpatch.geometry.parse import _describe
from daskpatch.adapters.xarray import import_xarray, is_dataarray, wrap

__all__ = ["DOWNSAMPLE", "as_dataarray", "check_target", "create_group", "finish", "level_shapes",
           "locate", "metadata", "write_geometry"]

#: Downsampling methods of ``to_zarr(..., ome=True, levels=N, downsample=...)``.
DOWNSAMPLE: tuple[str, ...] = ("auto", "mean", "mode")
AXIS_TYPES: tuple[str, ...] = ("space", "time", "channel")
NGFF_VERSION = "0.5"
_MARKER = "daskpatch"

#: Units the NGFF specification lists (UDUNITS-2 names) for space and time axes.
SPACE_UNITS: frozenset[str] = frozenset(
    "angstrom attometer centimeter decimeter exameter femtometer foot gigameter hectometer inch "
    "kilometer megameter meter micrometer mile millimeter nanometer parsec petameter picometer "
    "terameter yard yoctometer yottameter zeptometer zettameter".split()
)
TIME_UNITS: frozenset[str] = frozenset(
    "attosecond centisecond day decisecond exasecond femtosecond gigasecond hectosecond hour "
    "kilosecond megasecond microsecond millisecond minute nanosecond petasecond picosecond "
    "second terasecond yoctosecond yottasecond zeptosecond zettasecond".split()
)


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


def _ome_attrs(attrs: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The OME attributes of a group: 0.5 nests them under ``ome``, 0.4 and older do not."""
    ome = attrs.get("ome")
    if isinstance(ome, Mapping):
        return ome
    if "multiscales" in attrs or "bioformats2raw.layout" in attrs:
        return attrs
    return None


def _axes(multiscale: Mapping[str, Any], ndim: int) -> list[dict[str, Any]]:
    """The axes as dicts (0.3 lists bare names; 0.1-0.2 none: the NGFF default ``tczyx``)."""
    axes = multiscale.get("axes")
    if not axes:
        axes = list("tczyx"[5 - ndim:]) if ndim <= 5 else [f"dim_{i}" for i in range(ndim)]
    out = [dict(a) if isinstance(a, Mapping) else {"name": str(a)} for a in axes]
    for a in out:
        a.setdefault("type", _guess_type(a["name"]))
    return out


def _transform(transforms: Any, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """(scale, translation) of a list of NGFF coordinate transformations, applied in order."""
    scale, shift = np.ones(ndim), np.zeros(ndim)
    if transforms is not None and not isinstance(transforms, list):
        raise _malformed("coordinateTransformations must be a list", transforms)
    for t in transforms or ():
        if not isinstance(t, Mapping):
            raise _malformed("each coordinate transformation must be an object", t)
        for kind in ("scale", "translation"):
            if t.get("type") == kind and kind in t:
                try:
                    v = np.asarray(t[kind], dtype=float)
                except (TypeError, ValueError):
                    v = None
                if v is None or v.shape != (ndim,):
                    raise _malformed(f"a {kind} needs {ndim} numbers, one per axis", t[kind])
                if kind == "scale":
                    scale, shift = scale * v, shift * v
                else:
                    shift = shift + v
    return scale, shift


def _malformed(what: str, got: Any, where: str = "") -> ParameterError:
    text = repr(got)
    return ParameterError(
        f"the OME-Zarr metadata{' of ' + where if where else ''} is malformed: {what}; got "
        f"{text[:120]}"
        + ("..." if len(text) > 120 else ""), param="store", value=got)


def _check_multiscale(multiscales: Any, where: str) -> Mapping[str, Any]:
    """The first multiscale, checked enough to be read: an object whose datasets are objects
    with a path each."""
    if not isinstance(multiscales, list):
        raise _malformed("multiscales must be a list", multiscales, where)
    first = multiscales[0]
    if not isinstance(first, Mapping):
        raise _malformed("each multiscale must be an object", first, where)
    datasets = first.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise _malformed("a multiscale needs a non-empty list of datasets (its levels)",
                         datasets, where)
    for d in datasets:
        if not isinstance(d, Mapping) or not isinstance(d.get("path"), str) or not d["path"]:
            raise _malformed("each dataset must be an object with a path", d, where)
    return first


def _image(group: zarr.Group) -> tuple[zarr.Group, Mapping[str, Any]] | None:
    """The image group and its first multiscale, or ``None`` when ``group`` is no OME image."""
    ome = _ome_attrs(group.attrs)
    if ome is None:
        return None
    if "multiscales" not in ome and "bioformats2raw.layout" in ome:
        try:
            series = group["0"]
        except KeyError:
            return None
        return _image(series) if isinstance(series, zarr.Group) else None
    multiscales = ome.get("multiscales")
    if not multiscales:
        return None
    where = _store.where(group.store, group.path or None)
    return group, _check_multiscale(multiscales, where)


def _incomplete_error(where: str) -> IncompleteOutputError:
    return IncompleteOutputError(
        f"{where} is an incomplete OME-Zarr image written by daskpatch (interrupted before its "
        "last level was written; it has no OME metadata yet): finish it with "
        "to_zarr(..., ome=True, resume=True) and the same arguments, or open one written "
        "level with path=<path>/0", value=where, mentions=("path",)
    )


def locate(store: Any, path: Any, level: int) -> tuple[zarr.Array, Any]:
    """The Zarr array :func:`daskpatch.open_volume` opens at ``store``/``path`` (``level`` of an
    OME-Zarr image), and the image's ``(group, multiscale)`` (``None`` for a plain array);
    warns when daskpatch has not finished writing it."""
    image = None
    if isinstance(store, zarr.Array):
        z = _store.open_array(store, path)
    else:
        path = _store.parse_path(path)
        base, full = _store.resolve_store(store, path)
        node = _store.probe(base, full)
        if isinstance(node, zarr.Group):
            image = _image(node)
            if image is None and not _ome_attrs(node.attrs) and \
                    isinstance(node.attrs.get(_MARKER), Mapping):
                raise _incomplete_error(_store.where(base, full))
        if image is None:
            z = _store.open_array(store, path)  # an array, or the error naming the group's arrays
        else:
            group, multiscale = image
            datasets = multiscale.get("datasets") or []
            paths = [str(d.get("path")) for d in datasets]
            if level >= len(paths):
                raise ValueError(
                    f"level must be one of the {len(paths)} levels of the OME-Zarr image at "
                    f"{_store.where(base, full)} (0 to {len(paths) - 1}: paths {paths}); got "
                    f"{level}"
                )
            z = zarr.open_array(store=group.store, path=f"{group.path}/{paths[level]}".strip("/"),
                                mode="r")
    if image is None and level != 0:
        raise ValueError(
            f"level must be 0 for a plain Zarr array (only an OME-Zarr image group has levels); "
            f"got {level}"
        )
    _markers.warn_if_incomplete(z, _store.where(z.store, z.path or None))
    return z, image


def as_dataarray(z: zarr.Array, data: Any, image: Any, level: int) -> Any:
    """``data`` (the Dask array over ``z``) as an xarray DataArray: dims from the Zarr v3
    ``dimension_names`` (or ``_ARRAY_DIMENSIONS``), or, for an OME-Zarr image, the axes with
    coordinates from its scale and translation."""
    import_xarray("open_volume(..., xarray=True)")
    if image is None:
        return _plain_dataarray(z, data)
    return _ome_dataarray(data, image[1], level)


def _plain_dataarray(z: zarr.Array, data: da.Array) -> Any:
    attrs: dict[str, Any] = dict(z.attrs)
    names: Any = getattr(z.metadata, "dimension_names", None)
    names = names or attrs.pop("_ARRAY_DIMENSIONS", None)
    if not isinstance(names, (list, tuple)) or len(names) != z.ndim or \
            not all(isinstance(n, str) for n in names):
        names = [f"dim_{i}" for i in range(z.ndim)]
    return wrap(data, names, attrs=attrs)


def _ome_dataarray(data: da.Array, multiscale: Mapping[str, Any], level: int) -> Any:
    ndim = data.ndim
    axes = _axes(multiscale, ndim)
    if len(axes) != ndim:
        raise ValueError(
            f"the OME-Zarr multiscale has {len(axes)} axes but level {level} has {ndim} "
            "dimensions"
        )
    dataset = multiscale["datasets"][level]
    s_d, t_d = _transform(dataset.get("coordinateTransformations"), ndim)
    s_m, t_m = _transform(multiscale.get("coordinateTransformations"), ndim)
    scale, shift = s_d * s_m, t_d * s_m + t_m
    for a, ax in enumerate(axes):
        if ax.get("type") != "channel" and not (np.isfinite(scale[a]) and scale[a] > 0
                                                and np.isfinite(shift[a])):
            raise ParameterError(
                f"the OME-Zarr metadata gives axis {ax.get('name')!r} of level {level} scale "
                f"{scale[a]} and translation {shift[a]}: coordinates need a positive finite "
                "scale and a finite translation; fix the metadata, or open it with "
                "xarray=False", param="xarray", value=(float(scale[a]), float(shift[a])))
    xr = import_xarray("open_volume(..., xarray=True)")
    coords = {}
    for a, (ax, n) in enumerate(zip(axes, data.shape)):
        if ax.get("type") == "channel":
            values = np.arange(n)
        else:
            values = shift[a] + scale[a] * np.arange(n)
        attrs = {"units": ax["unit"]} if ax.get("unit") else {}
        coords[ax["name"]] = xr.Variable(ax["name"], values, attrs=attrs)
    ome = {"version": multiscale.get("version", NGFF_VERSION), "axes": axes, "level": level,
           "path": str(dataset.get("path"))}
    if multiscale.get("name"):
        ome["name"] = multiscale["name"]
    return wrap(data, [a["name"] for a in axes], coords, {"ome": ome},
                multiscale.get("name") or None)


# --------------------------------------------------------------------------------------------
# axes, scale and units of a write
# --------------------------------------------------------------------------------------------


def _guess_type(name: Any) -> str:
    n = str(name).lower()
    if n in ("t", "time"):
        return "time"
    if n in ("c", "ch", "channel", "channels"):
        return "channel"
    return "space"


def _default_names(ndim: int) -> list[str]:
    return list("tczyx"[5 - ndim:]) if 2 <= ndim <= 5 else [f"dim_{i}" for i in range(ndim)]


def _parse_axes(axes: Any, ndim: int) -> list[dict[str, Any]]:
    if isinstance(axes, str):
        axes = list(axes)
    if not isinstance(axes, Sequence):
        raise TypeError(
            f"axes must be a string of one-letter names (like 'czyx'), or a sequence of names or "
            f"of dicts with 'name' (and 'type', 'unit'); got {_describe(axes)}"
        )
    if len(axes) != ndim:
        raise ValueError(f"axes must have one entry per axis of the {ndim}-D array; got "
                         f"{list(axes)!r} with {len(axes)} entries")
    out = []
    for i, a in enumerate(axes):
        if isinstance(a, str):
            a = {"name": a}
        elif isinstance(a, Mapping) and isinstance(a.get("name"), str):
            a = {k: a[k] for k in ("name", "type", "unit") if a.get(k) is not None}
        else:
            raise TypeError(f"axes[{i}] must be a name or a dict with a 'name' string; got "
                            f"{_describe(a)}")
        out.append(a)
    return out


def _per_axis(value: Any, names: list[str], what: str, kind: type | tuple) -> list[Any]:
    """A per-axis list from a sequence (one per axis) or a mapping name -> value (None: absent)."""
    if isinstance(value, Mapping):
        unknown = [k for k in value if k not in names]
        if unknown:
            raise ValueError(f"{what} names axes {unknown} that the array does not have; its "
                             f"axes are {names}")
        out = [value.get(n) for n in names]
    elif isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != len(names):
            raise ValueError(f"{what} must have one entry per axis {names}; got {list(value)!r} "
                             f"with {len(value)} entries")
        out = list(value)
    else:
        raise TypeError(f"{what} must be a sequence (one entry per axis {names}) or a mapping "
                        f"from axis names; got {_describe(value)}")
    expected = "a string" if kind is str else "a number"
    for n, v in zip(names, out):
        if v is not None and (isinstance(v, bool) or not isinstance(v, kind)):
            raise TypeError(f"{what}[{n!r}] must be {expected} or None; got {_describe(v)}")
    return out


def _check_axes(axes: list[dict[str, Any]]) -> None:
    """NGFF 0.5 rules: 2-5 axes, unique names, 2-3 space axes last, time first, one channel."""
    names = [a["name"] for a in axes]
    if not 2 <= len(axes) <= 5:
        raise ValueError(f"an OME-Zarr image has 2 to 5 axes; the array has {len(axes)} "
                         f"({names})")
    if len(set(names)) != len(names) or not all(names):
        raise ValueError(f"axes must have distinct, non-empty names; got {names}")
    types = [a["type"] for a in axes]
    for a in axes:
        if a["type"] not in AXIS_TYPES:
            raise ValueError(f"the type of axis {a['name']!r} must be one of {AXIS_TYPES}; got "
                             f"{a['type']!r}")
    n_space = types.count("space")
    order = {"time": 0, "channel": 1, "space": 2}
    if not 2 <= n_space <= 3 or types.count("time") > 1 or types.count("channel") > 1 or \
            [order[t] for t in types] != sorted(order[t] for t in types):
        raise ValueError(
            "an OME-Zarr image needs 2 or 3 space axes, last, after at most one channel axis, "
            f"after at most one time axis (first); got axes {names} of types {types} (pass "
            "axes= with names, or dicts with 'type', to say which axis is which)"
        )
    for a in axes:
        unit = a.get("unit")
        allowed = {"space": SPACE_UNITS, "time": TIME_UNITS}.get(a["type"])
        if unit is not None and allowed is not None and unit not in allowed:
            raise ValueError(
                f"the unit of {a['type']} axis {a['name']!r} must be one of the NGFF units "
                f"({', '.join(sorted(allowed))}); got {unit!r}"
            )


def _coords_geometry(array: Any, names: list[str], given: list[Any]
                     ) -> tuple[list[Any], list[Any], list[Any]]:
    """(scale, translation, unit) per axis from a DataArray's 1-D coordinates (None: none).

    An axis whose scale is ``given`` takes only its translation (the first value) from them."""
    scale: list[Any] = [None] * len(names)
    shift: list[Any] = [None] * len(names)
    units: list[Any] = [None] * len(names)
    for i, n in enumerate(names):
        if n not in array.coords:
            continue
        c = array.coords[n]
        units[i] = c.attrs.get("units") or c.attrs.get("unit")
        values = np.asarray(c.values)
        if values.ndim == 1 and values.dtype.kind in "mM":
            raise ParameterError(
                f"the coordinate {n!r} holds {values.dtype} values, which OME-Zarr cannot store "
                "(one numeric scale and translation per axis): convert it to numbers (e.g. "
                "seconds since its first value) and pass units=, or drop the coordinate",
                param="array", value=str(values.dtype))
        if values.ndim != 1 or values.dtype.kind not in "iuf" or not len(values):
            continue
        shift[i] = float(values[0])
        if len(values) > 1:
            steps = np.diff(values.astype(float))
            if given[i] is not None:
                continue
            if not np.allclose(steps, steps[0], rtol=1e-6, atol=0) or steps[0] <= 0:
                raise ValueError(
                    f"the coordinate {n!r} is not evenly increasing, so OME-Zarr cannot store "
                    "it (one scale and translation per axis); pass scale= (or drop the "
                    "coordinate)"
                )
            scale[i] = float(steps[0])
    return scale, shift, units


def write_geometry(array: Any, ndim: int, axes: Any, scale: Any, units: Any
              ) -> tuple[list[dict[str, Any]], np.ndarray, np.ndarray]:
    """Validated (axes, scale, translation) of level 0, from the keywords and/or a DataArray."""
    xa = array if is_dataarray(array) else None
    known: dict[str, dict[str, Any]] = {}
    if xa is not None:
        ome = xa.attrs.get("ome")
        if isinstance(ome, Mapping) and isinstance(ome.get("axes"), Sequence):
            known = {a["name"]: dict(a) for a in ome["axes"]
                     if isinstance(a, Mapping) and isinstance(a.get("name"), str)}
    if axes is not None:
        parsed = _parse_axes(axes, ndim)
    elif xa is not None:
        parsed = [{"name": str(d)} for d in xa.dims]
    else:
        parsed = [{"name": n} for n in _default_names(ndim)]
    names = [a["name"] for a in parsed]
    for a in parsed:
        a.setdefault("type", known.get(a["name"], {}).get("type") or _guess_type(a["name"]))
        if known.get(a["name"], {}).get("unit"):
            a.setdefault("unit", known[a["name"]]["unit"])
    given = [None] * ndim if scale is None else _per_axis(scale, names, "scale", numbers.Real)
    c_scale, c_shift, c_units = (_coords_geometry(xa, names, given) if xa is not None
                                 else ([None] * ndim,) * 3)
    if units is not None:
        u = _per_axis(units, names, "units", str)
        c_units = [x if x is not None else y for x, y in zip(u, c_units)]
    for a, u in zip(parsed, c_units):
        if units is not None and u is not None:
            a["unit"] = u
        elif u is not None:
            a.setdefault("unit", u)
    c_scale = [x if x is not None else y for x, y in zip(given, c_scale)]
    out_scale = np.array([1.0 if v is None else float(v) for v in c_scale])
    if not np.all(np.isfinite(out_scale)) or np.any(out_scale <= 0):
        raise ValueError(f"scale must be positive and finite on every axis {names}; got "
                         f"{out_scale.tolist()}")
    shift = np.array([0.0 if v is None else float(v) for v in c_shift])
    _check_axes(parsed)
    return parsed, out_scale, shift


# --------------------------------------------------------------------------------------------
# downsampling
# --------------------------------------------------------------------------------------------


def _mode(v: np.ndarray) -> np.ndarray:
    """The most frequent value along the last axis (the smallest on a tie)."""
    s = np.sort(v, axis=-1)
    counts = np.empty(s.shape, dtype=np.int16)
    for j in range(s.shape[-1]):
        counts[..., j] = (s == s[..., j:j + 1]).sum(axis=-1)
    best = counts.argmax(axis=-1)[..., None]  # first maximum: the smallest of the tied values
    return np.take_along_axis(s, best, axis=-1)[..., 0]


def downsample_block(block: np.ndarray, factors: tuple[int, ...], method: str) -> np.ndarray:
    """Reduce each ``factors``-sized box of one block to one voxel (an odd end repeats its last
    voxel)."""
    pad = [(0, -n % f) for n, f in zip(block.shape, factors)]
    if any(p for _, p in pad):
        block = np.pad(block, pad, mode="edge")
    split = [d for n, f in zip(block.shape, factors) for d in (n // f, f)]
    boxes = block.reshape(split)
    inner = tuple(range(1, 2 * block.ndim, 2))
    if method == "mode":
        out_shape = boxes.shape[0::2]
        moved = np.moveaxis(boxes, inner, range(block.ndim, 2 * block.ndim))
        return _mode(moved.reshape(out_shape + (-1,)))
    dtype = block.dtype
    acc = np.float64 if dtype.kind != "f" or dtype.itemsize > 4 else np.float32
    mean = boxes.mean(axis=inner, dtype=acc)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        mean = np.clip(np.rint(mean), info.min, info.max)
    return mean.astype(dtype, copy=False)


def level_shapes(shape: tuple[int, ...], space: list[int], levels: int
                  ) -> list[tuple[int, ...]]:
    shapes = [tuple(shape)]
    for k in range(1, levels):
        prev = shapes[-1]
        if all(prev[a] < 2 for a in space):
            raise ValueError(
                f"levels={levels} is too many for shape {tuple(shape)}: level {k - 1} "
                f"{prev} has no space axis left to halve (at most levels={k})"
            )
        shapes.append(tuple(-(-n // 2) if a in space and n >= 2 else n
                            for a, n in enumerate(prev)))
    return shapes


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def _multiscale(axes: list[dict[str, Any]], shapes: list[tuple[int, ...]], scale: np.ndarray,
                shift: np.ndarray, method: str, name: Any) -> dict[str, Any]:
    datasets = []
    n0 = np.array(shapes[0], dtype=float)
    for k, shape in enumerate(shapes):
        s = scale * n0 / np.array(shape, dtype=float)
        t = shift + (s - scale) / 2
        transforms: list[dict[str, Any]] = [{"type": "scale", "scale": s.tolist()}]
        if np.any(t != 0):
            transforms.append({"type": "translation", "translation": t.tolist()})
        datasets.append({"path": str(k), "coordinateTransformations": transforms})
    out: dict[str, Any] = {"axes": axes, "datasets": datasets}
    if len(shapes) > 1:
        out["type"] = method
        out["metadata"] = {"description": f"2x {method} of the space axes per level, by daskpatch"}
    if name is not None:
        out["name"] = str(name)
    return out


def finish(group: zarr.Group, meta: dict[str, Any], _job: Any) -> zarr.Group:
    """Write the OME metadata: the last step, after every level is complete."""
    group.attrs.update(meta)
    return group



def check_target(base: Any, full: str | None, where: str, *, overwrite: bool, resume: bool,
                 levels: int, downsample: str) -> Any:
    """The node at an image's target (``None``: nothing there) after checking that this write
    may go there: a group only if daskpatch wrote it, an existing image only with ``overwrite``
    or ``resume`` (and then with the same number of levels and the same ``downsample``)."""
    node = _store.probe(base, full)
    marker: Any = node.attrs.get(_MARKER) if isinstance(node, zarr.Group) else None
    ours = isinstance(marker, Mapping)
    if isinstance(node, zarr.Group) and not ours:
        raise UnsafeTargetError(
            f"to_zarr: {where} is a group that daskpatch did not write; to_zarr never replaces "
            "it (with its children). Pass path= naming a new image inside it, or delete it",
            param="path", value=where
        )
    if node is not None and not (overwrite or resume):
        raise TargetExistsError(
            f"to_zarr: {'an OME-Zarr image' if ours else 'an array'} already exists at {where}; "
            "pass overwrite=True to replace it, or resume=True to finish an interrupted write",
            param="overwrite", value=where
        )
    if resume and node is not None:
        if not ours:
            raise ResumeMismatchError(
                f"resume=True with ome=True needs an OME-Zarr image at {where}; it holds an "
                "array. Pass overwrite=True to replace it", param="ome", stored=False, value=True)
        if marker.get("levels") != levels:
            raise ResumeMismatchError(
                f"resume=True needs the image at {where} to match this write, but it was "
                f"started with levels={marker.get('levels')} (this write: levels={levels}). "
                "Pass overwrite=True to start again",
                param="levels", stored=marker.get("levels"), value=levels
            )
        if marker.get("downsample", downsample) != downsample:
            raise ResumeMismatchError(
                f"resume=True needs the image at {where} to match this write, but it was "
                f"started with downsample={marker.get('downsample')!r} (this write: "
                f"downsample={downsample!r}); its levels would mix both. Pass the same "
                "downsample=, or overwrite=True to start again",
                param="downsample", stored=marker.get("downsample"), value=downsample
            )
    _targets.check_parents(base, full, where, "an image", name_parent=True)
    return node


def create_group(base: Any, full: str | None, node: Any, overwrite: bool, levels: int,
                 method: str) -> tuple[zarr.Group, dict[str, Any]]:
    """The image's group, created (marked incomplete) or reopened, and the marker that
    :func:`finish` writes once every level is complete."""
    info = {"complete": False, "levels": levels, "downsample": method}
    if node is None or overwrite:
        group = zarr.create_group(store=base, path=full or "", zarr_format=3, overwrite=overwrite,
                                  attributes={_MARKER: info})
    else:
        group = zarr.open_group(store=base, path=full or "", mode="r+")
    return group, {**info, "complete": True}


def metadata(axes: list[dict[str, Any]], shapes: list[tuple[int, ...]], scale: np.ndarray,
             shift: np.ndarray, method: str, name: Any, marker: dict[str, Any]
             ) -> dict[str, Any]:
    """The group attributes of a finished image: its ``ome`` metadata and daskpatch's marker."""
    return {"ome": {"version": NGFF_VERSION,
                    "multiscales": [_multiscale(axes, shapes, scale, shift, method, name)]},
            _MARKER: marker}
