"""PyTorch models as they are: NumPy batches in, the module under inference mode, NumPy out.

:func:`daskpatch.apply_patches` hands its ``fn`` NumPy batches in whatever thread or process runs
a block task, so a ``with torch.no_grad():`` around ``compute()`` in the caller's thread does not
reach the model. :class:`TorchModel` carries everything the call needs with it: it enters
``torch.inference_mode()`` itself, moves each batch to the module's device and dtype, optionally
autocasts, and converts the result back to NumPy. ``apply_patches`` wraps a bare
``torch.nn.Module`` in one; a plain callable that returns torch tensors has them converted.

PyTorch is imported only when a :class:`TorchModel` is made or called: ``import daskpatch`` never
imports it, and a module is recognised only when torch is already imported (by the caller, who
made the module).
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import sys
import threading
from typing import Any

import numpy as np

from daskpatch.adapters.threads import fit_torch_threads
from daskpatch.geometry.parse import _describe

__all__ = ["TorchModel", "as_model", "check_exported_shape", "check_model_input",
           "check_static_shape", "fixed_batch", "static_input_shape", "to_numpy"]

#: Accepted names of ``amp`` besides ``True``/``False``: the autocast dtype.
AMP_DTYPES: tuple[str, ...] = ("float16", "bfloat16")
_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as err:  # pragma: no cover - torch is installed where the tests run
        raise ImportError(
            "daskpatch.TorchModel needs PyTorch; install it (pip install 'daskpatch[torch]', or "
            "the torch build for your platform from pytorch.org)"
        ) from err
    return torch


def is_module(obj: Any) -> bool:
    """Whether ``obj`` is a ``torch.nn.Module`` (``False`` without importing torch if it is not
    imported yet: then no module can exist)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def to_numpy(out: Any) -> Any:
    """A torch tensor as a NumPy array (detached, on the CPU; float16 and bfloat16 as float32);
    anything else unchanged."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(out, torch.Tensor):
        return out
    out = out.detach()
    if out.dtype in (torch.float16, torch.bfloat16):
        return out.to("cpu", torch.float32).numpy()
    return out.cpu().resolve_conj().resolve_neg().numpy()


def as_model(fn: Any) -> Any:
    """A bare ``torch.nn.Module`` wrapped in :class:`TorchModel`; anything else as it is."""
    return TorchModel(fn) if is_module(fn) and not isinstance(fn, TorchModel) else fn


def check_model_input(model: Any, layout: Any, batch_shape: tuple[int, ...], axes: str) -> None:
    """Refuse, before anything runs, batches that a :class:`TorchModel`'s input layer cannot take.

    Checked only where the module's input layer is certain: the module is a convolution, or a
    ``torch.nn.Sequential`` whose first layer is one (a custom ``forward`` may reshape its input
    first, so its first registered layer proves nothing). ``batch_shape`` is ``(B, ...)`` as the
    model gets it.
    """
    if not isinstance(model, TorchModel):
        return
    check_exported_shape(model, batch_shape, axes)
    torch = sys.modules["torch"]
    layer = model.module
    while isinstance(layer, torch.nn.Sequential) and len(layer):
        layer = layer[0]
    if not isinstance(layer, torch.nn.modules.conv._ConvNd):
        return
    k, cin = len(layer.kernel_size), layer.in_channels
    n_spatial = len(batch_shape) - 1 - (layout.channel_axis is not None)
    if layout.channel_axis is None:
        fix = ("give the volume a channel axis before the spatial axes (for one channel: "
               "volume[None] with channel_axis=0)")
    elif not layout.channels_first:
        fix = ("put the channel axis first (np.moveaxis(volume, -1, 0), or the Dask "
               "equivalent, with channel_axis=0): torch layers take channel-first batches")
    elif n_spatial != k:
        fix = (f"check channel_axis and size: the model wants {k} spatial axes, the batches "
               f"have {n_spatial}")
    elif batch_shape[1] != cin:
        fix = f"the volume has {batch_shape[1]} channels where the model takes {cin}"
    else:
        return
    want = ("B", cin) + tuple("DHW"[3 - k:] if k <= 3 else [f"X{i}" for i in range(k)])
    raise ValueError(
        f"the model's input layer {layer} takes batches ({', '.join(map(str, want))}): {cin} "
        f"channel{'s' * (cin != 1)}, then {k} spatial axes; but {axes}. To fix it, {fix}"
    )


def static_input_shape(module: Any) -> tuple[int | None, ...] | None:
    """The input shape a module was exported (``torch.export``) or traced (``torch.jit.trace``)
    for, ``None`` per axis where it is dynamic; ``None`` when the module does not record one.

    An exported program keeps the shapes it was exported with unless they were declared dynamic
    (its guards refuse any other); a traced TorchScript module records the example's shape."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(module, torch.nn.Module):
        return None
    if isinstance(module, torch.fx.GraphModule):
        for node in module.graph.nodes:
            if node.op != "placeholder":
                continue
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                return tuple(d if isinstance(d, int) else None for d in val.shape)
            return None
        return None
    if isinstance(module, torch.jit.ScriptModule):
        try:
            inputs = list(module.graph.inputs())
            sizes = inputs[1].type().sizes() if len(inputs) > 1 else None
        except (AttributeError, RuntimeError):
            return None
        return None if sizes is None else tuple(sizes)
    return None


