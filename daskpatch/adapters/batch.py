"""The function :func:`daskpatch.apply_patches` calls on each batch, whatever the model is.

:class:`BatchFn` wraps the user's ``fn`` (a callable, or a :class:`~daskpatch.TorchModel`): it
turns torch results into NumPy, says in ``axes`` how the volume's axes were read (what the
engine's output checks and error notes quote), and tells the engine whether blocks blend on the
model's device (:mod:`daskpatch.adapters.device`). :func:`wrap_fn` makes it for
``apply_patches``; models with several heads (:class:`daskpatch.adapters.heads.HeadsFn`) are
one too. How a torch module itself is run and checked is :mod:`daskpatch.adapters.torch`'s.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from daskpatch.adapters.torch import TorchModel, as_model, check_model_input, to_numpy
from daskpatch.geometry.layout import describe_axes

__all__ = ["BatchFn", "wrap_fn"]


class BatchFn:
    """The ``fn`` that :func:`daskpatch.apply_patches` calls: the user's callable (or a
    :class:`TorchModel`), its torch tensor results turned into NumPy (see :func:`to_numpy`),
    ``axes`` (how the volume's axes were read, what ``fn`` gets and must return) explains the
    engine's check of the output shape and its notes on errors.
    """

    def __init__(self, fn: Any, out_shape: tuple[int, ...], axes: str) -> None:
        self.fn, self.out_shape, self.axes = fn, tuple(out_shape), axes

    def __call__(self, batch: np.ndarray) -> Any:
        # the engine checks the output's shape, and notes errors with the block, the patches
        # and how the volume's axes were read (``axes``)
        try:
            out = self.fn(batch)
        except SystemExit as err:  # would end the process silently, from a worker thread
            raise RuntimeError(f"fn called sys.exit({err.code!r}) on a batch; a model must "
                               "return its predictions or raise an exception") from err
        return to_numpy(out)

    @property
    def on_device(self) -> bool:
        """Whether blocks blend on the model's device (:meth:`device_block`)."""
        return isinstance(self.fn, TorchModel) and self.fn.blends_on_device

    def device_block(self, spec: Any, region: Any, check: Any) -> np.ndarray | None:
        """The block of ``spec`` accumulated on the model's device, or ``None``: on the host
        (see :func:`daskpatch.adapters.device.accumulate_on_device`)."""
        from daskpatch.adapters.device import accumulate_on_device

        def host_check(out: Any, batch_shape: tuple[int, ...], expected: tuple) -> None:
            check(to_numpy(out), batch_shape, expected)

        return accumulate_on_device(self.fn, spec, region, host_check)

    def __dask_tokenize__(self) -> Any:
        from dask.base import normalize_token

        return ("daskpatch-batch-fn", normalize_token(self.fn), self.out_shape)

    def __repr__(self) -> str:
        return repr(self.fn)


def wrap_fn(fn: Any, layout: Any, shape: tuple[int, ...], spatial: tuple[int, ...],
            channels: int, out_channels: int, out_spatial: tuple[int, ...] | None = None,
            scale: str | None = None) -> BatchFn:
    """The :class:`BatchFn` of ``apply_patches``: a bare module made a :class:`TorchModel`, its
    input layer checked against the batches it will get (``layout`` is the volume's
    :class:`~daskpatch._axes.Layout`). ``out_spatial``: the output patch's spatial shape when it
    differs (``out_scale``, described by ``scale``). A ``BatchFn`` already (a model with several
    heads, :class:`daskpatch.adapters.heads.HeadsFn`, checked itself) is used as it is."""
    if isinstance(fn, BatchFn):
        return fn
    fn = as_model(fn)
    batch = layout.patch_shape(tuple(spatial), channels)
    out = layout.patch_shape(tuple(spatial if out_spatial is None else out_spatial), out_channels)
    axes = (f"{describe_axes(layout.ndim, layout.channel_axis, layout.n_batch, shape)}: fn gets "
            f"batches {_shape('B', batch)} and must return {_shape('B', out)}"
            + (f" (out_scale={scale})" if scale else ""))
    check_model_input(fn, layout, (1,) + tuple(batch), axes)
    return BatchFn(fn, out, axes)


def _shape(first: str, rest: tuple[int, ...]) -> str:
    return "(" + ", ".join([first, *map(str, rest)]) + ")"
