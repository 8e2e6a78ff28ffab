"""The project stands on its own: no file of it points readers at files outside the repository."""

from __future__ import annotations

import subprocess

from tests.conftest import REPO

# the names of the steering folder's files, spelled so that this file does not contain them
OUTSIDE = ("FIELD" + "_NOTES", ".." + "/shared")


def test_no_file_points_outside_the_project():
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    outside = [f for f in files if any(ref in (REPO / f).read_text(errors="replace") for ref in OUTSIDE)]
    assert outside == []
