"""daskpatch's settings, in :mod:`dask.config` under ``daskpatch.*``.

The defaults come from ``daskpatch.yaml`` next to this file, loaded at import (as distributed
loads its own); override them as any dask setting::

    dask.config.set({"daskpatch.spill-bytes": "1 GiB"})

or ``DASK_DASKPATCH__SPILL_BYTES=1GiB`` in the environment. A setting is read where it is used,
when a graph is built, so a setting that changes the result (``slab-bytes``: the order of float
sums) is part of the graph's name.
"""

from __future__ import annotations

import os

import dask.config
import yaml
from dask.utils import parse_bytes

from daskpatch.geometry.parse import _describe

with open(os.path.join(os.path.dirname(__file__), "daskpatch.yaml")) as _f:
    _DEFAULTS: dict = yaml.safe_load(_f)
dask.config.update_defaults(_DEFAULTS)


def get_bytes(name: str) -> float:
    """The ``daskpatch.<name>`` setting as a number of bytes (it may be a number or a string
    such as ``"64 MiB"``); a ``None`` setting means the default.

    Examples
    --------
    >>> import dask
    >>> with dask.config.set({"daskpatch.spill-bytes": "1 MiB"}):
    ...     get_bytes("spill-bytes")
    1048576
    >>> get_bytes("slab-bytes")
    524288
    """
    key = f"daskpatch.{name}"
    value = dask.config.get(key, None)
    if value is None:
        value = _DEFAULTS["daskpatch"][name]
    if isinstance(value, str):
        try:
            return parse_bytes(value)
        except ValueError as err:
            raise ValueError(
                f"dask.config setting {key} must be a number of bytes or a "
                f"string such as '64 MiB'; got {_describe(value)}"
            ) from err
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"dask.config setting {key} must be a number of bytes or a string "
            f"such as '64 MiB'; got {_describe(value)}"
        )
    if not value >= 0:
        raise ValueError(f"dask.config setting {key} must be >= 0; got {value}")
    return value


def get_int(name: str) -> int:
    """The ``daskpatch.<name>`` setting as a positive integer."""
    key = f"daskpatch.{name}"
    value = dask.config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"dask.config setting {key} must be an integer >= 1; got "
                         f"{_describe(value)}")
    return value