def _exported(module: Any) -> bool:
    """Whether ``module`` is a ``torch.export`` program's module (``ep.module()``), whose
    ``eval()``/``train()`` raise: its placeholders carry the example's (fake) tensors."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(module, torch.fx.GraphModule):
        return False
    return any(n.op == "placeholder" and n.meta.get("val") is not None
               for n in module.graph.nodes)


def fixed_batch(module: Any) -> int | None:
    """The only batch size ``module`` takes, when it was exported or traced for one (see
    :func:`static_input_shape`); ``None`` when it takes any."""
    shape = static_input_shape(module)
    return shape[0] if shape and isinstance(shape[0], int) else None


def check_exported_shape(model: Any, batch_shape: tuple[int, ...], axes: str) -> None:
    """Refuse, before anything runs, batches whose patch shape a model exported with
    ``torch.export`` for fixed shapes cannot take (the batch axis is padded, see
    :class:`TorchModel`)."""
    module = getattr(model, "module", model)
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(module, torch.fx.GraphModule):
        return
    check_static_shape(static_input_shape(module), batch_shape, axes)


def check_static_shape(shape: tuple[int | None, ...] | None, batch_shape: tuple[int, ...],
                       axes: str) -> None:
    """Refuse ``batch_shape`` (the model's input, batch first) where an exported program's
    input ``shape`` (``None``: dynamic) differs from it on any axis but the batch's."""
    if shape is None:
        return
    want = tuple("B" if a == 0 else ("?" if d is None else d) for a, d in enumerate(shape))
    if len(shape) != len(batch_shape) or any(
            d is not None and d != g for d, g in zip(shape[1:], batch_shape[1:])):
        raise ValueError(
            f"the model was exported (torch.export) for inputs ({', '.join(map(str, want))}) "
            f"and takes no other shape; but {axes}. Choose size and channel_axis to match, or "
            "export the model with dynamic shapes (torch.export.Dim)")


def _parse_device(device: Any) -> str | None:
    if device is None:
        return None
    torch = _import_torch()
    if not isinstance(device, (str, torch.device)):
        raise TypeError(
            "device must be None, a device name such as 'cpu' or 'cuda:0', or a torch.device; "
            f"got {_describe(device)}"
        )
    try:
        return str(torch.device(device))
    except RuntimeError as err:
        raise ValueError(
            f"device must name a torch device such as 'cpu', 'cuda' or 'cuda:1'; got {device!r}"
        ) from err


def _parse_dtype(dtype: Any) -> str | None:
    if dtype is None:
        return None
    torch = _import_torch()
    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    elif isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
    else:
        raise TypeError(
            f"dtype must be None, a torch floating dtype or its name {_FLOAT_DTYPES}; "
            f"got {_describe(dtype)}"
        )
    if name not in _FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {_FLOAT_DTYPES} (a torch floating dtype); "
                         f"got {dtype!r}")
    return name


