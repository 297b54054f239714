"""Sphinx configuration of the dynamic-moe-router-kit documentation.

Build from the repository root (warnings are errors)::

    sphinx-build -W --keep-going -b html docs docs/_build/html

``families_table.md`` is regenerated from the family registry at the start of every build (see
``gen_families.py``); it is a git-ignored build artefact, included by ``concepts/families.md``.
``cli_reference.md`` is regenerated the same way from the ``dmr`` argparse parser (see
``gen_cli.py``) and included by ``cli.md``, so the command-line reference cannot go stale.
"""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import dynamic_moe_router

DOCS = Path(__file__).resolve().parent


def _load_generator(name: str = "gen_families"):  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(f"dmr_docs_{name}", DOCS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


# -- project ---------------------------------------------------------------------------------------
project = "dynamic-moe-router-kit"
author = "dynamic-moe-router-kit developers"
copyright = "dynamic-moe-router-kit developers"
release = dynamic_moe_router.__version__
version = ".".join(release.split(".")[:2])

# -- general ---------------------------------------------------------------------------------------
extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = [
    "_build",
    "families_table.md",  # generated, included by concepts/families.md
    "backends_table.md",  # generated with it (gen_families.py), included by concepts/backends.md
    "cli_reference.md",  # generated, included by cli.md
    "api/_autosummary",
    "Thumbs.db",
    ".DS_Store",
]

# -- MyST ------------------------------------------------------------------------------------------
myst_heading_anchors = 3

# -- autodoc / autosummary / napoleon --------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autosummary_generate = False  # plain autodoc directives only; nothing is generated
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# -- HTML ------------------------------------------------------------------------------------------
html_theme = "alabaster"
html_title = f"dynamic-moe-router-kit {release}"
html_theme_options = {
    "description": "Per-token dynamic expert routing for MoE language models",
    "fixed_sidebar": True,
}


def _generate_families_table(app) -> None:  # type: ignore[no-untyped-def]
    _load_generator().generate()


def _generate_cli_reference(app) -> None:  # type: ignore[no-untyped-def]
    _load_generator("gen_cli").generate()


def _drop_type_docstring(app, what, name, obj, options, lines) -> None:  # type: ignore[no-untyped-def]
    """Module data without a doc comment would show its type's docstring (``dict``'s, ...); drop it."""
    if what not in ("data", "attribute") or isinstance(obj, type):
        return
    type_doc = getattr(type(obj), "__doc__", None)
    if type_doc and lines and "\n".join(lines).strip() == inspect.cleandoc(type_doc).strip():
        lines.clear()


def setup(app):  # type: ignore[no-untyped-def]
    app.connect("builder-inited", _generate_families_table)
    app.connect("builder-inited", _generate_cli_reference)
    app.connect("autodoc-process-docstring", _drop_type_docstring, priority=100)  # before napoleon
    return {"parallel_read_safe": True, "parallel_write_safe": True}
