"""Training loaders: map-style datasets of grid and random patches read straight from Zarr, and their samplers."""

from daskpatch.data.datasets import PatchDataset, RandomPatchDataset
from daskpatch.data.sampling import INDEX_ATTR

__all__ = ["INDEX_ATTR", "PatchDataset", "RandomPatchDataset"]
