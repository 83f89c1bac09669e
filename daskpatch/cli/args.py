"""How the command line reads each flag's text (``argparse`` types): a value, or an
``argparse.ArgumentTypeError`` saying what was expected and what was given. What the flags
mean and what the commands do is :mod:`daskpatch.cli.commands`'s.

Examples
--------
>>> int_list("32,64,64"), out_scale_value("1/2"), storage_option("anon=true")
((32, 64, 64), 0.5, ('anon', True))
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import numpy as np
from dask.utils import parse_bytes

#: ``--scheduler`` names of dask's local schedulers (anything with ``://`` is a cluster address).
SCHEDULERS = ("threads", "processes", "sync")


def int_list(text: str, *, minimum: int = 1) -> int | tuple[int, ...]:
    """``"64"`` -> 64, ``"32,64,64"`` -> (32, 64, 64): an int, or one per spatial axis."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or any(v < minimum for v in values):
        raise argparse.ArgumentTypeError(
            f"expected an integer >= {minimum}, or one per spatial axis separated by commas "
            f"(e.g. 64 or 32,64,64); got {text!r}"
        )
    return values[0] if len(values) == 1 else values


def float_list(text: str) -> float | tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number, or one per spatial axis separated by commas; got {text!r}"
        ) from None
    return values[0] if len(values) == 1 else values


def out_scale_value(text: str) -> str | float | tuple[float, ...]:
    """``--out-scale``: ``infer``, a number, or one per spatial axis (``1,0.5,0.5``; ``1/3``)."""
    if text == "infer":
        return text
    try:
        values = tuple(float(Fraction(v)) for v in text.split(","))
    except (ValueError, ZeroDivisionError):
        values = ()
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(
            f"expected a positive number, one per spatial axis separated by commas (2 or "
            f"1,0.5,0.5), or infer; got {text!r}")
    return values[0] if len(values) == 1 else values


def csv(value: int | Sequence[int]) -> str:
    return str(value) if isinstance(value, int) else ",".join(map(str, value))


def positive_int(text: str) -> int:
    value = int_list(text)
    if not isinstance(value, int):
        raise argparse.ArgumentTypeError(f"expected one integer >= 1; got {text!r}")
    return value


def numpy_dtype(text: str) -> np.dtype:
    try:
        return np.dtype(text)
    except TypeError:
        raise argparse.ArgumentTypeError(
            f"expected a NumPy dtype name (float32, float16, uint8, ...); got {text!r}"
        ) from None


def byte_count(text: str) -> int:
    try:
        value = parse_bytes(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"expected a positive byte count (8388608, 8MiB, 16MB); got {text!r}"
        )
    return value


def scheduler_name(text: str) -> str:
    if text in SCHEDULERS or "://" in text:
        return text
    raise argparse.ArgumentTypeError(
        f"expected one of {', '.join(SCHEDULERS)} or a dask.distributed scheduler address "
        f"(tcp://host:8786); got {text!r}"
    )


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction from 0 to below 1; got {text!r}")
    return value


def storage_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` -> (key, value), the value read as JSON where it is (numbers, true/false,
    objects), else as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. endpoint_url=http://host:9000); "
                                         f"got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value
