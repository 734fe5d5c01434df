import importlib.metadata

project = "Flask-ThreadCtx"
copyright = "2026, The Flask-ThreadCtx developers"
release = importlib.metadata.version("Flask-ThreadCtx")
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinxcontrib.log_cabinet",
    "pallets_sphinx_themes",
]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_preserve_defaults = True
# No intersphinx: CI builds the docs without network access, and -W would fail on the fetch.

html_theme = "flask"
html_theme_options = {"index_sidebar_logo": False}
html_context = {"project_links": []}
html_sidebars = {
    "index": ["project.html", "localtoc.html", "searchbox.html"],
    "**": ["localtoc.html", "relations.html", "searchbox.html"],
}
html_title = f"Flask-ThreadCtx Documentation ({version})"
html_show_sourcelink = False
