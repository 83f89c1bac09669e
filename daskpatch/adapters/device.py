"""Blending on the model's device: a block's patches gathered, run, weighted and added where a
torch model runs, with one copy of the region up and one of the finished buffer back.

:func:`daskpatch.engine.block.apply_block` hands a block to :func:`accumulate_on_device` when
its model blends on its device (:attr:`daskpatch.TorchModel.blends_on_device`: a model on a GPU,
or ``blend_on_device=True``). The block's region goes to the device once; each batch is gathered
there, runs through the module with no copy to the host, and every prediction is weighted (the
window's product of per-axis rows, or a user window and its weight channel) and added into the
block's buffer, which lives on the device too; the finished buffer comes back once, as the NumPy
array the host path would have returned, and the chunk tasks go on as always. The host path
(:class:`daskpatch.engine.kernel.Accumulator`) stays the reference: the same sums, in another
order, equal to float rounding.

Where the host path does something this one does not, the block stays on the host: ``blend=
"crop"`` (a copy of owned boxes), complex or integer accumulators, a buffer that overflowed to
inf from finite predictions (the host path saturates; the block is then run again on the host).
"""

from __future__ import annotations

import itertools
import sys
from typing import Any

import numpy as np

from daskpatch.engine.spec import ApplyBlock

__all__ = ["accumulate_on_device", "can_blend"]

#: NumPy dtypes a region may go to the device in as it is (others go as float32).
_TORCH_DTYPES = frozenset("float16 float32 float64 int8 int16 int32 int64 uint8 bool".split())


def can_blend(spec: ApplyBlock) -> bool:
    """Whether the block of ``spec`` can be blended on a device (else: on the host)."""
    return not spec.numbers.copy and spec.numbers.acc.kind == "f"


def accumulate_on_device(model: Any, spec: ApplyBlock, region: Any,
                         check: Any) -> np.ndarray | None:
    """The block's buffer ``(C[+1], *ext)``, accumulated on ``model``'s device (a
    :class:`~daskpatch.TorchModel`), or ``None`` where the host must do it (see the module).

    ``region`` is the region read ``(C, *region)`` or a lazily read region (read whole here);
    ``check(out, batch_shape, expected)`` raises the engine's error for an output of the wrong
    shape or dtype (the error path only: it may copy the output to the host).
    """
    if not can_blend(spec):
        return None
    torch = sys.modules["torch"]  # a TorchModel imported it
    device, _ = model._place()
    upto = getattr(region, "upto", None)
    if upto is not None:  # a Region: all of it, once
        upto(region.shape[1])
        region = region.data
    host = np.asarray(region)
    if host.dtype.name not in _TORCH_DTYPES or not host.dtype.isnative:
        host = host.astype(np.float32)
    with torch.inference_mode():
        reg = torch.from_numpy(np.ascontiguousarray(host)).to(device)  # up once
        return _accumulate(torch, model, spec, reg, device, check)


def _accumulate(torch: Any, model: Any, spec: ApplyBlock, reg: Any, device: Any,
                check: Any) -> np.ndarray | None:
    layout, nb = spec.layout, spec.n_batch
    acc = getattr(torch, spec.numbers.acc.name)
    channels = spec.out_channels
    user = spec.weights.user
    size = tuple(int(v) for v in spec.patch_shape)
    out_size = tuple(int(v) for v in spec.out_patch_shape) or size
    starts = spec.starts
    out_starts = spec.out_starts or starts
    ext_lo = np.asarray(spec.ext_lo)
    ext_shape = tuple(spec.ext_shape)
    region_lo = np.asarray(spec.region_lo)
    buf = torch.zeros((channels + (user is not None),) + ext_shape, dtype=acc, device=device)
    expected = layout.patch_shape(out_size[nb:], channels)
    weights: dict[tuple[int, ...], Any] = {}
    user_w = None if user is None else torch.from_numpy(
        np.ascontiguousarray(user, dtype=spec.numbers.acc)).to(device)
    bad = torch.zeros((), dtype=torch.bool, device=device)  # a non-finite prediction seen
    items = list(itertools.product(*spec.owned))
    for b0 in range(0, len(items), spec.batch_size):
        chunk = items[b0:b0 + spec.batch_size]
        patches = []
        for g in chunk:
            rel = [int(s[i]) - int(lo) for s, i, lo in zip(starts, g, region_lo)]
            patches.append(reg[(slice(None),) + tuple(slice(r, r + z) for r, z in zip(rel, size))])
        x = torch.stack(patches).reshape((len(chunk), reg.shape[0]) + size[nb:])
        x = _from_canonical(torch, layout, x)
        y = model.run_tensor(x)
        want = (len(chunk),) + expected
        if not torch.is_tensor(y) or tuple(y.shape) != want or y.is_complex() or \
                not (y.is_floating_point() or y.dtype in _int_types(torch)):
            check(y, tuple(x.shape), want)  # raises the engine's error
            if torch.is_tensor(y) and y.is_complex():
                return None  # the host path says why a complex output needs a complex dtype
        y = _to_canonical(torch, layout, y).reshape((len(chunk), channels) + out_size)
        if y.is_floating_point():
            bad |= ~torch.isfinite(y).all()
        for j, g in enumerate(chunk):
            st = np.array([int(s[i]) for s, i in zip(out_starts, g)]) - ext_lo
            end = np.minimum(st + out_size, ext_shape)  # border="pad": cropped to the buffer
            dst = tuple(slice(int(a), int(e)) for a, e in zip(st, end))
            src = tuple(slice(0, int(e - a)) for a, e in zip(st, end))
            if user_w is not None:
                w = user_w[src]
                buf[(slice(0, channels),) + dst].add_(y[j][(slice(None),) + src].to(acc) * w)
                buf[(channels,) + dst].add_(w)
            else:
                w = _weight(torch, spec, g, weights, acc, device)[src]
                buf[(slice(None),) + dst].addcmul_(y[j][(slice(None),) + src].to(acc), w)
    if not bool(bad) and not bool(torch.isfinite(buf).all()):
        return None  # finite predictions overflowed: the host path saturates instead
    return buf.cpu().numpy()  # back once


def _int_types(torch: Any) -> tuple:
    return (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool)


def _weight(torch: Any, spec: ApplyBlock, g: tuple[int, ...], cache: dict, acc: Any,
            device: Any) -> Any:
    """The separable window of patch ``g``: the outer product of its per-axis rows (float64,
    then the accumulator's dtype), on the device, cached by row identity."""
    q, ids = spec.weights.q, spec.weights.q_ids
    assert q is not None
    key = tuple(int(i[k]) for i, k in zip(ids, g))
    w = cache.get(key)
    if w is None:
        full = np.ones((), dtype=np.float64)
        for qa, k in zip(q, g):
            full = np.multiply.outer(full, qa[k])
        w = cache[key] = torch.from_numpy(np.ascontiguousarray(full)).to(device=device,
                                                                         dtype=acc)
    return w


def _from_canonical(torch: Any, layout: Any, x: Any) -> Any:
    """``(B, C, *size)`` to the user's patch layout (as :meth:`Layout.from_canonical`)."""
    if layout.channel_axis is None:
        return x[:, 0]
    return x if layout.channels_first else torch.movedim(x, 1, -1)


def _to_canonical(torch: Any, layout: Any, y: Any) -> Any:
    if layout.channel_axis is None:
        return y[:, None]
    return y if layout.channels_first else torch.movedim(y, -1, 1)
