"""NIfTI out: a (lazy) volume written to a ``.nii`` or ``.nii.gz`` file with its affine.

Reading NIfTI needs no function of ours: nibabel's ``dataobj`` is a lazy array view (see the
user guide's NIfTI recipe, which reads ``x, y, z`` and transposes to ``z, y, x``).
:func:`to_nifti` is the way back: it takes the array in that ``z, y, x`` order (or ``x, y, z``
with ``axes="xyz"``), writes it in NIfTI's ``x, y, z`` order with the affine (and optionally the
header) of the image it came from. An uncompressed ``.nii`` is written chunk by chunk into the
file (memory is the running tasks', not the volume's); a ``.nii.gz`` is computed into memory
first, since gzip streams in order only. nibabel (the ``formats`` extra) is imported when called.
"""

from __future__ import annotations

import os
import uuid
from typing import Any, Literal

import numpy as np

from daskpatch.adapters.xarray import is_dataarray
from daskpatch.errors import ParameterError, ParameterTypeError, TargetExistsError
from daskpatch.geometry.parse import _describe, parse_bool, parse_choice
from daskpatch.graph import jobs as _sched
from daskpatch.graph.inputs import as_dask
from daskpatch.io import to_numpy

__all__ = ["NIFTI_AXES", "to_nifti"]

#: Accepted ``axes`` of :func:`to_nifti`: the order of the array's spatial axes.
NIFTI_AXES: tuple[str, ...] = ("zyx", "xyz")


def _import_nibabel() -> Any:
    try:
        import nibabel
    except ImportError as err:  # pragma: no cover - the dev extra installs it
        raise ImportError("to_nifti needs nibabel; install it with pip install "
                          "'daskpatch[formats]'") from err
    return nibabel


