"""The exceptions daskpatch raises for failures users handle, carrying what failed as attributes.

Every class subclasses the built-in exception daskpatch raised before it existed, so
``except ValueError`` (or ``TypeError``, ``FileExistsError``, ``PermissionError``) keeps working,
and mixes in :class:`DaskpatchError`, so ``except daskpatch.errors.DaskpatchError`` catches all
of them. Each carries the parameter at fault (``param``, as the Python API names it) and its
value, so a caller (the command line among them) can tell the failures apart without reading the
message.

Examples
--------
>>> import numpy as np
>>> import daskpatch
>>> from daskpatch.errors import ParameterTypeError
>>> try:
...     daskpatch.apply_patches(np.zeros((8, 8)), lambda b: b, size="a", stride=4)
... except TypeError as err:  # still a TypeError
...     print(type(err).__name__, err.param, repr(err.value))
ParameterTypeError size 'a'
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = [
    "DaskpatchError",
    "IncompleteOutputError",
    "IncompleteWarning",
    "ModelOutputError",
    "ModelOutputTypeError",
    "ParameterError",
    "ParameterTypeError",
    "ResumeMismatchError",
    "TargetExistsError",
    "TargetNotDeletableError",
    "UncoveredVoxelsError",
    "UnsafeTargetError",
]


class DaskpatchError(Exception):
    """Base of daskpatch's errors: ``except DaskpatchError`` catches every one of them.

    Parameters
    ----------
    message
        The error message (``str(err)``).
    param
        The parameter at fault as the Python API names it (``"fill_value"``, ``"size[0]"``,
        ``"path"``), or ``None`` when no single parameter is.
    value
        The offending value of ``param`` (or what the failure is about).
    expected
        What would have been accepted, when the check knows it.
    mentions
        Other parameters the message names (a parameter that fixes the failure, a compound
        such as ``"store/path"``); :meth:`reworded` respells them along with ``param``.

    Examples
    --------
    >>> err = DaskpatchError("fill_value=300 does not fit uint8; pass fill_value=...",
    ...                      param="fill_value", value=300)
    >>> err.param, err.value
    ('fill_value', 300)
    >>> err.reworded({"fill_value": "--fill-value"})
    '--fill-value=300 does not fit uint8; pass --fill-value=...'
    """

    def __init__(self, message: str, *, param: str | None = None, value: Any = None,
                 expected: Any = None, mentions: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.param = param
        self.value = value
        self.expected = expected
        self.mentions = tuple(mentions)

    @property
    def message(self) -> str:
        """The message, as ``str(err)`` shows it."""
        return str(self.args[0]) if self.args else ""

    def __str__(self) -> str:  # OSError subclasses would otherwise format their own way
        return self.message

    def reworded(self, names: Mapping[str, str]) -> str:
        """The message with the parameters it names (``param`` without its ``[i]`` index, and
        ``mentions``) respelled as ``names`` maps them, e.g. in a command line's flags.

        Only those parameters are respelled, each where it stands as a word of its own (not
        inside another name or a quoted value, nor a noun before a quoted name as in
        ``path 'a/b' of store ...``); ``name= `` (a blank to fill in) becomes ``flag `` and
        ``name=value`` becomes ``flag=value``.

        Examples
        --------
        >>> err = ParameterError("store/path must name an array; pass path= one of ['a']",
        ...                      param="path", mentions=("store/path",))
        >>> err.reworded({"store/path": "SRC/--src-path", "path": "--src-path"})
        "SRC/--src-path must name an array; pass --src-path one of ['a']"
        """
        wanted = [self.param.split("[", 1)[0]] if self.param else []
        wanted += list(self.mentions)
        known = sorted({n for n in wanted if n in names}, key=len, reverse=True)
        if not known:
            return self.message
        token = re.compile(r"(?<![\w/'-])(" + "|".join(map(re.escape, known))
                           + r")(?![\w/']| ')(= )?")
        return token.sub(lambda m: names[m[1]] + (" " if m[2] else ""), self.message)


class ParameterError(DaskpatchError, ValueError):
    """An argument of the right type but a bad value (``param``, ``value``, ``expected``)."""


class ParameterTypeError(DaskpatchError, TypeError):
    """An argument of the wrong type (``param``, ``value``, ``expected``)."""


class ResumeMismatchError(DaskpatchError, ValueError):
    """``resume=True`` on an output written otherwise: ``param`` is the first setting that
    differs, ``stored`` what the output has and ``value`` what this call has."""

    def __init__(self, message: str, *, param: str | None = None, stored: Any = None,
                 value: Any = None, expected: Any = None, mentions: tuple[str, ...] = ()
                 ) -> None:
        super().__init__(message, param=param, value=value, expected=expected,
                         mentions=mentions)
        self.stored = stored

    @property
    def given(self) -> Any:
        """This call's value of ``param`` (same as ``value``)."""
        return self.value


class UnsafeTargetError(DaskpatchError, ValueError):
    """The output target cannot be written safely: it is a group, lies under an array, or is
    read by the graph being written; ``value`` names the target."""


class TargetExistsError(DaskpatchError, FileExistsError):
    """The output target holds something daskpatch will not replace (another node without
    ``overwrite=True``, a file, files that are not part of a Zarr array)."""


class TargetNotDeletableError(DaskpatchError, PermissionError):
    """``overwrite=True`` on a target whose old files cannot all be deleted; nothing was
    deleted."""


class WriterConflictError(DaskpatchError, ValueError):
    """Another writer holds the output's writer lease: a second writer is refused before it
    writes anything, and a writer whose lease another took over stops before its next chunk;
    ``holder`` describes the other writer (host, process, since when)."""

    def __init__(self, message: str, *, holder: Any = None, param: str | None = None,
                 value: Any = None, mentions: tuple[str, ...] = ()) -> None:
        super().__init__(message, param=param, value=value, mentions=mentions)
        self.holder = holder


class IncompleteOutputError(DaskpatchError, ValueError):
    """An output whose write has not finished was refused where a complete one is needed;
    ``value`` names it."""


class UncoveredVoxelsError(DaskpatchError, ValueError):
    """Patches do not cover every voxel and no ``fill_value`` says what they hold: ``uncovered``
    of the ``total`` voxels (``param`` is ``"fill_value"``)."""

    def __init__(self, message: str, *, uncovered: int | None = None, total: int | None = None,
                 param: str | None = "fill_value", value: Any = None,
                 mentions: tuple[str, ...] = ()) -> None:
        super().__init__(message, param=param, value=value, mentions=mentions)
        self.uncovered = uncovered
        self.total = total


class _ModelOutput(DaskpatchError):
    """What the model (``fn``) returned does not fit: ``expected`` and ``got`` (``param`` is
    ``"fn"``)."""

    def __init__(self, message: str, *, expected: Any = None, got: Any = None,
                 param: str | None = "fn") -> None:
        super().__init__(message, param=param, value=got, expected=expected)
        self.got = got


class ModelOutputError(_ModelOutput, ValueError):
    """The model (``fn``) returned an array of the wrong shape: ``expected`` and ``got`` are
    shapes (``param`` is ``"fn"``)."""


class ModelOutputTypeError(_ModelOutput, TypeError):
    """The model (``fn``) returned something that is not a numeric array: ``expected`` says
    what it should be and ``got`` what it was (a type name or a dtype)."""


class IncompleteWarning(UserWarning):
    """An output of :func:`daskpatch.to_zarr` was opened before its write finished.

    Its missing chunks read as the fill value. Finish it with ``to_zarr(..., resume=True)`` and
    the same array and parameters.
    """

