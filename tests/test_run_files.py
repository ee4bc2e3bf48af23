"""A run folder's completions.jsonl, plain as a run writes it or gzipped as a study archives it: every reader
takes either, and archiving is byte-reproducible."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from refusal.compare import RunOutcomes
from refusal.evaluation.resume import finished_run
from refusal.run_files import ARCHIVED, COMPLETIONS, archive_completions, completions_path, read_completions

ROWS = [{"split": "harmful", "prompt": f"p{i}", "refused": i % 3 == 0, "baseline_refused": i % 2 == 0} for i in range(7)]


def write_run(folder) -> None:
    folder.mkdir(parents=True)
    (folder / COMPLETIONS).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    (folder / "results.json").write_text(json.dumps({"status": "ok", "config_sha256": "f" * 64}))


def test_archiving_gzips_every_run_in_place_and_readers_see_the_same_rows(tmp_path):
    for name in ("a", "b/c"):
        write_run(tmp_path / "study" / name)
    plain = RunOutcomes.from_dir(tmp_path / "study" / "a")
    assert archive_completions(tmp_path / "study") == 2
    for name in ("a", "b/c"):
        run = tmp_path / "study" / name
        assert completions_path(run) == run / ARCHIVED and not (run / COMPLETIONS).exists()
        assert read_completions(run) == ROWS
        assert json.loads(gzip.decompress((run / ARCHIVED).read_bytes()).splitlines()[0]) == ROWS[0]
    archived = RunOutcomes.from_dir(tmp_path / "study" / "a")
    assert archived.digests == plain.digests
    np.testing.assert_array_equal(archived.refused["harmful"], plain.refused["harmful"])
    assert finished_run(tmp_path / "study" / "a", "f" * 64) is not None  # a resumed run stays finished
    assert archive_completions(tmp_path / "study") == 0  # nothing plain is left


def test_the_same_rows_archive_to_the_same_bytes(tmp_path):
    """No file name or time in the gzip header: an unchanged record is an unchanged file in git."""
    write_run(tmp_path / "one")
    write_run(tmp_path / "two")
    archive_completions(tmp_path / "one")
    archive_completions(tmp_path / "two")
    assert (tmp_path / "one" / ARCHIVED).read_bytes() == (tmp_path / "two" / ARCHIVED).read_bytes()


def test_a_folder_without_completions_is_named(tmp_path):
    assert completions_path(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="completions.jsonl not found"):
        read_completions(tmp_path)
