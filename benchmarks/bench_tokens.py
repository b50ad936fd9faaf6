"""Time and peak memory of the weight tokenizer on a 7B-class adapter (from a config alone).

    python benchmarks/bench_tokens.py                       # Mistral-7B, r=16, all 7 projections
    python benchmarks/bench_tokens.py --rank 4 --token-size 256

Memory is the process's peak resident set (VmHWM, reset before each step through
/proc/self/clear_refs) above what it held before the step, in units of one fp32 copy of the
adapter. torch's CPU allocations are invisible to tracemalloc, hence RSS.
"""

import argparse
import gc
import time
from pathlib import Path

import torch
from transformers import MistralConfig

from oral.lora import LoraSpec
from oral.tokens import WeightTokenizer

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> int:
    """Reset the peak RSS to the current RSS; return the current RSS in bytes."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kb("VmRSS") * 1024


def peak_above(baseline: int) -> int:
    return _status_kb("VmHWM") * 1024 - baseline


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--token-size", type=int, default=128)
    args = p.parse_args()
    torch.set_num_threads(1)

    t0 = time.perf_counter()
    config = MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=8)
    spec = LoraSpec.from_base_config(config, SEVEN, rank=args.rank, alpha=2 * args.rank)
    t_spec = time.perf_counter() - t0
    tok = WeightTokenizer(spec, args.token_size)
    tok.positions, tok.mask  # built once per tokenizer, shared by every encode
    copy_bytes = spec.num_params * 4
    print(f"spec      Mistral-7B r={args.rank}, {spec.summary()} ({t_spec:.2f} s from the config)")
    print(f"tokens    {tok.num_tokens:,} x {args.token_size} ({tok.num_tokens * args.token_size / spec.num_params - 1:.2%} padding); "
          f"one fp32 copy = {copy_bytes / 2**20:.0f} MiB; shared mask + positions = "
          f"{(tok.mask.numel() + tok.positions.numel() * 8) / 2**20:.0f} MiB")

    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=g) * 0.01 for k, shape in spec.shapes().items()}

    base = reset_peak()
    t0 = time.perf_counter()
    batch = tok.encode(state)
    t_enc = time.perf_counter() - t0
    enc_peak = peak_above(base)

    del state
    base = reset_peak()
    t0 = time.perf_counter()
    back = tok.decode(batch.tokens)
    t_dec = time.perf_counter() - t0
    dec_peak = peak_above(base)

    # The input (state or tokens) is one copy already held; the step adds its output.
    print(f"encode    {t_enc:.2f} s, peak +{enc_peak / 2**20:.0f} MiB = {enc_peak / copy_bytes:.2f} copies "
          f"above the input state ({1 + enc_peak / copy_bytes:.2f} copies held in all)")
    print(f"decode    {t_dec:.2f} s, peak +{dec_peak / 2**20:.0f} MiB = {dec_peak / copy_bytes:.2f} copies "
          f"above the tokens ({1 + dec_peak / copy_bytes:.2f} copies held in all)")
    g = torch.Generator().manual_seed(0)
    exact = all(torch.equal(back[k], torch.randn(shape, generator=g) * 0.01) for k, shape in spec.shapes().items())
    print(f"exact     {exact}")


if __name__ == "__main__":
    main()
