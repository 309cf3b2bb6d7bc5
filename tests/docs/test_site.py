"""The documentation site builds with `mkdocs build --strict`, as `make docs` builds it (never
with --quiet: it hides the warnings --strict counts, and a broken link then passes).

--strict turns every warning into a failure: a link to a page or an anchor that does not
exist, a page left out of the nav, a snippet (the example policy, bench/README.md) whose
file is gone. The build goes to a temporary directory; the repository is not written.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from extproc.diagnosis import HINTS

ROOT = Path(__file__).resolve().parents[2]


def build(root: Path, site: Path) -> subprocess.CompletedProcess[str]:
    """`mkdocs build --strict` of the project at `root` into `site`."""
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=root,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def copy_project(tmp_path: Path) -> Path:
    """What the site is built from (mkdocs.yml, docs/, and the files snippets include)."""
    root = tmp_path / "project"
    shutil.copytree(ROOT / "docs", root / "docs")
    shutil.copy(ROOT / "mkdocs.yml", root)
    (root / "bench").mkdir()
    shutil.copy(ROOT / "bench" / "README.md", root / "bench")
    shutil.copytree(ROOT / "examples", root / "examples")
    return root


class _Ids(HTMLParser):
    """Every `id` of an HTML page's `<a>` elements, counted (a maintained parser, not a
    regex); headings keep their own ids on the heading."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: Counter[str] = Counter()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.ids.update(value for name, value in attrs if name == "id" and value)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The site of this checkout, built once with --strict; its build must pass."""
    out = tmp_path_factory.mktemp("site") / "site"
    result = build(ROOT, out)
    assert result.returncode == 0, result.stdout + result.stderr
    yield out


class TestSite:
    def test_builds_strict(self, site):
        """The site builds with no warning, every page of docs/ in it."""
        pages = {p.relative_to(ROOT / "docs") for p in (ROOT / "docs").rglob("*.md")}
        built = {p for p in pages if (site / p.with_suffix("") / "index.html").exists()}
        built |= {p for p in pages if p.name == "index.md"}
        assert built == pages

    def test_one_anchor_per_reason(self, site):
        """The built reason catalogue has exactly one `reason-CODE` anchor per reason code the
        core knows (diagnosis.HINTS), and none for a code it does not: the live page links
        each row's reason there (`serve --ui-docs-url`)."""
        parser = _Ids()
        parser.feed((site / "reasons" / "index.html").read_text(encoding="utf-8"))
        assert parser.ids == {f"reason-{code}": 1 for code in HINTS}

    def test_broken_anchor_fails(self, tmp_path):
        """A link to an anchor that no heading makes fails the build (what --strict is for)."""
        root = copy_project(tmp_path)
        assert build(root, tmp_path / "ok").returncode == 0
        page = root / "docs" / "index.md"
        page.write_text(page.read_text() + "\n[gone](reasons.md#no-such-heading)\n")
        result = build(root, tmp_path / "broken")
        assert result.returncode != 0
        assert "no-such-heading" in result.stdout + result.stderr

    def test_nav_names_every_page(self):
        """mkdocs.yml's nav lists every Markdown file of docs/ (the order a reader follows)."""
        config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

        def entries(nav: list) -> set[str]:
            found: set[str] = set()
            for item in nav:
                for value in item.values() if isinstance(item, dict) else [item]:
                    found |= entries(value) if isinstance(value, list) else {value}
            return found

        pages = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md")}
        assert entries(config["nav"]) == pages
