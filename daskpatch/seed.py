"""Drop-in replacements for the seed article's ``get_patches`` and ``reconstruct_patch``.

Same signatures and layouts, eager NumPy in and out, built on the lazy engine:

- ``get_patches(img_arr, size=128, stride=128)``: a volume ``(X, Y, Z)`` or a stack of volumes
  ``(B, X, Y, Z)`` to patches ``(N, s, s, s)``;
- ``reconstruct_patch(img_arr, org_img_size, stride=128, size=128)``: patches ``(N, s, s, s, C)`` to
  volumes ``(B, X, Y, Z, C)``.

Where the seed was right (shapes divisible by the stride, no overlap) the results are identical.
Where it was wrong they are not: the seed used the first axis's patch count on every axis
(non-cubic shapes came out wrong), dropped the remainder of non-divisible shapes, and overwrote
overlapping patches. Here each axis has its own grid, the last patch is shifted back to cover the
end (``border="shift"``), and overlaps are blended.
"""

from __future__ import annotations


import numpy as np

from daskpatch.geometry.parse import _describe, parse_per_axis
from daskpatch.patches import reconstruct
from daskpatch.extract import extract_patches
from daskpatch.geometry.grid import PatchGrid
from daskpatch.geometry.windows import Blend

__all__ = ["get_patches", "reconstruct_patch"]


def get_patches(
    img_arr: np.ndarray, size: int | tuple[int, ...] = 128, stride: int | tuple[int, ...] = 128
) -> np.ndarray:
    """Cut a 3-D volume, or a stack of them, into patches (eager NumPy, seed-compatible).

    Parameters
    ----------
    img_arr : ndarray
        ``(X, Y, Z)``, or ``(B, X, Y, Z)`` for ``B`` volumes.
    size, stride : int or tuple of 3 ints
        Patch shape and step.

    Returns
    -------
    ndarray
        ``(N, *size)``; for a stack, the patches of each volume in turn.

    Examples
    --------
    >>> vol = np.zeros((256, 256, 256), dtype=np.float32)
    >>> get_patches(vol).shape
    (8, 128, 128, 128)
    >>> get_patches(np.zeros((4, 256, 256, 256), dtype=np.uint8)).shape
    (32, 128, 128, 128)
    """
    arr = np.asarray(img_arr) if not hasattr(img_arr, "ndim") else img_arr
    if not hasattr(arr, "ndim"):
        raise TypeError(f"img_arr must be an array; got {_describe(img_arr)}")
    if arr.ndim not in (3, 4):
        raise ValueError(
            f"img_arr must be a 3-D volume (X, Y, Z) or a stack (B, X, Y, Z); got {arr.ndim}-D "
            f"shape {tuple(arr.shape)}"
        )
    size_t = parse_per_axis(size, 3, "size")
    stride_t = size_t if stride is None else parse_per_axis(stride, 3, "stride")
    return np.asarray(extract_patches(arr, size_t, stride_t).compute(scheduler="threads"))


def reconstruct_patch(
    img_arr: np.ndarray,
    org_img_size: tuple[int, int, int],
    stride: int | tuple[int, ...] | None = 128,
    size: int | tuple[int, ...] | None = 128,
    *,
    blend: Blend | None = None,
) -> np.ndarray:
    """Stitch patches back into volumes (eager NumPy, seed-compatible).

    Parameters
    ----------
    img_arr : ndarray
        Patches ``(N, s, s, s, C)`` (channel last, as a Keras model predicts them), or
        ``(N, s, s, s)``. ``N`` must be a whole number of volumes.
    org_img_size : tuple of 3 ints
        Spatial shape ``(X, Y, Z)`` of one volume.
    stride, size : int or tuple of 3 ints
        The grid the patches were cut with; ``size=None`` takes it from the patches, and
        ``stride=None`` means ``stride=size`` (no overlap), as in the seed article.
    blend : str, array or callable, optional
        How overlapping patches combine (see :func:`daskpatch.reconstruct`); ``None`` means
        ``"gaussian"`` for floating patches and ``"crop"`` (no mixing of values) for integer ones.

    Returns
    -------
    ndarray
        ``(B, X, Y, Z, C)`` (``(B, X, Y, Z)`` for patches without a channel axis), in the patches'
        dtype.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> vols = rng.random((4, 64, 64, 64), dtype=np.float32)
    >>> patches = get_patches(vols, size=32, stride=32)
    >>> back = reconstruct_patch(patches[..., None], (64, 64, 64), stride=32, size=32)
    >>> back.shape
    (4, 64, 64, 64, 1)
    >>> bool((back[..., 0] == vols).all())
    True
    """
    arr = img_arr
    if not (hasattr(arr, "ndim") and hasattr(arr, "shape")):
        raise TypeError(f"img_arr must be an array of patches; got {_describe(img_arr)}")
    if arr.ndim not in (4, 5):
        raise ValueError(
            "img_arr must be patches (N, s, s, s, C) or (N, s, s, s); got "
            f"{arr.ndim}-D shape {tuple(arr.shape)}"
        )
    spatial = parse_per_axis(tuple(org_img_size) if not isinstance(org_img_size, int)
                             else org_img_size, 3, "org_img_size")
    size_t = tuple(arr.shape[1:4]) if size is None else parse_per_axis(size, 3, "size")
    stride_t = size_t if stride is None else parse_per_axis(stride, 3, "stride")
    per_volume = len(PatchGrid(spatial, size_t, stride_t))
    n = arr.shape[0]
    if n % per_volume:
        raise ValueError(
            f"img_arr holds {n} patches, not a whole number of volumes of {per_volume} patches "
            f"each (org_img_size={spatial}, size={size_t}, stride={stride_t})"
        )
    batch = n // per_volume
    has_channel = arr.ndim == 5
    shape = (batch, *spatial) + ((arr.shape[-1],) if has_channel else ())
    dtype = np.dtype(arr.dtype)
    if blend is None:
        blend = "gaussian" if dtype.kind in "fc" else "crop"
    out = reconstruct(arr, shape, size_t, stride_t, blend=blend,
                      channel_axis=-1 if has_channel else None)
    result = np.asarray(out.compute(scheduler="threads"))
    if result.dtype != dtype:
        if dtype.kind in "biu":
            result = np.rint(result)
        result = result.astype(dtype)
    return result
