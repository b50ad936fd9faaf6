"""Task and Example: what a model is asked, what it should answer, and how the answer is scored."""

import copy
import hashlib
import random
from dataclasses import dataclass, field, replace
from typing import Any, Callable

SPLITS = ("train", "validation", "test")
KINDS = ("classification", "generation")


class TaskError(ValueError):
    """A task that cannot be found, built or read."""


@dataclass(frozen=True)
class Example:
    """One templated example: the model sees `prompt` and should continue with `target`."""

    prompt: str  # the full templated text the model sees
    target: str  # the answer text; for classification the label word with its leading space
    label: int | None = None  # index into Task.labels (classification), None for generation
    meta: dict = field(default_factory=dict)  # the raw record (text, answer, source fields)


@dataclass(frozen=True)
class SplitSizes:
    """Sizes of the fixed splits: test and validation first, then train takes the rest up to a cap."""

    test: int = 300
    validation: int = 150
    train: int = 2000  # a cap: train holds the remaining examples, at most this many


# A loader returns raw records: dicts with at least "text" (or any field the template names) and
# "label" (an int index into the task's labels) or "answer" (a string), for generation.
Loader = Callable[[], list[dict]]


def truncate_words(text: str, max_chars: int) -> str:
    """Collapse whitespace and cut `text` at a word boundary to at most `max_chars` characters."""
    text = " ".join(text.split())
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars].rsplit(" ", 1)[0]
    return cut + " ..."


def _norm_key(text: str) -> str:
    """The deduplication key: lower case, whitespace collapsed."""
    return " ".join(text.lower().split())


