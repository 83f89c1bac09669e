"""The overlap-add engine, one reason to change per module.

- :mod:`.spec` -- what each block task needs, one frozen value per task;
- :mod:`.kernel` -- the accumulation of weighted patches into a block's buffer;
- :mod:`.block` -- the accumulate tasks (the model's batches, or the patch array's rows);
- :mod:`.halo` -- halo exchange, and the sum and cast of each output chunk;
- :mod:`.spill` -- where spilled halo parts wait (a Zarr store);
- :mod:`.sink` -- the in-memory result of :func:`daskpatch.to_numpy`;
- :mod:`.engine` -- the tasks of one overlap-add, made on demand;
- :mod:`.order` -- the order its blocks start in on a cluster (biggest first).

The graphs of those tasks are :mod:`daskpatch._graph`'s; the block plan is
:meth:`daskpatch.grid.PatchGrid.block_plan`'s.
"""
