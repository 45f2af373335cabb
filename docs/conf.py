"""Sphinx configuration: the API reference from the package's ``:param:`` docstrings, the pages in Markdown (MyST)."""

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

with open(os.path.join(os.path.dirname(__file__), os.pardir, "sb3_metarl", "version.txt")) as file_handler:
    release = version = file_handler.read().strip()

project = "sb3_metarl"
author = "sb3_metarl contributors"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.viewcode", "myst_parser"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
# the run folders hold checkpoints and curves, not pages; the *_table.md fragments are inside their pages already
exclude_patterns = ["_build", "results/runs", "results/**/*_table.md", "results/*_table.md"]
myst_heading_anchors = 3
autodoc_member_order = "bysource"
autodoc_typehints = "description"
# only this package's own docstrings (an undocumented override would show Gymnasium's or SB3's)
autodoc_inherit_docstrings = False
autodoc_default_options = {"members": True, "show-inheritance": True}
# the result pages link to the scripts and data files that made them (outside the docs tree, viewed on the forge)
suppress_warnings = ["myst.xref_missing"]
html_theme = "alabaster"
html_title = f"sb3_metarl {release}"
