import importlib.metadata

from sphinx.ext.intersphinx import missing_reference

project = "Flask-ThreadCtx"
copyright = "2026, The Flask-ThreadCtx developers"
release = importlib.metadata.version("Flask-ThreadCtx")
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.intersphinx",
    "sphinxcontrib.log_cabinet",
    "pallets_sphinx_themes",
]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_preserve_defaults = True
nitpicky = True
nitpick_ignore = [
    # Flask's app context class, named in the Backend protocol's signatures: not in its docs.
    ("py:class", "AppContext"),
    # Type variables and parameter specs of the typed signatures: not documented objects.
    ("py:class", "P"),
    ("py:class", "~P"),
    ("py:class", "P.args"),
    ("py:class", "P.kwargs"),
    ("py:class", "R"),
    ("py:class", "flask_threadctx.extension.R"),
    ("py:class", "flask_threadctx.contexts.threads.R"),
    ("py:class", "flask_threadctx.future.R"),
    # The Literal of TaskInfo.state, whose docstring lists its values.
    ("py:class", "TaskState"),
]

# CI builds the docs without network access, so the inventories are files in the repository,
# made for the versions the package is tested with: Python's from Debian's python3.11-doc
# package (/usr/share/doc/python3.11/html/objects.inv), Flask's, Werkzeug's and blinker's by
# building the docs in their sdists (pip download --no-binary :all: flask==3.1.3 ...; then
# sphinx-build -b dirhtml docs out). The links still point to the live sites.
intersphinx_mapping = {
    "python": ("https://docs.python.org/3/", "_inventories/python.inv"),
    "flask": ("https://flask.palletsprojects.com/en/stable/", "_inventories/flask.inv"),
    "werkzeug": ("https://werkzeug.palletsprojects.com/en/stable/", "_inventories/werkzeug.inv"),
    "blinker": ("https://blinker.readthedocs.io/en/stable/", "_inventories/blinker.inv"),
}

html_theme = "flask"
html_theme_options = {"index_sidebar_logo": False}
html_context = {"project_links": []}
html_sidebars = {
    "index": ["project.html", "localtoc.html", "searchbox.html"],
    "**": ["localtoc.html", "relations.html", "searchbox.html"],
}
html_title = f"Flask-ThreadCtx Documentation ({version})"
html_show_sourcelink = False


# The package's modules annotate with the short names ``t.`` and ``cabc.``, imported for type
# checking only, so autodoc keeps them as written. Look them up under their real names.
_ALIASES = {"t.": "typing.", "cabc.": "collections.abc."}


def _resolve_aliases(app, env, node, contnode):
    target = node.get("reftarget", "")
    for alias, module in _ALIASES.items():
        if target.startswith(alias):
            node["reftarget"] = module + target.removeprefix(alias)
            return missing_reference(app, env, node, contnode)
    return None


def _hide_internal_parameters(app, what, name, obj, options, signature, return_annotation):
    # A TaskFuture is made by the pool; its constructor's parameters are not for users.
    if name == "flask_threadctx.TaskFuture":
        document = getattr(app.env, "current_document", None)  # Sphinx 8.2 and later
        if document is not None:
            document.autodoc_annotations.pop(name, None)
        else:
            app.env.temp_data.get("annotations", {}).pop(name, None)


def setup(app):
    app.connect("missing-reference", _resolve_aliases)
    app.connect("autodoc-process-signature", _hide_internal_parameters, priority=600)