def _parse_affine(affine: Any) -> np.ndarray:
    if affine is None:
        return np.eye(4)
    try:
        arr = np.asarray(affine, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ParameterTypeError(f"affine must be a 4 x 4 array of numbers or None; got "
                                 f"{_describe(affine)}", param="affine", value=affine,
                                 expected="a 4 x 4 array") from err
    if arr.shape != (4, 4) or not np.isfinite(arr).all():
        raise ParameterError(f"affine must be a finite 4 x 4 array (voxel to world, as "
                             f"nibabel's img.affine); got shape {arr.shape}"
                             + ("" if arr.shape != (4, 4) else " with non-finite values"),
                             param="affine", value=arr.shape, expected=(4, 4))
    return arr


class _NiftiRegion:
    """A ``da.store`` target writing into the data part of an uncompressed NIfTI file (in
    Fortran order, from ``offset``); it pickles as its path, so a cluster's workers write the
    file themselves where they see it."""

    def __init__(self, path: str, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path, self.offset, self.shape, self.dtype = path, offset, shape, dtype

    def __setitem__(self, key: Any, value: np.ndarray) -> None:
        mm = np.memmap(self.path, dtype=self.dtype, mode="r+", offset=self.offset,
                       shape=self.shape, order="F")
        try:
            mm[key] = value
            mm.flush()
        finally:
            del mm


def to_nifti(
    array: Any,
    path: str | os.PathLike,
    affine: Any = None,
    *,
    header: Any = None,
    axes: Literal["zyx", "xyz"] = "zyx",
    channel_axis: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> str:
    """Write a volume to a NIfTI-1 file with its affine.

    Parameters
    ----------
    array : array-like or xarray.DataArray
        The volume: NumPy, Dask (computed here) or Zarr, 2 or 3 spatial axes, and a channel axis
        when ``channel_axis`` is given (written as NIfTI's 4th axis).
    path : str or os.PathLike
        A ``.nii`` file (written chunk by chunk) or ``.nii.gz`` (computed in memory, then
        compressed). It is written under a temporary name and renamed when complete, so a
        failed write leaves nothing at ``path``.
    affine : array of shape (4, 4), optional
        Voxel (``i, j, k`` in NIfTI's ``x, y, z`` order) to world coordinates, as nibabel's
        ``img.affine`` of the image the volume was read from; set as both qform and sform.
        ``None``: the identity.
    header : nibabel.Nifti1Header, optional
        A header to start from (units, description, intent, ...; ``img.header`` of the source);
        its shape, dtype, affine and scaling are replaced by the array's.
    axes : {"zyx", "xyz"}
        The order of the array's spatial axes: ``"zyx"`` (default; as the user guide's recipe
        reads a NIfTI file, and as OME-Zarr keeps them) is reversed into NIfTI's ``x, y, z``;
        ``"xyz"`` is written as it is.
    channel_axis : int, optional
        The array's channel axis (written last, as NIfTI's 4th axis).
    overwrite : bool
        Replace an existing file at ``path``; without it an existing file is refused.
    progress : bool
        Show a progress bar.

    Returns
    -------
    str
        ``path``.

    Examples
    --------
    >>> import os, tempfile, numpy as np, nibabel as nib
    >>> tmp = tempfile.mkdtemp()
    >>> vol_xyz = np.random.default_rng(0).random((6, 5, 4), dtype=np.float32)
    >>> nib.save(nib.Nifti1Image(vol_xyz, np.diag([0.5, 0.5, 2.0, 1.0])), f"{tmp}/ct.nii")
    >>> img = nib.load(f"{tmp}/ct.nii")
    >>> vol = np.asarray(img.dataobj).transpose(2, 1, 0)            # z, y, x
    >>> out = to_nifti(2 * vol, f"{tmp}/pred.nii", img.affine, header=img.header)
    >>> back = nib.load(out)
    >>> back.shape, bool(np.allclose(back.get_fdata(), 2 * vol_xyz))
    ((6, 5, 4), True)
    >>> bool(np.allclose(back.affine, img.affine))
    True
    """
    nib = _import_nibabel()
    if is_dataarray(array):
        array = array.data
    if not isinstance(path, (str, os.PathLike)):
        raise ParameterTypeError(f"path must be a file path ending in .nii or .nii.gz; got "
                                 f"{_describe(path)}", param="path", value=path)
    path = os.fspath(path)
    gz = path.endswith(".nii.gz")
    if not (gz or path.endswith(".nii")):
        raise ParameterError(f"path must end in .nii (uncompressed, written chunk by chunk) or "
                             f".nii.gz; got {path!r}", param="path", value=path,
                             expected=".nii or .nii.gz")
    axes = parse_choice(axes, "axes", NIFTI_AXES)  # type: ignore[assignment]
    overwrite = parse_bool(overwrite, "overwrite")
    progress = parse_bool(progress, "progress")
    aff = _parse_affine(affine)
    x = as_dask(array)
    if channel_axis is not None:
        if isinstance(channel_axis, bool) or not isinstance(channel_axis, (int, np.integer)) \
                or not -x.ndim <= channel_axis < x.ndim:
            raise ParameterError(f"channel_axis must be None or an axis of the {x.ndim}-D "
                                 f"array; got {channel_axis!r}", param="channel_axis",
                                 value=channel_axis, expected=(-x.ndim, x.ndim - 1))
        ch = int(channel_axis) % x.ndim  # to the end (a transpose: both graph modes have it)
        x = x.transpose(tuple(a for a in range(x.ndim) if a != ch) + (ch,))
    n_spatial = x.ndim - (channel_axis is not None)
    if n_spatial not in (2, 3):
        raise ParameterError(
            f"array must have 2 or 3 spatial axes (plus channel_axis); got a {x.ndim}-D array "
            f"of shape {x.shape} with channel_axis={channel_axis}", param="array",
            value=x.shape, expected="2 or 3 spatial axes", mentions=("channel_axis",))
    if axes == "zyx":
        x = x.transpose(tuple(reversed(range(n_spatial))) + tuple(range(n_spatial, x.ndim)))
    if os.path.exists(path) and not overwrite:
        raise TargetExistsError(f"{path!r} already exists; pass overwrite=True to replace it",
                                param="path", value=path)
    if header is not None and not isinstance(header, nib.Nifti1Header):
        raise ParameterTypeError(f"header must be a nibabel.Nifti1Header or None; got "
                                 f"{_describe(header)}", param="header", value=header)
    hdr = nib.Nifti1Header() if header is None else header.copy()
    shape = tuple(int(n) for n in x.shape)
    if n_spatial == 2 and channel_axis is not None:
        shape = shape[:2] + (1,) + shape[2:]  # NIfTI's 4th axis comes after z
        x = x[:, :, None]
    hdr.set_data_shape(shape)
    try:
        hdr.set_data_dtype(x.dtype)
    except Exception as err:  # nibabel's HeaderDataError: a dtype NIfTI has no code for
        raise ParameterTypeError(f"NIfTI-1 cannot store dtype {x.dtype}; cast the array (e.g. "
                                 "to float32) first", param="array", value=x.dtype) from err
    hdr.set_slope_inter(None, None)
    hdr.set_qform(aff, code=int(hdr["qform_code"]) or 1)
    hdr.set_sform(aff, code=int(hdr["sform_code"]) or 1)
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                       f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        if gz:
            data = to_numpy(x, progress=progress)
            nib.save(nib.Nifti1Image(data, aff, hdr), tmp + ".nii.gz")
            os.replace(tmp + ".nii.gz", path)
            return path
        hdr.set_data_offset(352)  # single file: the 348-byte header and 4 extension bytes
        offset = int(hdr.get_data_offset())
        dtype = hdr.get_data_dtype()
        with open(tmp, "wb") as f:
            hdr.write_to(f)
            f.write(b"\0" * (offset - f.tell()))
            f.truncate(offset + int(np.prod(shape)) * dtype.itemsize)
        target = _NiftiRegion(tmp, offset, shape, dtype)
        job = _sched.store_job(x.astype(dtype), target)  # type: ignore[arg-type]
        _sched.compute(job, progress)
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, tmp + ".nii.gz"):
            if os.path.exists(leftover):
                os.remove(leftover)
    return path
