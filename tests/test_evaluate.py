import json
import time
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

from oral.cli import main
from oral.evaluate import IGNORE_INDEX, Evaluator, ScoreCache, encode_example
from oral.models import load_base, load_tokenizer
from oral.tasks import SplitSizes, Task, get_task


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny-llama")


@pytest.fixture(scope="module")
def base():
    """A tiny-llama of its own (the evaluator injects LoRA layers into it)."""
    model, tok = load_base("tiny-llama")
    return model, tok


def _task(records, labels=("negative", "positive"), kind="classification", **kw) -> Task:
    return Task("hand-made", kind, "Review: {text}\nSentiment:", lambda: list(records), descriptions=["d"],
                heldout_descriptions=[], labels=list(labels) if kind == "classification" else None,
                sizes=SplitSizes(test=len(records), validation=0, train=0), **kw)


class KeywordModel(torch.nn.Module):
    """Predicts `yes_id` as the next token when a prompt contains `key_id`, else `no_id`."""

    def __init__(self, key_id: int, yes_id: int, no_id: int, vocab: int = 49152):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.key_id, self.yes_id, self.no_id, self.vocab = key_id, yes_id, no_id, vocab

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None, logits_to_keep=0):
        B, T = input_ids.shape
        logits = torch.zeros(B, T, self.vocab)
        has_key = ((input_ids == self.key_id) & (attention_mask == 1)).any(-1)  # (B,)
        logits[has_key, :, self.yes_id] = 5.0
        logits[~has_key, :, self.no_id] = 5.0
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)

    answer_ids: list[int] = []

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        # Always answers with the tokens of `answer_ids`.
        new = torch.tensor(self.answer_ids).expand(input_ids.shape[0], len(self.answer_ids))
        return torch.cat([input_ids, new], dim=1)


# -----------------------------------------------------------------------------
# metrics on hand-made cases


@pytest.mark.parametrize("batch_size", [1, 3])
def test_accuracy_on_hand_made_examples(tok, batch_size):
    key = tok(" great", add_special_tokens=False).input_ids[0]
    pos, neg = (tok(" " + w, add_special_tokens=False).input_ids[0] for w in ("positive", "negative"))
    records = [
        {"text": "a great film", "label": 1},  # right
        {"text": "great acting, long too", "label": 1},  # right
        {"text": "not so great really", "label": 0},  # wrong: the keyword fools the model
        {"text": "dull and slow and boring and far far too long for anyone", "label": 0},  # right
    ]
    ev = Evaluator(KeywordModel(key, pos, neg), tok, batch_size=batch_size, progress=False)
    r = ev.evaluate(_task(records))
    assert r == {"metric": "accuracy", "value": 0.75, "n": 4}
    first_two = _task(records).split("test")[:2]
    assert ev.evaluate(_task(records), limit=2) == {
        "metric": "accuracy", "value": sum(ex.label == int("great" in ex.meta["text"]) for ex in first_two) / 2, "n": 2}


def test_generation_score_on_hand_made_examples(tok):
    records = [{"text": "3 + 4", "answer": "7"}, {"text": "2 + 5", "answer": "7"}, {"text": "1 + 1", "answer": "2"}]
    stub = KeywordModel(0, 1, 2)
    stub.answer_ids = tok(" 7\nand more", add_special_tokens=False).input_ids
    ev = Evaluator(stub, tok, batch_size=2, progress=False)
    task = _task(records, kind="generation")
    assert ev.generate(task, task.split("test")) == ["7", "7", "7"]
    r = ev.evaluate(task)
    assert r["metric"] == "exact_match" and r["value"] == pytest.approx(2 / 3) and r["n"] == 3


# -----------------------------------------------------------------------------
# the real forward path (tiny-llama)


def test_fast_and_general_label_scoring_agree(base):
    model, tok = base
    ev = Evaluator(model, tok, batch_size=5, progress=False)
    task = get_task("trec-question")
    examples = task.split("test")[:12]
    fast = ev.classify(task, examples)
    ev._single_token_ids = lambda words: None  # force the full-continuation path
    general = ev.classify(task, examples)
    assert fast == general


def test_predictions_do_not_depend_on_batch_size(base):
    model, tok = base
    task = get_task("text-domain")
    examples = task.split("test")[:10]
    a = Evaluator(model, tok, batch_size=1, progress=False).classify(task, examples)
    b = Evaluator(model, tok, batch_size=4, progress=False).classify(task, examples)
    assert a == b


def test_greedy_generation_does_not_depend_on_batch_size(base):
    model, tok = base
    task = get_task("basic-arithmetic")
    examples = task.split("test")[:5]
    a = Evaluator(model, tok, batch_size=1, progress=False).generate(task, examples, max_new_tokens=4)
    b = Evaluator(model, tok, batch_size=5, progress=False).generate(task, examples, max_new_tokens=4)
    assert a == b and all(isinstance(x, str) for x in a)


def _manual_loss(model, tok, examples) -> float:
    total, n = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            ids, labels = encode_example(tok, ex)
            logits = model(torch.tensor([ids])).logits[0]  # (T, V)
            lp = logits[:-1].log_softmax(-1)  # predicts tokens 1..T-1
            tgt = torch.tensor(labels[1:])
            keep = tgt != IGNORE_INDEX
            total -= lp[keep].gather(-1, tgt[keep][:, None]).sum().item()
            n += int(keep.sum())
    return total / n


