"""Export tasks as lm-evaluation-harness task YAMLs over local JSONL files.

The harness can then cross-check our numbers:

    lm_eval --model hf --model_args pretrained=DIR,peft=ADAPTER --include_path OUT --tasks oral_movie_sentiment

Each task gets `OUT/<task>/{train,validation,test}.jsonl` (fields `prompt`, `target`, `label`,
`choices` / `answer`) and `OUT/<task>/oral_<task>.yaml`. Our prompts end right before the answer;
the harness joins context and continuation with a single space (`target_delimiter`), the space
our targets start with, so both see the same text.
"""

import json
from pathlib import Path

import yaml

from oral.io import atomic_write_text
from oral.tasks.base import SPLITS, Task


def lm_eval_name(task: Task) -> str:
    return "oral_" + task.name.replace("-", "_")


def task_yaml(task: Task, data_dir: Path) -> dict:
    """The harness task config for `task`, whose split files are in `data_dir` (absolute paths)."""
    files = {s: str((data_dir / f"{s}.jsonl").resolve()) for s in SPLITS}
    cfg: dict = {
        "task": lm_eval_name(task),
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": files},
        "training_split": "train",
        "validation_split": "validation",
        "test_split": "test",
        "doc_to_text": "{{prompt}}",
        "target_delimiter": " ",
        "metadata": {"version": 1.0, "description": task.descriptions[0]},
    }
    if task.kind == "classification":
        cfg.update({
            "output_type": "multiple_choice",
            "doc_to_target": "label",  # a column name: the index into doc_to_choice
            "doc_to_choice": list(task.labels),
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        })
    else:
        cfg.update({
            "output_type": "generate_until",
            "doc_to_target": "answer",
            "generation_kwargs": {"until": ["\n"], "do_sample": False, "max_gen_toks": task.max_new_tokens},
            "filter_list": [{"name": "strip", "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}]}],
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                             "ignore_case": False, "ignore_punctuation": False}],
        })
    return cfg


def export_lm_eval(tasks: list[Task], out_dir: str | Path) -> list[Path]:
    """Write the data files and YAML of each task under `out_dir`; returns the YAML paths."""
    out_dir = Path(out_dir).expanduser()
    written = []
    for task in tasks:
        d = out_dir / task.name
        for s in SPLITS:
            rows = []
            for ex in task.split(s):
                row = {"prompt": ex.prompt, "target": ex.target.strip()}
                if task.kind == "classification":
                    row.update({"label": ex.label, "choices": list(task.labels)})
                else:
                    row["answer"] = ex.target.strip()
                rows.append(json.dumps(row, ensure_ascii=False))
            atomic_write_text(d / f"{s}.jsonl", "\n".join(rows) + ("\n" if rows else ""))
        path = d / f"{lm_eval_name(task)}.yaml"
        text = f"# lm-evaluation-harness task exported by `oral tasks --export-lm-eval` ({task.name})\n"
        text += yaml.safe_dump(task_yaml(task, d), sort_keys=False, allow_unicode=True)
        atomic_write_text(path, text)
        written.append(path)
    return written
