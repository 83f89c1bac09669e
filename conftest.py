"""Doctests that need PyTorch are skipped where it is not installed (it is an optional extra)."""

from __future__ import annotations

import importlib.util

collect_ignore = [] if importlib.util.find_spec("torch") else ["daskpatch/_torch.py"]
