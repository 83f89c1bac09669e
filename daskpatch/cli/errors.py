"""How the command line's errors read: the bad-input exception (exit status 2), and library
errors told in the flags a user typed (``fill_value=`` -> ``--fill-value``).

A library error (:class:`daskpatch.errors.DaskpatchError`) names the parameters its message
uses (``param`` and ``mentions``); :func:`in_flags` respells just those, chosen by the error's
class and attributes, never by searching arbitrary message text.
"""

from __future__ import annotations

from daskpatch.errors import (DaskpatchError, TargetExistsError, TargetNotDeletableError,
                              UnsafeTargetError)

__all__ = ["UsageError", "flag_names", "in_flags"]

#: Parameters of the Python API named in its error messages -> the flags that set them.
FLAGS = {
    "fill_value": "--fill-value", "channel_axis": "--channel-axis",
    "out_channels": "--out-channels", "block_shape": "--block-shape",
    "sigma_scale": "--sigma-scale", "batch_size": "--batch-size", "pad_mode": "--pad-mode",
    "out_scale": "--out-scale",
    "target_bytes": "--target-bytes", "target_path": "--dst-path",
    "target/target_path": "DST/--dst-path",
}
#: The flag that sets the source's ``path=``, per command.
PATH_FLAGS = {"apply": "--src-path", "info": "--path", "rechunk": "--path"}
#: Errors about the output: their ``path`` is the one inside DST.
TARGET_ERRORS = (UnsafeTargetError, TargetExistsError, TargetNotDeletableError)


class UsageError(Exception):
    """A bad command line or input, found before anything was written (exit status 2)."""


def flag_names(err: DaskpatchError, command: str | None) -> dict[str, str]:
    """The flags of ``command`` that set the parameters ``err`` may name.

    ``path`` is DST's (``--dst-path``) in an error about the output target, else SRC's;
    ``store/path`` (and ``SRC/path``) is SRC with its path flag.

    >>> from daskpatch.errors import ParameterError, UnsafeTargetError
    >>> flag_names(ParameterError("x", param="path"), "apply")["path"]
    '--src-path'
    >>> flag_names(UnsafeTargetError("x", param="path"), "apply")["path"]
    '--dst-path'
    """
    src = PATH_FLAGS.get(command or "", "--path")
    path = "--dst-path" if isinstance(err, TARGET_ERRORS) else src
    return {**FLAGS, "path": path, "store/path": f"SRC/{src}", "SRC/path": f"SRC/{src}"}


def in_flags(err: BaseException, command: str | None) -> str:
    """The message of ``err`` with the parameters of the Python API it names written as the
    ``command``'s flags (a :class:`~daskpatch.errors.DaskpatchError`; others as they are).

    >>> from daskpatch.errors import ParameterError, UncoveredVoxelsError
    >>> in_flags(ParameterError("fill_value=300 does not fit the result dtype uint8",
    ...                         param="fill_value", value=300), "apply")
    '--fill-value=300 does not fit the result dtype uint8'
    >>> in_flags(UncoveredVoxelsError("12 voxels uncovered; pass fill_value=... to fill them",
    ...                               uncovered=12, total=64), "apply")
    '12 voxels uncovered; pass --fill-value=... to fill them'
    >>> in_flags(ParameterError("store/path must name a Zarr array; pass path= one of ['a']",
    ...                         param="path", mentions=("store/path",)), "apply")
    "SRC/--src-path must name a Zarr array; pass --src-path one of ['a']"
    >>> in_flags(ValueError("fill_value is not ours to rename"), "apply")
    'fill_value is not ours to rename'
    """
    if isinstance(err, DaskpatchError):
        return err.reworded(flag_names(err, command))
    return str(err)
