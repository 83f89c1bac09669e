"""The ``daskpatch`` command line: ``info``, ``apply`` and ``rechunk`` (also ``python -m daskpatch``)."""

from daskpatch.cli.commands import main

__all__ = ["main"]
