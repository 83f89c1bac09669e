"""The model ``daskpatch apply --model SPEC`` names: resolved, checked, loaded once per process.

SPEC is ``package.module:callable`` (a function on NumPy batches, a ``torch.nn.Module``, or a
class or argument-free factory that makes either) or a TorchScript (``.pt``, ``.pth``) or
``torch.export`` (``.pt2``) file. :class:`SpecModel` is what the command hands to
:func:`daskpatch.apply_patches`: it pickles as its SPEC, so worker processes load the model
again themselves.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from daskpatch.cli.errors import UsageError as _UsageError
from daskpatch.adapters.models import file_digest
from daskpatch.adapters.torch import TorchModel, fixed_batch, is_module, static_input_shape

__all__ = ["TORCH_FILES", "SpecModel", "resolve_spec"]

#: Suffixes of model files ``--model`` loads with torch.
TORCH_FILES = (".pt", ".pth", ".pt2")


class SpecModel:
    """The model ``--model SPEC`` names, loaded on first use and kept by this object.

    It pickles as its SPEC (torch files and many modules do not pickle): ``apply_patches`` puts
    the model in the graph once, so each worker process unpickles one copy and loads it once;
    on the local scheduler every block task shares this object. Nothing is kept per process.
    """

    def __init__(self, spec: str, device: str | None, channels: str,
                 amp: bool | str = False, batch_size: int | None = None) -> None:
        self.spec, self.device, self.channels, self.amp = spec, device, channels, amp
        #: the only batch size a torch file's model takes (found by :meth:`probe`), or None
        self.batch_size = batch_size
        self._lock = threading.Lock()
        self._fn: Callable[[np.ndarray], np.ndarray] | None = None

    def __reduce__(self) -> tuple:
        return (SpecModel, (self.spec, self.device, self.channels, self.amp, self.batch_size))

    def __dask_tokenize__(self) -> tuple:
        return ("daskpatch-cli-model", self.spec, self.device, self.channels, self.amp)

    def __daskpatch_fingerprint__(self) -> dict[str, Any]:
        """The spec, and a hash of what it names: a torch file's bytes, or the source file of
        the module a ``module:callable`` comes from (weights such code loads from elsewhere are
        not seen: name their version with ``--run-id``)."""
        out: dict[str, Any] = {"by": "the --model spec and the file it names", "spec": self.spec,
                               "channels": self.channels}
        if self.spec.endswith(TORCH_FILES):
            out["sha256"] = file_digest(self.spec)
            return out
        resolve_spec(self.spec)  # imports the module (a clear error where it cannot)
        source = getattr(sys.modules.get(self.spec.rpartition(":")[0]), "__file__", None)
        if source is not None and os.path.isfile(source):
            out["source"] = os.path.basename(source)
            out["sha256"] = file_digest(source)
        return out

    def load(self) -> Callable[[np.ndarray], np.ndarray]:
        with self._lock:
            if self._fn is None:
                try:
                    self._fn = _load_model(self.spec, self.device, self.channels, self.amp,
                                           self.batch_size)
                    if self.batch_size is None:
                        self.batch_size = getattr(self._fn, "batch_size", None)
                except SystemExit as err:  # a factory's sys.exit()
                    raise _UsageError(f"--model {self.spec!r}: building the model called "
                                      f"sys.exit({err.code!r})") from err
            return self._fn

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.load()(batch)

    def probe(self, patch_shape: tuple[int, ...], dtype: Any, batch_size: int) -> int | None:
        """For a TorchScript file, whose saved graph keeps no input shapes: run the model on
        one all-zero patch of ``patch_shape`` (as ``apply_patches`` gives it, no batch axis),
        before anything is written. Where that fails and a batch of ``batch_size`` runs, the
        model was traced for that batch size: batches are padded to it from then on (the
        size is returned). Where both fail, a one-line error says why."""
        fn = self.load()
        if not self.spec.endswith((".pt", ".pth")) or self.batch_size is not None:
            return self.batch_size
        try:
            fn(np.zeros((1,) + tuple(patch_shape), dtype=dtype))
            return None
        except Exception as err:  # noqa: BLE001 - reported below
            first = err
        if batch_size > 1:
            try:
                fn(np.zeros((batch_size,) + tuple(patch_shape), dtype=dtype))
            except Exception:  # noqa: BLE001 - the batch of one's error is the one reported
                pass
            else:
                with self._lock:
                    self.batch_size, self._fn = batch_size, None
                self.load()
                return batch_size
        text = (str(first).strip().splitlines() or [type(first).__name__])
        line = next((t.strip() for t in reversed(text) if t.strip()), "")
        raise _UsageError(
            f"--model {self.spec!r} fails on a batch of one patch {(1,) + tuple(patch_shape)}: "
            f"{type(first).__name__}: {line}"
            + ("" if batch_size > 1 else "; if it was traced for a fixed batch size, pass that "
               "size as --batch-size (the last batch is then padded)"))


def _needs_arguments(fn: Callable) -> bool:
    """Whether ``fn`` cannot be called without arguments (or takes ``*args``: a batch)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: a model, not a factory
        return True
    return any(p.kind is p.VAR_POSITIONAL
               or (p.default is p.empty and p.kind is not p.VAR_KEYWORD) for p in params)


