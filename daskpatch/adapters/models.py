"""What can be known of a model without running it: the fingerprint :func:`daskpatch.to_zarr`
records so that ``resume=True`` refuses another model.

:func:`model_fingerprint` fingerprints what is deterministic across processes: a torch module
(its class and a hash of its parameters), a Python function (its qualified name and a hash of
its code), an object defining ``__daskpatch_fingerprint__()`` (the command line's models: the
spec and a hash of the file or module source it names). Anything else -- a callable object, a
builtin -- is recorded as not fingerprinted: name its version with ``run_id``.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import types
from typing import Any

from daskpatch.adapters.batch import BatchFn
from daskpatch.adapters.torch import TorchModel, is_module

#: The ``by`` of a model nothing deterministic is known of.
NOT_FINGERPRINTED = "nothing: pass run_id= to name the model's version"


def model_fingerprint(fn: Any) -> dict[str, Any]:
    """A JSON-ready description of ``fn`` that is the same for the same model in any process.

    Examples
    --------
    >>> def double(batch):
    ...     return 2 * batch
    >>> fp = model_fingerprint(double)
    >>> fp["by"], fp["name"].endswith("double")
    ('qualified name and code', True)
    >>> model_fingerprint(object())["by"].startswith("nothing")
    True
    """
    if isinstance(fn, BatchFn):
        return model_fingerprint(fn.fn)
    own = getattr(type(fn), "__daskpatch_fingerprint__", None)
    if own is not None:
        return dict(own(fn))
    if is_module(fn):
        return TorchModel(fn).__daskpatch_fingerprint__()
    if isinstance(fn, functools.partial):
        inner = model_fingerprint(fn.func)
        if inner["by"] == NOT_FINGERPRINTED:
            return inner
        return {**inner, "partial": _digest(repr((fn.args, sorted(fn.keywords.items()))))}
    if isinstance(fn, (types.FunctionType, types.MethodType)):
        func = fn.__func__ if isinstance(fn, types.MethodType) else fn
        out = {"by": "qualified name and code",
               "name": f"{func.__module__}.{func.__qualname__}",
               "code": _digest(_code_bytes(func.__code__)),
               "defaults": _digest(repr((func.__defaults__, func.__kwdefaults__)))}
        if func.__closure__ or isinstance(fn, types.MethodType):
            out["note"] = "values it captures (closure, bound object) are not fingerprinted"
        return out
    if isinstance(fn, (types.BuiltinFunctionType, type(abs))) or inspect.isbuiltin(fn) \
            or type(fn).__name__ == "ufunc":
        return {"by": "name", "name": f"{getattr(fn, '__module__', None)}.{fn.__name__}"}
    return {"by": NOT_FINGERPRINTED, "type": f"{type(fn).__module__}.{type(fn).__qualname__}"}


def file_digest(path: str) -> str:
    """The SHA-256 of a file's bytes (a model file the command line loads)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _digest(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()[:32]


def _code_bytes(code: types.CodeType) -> bytes:
    """A code object's bytecode, constants (nested code included), names and flags."""
    parts = [code.co_code, repr(code.co_names).encode(), repr(code.co_varnames).encode(),
             str(code.co_flags).encode()]
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            parts.append(_code_bytes(const))
        elif isinstance(const, frozenset):  # its repr's order changes with the hash seed
            parts.append(repr(sorted(map(repr, const))).encode())
        else:
            parts.append(repr(const).encode())
    return b"\0".join(parts)
