"""Reliability and security: nothing lost when a run is killed, reproducible runs, safe inputs.

Killed runs: a driver process extracts activations (or generates) on the tiny model with a hook
that prints a line and sleeps on every forward pass; the test SIGKILLs it mid-run, checks that
nothing half-written is trusted, then reruns in this process (same tiny weights, same cache
keys), counting forward passes to prove that completed work is not redone, and compares the
result with an uninterrupted run.
"""

from __future__ import annotations

import ast
import json
import os
import queue
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO
from safetensors.torch import load_file

from refusal.artifacts import artifact_paths, load_artifact

SMALL = ["data.n_train=8", "data.n_val=4", "data.n_test=4", "eval.max_new_tokens=4", "geometry.enabled=false"]
PROMPTS = [f"Explain idea number {i} in {'some ' * (i % 5)}detail." for i in range(24)]
SHARD = 4  # prompts per shard = per batch, so one forward pass of the first block per shard

DRIVER = textwrap.dedent('''
    import sys, time
    from refusal.runtime.activations import ActivationCache
    from refusal.runtime.generation import GenerationCache
    from refusal.models import load_model

    mode, root, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
    prompts = {prompts!r}
    bundle = load_model({{"name": "tiny", "source": "tiny", "device": "cpu"}}, root)

    def slow(module, args):
        if args[0].shape[0] > 1:  # a batch pass (the shared prompt prefix runs as one row before it)
            print("forward", flush=True)
            time.sleep(delay)

    bundle.layout.blocks[0].register_forward_pre_hook(slow)
    ids = bundle.tokenize_instructions(prompts)
    print("ready", flush=True)
    if mode == "extract":
        ActivationCache(root, shard_size={shard}).get(
            bundle, ids, len(bundle.post_instruction_ids), batch_size={shard}, progress=False)
    else:
        GenerationCache(root).get(bundle, ids, 4, batch_size={shard}, progress=False)
    print("done", flush=True)
''').format(prompts=PROMPTS, shard=SHARD)


