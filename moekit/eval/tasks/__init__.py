"""The benchmarks moekit runs through lm-evaluation-harness, and their offline (local-file) variants.

Every task is the harness's own definition (prompt, choices, metrics). The YAML files in this folder only
re-point a task's data at a local JSON-lines file whose records carry the Hugging Face dataset's fields:
each ``<task>_local.yaml`` is a harness group that references the registered harness task(s) and overrides
``custom_dataset`` (``local_data.load``) and the splits, nothing else. The harness CLI can read them too::

    lm_eval --include_path moekit/tasks --tasks arc_easy_local \
            --metadata '{"moekit_data_dir": "../shared/data/dev"}' ...

``generate.py`` writes the YAML files from :data:`TASKS` (the per-subject MMLU/KMMLU lists come from the
installed harness).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class TaskSpec:
    """One benchmark: its harness name, where its local copy lives and how its summary is taken."""

    name: str  # the harness task or group name (hub data)
    file: str  # default local file name inside a data directory
    split: str  # the split the harness scores (test or validation)
    required: tuple[str, ...]  # record fields the harness prompt reads
    summary: str = "acc"  # acc_norm for hellaswag, click, ARC and OpenBookQA (length-normalised, as the harness
    # leaderboards report them; OpenBookQA's unnormalised acc sits below chance for small models), acc otherwise
    leaves: tuple[str, ...] = ()  # harness tasks referenced by the local group (default: the task itself)
    subject_field: str | None = None  # per-subject tasks: record field filtered by the subject
    group: bool = False  # the harness name is a group (its metric is the group's aggregate)
    harness_dir: str = ""  # folder under lm_eval/tasks holding its definition (indexing only these is fast)

    @property
    def local_name(self) -> str:
        return f"{self.name}_local"


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("arc_easy", "arc_easy.jsonl", "test", ("question", "choices", "answerKey"),
                 summary="acc_norm", harness_dir="arc"),
        TaskSpec("arc_challenge", "arc_challenge.jsonl", "test", ("question", "choices", "answerKey"),
                 summary="acc_norm", harness_dir="arc"),
        TaskSpec("openbookqa", "openbookqa.jsonl", "test", ("question_stem", "choices", "answerKey"),
                 summary="acc_norm", harness_dir="openbookqa"),
        TaskSpec("social_iqa", "social_iqa.jsonl", "validation",
                 ("context", "question", "answerA", "answerB", "answerC", "label"), harness_dir="siqa"),
        TaskSpec("piqa", "piqa.jsonl", "validation", ("goal", "sol1", "sol2", "label"), harness_dir="piqa"),
        TaskSpec("hellaswag", "hellaswag.jsonl", "validation", ("ctx_a", "ctx_b", "activity_label", "endings", "label"),
                 summary="acc_norm", harness_dir="hellaswag"),
        TaskSpec("winogrande", "winogrande.jsonl", "validation", ("sentence", "option1", "option2", "answer"), harness_dir="winogrande"),
        TaskSpec("mmlu", "mmlu_dev.jsonl", "test", ("question", "subject", "choices", "answer"),
                 subject_field="subject", group=True, harness_dir="mmlu/default"),
        TaskSpec("kmmlu", "kmmlu.jsonl", "test", ("question", "A", "B", "C", "D", "answer", "Category"),
                 subject_field="Category", group=True, harness_dir="kmmlu/default"),
        TaskSpec("click", "click.jsonl", "train", ("id", "paragraph", "question", "choices", "answer"),
                 summary="acc_norm", leaves=("click",), group=True, harness_dir="click"),
    )
}

KNOWN_TASKS = tuple(TASKS)
DEV_TASKS = ("arc_easy", "openbookqa", "social_iqa")  # the offline dev copies in ../shared/data/dev


def summary_metric(task: str) -> str:
    spec = TASKS.get(task)
    return spec.summary if spec else "acc"