def _import_attr(spec: str) -> Any:
    modname, _, attr = spec.rpartition(":")
    if not modname or not attr:
        hint = ""
        if spec.endswith(".py"):
            hint = f" (for a function in {spec}, pass {os.path.basename(spec)[:-3]}:NAME)"
        raise _UsageError(f"--model must be package.module:callable or a .pt, .pth or .pt2 "
                          f"file; got {spec!r}{hint}")
    try:
        module = importlib.import_module(modname)
    except ModuleNotFoundError as err:
        if err.name and (modname == err.name or modname.startswith(err.name + ".")):
            raise _UsageError(
                f"--model {spec!r}: no module named {err.name!r} (the module must be importable: "
                "in the current directory or on PYTHONPATH)"
            ) from err
        raise _UsageError(f"--model {spec!r}: importing {modname!r} failed: "
                          f"{type(err).__name__}: {err}") from err
    except Exception as err:
        raise _UsageError(f"--model {spec!r}: importing {modname!r} failed: "
                          f"{type(err).__name__}: {err}") from err
    except SystemExit as err:  # a script's sys.exit() run on import
        raise _UsageError(f"--model {spec!r}: importing {modname!r} called sys.exit("
                          f"{err.code!r}); a model's module must not exit when imported (put "
                          "its script part under if __name__ == '__main__':)") from err
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise _UsageError(f"--model {spec!r}: {modname!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _load_torch_file(path: str) -> Any:
    import torch

    try:
        if path.endswith(".pt2"):
            return torch.export.load(path).module()
        import warnings

        with warnings.catch_warnings():  # deprecated in torch 2.13, still what .pt files are
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(path, map_location="cpu")
    except Exception as err:
        kind = "torch.export" if path.endswith(".pt2") else "TorchScript"
        first = (str(err).strip().splitlines() or [""])[0].split(". ")[0]
        raise _UsageError(
            f"--model {path!r} is not a {kind} file ({type(err).__name__}: {first}); a pickled "
            "nn.Module needs a package.module:factory that loads it"
        ) from err


def resolve_spec(spec: str) -> Any:
    """What ``--model SPEC`` names, checked but not built: the module attribute, or the torch
    file's path (checked to exist)."""
    if spec.endswith(TORCH_FILES):
        try:
            import torch  # noqa: F401
        except ImportError as err:
            raise _UsageError(f"--model {spec!r} is a torch file, but torch is not installed "
                              "(pip install 'daskpatch[torch]')") from err
        if not os.path.isfile(spec):
            raise _UsageError(f"--model {spec!r}: no such file")
        return spec
    obj = _import_attr(spec)
    if inspect.isclass(obj) and _needs_arguments(obj):
        raise _UsageError(f"--model {spec!r} is a class whose constructor needs arguments; name "
                          "a function that builds the model instead")
    return obj


def _load_model(spec: str, device: str | None, channels: str, amp: bool | str = False,
                batch_size: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """The NumPy-batch callable ``--model SPEC`` names (see ``daskpatch apply --help``)."""
    obj = resolve_spec(spec)
    if spec.endswith(TORCH_FILES):
        obj = _load_torch_file(spec)
    elif inspect.isclass(obj):
        obj = obj()
    elif (inspect.isfunction(obj) or inspect.ismethod(obj)) and not _needs_arguments(obj):
        obj = obj()  # a factory
        if inspect.isclass(obj):
            raise _UsageError(f"--model {spec!r}: the factory returned a class ({obj!r}); it "
                              "must return a model")
    if is_module(obj):
        return _torch_adapter(obj, device, channels, amp, batch_size)
    if device is not None:
        raise _UsageError(f"--device {device!r} applies to torch models; --model {spec!r} is "
                          f"{type(obj).__name__}")
    if not callable(obj):
        raise _UsageError(f"--model {spec!r} is {type(obj).__name__}, not a callable model")
    return obj


def _torch_adapter(module: Any, device: str | None, channels: str, amp: bool | str = False,
                   batch_size: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """A NumPy-batch function running a torch module through :class:`daskpatch.TorchModel`.

    ``TorchModel`` puts the module in eval mode, runs each call under
    :func:`torch.inference_mode` on ``device`` (default: where its parameters are) in its
    floating dtype (float32 for a module without floating tensors, as the command line always
    did). This adds the channel handling of ``--channel-axis`` (``channels``: ``"none"`` adds
    a channel axis of 1 and removes it from the output, ``"last"`` moves the channel axis to
    position 1 and back, ``"first"`` passes it as it is). A ``torch.export`` module, whose
    ``eval()`` refuses, keeps the mode it was exported in.
    """
    import torch

    if device is not None:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise _UsageError(f"--device must be a torch device (cpu, cuda, cuda:1); got "
                              f"{device!r}") from err
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise _UsageError(f"--device {device!r}: torch sees no CUDA device")
    # an exported (or probed, see SpecModel.probe) batch size: batches are padded to it
    fixed = batch_size or fixed_batch(module)
    shape = static_input_shape(module) if isinstance(module, torch.fx.GraphModule) else None
    try:
        module.eval()
    except NotImplementedError:  # a torch.export module: it keeps its mode
        module = _kept_mode(module)
    tensors = list(module.parameters()) + list(module.buffers())
    floats = any(t.is_floating_point() for t in tensors)
    model = TorchModel(module, device=device, dtype=None if floats else "float32", amp=amp,
                       batch_size=fixed)

    def run(batch: np.ndarray) -> np.ndarray:
        if channels == "none":
            batch = batch[:, None]
        elif channels == "last":
            batch = np.moveaxis(batch, -1, 1)
        y = model(batch)
        if not isinstance(y, np.ndarray):
            raise TypeError(f"the torch model must return a tensor; got {type(y).__name__}")
        if channels == "none":
            if y.ndim != batch.ndim or y.shape[1] != 1:
                raise ValueError(
                    f"the torch model returned shape {tuple(y.shape)} for input "
                    f"{tuple(batch.shape)}; a volume without --channel-axis goes in and out as "
                    "one channel (give the volume a channel axis for more output channels)"
                )
            y = y[:, 0]
        elif channels == "last":
            y = np.moveaxis(y, 1, -1)
        return y

    run.batch_size = fixed  # type: ignore[attr-defined]
    run.input_shape = shape  # type: ignore[attr-defined]
    return run


def _kept_mode(module: Any) -> Any:
    """``module`` inside a ``torch.nn.Module`` whose ``train()``/``eval()`` change nothing."""
    import torch

    class KeptMode(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner
            self.training = False  # runs as exported; nothing for TorchModel to copy

        def train(self, mode: bool = True) -> Any:
            return self

        def forward(self, x: Any) -> Any:
            return self.inner(x)

    return KeptMode(module)