def _parse_amp(amp: Any) -> bool | str:
    if isinstance(amp, bool):
        return amp
    if isinstance(amp, str):
        if amp not in AMP_DTYPES:
            raise ValueError(f"amp must be True, False or one of {AMP_DTYPES}; got {amp!r}")
        return amp
    raise TypeError(f"amp must be True, False or one of {AMP_DTYPES}; got {_describe(amp)}")


class TorchModel:
    """A ``torch.nn.Module`` as a function on NumPy batches, for :func:`daskpatch.apply_patches`.

    Each call runs under ``torch.inference_mode()`` (no autograd, whichever thread, process or
    cluster worker calls it), moves the batch to the module's device and dtype, runs the module
    (under ``torch.autocast`` with ``amp``) and returns a NumPy array on the CPU. The module runs
    in evaluation mode: one in training mode is copied when wrapped and the copy switched to
    ``eval()``, so the caller's module keeps its mode (a training loop that validates through
    daskpatch goes on training with its BatchNorm and Dropout as they were) and the copy keeps
    the weights it had when wrapped. A bare module passed to :func:`~daskpatch.apply_patches` is
    wrapped in a ``TorchModel()`` with the defaults.

    Parameters
    ----------
    module : torch.nn.Module
        Takes a ``torch.Tensor`` batch ``(B, C, *size)`` (channel-first, as PyTorch layers want:
        give the volume ``channel_axis=0``) and returns one of the same spatial shape.
    device : str or torch.device, optional
        Where the module runs: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ... ``None`` (default): the
        device of the module's parameters (the CPU for a module without any). A given device
        moves the module there (``module.to(device)``, in place) on its first call in each
        process, so a graph built on a machine without a GPU runs on GPU workers.
    dtype : str or torch.dtype, optional
        Floating dtype the module runs in (``"float32"``, ``"float16"``, ``"bfloat16"``,
        ``"float64"``); given, the module is converted on its first call in each process.
        ``None`` (default): the dtype of the module's floating parameters (the batch's own dtype
        when floating, else float32, for a module without any). Batches are converted to it.
    amp : bool or {"float16", "bfloat16"}
        Mixed precision: run the module under ``torch.autocast(device_type, dtype)``. ``True``
        means float16 on CUDA and bfloat16 on the CPU (the CPU autocast's native type: it is
        fast on CPUs with AVX-512 BF16 or AMX, slow elsewhere, and less precise than float32
        either way); a name picks the dtype. Results come back as float32.
    batch_size : int, optional
        The only batch size the module takes (a ``torch.export`` program exported for a fixed
        batch, a traced TorchScript module with a batch-dependent reshape): every call then
        runs the module on batches of exactly this size, padding the last one with copies of
        its last patch and dropping their outputs, so ``apply_patches`` may use any
        ``batch_size`` (the same one wastes nothing). ``None`` (default): the batch size an
        exported program's input was fixed to, or a traced module's example had; any size
        for other modules.
    blend_on_device : bool, optional
        Blend the predictions where the module runs (:mod:`daskpatch.adapters.device`): each
        work block's region goes to the device once, its patches are gathered, run, weighted
        and added into a buffer on the device, and the finished block comes back once -- no
        prediction crosses to the host. ``None`` (default): on when the device (given, or the
        parameters') is not the CPU. ``True`` on the CPU runs the same path with torch ops.
        Results equal the host's to float rounding; ``blend="crop"`` and several heads, flips
        or uncertainty blend on the host.

    Notes
    -----
    *Devices.* With ``device="cuda"`` every worker thread shares the one GPU; run the threaded
    scheduler with few threads, or a ``dask.distributed`` cluster with one worker per GPU and
    ``device="cuda"`` (each worker process moves its own copy of the module). Batches are copied
    from NumPy to the device and the result back to the CPU on each call: pick ``batch_size`` to
    fill the GPU. On the CPU, torch's own threads compete with dask's: in the threads that run
    dask's tasks, the module runs with ``max(1, cores // dask threads)`` intra-op threads,
    unless ``torch.set_num_threads``, ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` or the
    ``daskpatch.torch-threads`` setting chose them (:mod:`daskpatch.adapters.threads`).

    *Pickling.* A ``TorchModel`` pickles with its module (parameters on their current device), so
    it ships to ``dask.distributed`` workers and spawned processes; a TorchScript module
    (``torch.jit.script``/``torch.jit.load``) travels as its ``torch.jit.save`` bytes and arrives
    on the CPU (give ``device=`` to run it elsewhere). Its dask token hashes the
    module's class, ``repr``, plain attributes and every tensor of its ``state_dict``: changed
    weights give a new graph name, the same weights the same name in any session.

    Examples
    --------
    >>> import numpy as np
    >>> import torch
    >>> import daskpatch as dp
    >>> net = torch.nn.Conv3d(1, 2, kernel_size=3, padding=1)
    >>> model = dp.TorchModel(net)
    >>> out = model(np.zeros((4, 1, 8, 8, 8), dtype=np.float32))   # NumPy in, NumPy out
    >>> type(out).__name__, out.shape, out.dtype
    ('ndarray', (4, 2, 8, 8, 8), dtype('float32'))
    >>> vol = np.random.default_rng(0).random((1, 32, 32, 32), dtype=np.float32)
    >>> logits = dp.apply_patches(vol, net, 16, 8, channel_axis=0, out_channels=2, batch_size=4)
    >>> logits.shape
    (2, 32, 32, 32)
    """

    def __init__(self, module: Any, device: Any = None, dtype: Any = None,
                 amp: bool | str = False, batch_size: int | None = None,
                 blend_on_device: bool | None = None) -> None:
        torch = _import_torch()
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"module must be a torch.nn.Module; got {_describe(module)}")
        if batch_size is None:
            batch_size = fixed_batch(module)
        elif isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise TypeError(f"batch_size must be None or an integer >= 1 (the only batch size "
                            f"the module takes); got {_describe(batch_size)}")
        if _exported(module):  # a torch.export program: runs as exported (no eval())
            self.module = module
        else:
            if module.training:  # never change the caller's module: a copy in eval mode
                module = copy.deepcopy(module)
            self.module = module.eval()
        self.device = _parse_device(device)
        self.dtype = _parse_dtype(dtype)
        self.amp = _parse_amp(amp)
        self.batch_size = batch_size
        if blend_on_device is not None and not isinstance(blend_on_device, bool):
            raise TypeError(f"blend_on_device must be None, True or False; got "
                            f"{_describe(blend_on_device)}")
        self.blend_on_device = blend_on_device
        self._init_local()

    def _init_local(self) -> None:
        self._lock = threading.Lock()
        self._placed: tuple[int, Any, Any] | None = None  # (pid, device, dtype)
        self._token: tuple[tuple, Any] | None = None  # (tensor versions, token)

    # -- pickling ----------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = {k: self.__dict__[k] for k in ("module", "device", "dtype", "amp",
                                                "batch_size", "blend_on_device")}
        torch = sys.modules["torch"]
        if isinstance(self.module, torch.jit.ScriptModule):  # it has no pickle of its own
            buf = io.BytesIO()
            torch.jit.save(self.module, buf)
            state["module"] = None
            state["script"] = buf.getvalue()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        script = state.pop("script", None)
        state.setdefault("batch_size", None)
        state.setdefault("blend_on_device", None)
        self.__dict__.update(state)
        if script is not None:
            torch = _import_torch()
            self.module = torch.jit.load(io.BytesIO(script), map_location="cpu").eval()
        self._init_local()

    def __repr__(self) -> str:
        fixed = "" if self.batch_size is None else f", batch_size={self.batch_size}"
        if self.blend_on_device is not None:
            fixed += f", blend_on_device={self.blend_on_device}"
        return (f"TorchModel({type(self.module).__name__}, device={self.device!r}, "
                f"dtype={self.dtype!r}, amp={self.amp!r}{fixed})")

    @property
    def blends_on_device(self) -> bool:
        """Whether ``apply_patches`` blends this model's predictions on its device
        (:mod:`daskpatch.adapters.device`): ``blend_on_device`` when given, else when the device
        (given, or the parameters') is not the CPU."""
        if self.blend_on_device is not None:
            return self.blend_on_device
        if self.device is not None:
            return not str(self.device).startswith("cpu")
        ref = self._floating_tensor()
        return ref is not None and ref.device.type != "cpu"

    # -- placement ---------------------------------------------------------------------------------
    def _floating_tensor(self) -> Any | None:
        for t in self.module.parameters():
            if t.is_floating_point():
                return t
        for t in self.module.buffers():
            if t.is_floating_point():
                return t
        return None

    def _place(self) -> tuple[Any, Any]:
        """(device, dtype or None) for this process, moving the module once if asked to."""
        placed = self._placed
        if placed is not None and placed[0] == os.getpid():
            return placed[1], placed[2]
        torch = _import_torch()
        with self._lock:
            placed = self._placed
            if placed is not None and placed[0] == os.getpid():
                return placed[1], placed[2]
            if self.device is not None:
                device = torch.device(self.device)
                if device.type == "cuda" and not torch.cuda.is_available():
                    raise RuntimeError(
                        f"TorchModel(device={self.device!r}): CUDA is not available in this "
                        f"process (pid {os.getpid()}); run it where a GPU is, or use device='cpu'"
                    )
                self.module.to(device)
            dtype = None if self.dtype is None else getattr(torch, self.dtype)
            if dtype is not None:
                self.module.to(dtype)
            ref = self._floating_tensor()
            if self.device is None:
                device = ref.device if ref is not None else torch.device("cpu")
            if dtype is None and ref is not None:
                dtype = ref.dtype
            self._placed = (os.getpid(), device, dtype)
            return device, dtype

    # -- the call ----------------------------------------------------------------------------------
    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Run the module on a NumPy batch; return a NumPy array (float32 under ``amp``).

        With a fixed ``batch_size`` the batch goes in pieces of that size, the last one padded
        with copies of its last patch, and the padding's outputs are dropped."""
        n = self.batch_size
        batch = np.asarray(batch)
        if n is None or batch.shape[0] == n:
            return self._run(batch)
        outs = []
        for i in range(0, batch.shape[0], n):
            part = batch[i:i + n]
            k = part.shape[0]
            if k < n:
                part = np.concatenate([part, np.repeat(part[-1:], n - k, axis=0)])
            out = self._run(part)
            if not isinstance(out, np.ndarray) or out.ndim == 0 or out.shape[0] != n:
                raise ValueError(f"TorchModel(batch_size={n}): the module returned "
                                 f"{type(out).__name__} of shape {getattr(out, 'shape', None)} "
                                 f"for a batch of {n}; a fixed batch size needs one output "
                                 "array with the batch first")
            outs.append(out[:k])
        return np.concatenate(outs)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        torch = _import_torch()
        batch = np.asarray(batch)
        if not batch.dtype.isnative:
            batch = batch.astype(batch.dtype.newbyteorder("="))
        batch = np.ascontiguousarray(batch)
        if not batch.flags.writeable:  # torch warns about tensors over read-only memory
            batch = batch.copy()
        with torch.inference_mode():
            return to_numpy(self._forward(torch, torch.from_numpy(batch)))

    def run_tensor(self, x: Any) -> Any:
        """Run the module on a batch tensor (on any device; moved to the module's device and
        dtype) and return its output as it is, on the device: what blending on the device
        (:mod:`daskpatch.adapters.device`) calls. A fixed ``batch_size`` pads and drops as
        :meth:`__call__` does."""
        torch = _import_torch()
        n = self.batch_size
        with torch.inference_mode():
            if n is None or x.shape[0] == n:
                return self._forward(torch, x)
            outs = []
            for i in range(0, x.shape[0], n):
                part = x[i:i + n]
                k = part.shape[0]
                if k < n:
                    part = torch.cat([part, part[-1:].expand((n - k,) + tuple(part.shape[1:]))])
                out = self._forward(torch, part)
                if not torch.is_tensor(out) or out.ndim == 0 or out.shape[0] != n:
                    raise ValueError(f"TorchModel(batch_size={n}): the module returned "
                                     f"{type(out).__name__} of shape "
                                     f"{tuple(getattr(out, 'shape', ()))} for a batch of {n}; "
                                     "a fixed batch size needs one output tensor with the "
                                     "batch first")
                outs.append(out[:k])
            return torch.cat(outs)

    def _forward(self, torch: Any, x: Any) -> Any:
        """The module on tensor ``x`` (under inference mode): moved to its device and dtype,
        under autocast with ``amp``; its output as it is."""
        device, dtype = self._place()
        if device.type == "cpu" and threading.current_thread() is not threading.main_thread():
            fit_torch_threads(torch)  # a dask thread: its torch threads fit the cores
        if dtype is None:
            dtype = x.dtype if x.is_floating_point() else torch.float32
        if self.amp:
            amp_dtype = self.amp if isinstance(self.amp, str) else (
                "float16" if device.type == "cuda" else "bfloat16")
            autocast: Any = torch.autocast(device.type, dtype=getattr(torch, amp_dtype))
        else:
            autocast = contextlib.nullcontext()
        x = x.to(device=device, dtype=dtype, non_blocking=device.type == "cuda")
        with autocast:
            return self.module(x)

    # -- graph names -----------------------------------------------------------------------------
    def __dask_tokenize__(self) -> Any:
        from dask.base import normalize_token, tokenize

        state = self.module.state_dict(keep_vars=True)
        versions = tuple((k, t._version, t.data_ptr()) for k, t in state.items())
        cached = self._token
        if cached is not None and cached[0] == versions:
            return cached[1]
        torch = _import_torch()
        tensors = []
        for k, t in state.items():
            t = t.detach()
            if t.dtype == torch.bfloat16:
                t = t.view(torch.int16)
            tensors.append((k, tuple(t.shape), str(t.dtype), tokenize(t.cpu().numpy())))
        attrs = [
            (name, sorted((k, v) for k, v in vars(m).items()
                          if isinstance(v, (bool, int, float, str, type(None)))))
            for name, m in self.module.named_modules()
        ]
        cls = type(self.module)
        token = ("daskpatch-torch-model", cls.__module__, cls.__qualname__, repr(self.module),
                 normalize_token(attrs), tensors, self.device, self.dtype, self.amp)
        self._token = (versions, token)
        return token

    def __daskpatch_fingerprint__(self) -> dict[str, Any]:
        """What :func:`daskpatch.to_zarr` records of this model: the module's class and a hash
        of its parameters, buffers and plain attributes (the same weights give the same hash in
        any process), the dtype and mixed precision it runs in; not the device."""
        from dask.base import tokenize

        token = self.__dask_tokenize__()
        cls = type(self.module)
        return {"by": "module class and parameters",
                "class": f"{cls.__module__}.{cls.__qualname__}",
                "parameters": tokenize(token[3:6]), "dtype": self.dtype, "amp": self.amp}