def test_task_loss_matches_unbatched_reference(base):
    model, tok = base
    task = get_task("basic-arithmetic")  # multi-token targets
    examples = task.split("validation")[:6]
    ev = Evaluator(model, tok, batch_size=4, progress=False)
    assert ev.task_loss(task, "validation", limit=6) == pytest.approx(_manual_loss(model, tok, examples), rel=1e-4)


def test_encode_example_masks_the_prompt(tok):
    ex = get_task("movie-sentiment").split("train")[0]
    ids, labels = encode_example(tok, ex)
    n_target = len(tok(ex.target, add_special_tokens=False).input_ids)
    assert len(ids) == len(labels)
    assert labels[-n_target:] == ids[-n_target:]
    assert all(x == IGNORE_INDEX for x in labels[:-n_target])
    assert tok.decode(ids[-n_target:]) == ex.target


# -----------------------------------------------------------------------------
# adapters swapped in place


def _random_lora(r: int, seed: int):
    torch.manual_seed(seed)
    model, _ = load_base("tiny-llama")
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.5)
    return peft_model, config


def test_set_adapter_swaps_in_place_and_matches_peft(base, tmp_path):
    model, tok = base
    task = get_task("movie-sentiment")
    ev = Evaluator(model, tok, batch_size=8, progress=False)
    plain = ev.task_loss(task, limit=8)

    peft_a, config_a = _random_lora(4, seed=1)
    ref_a = Evaluator(peft_a, tok, batch_size=8, progress=False).task_loss(task, limit=8)
    peft_a.save_pretrained(tmp_path / "a")
    ev.set_adapter(tmp_path / "a")
    loss_a = ev.task_loss(task, limit=8)
    assert loss_a == pytest.approx(ref_a, rel=1e-5)
    assert abs(loss_a - plain) > 1e-3

    ev.set_adapter(None)
    assert ev.task_loss(task, limit=8) == plain

    peft_b, config_b = _random_lora(2, seed=2)  # another rank: the layers are rebuilt
    ev.set_adapter(get_peft_model_state_dict(peft_b), spec=config_b)
    ref_b = Evaluator(peft_b, tok, batch_size=8, progress=False).task_loss(task, limit=8)
    assert ev.task_loss(task, limit=8) == pytest.approx(ref_b, rel=1e-5)

    ev.set_adapter(get_peft_model_state_dict(peft_b))  # same shapes: no spec needed
    assert ev.task_loss(task, limit=8) == pytest.approx(ref_b, rel=1e-5)
    ev.set_adapter(None)
    assert ev.task_loss(task, limit=8) == plain


def test_set_adapter_rejects_bad_input(tok):
    model, _ = load_base("tiny-llama")
    ev = Evaluator(model, tok, progress=False)
    peft_a, config_a = _random_lora(4, seed=1)
    state = get_peft_model_state_dict(peft_a)
    with pytest.raises(ValueError, match="spec"):
        ev.set_adapter(state)  # the first state dict needs its spec
    ev.set_adapter(state, spec=config_a)
    with pytest.raises(ValueError, match="does not fit"):
        ev.set_adapter({k.replace("q_proj", "k_proj"): v for k, v in state.items()})
    with pytest.raises(TypeError):
        ev.set_adapter(42)


# -----------------------------------------------------------------------------
# CLI


def test_cli_eval_json_is_deterministic(capsys):
    args = ["eval", "--base", "tiny-llama", "--task", "sms-spam,basic-arithmetic", "--limit", "6", "--json"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    second = json.loads(capsys.readouterr().out)
    assert first == second
    assert first["base"] == "tiny-llama" and first["adapter"] is None
    assert first["results"]["sms-spam"]["metric"] == "accuracy" and first["results"]["sms-spam"]["n"] == 6
    assert 0.0 <= first["results"]["basic-arithmetic"]["value"] <= 1.0


@pytest.mark.slow
def test_smollm2_movie_sentiment_200_under_a_minute():
    model, tok = load_base("smollm2-135m")
    ev = Evaluator(model, tok, batch_size=16, progress=False)
    t0 = time.perf_counter()
    r = ev.evaluate("movie-sentiment", limit=200)
    assert time.perf_counter() - t0 < 60
    assert r["n"] == 200 and 0.55 <= r["value"] <= 0.9  # well above a coin flip, below a tuned adapter
    assert ev.evaluate("movie-sentiment", limit=200) == r


def test_score_cache_measures_once_and_merges_what_another_process_wrote(tmp_path):
    path = tmp_path / "scores.json"
    a, b = ScoreCache(path), ScoreCache(path)  # two processes sharing the file
    calls = []
    assert a.get({"task": "x"}, lambda: calls.append("x") or {"value": 1.0}) == {"value": 1.0}
    assert b.get({"task": "y"}, lambda: calls.append("y") or {"value": 2.0}) == {"value": 2.0}
    assert a.get({"task": "x"}, lambda: calls.append("again") or {}) == {"value": 1.0}
    assert calls == ["x", "y"]
    on_disk = json.loads(path.read_text())
    assert sorted(json.loads(k)["task"] for k in on_disk) == ["x", "y"]  # b kept a's score
    assert {"task": "y"} in ScoreCache(path)
