"""daskpatch: patch-based processing of N-D volumes larger than RAM.

Lazy Dask graphs cut a volume into patches, run a model on every patch exactly once, and blend the
predictions back into a seamless volume with exact normalisation; volumes live in Zarr stores.
"""

from .grid import PatchGrid

__all__ = ["PatchGrid"]
__version__ = "0.1.0"
