"""Sphinx configuration of daskpatch's documentation site.

Build: ``python -m sphinx -W --keep-going -b html docs docs/_build/html`` (warnings are errors).

The tools are the ones dask, xarray and zarr use for theirs: Sphinx with autodoc/autosummary, the
PyData theme and numpydoc. daskpatch's docstrings are numpydoc already, so the API reference is
generated from them as it stands, and a reader moving between dask, xarray, zarr and daskpatch finds
the same layout and the same kind of reference pages (see also the design page).
"""

from __future__ import annotations

import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # this checkout's daskpatch, whatever is installed
sys.path.insert(0, os.path.join(HERE, "_ext"))

import daskpatch  # noqa: E402

project = "daskpatch"
author = "the daskpatch developers"
copyright = "the daskpatch developers"  # noqa: A001
release = version = daskpatch.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "numpydoc",
    "myst_parser",  # the narrative pages are Markdown (they began as README sections)
    "results",  # docs/_ext/results.py: tables from benchmarks/results/*.json
]

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
myst_heading_anchors = 3
templates_path: list[str] = []
html_static_path: list[str] = []

# API reference: autosummary writes one page per public name into docs/generated/ (not committed)
autosummary_generate = True
autodoc_typehints = "none"  # numpydoc's Parameters sections carry the types
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_validation_checks: set[str] = set()

html_theme = "pydata_sphinx_theme"
html_title = "daskpatch"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
}
html_copy_source = False

# The API page must list exactly the names of daskpatch.__all__.
with open(os.path.join(HERE, "api.rst"), encoding="utf-8") as _f:
    _listed = set(re.findall(r"^   (\w+)$", _f.read(), flags=re.M))
if _listed != set(daskpatch.__all__):
    raise RuntimeError(
        "docs/api.rst must list exactly daskpatch.__all__: missing "
        f"{sorted(set(daskpatch.__all__) - _listed)}, extra {sorted(_listed - set(daskpatch.__all__))}"
    )
