"""What the installed package's metadata says about where its documentation lives.

Its own module, outside `extproc.render`: `extproc serve` reads it (the live page's reason
links) and must not load the renderers and their typed Envoy config to do so (some 20 MiB
of resident memory per server process; tests/unit/test_layers.py).
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, metadata

DISTRIBUTION = "extproc-doctor"

# The well-known label `documentation` and its alias `docs`, and how a label is normalised
# before the comparison (PEP 753, packaging.python.org "Well-known Project URLs in Metadata").
_DOCUMENTATION_LABELS = ("documentation", "docs")
_LABEL_NOISE = str.maketrans("", "", string.punctuation + string.whitespace)


def documentation_url(project_urls: Iterable[str]) -> str | None:
    """The documentation's address from core metadata's `Project-URL: LABEL, URL` lines."""
    for entry in project_urls:
        label, _, url = entry.partition(",")
        if label.translate(_LABEL_NOISE).lower() in _DOCUMENTATION_LABELS and url.strip():
            return url.strip()
    return None


def published_documentation_url() -> str | None:
    """The documentation site the installed package's metadata names (pyproject.toml
    `[project.urls] Documentation`); None when it names none. The alerts' runbooks and the
    live page's reason links (`serve --ui-docs-url`) both start from it."""
    try:
        urls = metadata(DISTRIBUTION).get_all("Project-URL") or []
    except PackageNotFoundError:
        return None
    return documentation_url(urls)