class Driver:
    """A child process whose stdout lines arrive on a queue, so the test can wait for the n-th one."""

    def __init__(self, tmp_path: Path, mode: str, root: Path, delay: float):
        script = tmp_path / "driver.py"
        script.write_text(DRIVER)
        env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen([sys.executable, str(script), mode, str(root), str(delay)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def wait_for(self, what: str, count: int = 1, timeout: float = 240.0) -> None:
        deadline, seen = time.monotonic() + timeout, 0
        while seen < count:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.proc.kill()
                pytest.fail(f"driver never printed {what!r} x{count}: {self.proc.stderr.read()[-3000:]}")
            seen += line == what
            assert line != "done", "the driver finished before it could be killed"

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        assert self.proc.returncode == -signal.SIGKILL


class ForwardCounter:
    """Counts batch passes of the first block (one per extraction batch, one per generation step; the
    one-row pass of a shared prompt prefix is not counted)."""

    def __init__(self, bundle):
        self.n = 0
        self.handle = bundle.layout.blocks[0].register_forward_pre_hook(self._count)

    def _count(self, module, args) -> None:
        self.n += args[0].shape[0] > 1

    def __enter__(self) -> ForwardCounter:
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


# -- nothing lost ---------------------------------------------------------------------------------
def test_killed_extraction_resumes_from_complete_shards(tiny_bundle, tmp_path):
    from refusal.runtime.activations import ActivationCache

    root = tmp_path / "cache"
    n_shards = len(PROMPTS) // SHARD
    driver = Driver(tmp_path, "extract", root, delay=0.5)
    driver.wait_for("forward", count=3)  # shard 2 is being extracted, so shards 0 and 1 were saved
    driver.kill()

    ids = tiny_bundle.tokenize_instructions(PROMPTS)
    n_pos = len(tiny_bundle.post_instruction_ids)
    cache = ActivationCache(root, shard_size=SHARD)
    folder = root / "tiny" / cache.key(tiny_bundle, ids, n_pos)
    committed = sorted(folder.glob("shard*.json"))
    assert 2 <= len(committed) < n_shards
    for meta in committed:  # a committed shard is whole: its checksum verifies
        load_artifact(meta.with_suffix(""))
    # What a kill at the worst moment leaves: a temp file, and a tensor file renamed before its JSON.
    nxt = folder / f"shard{len(committed):05d}"
    (folder / f".{nxt.name}.safetensors.killed.tmp").write_bytes(b"half a tensor")
    artifact_paths(nxt)[0].write_bytes(b"tensor written, metadata never")

    with ForwardCounter(tiny_bundle) as counter:
        resumed = cache.get(tiny_bundle, ids, n_pos, batch_size=SHARD, progress=False)
    assert counter.n == n_shards - len(committed)  # only the missing shards were extracted
    reference = ActivationCache(tmp_path / "fresh", shard_size=SHARD).get(
        tiny_bundle, ids, n_pos, batch_size=SHARD, progress=False)
    assert torch.equal(resumed, reference)
    assert len(list(folder.glob("shard*.json"))) == n_shards


def test_killed_generation_keeps_its_finished_batches_and_the_rerun_redoes_only_the_rest(tiny_bundle, tmp_path):
    from refusal.runtime.generation import GenerationCache, generate

    root = tmp_path / "cache"
    driver = Driver(tmp_path, "generate", root, delay=0.3)
    driver.wait_for("forward", count=6)  # the first batch is done (4 passes: 4 new tokens), the second generating
    driver.kill()
    folder = root / "tiny"
    assert not list(folder.glob("*[0-9a-f].json"))  # no cache entry: it is written once every batch is done
    kept = sorted(p.name for p in folder.glob("partial/*/batch*.json"))
    assert kept and kept == [f"batch{i:05d}.json" for i in range(len(kept))] and len(kept) < len(PROMPTS) // SHARD

    ids = tiny_bundle.tokenize_instructions(PROMPTS)
    with ForwardCounter(tiny_bundle) as full:
        reference = generate(tiny_bundle, ids, max_new_tokens=4, batch_size=SHARD, progress=False)
    assert all(len(row) == 4 for row in reference.completion_ids)  # no early end: every batch takes 4 passes
    cache = GenerationCache(root)
    with ForwardCounter(tiny_bundle) as resumed:
        rerun = cache.get(tiny_bundle, ids, 4, batch_size=SHARD, progress=False)
    assert resumed.n == full.n - 4 * len(kept)  # the journaled batches were not generated again
    assert rerun.completions == reference.completions and rerun.completion_ids == reference.completion_ids
    assert torch.equal(rerun.first_logits, reference.first_logits)
    assert not list(folder.glob("partial/*/*"))  # the journal goes once the whole result is saved
    with ForwardCounter(tiny_bundle) as counter:
        hit = cache.get(tiny_bundle, ids, 4, batch_size=SHARD, progress=False)
    assert counter.n == 0 and hit.completions == reference.completions


def test_a_journal_nobody_resumed_for_weeks_is_removed_when_the_model_generates_again(tiny_bundle, tmp_path):
    """A journal whose newest batch is older than STALE_JOURNAL_DAYS goes; one a day younger than that stays (its run
    may still be resumed), and so does the new generation's result."""
    from refusal.runtime.generation import STALE_JOURNAL_DAYS, GenerationCache

    partial = tmp_path / "tiny" / "partial"
    old, recent = partial / "abandoned", partial / "recent"
    for folder, age_days in ((old, STALE_JOURNAL_DAYS + 1), (recent, STALE_JOURNAL_DAYS - 1)):
        folder.mkdir(parents=True)
        (folder / "batch00000.json").write_text("{}")
        stamp = time.time() - age_days * 86400
        os.utime(folder / "batch00000.json", (stamp, stamp))
    ids = tiny_bundle.tokenize_instructions(PROMPTS[:4])
    GenerationCache(tmp_path).get(tiny_bundle, ids, 2, batch_size=SHARD, progress=False)
    assert not old.exists() and (recent / "batch00000.json").exists()
    assert sorted(p.name for p in partial.iterdir()) == ["recent"]  # the finished call removed its own journal


def test_a_damaged_journal_batch_is_generated_again_never_trusted(tiny_bundle, tmp_path):
    """Batches whose logits were truncated or whose token ids were edited fail their checksums: only those are
    generated again, and the result equals an uninterrupted run's."""
    from refusal.runtime.generation import BatchJournal, generate

    ids = tiny_bundle.tokenize_instructions(PROMPTS[:12])
    journal = BatchJournal(tmp_path / "journal")
    reference = generate(tiny_bundle, ids, max_new_tokens=4, batch_size=SHARD, progress=False, journal=journal)
    assert all(len(row) == 4 for row in reference.completion_ids)  # every batch takes 4 passes
    logits, record = tmp_path / "journal" / "batch00001.safetensors", tmp_path / "journal" / "batch00002.json"
    logits.write_bytes(logits.read_bytes()[:-8])
    edited = json.loads(record.read_text())
    edited["meta"]["completion_ids"][0][0] += 1
    record.write_text(json.dumps(edited))
    with ForwardCounter(tiny_bundle) as counter:
        again = generate(tiny_bundle, ids, max_new_tokens=4, batch_size=SHARD, progress=False, journal=journal)
    assert counter.n == 2 * 4
    assert again.completion_ids == reference.completion_ids and torch.equal(again.first_logits, reference.first_logits)


def test_a_journal_that_cannot_be_kept_never_fails_the_generation(tiny_bundle, tmp_path):
    """A multirun's jobs share the unsteered generations' journal, and the first to finish removes it while another
    writes a batch into it (a CI failure: FileNotFoundError on the batch's temp file). The journal only saves a
    resumed run work, so a batch it cannot keep is logged and the generation goes on with the same result."""
    from refusal.runtime.generation import BatchJournal, generate

    ids = tiny_bundle.tokenize_instructions(PROMPTS[:8])
    reference = generate(tiny_bundle, ids, max_new_tokens=3, batch_size=SHARD, progress=False)
    blocked = tmp_path / "partial"
    blocked.write_text("a file where the journal's folder should be: every save raises OSError")
    journal = BatchJournal(blocked / "key")
    again = generate(tiny_bundle, ids, max_new_tokens=3, batch_size=SHARD, progress=False, journal=journal)
    assert again.completion_ids == reference.completion_ids and torch.equal(again.first_logits, reference.first_logits)
    assert journal.load(0, SHARD) is None and blocked.is_file()


KILLED_WRITER = textwrap.dedent('''
    import sys, time
    from pathlib import Path
    from refusal.artifacts import atomic_target
    from refusal.models.gguf_package import write_checkpoint

    root = Path(sys.argv[1])

    def fill(staging):
        (staging / "model.safetensors").write_bytes(b"x" * (1 << 20))  # the first GB of a dequantized model
        print("filling", flush=True)
        time.sleep(600)

    with atomic_target(root / "m.gguf") as tmp:  # an assembled GGUF half written
        tmp.write_bytes(b"GGUF half")
        write_checkpoint(root / "0123456789abcdef-hf", "0" * 64, fill)
''')


def test_killed_dequantization_leaves_temps_the_next_write_removes(tmp_path):
    from refusal.artifacts import DEAD_WRITER_GRACE_S
    from refusal.models.gguf_package import verify_checkpoint, write_checkpoint

    root = tmp_path / "models"
    root.mkdir()
    script = tmp_path / "writer.py"
    script.write_text(KILLED_WRITER)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, str(script), str(root)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "filling"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    final = root / "0123456789abcdef-hf"
    left = sorted(p.name for p in root.iterdir())
    assert len(left) == 2 and all(n.startswith(".") and n.endswith(".tmp") and f".{proc.pid}@" in n for n in left)
    assert verify_checkpoint(final, "0" * 64) is not None  # nothing half-built is trusted

    def fill(staging: Path) -> None:
        (staging / "model.safetensors").write_bytes(b"weights")

    write_checkpoint(final, "0" * 64, fill)  # just killed: kept a while (a writer in another pid namespace?)
    assert sorted(p.name for p in root.iterdir() if p.name.endswith(".tmp")) == left
    when = time.time() - DEAD_WRITER_GRACE_S - 60
    for path in [*root.rglob("*.tmp"), *root.rglob("*.tmp/*")]:
        os.utime(path, (when, when))
    write_checkpoint(final, "0" * 64, fill)  # the next write into the folder removes them
    assert not [p for p in root.iterdir() if p.name.endswith(".tmp")]
    assert verify_checkpoint(final, "0" * 64) is None


def test_multirun_with_a_failing_job_finishes_the_others_and_reports(tmp_path):
    sweep = tmp_path / "sweep"
    # k=999 is meaningless to `none` (ignored) but impossible for inlp_flip (ConfigError before fitting).
    proc = subprocess.run(
        [sys.executable, str(REPO / "evaluate.py"), "-m", "model=tiny", "intervention=none,inlp_flip",
         "++intervention.k=999", *SMALL, "logger=none", "progress=false", f"cache_dir={tmp_path / 'cache'}",
         f"artifacts_dir={tmp_path / 'art'}", f"hydra.sweep.dir={sweep}"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    good = json.loads((sweep / "0_tiny_none" / "results.json").read_text())
    bad = json.loads((sweep / "1_tiny_inlp_flip" / "results.json").read_text())
    assert good["status"] == "ok" and "harmful/refusal_rate" in good["metrics"]
    assert bad["status"] == "failed" and bad["error"].startswith("ConfigError: intervention.k=999 exceeds")
    report = (sweep / "report.md").read_text()
    assert "1 runs succeeded, 1 failed." in report and "## Failed runs" in report
    assert "`1_tiny_inlp_flip`: ConfigError: intervention.k=999" in report
    assert "FAILED 1_tiny_inlp_flip: ConfigError" in proc.stderr


# -- reproducible ---------------------------------------------------------------------------------
def test_same_config_and_seed_give_identical_metrics_and_artifacts(compose, tmp_path):
    from refusal.evaluation import run_evaluation

    overrides = [*SMALL, "intervention=inlp_flip", "layer=fixed", "layer.index=1", "fit.inlp.n_iterations=3", "fit.inlp.positions=selected"]
    runs = []
    for name in ("a", "b"):
        cfg = compose(*overrides, f"cache_dir={tmp_path / name / 'cache'}", f"artifacts_dir={tmp_path / name / 'art'}")
        run_evaluation(cfg, tmp_path / name / "run")
        runs.append(json.loads((tmp_path / name / "run" / "results.json").read_text()))
    a, b = runs
    assert a["metrics"] == b["metrics"]  # exact, not approximate
    assert {k: v for k, v in a.items() if k != "timings"} == {k: v for k, v in b.items() if k != "timings"}
    tensors_a = sorted((tmp_path / "a" / "art").rglob("*.safetensors"))
    names = [p.name for p in tensors_a]
    assert names[0] == "dim_L1_P-1.safetensors" and re.fullmatch(r"inlp_L1_P-1_selected-[0-9a-f]{8}\.safetensors", names[1])
    for path in tensors_a:
        twin = tmp_path / "b" / "art" / path.relative_to(tmp_path / "a" / "art")
        assert path.read_bytes() == twin.read_bytes()  # bit for bit
        ta, tb = load_file(path), load_file(twin)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    for key in ("torch", "transformers", "refusal"):
        assert a["versions"][key] and a["versions"][key] != "not installed"
    assert a["versions"]["torch"] == torch.__version__
    assert re.fullmatch(r"[0-9a-f]{64}", a["weights_hash"]) and re.fullmatch(r"[0-9a-f]{64}", a["data"]["digest"])
    assert a["seed"] == 0


# -- security -------------------------------------------------------------------------------------
def _python_files() -> list[Path]:
    return sorted((REPO / "src").rglob("*.py")) + sorted((REPO / "plugins").glob("*.py"))


def test_no_pickle_and_no_unsafe_torch_load_in_source():
    """Pickle runs code on load: tensors travel as safetensors, and any torch.load must be weights_only."""
    offenders = []
    for path in _python_files():
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text, filename=str(path))
        load_names = {"torch.load"} | ({"load"} if re.search(r"from torch import [^\n]*\bload\b", text) else set())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                bad = [a.name for a in node.names if a.name.split(".")[0] in ("pickle", "dill", "cloudpickle")]
            elif isinstance(node, ast.ImportFrom):
                bad = [node.module] if (node.module or "").split(".")[0] in ("pickle", "dill", "cloudpickle") else []
            else:
                bad = []
            if bad:
                offenders.append(f"{path}:{node.lineno} imports {bad}")
            if isinstance(node, ast.Call) and ast.unparse(node.func) in load_names:
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                if not safe:
                    offenders.append(f"{path}:{node.lineno} calls torch.load without weights_only=True")
    assert not offenders, offenders
    assert _python_files() and not any("pickle.load" in p.read_text() for p in _python_files())


def _save_tiny_checkpoint(bundle, folder: Path) -> Path:
    bundle.model.save_pretrained(folder)
    bundle.tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(("setting", "expected"), [(None, False), (False, False), ("false", False), (True, True)])
def test_trust_remote_code_only_when_the_config_says_true(tiny_bundle, tmp_path, monkeypatch, setting, expected):
    import transformers

    from refusal.models.loader import load_model

    folder = _save_tiny_checkpoint(tiny_bundle, tmp_path / "ckpt")
    seen: list[bool] = []
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        real = auto.from_pretrained.__func__

        def spy(cls, *args, _real=real, **kwargs):
            seen.append(kwargs.get("trust_remote_code", "missing"))
            return _real(cls, *args, **kwargs)

        monkeypatch.setattr(auto, "from_pretrained", classmethod(spy))
    cfg = {"name": "local", "source": "local", "path": str(folder), "device": "cpu"}
    if setting is not None:
        cfg["trust_remote_code"] = setting
    load_model(cfg, tmp_path / "cache")
    assert seen == [expected, expected]  # tokenizer and model, always passed explicitly


def test_string_trust_remote_code_is_a_config_error(compose):
    from refusal.config import check_config
    from refusal.errors import ConfigError

    for value in ("yes", "on", "true", "1"):  # OmegaConf would read yes/on as true: this key is checked strictly
        with pytest.raises(ConfigError, match=f"model.trust_remote_code='{value}' must be true or false"):
            check_config(compose(f"model.trust_remote_code='{value}'"))
    check_config(compose("model.trust_remote_code=false"))
    for model in sorted((REPO / "conf" / "model").glob("*.yaml")):  # every shipped model config: false
        assert yaml.safe_load(model.read_text()).get("trust_remote_code") is False, model.name


@pytest.mark.parametrize("name", ["../../escape", "a/b", "..", "/abs", "x\\y", ""])
def test_model_names_that_could_escape_the_roots_are_rejected(compose, name):
    from refusal.config import check_config
    from refusal.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model.name=.* \(no path separators or '\.\.'\)"):
        check_config(compose(f"model.name='{name}'"))


def test_gguf_filename_that_could_escape_the_cache_is_rejected(compose):
    from refusal.config import check_config
    from refusal.errors import ConfigError

    with pytest.raises(ConfigError, match="model.gguf.filename="):
        check_config(compose("model=qwen05", "model.gguf.filename=../../evil.gguf"))


def test_runs_write_only_under_their_roots(compose, tiny_bundle, tmp_path):
    """A local checkpoint folder and the data files are read, never written (the weights-hash memo lives in cache_dir)."""
    from refusal.evaluation import run_evaluation

    folder = _save_tiny_checkpoint(tiny_bundle, tmp_path / "ckpt")
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    roots = [tmp_path / "cache", tmp_path / "art", tmp_path / "run"]
    cfg = compose(*SMALL, "model=local", f"model.path={folder}", "model.device=cpu",
                  f"cache_dir={roots[0]}", f"artifacts_dir={roots[1]}")
    outside_before = {p for p in tmp_path.rglob("*")}
    run_evaluation(cfg, roots[2])
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == before
    new = {p for p in tmp_path.rglob("*")} - outside_before
    assert new and all(any(root == p or root in p.parents for root in roots) for p in new), sorted(new)


def test_hydra_target_only_in_the_callback_and_only_refusal_classes():
    found = []

    def walk(node, path: str, source: Path) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                here = f"{path}.{key}" if path else str(key)
                if key == "_target_":
                    found.append((source.relative_to(REPO).as_posix(), here, value))
                walk(value, here, source)
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]", source)

    for path in sorted((REPO / "conf").rglob("*.yaml")):
        walk(yaml.safe_load(path.read_text()) or {}, "", path)
    assert found, "expected at least the sweep report callback"
    for source, where, target in found:
        assert source == "conf/config.yaml" and where.startswith("hydra.callbacks."), (source, where)
        assert isinstance(target, str) and target.startswith("refusal."), (source, where, target)


def test_atomic_writes_get_the_users_usual_mode_not_mkstemps_private_one(tmp_path):
    """Results and artifacts are readable by collaborators like any file the user writes (0666 minus umask)."""
    import os
    import stat

    from refusal.artifacts import atomic_write_json, save_artifact

    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "results.json", {"ok": 1})
        save_artifact(tmp_path / "art", {"x": torch.zeros(2)}, {"k": 1})
    finally:
        os.umask(old)
    for name in ("results.json", "art.json", "art.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644
    assert not list(tmp_path.glob(".*.tmp"))
