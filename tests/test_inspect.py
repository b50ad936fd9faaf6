"""`oral inspect`: spec, sizes, tokens, norms and validity of an adapter dir; non-zero exit when invalid."""

import argparse
import json
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig

from oral.cli import inspect as inspect_cli
from oral.models import load_base


def oral_inspect(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="oral")
    inspect_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["inspect", *argv])
    return args.func(args)


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory):
    """tiny-llama + plain PEFT (r=4 on q_proj, v_proj), B drawn at random so it is not zero."""
    model, _ = load_base("tiny-llama")
    torch.manual_seed(0)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("inspect") / "adapter"
    pm.save_pretrained(str(path))
    return path


def test_inspect_json_reports_spec_sizes_tokens_and_norms(peft_adapter, capsys):
    assert oral_inspect(str(peft_adapter), "--base", "tiny-llama", "--token-size", "16", "--json") == 0
    info = json.loads(capsys.readouterr().out)
    # tiny-llama: 2 layers, hidden 64, 2 kv heads of 16 -> q (64->64), v (64->32).
    assert info["valid"] and info["problems"] == []
    assert info["num_modules"] == 4 and info["num_layers"] == 2
    assert info["num_params"] == 2 * (4 * (64 + 64) + 4 * (64 + 32))
    assert info["num_tokens"] == 2 * (256 // 16 + 256 // 16 + 256 // 16 + 128 // 16)
    state = load_file(str(peft_adapter / "adapter_model.safetensors"))
    v1 = next(m for m in info["modules"] if m["name"] == "model.layers.1.self_attn.v_proj")
    assert (v1["in"], v1["out"], v1["rank"]) == (64, 32, 4)
    B = state["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    A = state["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"]
    assert math.isclose(v1["norms"]["norm_B"], B.norm().item(), rel_tol=1e-5)
    assert math.isclose(v1["norms"]["norm_delta"], (2.0 * B @ A).norm().item(), rel_tol=1e-4)


def test_inspect_text_output_names_the_layout(peft_adapter, capsys):
    assert oral_inspect(str(peft_adapter)) == 0
    out = capsys.readouterr().out
    assert "2 layers x 2 modules" in out and "valid     yes" in out


def _corrupt_copy(src, dst, edit):
    dst.mkdir()
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    state = load_file(str(src / "adapter_model.safetensors"))
    edit(state)
    save_file(state, str(dst / "adapter_model.safetensors"))
    return dst


K = "base_model.model.model.layers.0.self_attn.q_proj.lora_"


@pytest.mark.parametrize("edit,base,message", [
    (lambda s: s[K + "A.weight"].__setitem__((0, 0), float("nan")), None, "non-finite"),
    (lambda s: s.__setitem__(K + "A.weight", torch.randn(3, 64)), None, "shape (3, 64)"),
    (lambda s: s.__setitem__(K + "A.weight", torch.randn(4, 65)), "tiny-llama", "(in=64, out=64) but the adapter has (in=65"),
    (lambda s: s.pop(K + "B.weight"), None, "missing key"),
    (lambda s: s.__setitem__("base_model.model.lm_head.weight", torch.randn(2, 2)), None, "stray key"),
    (lambda s: s[K + "B.weight"].zero_(), None, "all zero"),
], ids=["nan", "rank", "in-features", "missing", "stray", "zero-B"])
def test_inspect_fails_with_a_clear_message_on_an_invalid_adapter(peft_adapter, tmp_path, capsys, edit, base, message):
    bad = _corrupt_copy(peft_adapter, tmp_path / "bad", edit)
    assert oral_inspect(str(bad), "--json", *(["--base", base] if base else [])) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["valid"] is False
    assert message in captured.err


def test_inspect_fails_against_the_wrong_base(peft_adapter, tmp_path, capsys):
    other = tmp_path / "wide-llama"
    LlamaConfig(hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=100).save_pretrained(other)
    assert oral_inspect(str(peft_adapter), "--base", str(other)) == 1
    assert "wrong base model" in capsys.readouterr().err


def test_verbose_flag_shows_the_traceback_of_an_error_and_plain_mode_one_line(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "not-an-adapter"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{ this is not json")

    def run(*flags):
        return subprocess.run([sys.executable, "-m", "oral.cli", *flags, "inspect", str(bad)],
                              capture_output=True, text=True, timeout=120)

    plain, verbose = run(), run("-v")
    assert plain.returncode == verbose.returncode == 2
    assert "Traceback" not in plain.stderr and len(plain.stderr.strip().splitlines()) == 1
    assert "Traceback" in verbose.stderr and "adapter_config.json" in verbose.stderr.splitlines()[-1]
