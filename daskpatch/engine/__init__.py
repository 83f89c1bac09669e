"""Per-block NumPy work: task specs, gathering patches, weighted accumulation, numerics and memory (no dask graph, no store: a task is handed what it reads and where it writes)."""