def _stable_seed(name: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{name}:{seed}".encode()).digest()[:8], "little")


class Task:
    """A named task: a template over raw records, label words or answers, a metric and descriptions.

    Splits are built on first use: records are deduplicated by their normalized text (records whose
    text appears with two different labels are dropped), shuffled with a seed derived from the
    task name, and cut into test / validation / train, so no text lies in two splits.
    """

    def __init__(
        self,
        name: str,
        kind: str,
        template: str,
        loader: Loader,
        descriptions: list[str],
        heldout_descriptions: list[str],
        labels: list[str] | None = None,
        metric: str | None = None,
        sizes: SplitSizes = SplitSizes(),
        seed: int = 0,
        key_field: str = "text",
        max_new_tokens: int = 16,
        scorer: Callable[[str, Example], float] | None = None,
        presplit: bool = False,
        source: str = "",
    ):
        if kind not in KINDS:
            raise TaskError(f"task {name!r}: kind must be one of {KINDS}, got {kind!r}")
        if kind == "classification" and (not labels or len(labels) < 2):
            raise TaskError(f"task {name!r}: a classification task needs at least two label words")
        if kind == "classification" and len(set(labels)) != len(labels):
            raise TaskError(f"task {name!r}: label words must be distinct, got {labels}")
        if not descriptions:
            raise TaskError(f"task {name!r}: give at least one description")
        self.name = name
        self.kind = kind
        self.template = template
        self.labels: list[str] = list(labels or [])
        self.descriptions: list[str] = list(descriptions)
        self.heldout_descriptions: list[str] = list(heldout_descriptions)
        self.metric = metric or ("accuracy" if kind == "classification" else "exact_match")
        self.sizes = sizes
        self.seed = seed
        self.key_field = key_field
        self.max_new_tokens = max_new_tokens
        self.source = source
        self._loader = loader
        self._scorer = scorer
        self._presplit = presplit  # the loader gives records with a "split" field already
        self._splits: dict[str, list[Example]] | None = None

    def __repr__(self) -> str:
        return f"Task({self.name!r}, kind={self.kind!r}, metric={self.metric!r})"

    # -------------------------------------------------------------------------
    # Examples

    def make_example(self, record: dict) -> Example:
        """Template one raw record into an Example."""
        try:
            prompt = self.template.format_map(record)
        except KeyError as e:
            raise TaskError(
                f"task {self.name!r}: the template names field {e.args[0]!r} but a record has only "
                f"{sorted(record)}; fix the template or the data"
            ) from None
        if self.kind == "classification":
            label = int(record["label"])
            return Example(prompt, " " + self.labels[label], label, dict(record))
        return Example(prompt, " " + str(record["answer"]).strip(), None, dict(record))

    def _build(self) -> dict[str, list[Example]]:
        records = self._loader()
        if not records:
            raise TaskError(f"task {self.name!r}: the data source gave no records")
        # 1. deduplicate; a text seen with two different answers is ambiguous: drop it everywhere.
        by_key: dict[str, dict] = {}
        conflicted: set[str] = set()
        for i, r in enumerate(records):
            if self.key_field not in r:
                raise TaskError(
                    f"task {self.name!r}: record {i} has no field {self.key_field!r} (fields: {sorted(r)}); "
                    "fix the data or the template"
                )
            k = _norm_key(str(r[self.key_field]))
            if not k:
                continue
            answer = r.get("label", r.get("answer"))
            if k in by_key and by_key[k].get("label", by_key[k].get("answer")) != answer:
                conflicted.add(k)
            by_key.setdefault(k, r)
        keys = sorted(k for k in by_key if k not in conflicted)
        if self._presplit:
            out = {s: [self.make_example(by_key[k]) for k in keys if by_key[k]["split"] == s] for s in SPLITS}
            rng = random.Random(_stable_seed(self.name, self.seed))
            for s in SPLITS:
                rng.shuffle(out[s])
            out["train"] = out["train"][: self.sizes.train]
            return out
        # 2. a fixed shuffle, then test, validation, train in that order.
        random.Random(_stable_seed(self.name, self.seed)).shuffle(keys)
        n_test, n_val = self.sizes.test, self.sizes.validation
        if len(keys) - n_test - n_val < min(self.sizes.train, len(keys) // 2):
            # Too little data for these sizes to leave half for training: 20% test, 10% validation.
            n_test = max(1, len(keys) // 5)
            n_val = max(1, len(keys) // 10) if len(keys) >= 3 else 0
        parts = {
            "test": keys[:n_test],
            "validation": keys[n_test : n_test + n_val],
            "train": keys[n_test + n_val : n_test + n_val + self.sizes.train],
        }
        return {s: [self.make_example(by_key[k]) for k in ks] for s, ks in parts.items()}

    def split(self, name: str) -> list[Example]:
        """The fixed examples of split `name` ("train", "validation" or "test")."""
        if name not in SPLITS:
            raise TaskError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")
        if self._splits is None:
            self._splits = self._build()
        return self._splits[name]

    def prefixed(self, text: str) -> "Task":
        """The same task with `text` and a newline before every prompt: the description-in-the-prompt
        baseline (same examples, labels and metric; the name says what was added)."""
        out = copy.copy(self)
        out.name = f"{self.name}+instruction"
        out._splits = {s: [replace(e, prompt=f"{text}\n{e.prompt}") for e in self.split(s)] for s in SPLITS}
        return out

    def split_sizes(self) -> dict[str, int]:
        return {s: len(self.split(s)) for s in SPLITS}

    # -------------------------------------------------------------------------
    # Scoring generations

    def score(self, prediction: str, example: Example) -> float:
        """Score a generated answer (the text after the prompt): 1.0 right, 0.0 wrong."""
        answer = prediction.strip().split("\n", 1)[0].strip()
        if self._scorer is not None:
            return float(self._scorer(answer, example))
        return float(answer == example.target.strip())

    def info(self) -> dict[str, Any]:
        """A summary for listings: name, kind, metric, labels, split sizes, one description."""
        return {
            "name": self.name,
            "kind": self.kind,
            "metric": self.metric,
            "labels": self.labels,
            "splits": self.split_sizes(),
            "description": self.descriptions[0],
            "descriptions": self.descriptions,
            "heldout_descriptions": self.heldout_descriptions,
            "template": self.template,
            "source": self.source,
        }
