"""What a new user meets first: progress without a terminal, a mistyped base, a missing zoo, warnings,
--help texts."""

import argparse
import copy
import io
import subprocess
import sys
import time
import warnings

import pytest


# -----------------------------------------------------------------------------
# Progress without a terminal


def lines_of(capsys) -> list[str]:
    return capsys.readouterr().err.splitlines()


def test_progress_without_a_terminal_prints_a_line_at_start_every_n_items_and_at_the_end(capsys):
    from oral.progress import LineProgress, progress_bar

    bar = progress_bar(range(5), desc="stage", every=2)  # capsys's stderr is not a terminal
    assert isinstance(bar, LineProgress)
    for _ in bar:
        bar.set_postfix(loss="0.500")
    lines = lines_of(capsys)
    assert lines[0] == "stage: start"
    assert [ln.split(",")[0] for ln in lines[1:]] == ["stage: 2/5 (40%)", "stage: 4/5 (80%)", "stage: done"]
    assert "loss=0.500" in lines[-1] and "5/5 (100%)" in lines[-1]


def test_progress_without_a_terminal_also_prints_by_time_and_says_when_a_stage_stopped_early(capsys):
    from oral.progress import progress_bar

    bar = progress_bar(total=10, initial=4, desc="grid", seconds=0.0)  # resumed: 4 done before
    bar.update(1)
    bar.close()
    lines = lines_of(capsys)
    assert lines[0] == "grid: start, 4/10 done before"
    assert lines[1].startswith("grid: 5/10 (50%)") and "eta" in lines[1]
    assert lines[2].startswith("grid: stopped, 5/10")


def test_progress_on_a_terminal_is_tqdm_and_disabled_progress_prints_nothing(capsys, monkeypatch):
    from tqdm.auto import tqdm

    from oral.progress import progress_bar

    list(progress_bar(range(3), desc="quiet", disable=True))
    assert capsys.readouterr().err == ""
    tty = io.StringIO()
    tty.isatty = lambda: True
    monkeypatch.setattr(sys, "stderr", tty)
    assert isinstance(progress_bar(range(3), desc="bar"), tqdm)


def test_a_training_run_without_a_terminal_prints_plain_progress_lines(tiny, tmp_path, capsys):
    from oral.finetune import train_lora

    model, tok = tiny
    train_lora(copy.deepcopy(model), "movie-sentiment", rank=2, steps=2, keep=1, out_dir=tmp_path / "zoo",
               tokenizer=tok, batch_size=2, eval_limit=4, eval_base=False, warmup_steps=1)
    lines = [ln for ln in lines_of(capsys) if "/movie-sentiment/r2/s0" in ln]
    assert lines[0].endswith(": start")
    assert ": done, 2/2 (100%)" in lines[-1] and "loss=" in lines[-1]


# -----------------------------------------------------------------------------
# A base model name that is neither embedded, a local dir, nor servable by the hub


def test_a_mistyped_base_fails_at_once_offline_and_names_the_embedded_model(monkeypatch):
    from oral.models import ModelError, load_base_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    with pytest.raises(ModelError, match=r"HF_HUB_OFFLINE is set; did you mean 'smollm2-135m'\?"):
        load_base_config("smollm-135m")
    assert time.time() - t0 < 2.0


def test_a_mistyped_base_fails_at_once_when_the_hub_is_unreachable(monkeypatch):
    import huggingface_hub

    from oral import models

    class NoNetwork:
        def head(self, url, timeout):
            raise ConnectionError("name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_session", lambda: NoNetwork())
    models._hub_unreachable.cache_clear()
    try:
        t0 = time.time()
        with pytest.raises(models.ModelError, match=r"unreachable .*did you mean 'tiny-llama'\?"):
            models.load_tokenizer("tiny-lama")
        assert time.time() - t0 < 2.0
    finally:
        models._hub_unreachable.cache_clear()


def test_the_hub_id_of_an_embedded_model_offline_points_to_the_embedded_one(monkeypatch):
    from oral.models import ModelError, resolve

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="the embedded 'smollm2-135m' is that model"):
        resolve("HuggingFaceTB/SmolLM2-135M-Instruct")


# -----------------------------------------------------------------------------
# oral zoo on a dir that is not a zoo


@pytest.mark.parametrize("flag", ["--summary", "--evaluate"])
def test_zoo_summary_of_a_missing_dir_is_an_error_naming_the_dir_and_how_to_build_one(tmp_path, capsys, flag):
    from oral.cli import main

    missing = tmp_path / "no-such-zoo"
    assert main(["zoo", flag, "--out", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"{missing} does not exist" in err and "oral zoo --config configs/zoo-quick.yaml" in err
    assert main(["zoo", flag, "--out", str(tmp_path)]) == 2  # a dir, but no manifest
    assert "has no manifest.jsonl" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# Warnings and help texts


def test_peft_wrapping_hides_only_the_is_gradient_checkpointing_future_warning(tiny):
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings(record=True) as caught:  # without oral's filter, PEFT triggers it
        warnings.simplefilter("always")
        get_peft_model(copy.deepcopy(tiny[0]), LoraConfig(r=2, target_modules=["q_proj"]))
    assert any("is_gradient_checkpointing" in str(w.message) for w in caught)
    # A fresh process (pytest resets warning filters per test): importing oral hides that warning only.
    code = ("import warnings; import oral.lora; from peft import LoraConfig, get_peft_model; "
            "from transformers import LlamaForCausalLM; from oral.models import tiny_llama_config; "
            "get_peft_model(LlamaForCausalLM(tiny_llama_config()), LoraConfig(r=2, target_modules=['q_proj'])); "
            "warnings.warn('another deprecation', FutureWarning)")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert "is_gradient_checkpointing" not in err and "another deprecation" in err


def has_default(action: argparse.Action) -> bool:
    """An option whose default is worth showing (not None, False, [] or argparse's SUPPRESS)."""
    d = action.default
    return bool(action.option_strings) and not (d is None or d is False or d == [] or d is argparse.SUPPRESS)


def test_every_command_help_has_a_description_and_shows_each_option_default():
    from oral.cli import HelpFormatter, build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        assert p.description, f"oral {name} has no description"
        formatter = p.formatter_class(prog=p.prog)
        assert isinstance(formatter, HelpFormatter)
        for action in filter(has_default, p._actions):
            assert action.help, f"oral {name} {action.option_strings[0]} has a default but no help text"
            assert "default" in formatter._get_help_string(action), (name, action.option_strings)
        p.format_help()  # every help string formats
