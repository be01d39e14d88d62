"""A Sphinx extension that keeps one copy of each script a page loads.

With the Sphinx 7.4 that Jupyter Book 1.0 installs, the inline configuration scripts of
sphinx-togglebutton and sphinx-thebe reach every page twice, once registered with the file name
None and once with ``""``, and the second ``const THEBE_JS_URL = ...`` is a JavaScript error
(``SyntaxError: Identifier 'THEBE_JS_URL' has already been declared``) that
``tests/test_browser.py`` catches. Two scripts are the same when their file (None and ``""``
alike: an inline script), priority and attributes (an inline script's body among them) are.
"""
from __future__ import annotations


def _key(script) -> tuple:
    attributes = getattr(script, "attributes", {})
    return (getattr(script, "filename", script) or None, getattr(script, "priority", None),
            tuple(sorted(attributes.items())))


def _unique_scripts(app, pagename, templatename, context, doctree) -> None:
    scripts = context.get("script_files")
    if scripts:
        unique = {}
        for script in scripts:  # the first of equal scripts, in the page's order
            unique.setdefault(_key(script), script)
        context["script_files"] = list(unique.values())


def setup(app):
    app.connect("html-page-context", _unique_scripts)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
