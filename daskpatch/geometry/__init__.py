"""Pure geometry: patch grids, block plans, axis layouts, windows and the block/chunk-size policy (NumPy only: no dask graph, no store)."""
