"""The docs site builds with no broken link and no page left out of its navigation, and the
README stays a front page."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_the_docs_site_builds_strictly(tmp_path):
    r = subprocess.run([str(Path(sys.executable).with_name("mkdocs")), "build", "--strict", "--site-dir",
                        str(tmp_path / "site")], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "site" / "architecture" / "index.html").is_file()


def test_the_readme_is_a_front_page_that_links_the_reference():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    linked = {p.name for p in (REPO / "docs").glob("*.md") if f"(docs/{p.name})" in readme}
    pages = {p.name for p in (REPO / "docs").glob("*.md")} - {"index.md"}
    assert pages - linked == set()
