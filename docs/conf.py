"""Sphinx configuration of the regvi documentation (``python -m sphinx -b html docs docs/_build``)."""

from __future__ import annotations

import os
import sys
from importlib.util import find_spec
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # import regvi and evaluation from this checkout
# keep imports during the build quiet and local
os.environ.setdefault("MPLBACKEND", "Agg")

project = "regvi"
author = "regvi developers"
copyright = "regvi developers"

try:
    from regvi import __version__ as release
except ImportError:  # pragma: no cover - documentation without the package installed
    release = "0.1.0"
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# MyST: Markdown pages with $…$ / $$…$$ maths and linkable section anchors (page.md#section)
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3

# API reference from the numpy docstrings
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_default_options = {"members": True, "show-inheritance": False}

html_theme = "furo" if find_spec("furo") is not None else "alabaster"
html_title = f"regvi {release}"
