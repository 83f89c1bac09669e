"""Renamed :mod:`daskpatch._source`: this name is the same module until the imports move."""
import sys
from typing import TYPE_CHECKING

from . import _source

if TYPE_CHECKING:
    from ._source import Volume as Volume  # noqa: F401

sys.modules[__name__] = _source
