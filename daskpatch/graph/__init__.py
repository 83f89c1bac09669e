"""Dask graphs: the layers of the patch and overlap-add plans, lowering a plan for its target, ordering and jobs (the only place touching dask internals)."""
