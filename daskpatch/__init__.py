"""daskpatch: patch-based processing of N-D volumes larger than RAM.

Lazy Dask graphs cut a volume into patches, run a model on every patch exactly once, and blend the
predictions back into a seamless volume with exact normalisation; volumes live in Zarr stores.
"""

from ._svg import plot_window
from ._torch import TorchModel
from .blend import apply_patches, reconstruct
from .data import PatchDataset, RandomPatchDataset
from .extract import extract_patches
from .grid import PatchGrid
from .io import (
    aligned_chunks,
    is_stride_aligned,
    open_volume,
    rechunk_to_stride,
    to_numpy,
    to_zarr,
)
from .seed import get_patches, reconstruct_patch
from .windows import BLENDS, window

__all__ = [
    "BLENDS",
    "PatchDataset",
    "PatchGrid",
    "RandomPatchDataset",
    "TorchModel",
    "aligned_chunks",
    "apply_patches",
    "extract_patches",
    "get_patches",
    "is_stride_aligned",
    "open_volume",
    "plot_window",
    "rechunk_to_stride",
    "reconstruct",
    "reconstruct_patch",
    "to_numpy",
    "to_zarr",
    "window",
]
__version__ = "0.1.0"
