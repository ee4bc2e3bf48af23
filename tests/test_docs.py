"""The docs name real things: every test docs/ERRORS.md cites exists."""

from __future__ import annotations

import re

from conftest import REPO


def test_every_test_named_in_the_errors_table_exists():
    table = (REPO / "docs" / "ERRORS.md").read_text()
    named = set(re.findall(r"`(test_\w+)", table)) | set(re.findall(r"::(test_\w+)", table))
    defined = {m for f in (REPO / "tests").glob("test_*.py") for m in re.findall(r"^def (test_\w+)", f.read_text(), re.M)}
    assert named, "the table names no tests"
    assert sorted(named - defined) == []
