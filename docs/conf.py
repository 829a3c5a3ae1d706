"""Sphinx configuration of the vlm_jax documentation (Sphinx + MyST, myst-nb for the notebook).

Build (warnings are errors; .ci/run does this):  sphinx-build -W -b html docs docs/_build/html
Nothing is fetched (no intersphinx) and the Colab notebook is rendered without being executed.
"""

import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))
sys.path.insert(0, str(DOCS.parent))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

project = "vlm_jax"
author = "the vlm_jax authors"
copyright = "the vlm_jax authors"

extensions = [
    "myst_nb",  # MyST markdown pages and .ipynb notebooks
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "vlm_jax_docs",  # generated pages: config reference, CLI --help, the notebook copy
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "results", "_generated/*.md", "_generated/*.txt", "**/.ipynb_checkpoints"]
root_doc = "index"

myst_enable_extensions = ["colon_fence", "deflist", "dollarmath", "amsmath"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # the Colab notebook is shown as committed, never executed here
nb_merge_streams = True

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": False}
autosummary_generate = False
default_role = "code"  # the code base's docstrings write `name` for code

html_theme = "sphinx_book_theme"
html_title = "vlm_jax"
html_theme_options = {"show_toc_level": 2}
