"""daskpatch: patch-based processing of N-D volumes larger than RAM.

Lazy Dask graphs cut a volume into patches, run a model on every patch exactly once, and blend the
predictions back into a seamless volume with exact normalisation; volumes live in Zarr stores.
"""

from daskpatch import errors
from daskpatch.viz import plot_window
from daskpatch.adapters.torch import TorchModel
from daskpatch.patches import apply_patches, reconstruct
from daskpatch.data.datasets import PatchDataset, RandomPatchDataset
from daskpatch.extract import extract_patches
from daskpatch.geometry.grid import PatchGrid
from daskpatch.io import IncompleteWarning, open_volume, to_numpy, to_zarr
from daskpatch.nifti import to_nifti
from daskpatch.rechunk import aligned_chunks, is_stride_aligned, rechunk_to_stride
from daskpatch.seed import get_patches, reconstruct_patch
from daskpatch.geometry.windows import BLENDS, window

__all__ = [
    "BLENDS",
    "IncompleteWarning",
    "PatchDataset",
    "PatchGrid",
    "RandomPatchDataset",
    "TorchModel",
    "aligned_chunks",
    "errors",
    "apply_patches",
    "extract_patches",
    "get_patches",
    "is_stride_aligned",
    "open_volume",
    "plot_window",
    "rechunk_to_stride",
    "reconstruct",
    "reconstruct_patch",
    "to_nifti",
    "to_numpy",
    "to_zarr",
    "window",
]
__version__ = "0.1.0"
