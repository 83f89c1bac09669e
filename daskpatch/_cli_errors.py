"""How the command line's errors read: the bad-input exception (exit status 2)."""

from __future__ import annotations

__all__ = ["UsageError"]


class UsageError(Exception):
    """A bad command line or input, found before anything was written (exit status 2)."""
