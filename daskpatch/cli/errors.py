"""How the command line's errors read: the bad-input exception (exit status 2), and library
messages told in the flags a user typed (``fill_value=`` -> ``--fill-value``)."""

from __future__ import annotations

import re

__all__ = ["UsageError", "in_flags"]

#: Parameters of the Python API named in its error messages -> the flags that set them.
FLAGS = {
    "fill_value": "--fill-value", "channel_axis": "--channel-axis",
    "out_channels": "--out-channels", "block_shape": "--block-shape",
    "sigma_scale": "--sigma-scale", "batch_size": "--batch-size", "pad_mode": "--pad-mode",
    "target_bytes": "--target-bytes", "target_path": "--dst-path",
}
#: The flag that sets the source's ``path=``, per command.
PATH_FLAGS = {"apply": "--src-path", "info": "--path", "rechunk": "--path"}

_PARAMS = re.compile(r"(?<![\w-])(" + "|".join(FLAGS) + r")\b")
_PATH = re.compile(r"(?<![\w/-])path=( ?)")
_SOURCE_PATH = re.compile(r"\b(?:store|source|SRC)/path\b")


class UsageError(Exception):
    """A bad command line or input, found before anything was written (exit status 2)."""


def in_flags(message: str, command: str | None) -> str:
    """``message`` of the Python API with the parameters it names as the ``command``'s flags.

    >>> in_flags("fill_value=300 does not fit the result dtype uint8", "apply")
    '--fill-value=300 does not fit the result dtype uint8'
    >>> in_flags("the root of store 'g.zarr' holds a group; pass path= one of ['a']", "apply")
    "the root of store 'g.zarr' holds a group; pass --src-path one of ['a']"
    >>> in_flags("SRC/path must name a Zarr array", "rechunk")
    'SRC/--path must name a Zarr array'

    """
    message = _PARAMS.sub(lambda m: FLAGS[m[1]], message)
    flag = PATH_FLAGS.get(command or "", "--path")
    message = _SOURCE_PATH.sub(f"SRC/{flag}", message)
    return _PATH.sub(lambda m: flag + (" " if m[1] else "="), message)
