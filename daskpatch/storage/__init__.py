"""Zarr stores: the one way in (sources), store naming and checks, done-markers, fingerprints, spill, chunk writes and OME-Zarr metadata (no dask graph)."""
