"""Generator timing: one training step and one adapter's sampling, per preset and LoRA layout.

    python benchmarks/bench_generator.py [--device cpu|cuda] [--presets tiny,small] [--layouts tiny-llama,smollm2-135m,mistral-7b]

Layouts are built from model configs alone (no weights), so 7B-class shapes run without the 7B
weights. Conditions are random vectors of the right size (the encoder is not timed). Prints one
JSON line per (preset, layout).
"""

import argparse
import json
import time

import torch

from oral.diffusion import Diffusion
from oral.generator import GeneratorNet, generator_config
from oral.lora import LoraSpec
from oral.models import tiny_llama_config
from oral.tokens import WeightTokenizer

MISTRAL_7B = dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, vocab_size=32000)
SMOLLM2_135M = dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
LAYOUTS = {
    "tiny-llama": lambda: LoraSpec.from_base_config(tiny_llama_config(), ["q_proj", "v_proj"], 4, 8),
    "smollm2-135m": lambda: LoraSpec.from_base_config(SMOLLM2_135M, ["q_proj", "v_proj"], 4, 8),
    "mistral-7b": lambda: LoraSpec.from_base_config(MISTRAL_7B, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                 "up_proj", "down_proj"], 16, 32),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(preset: str, layout: str, device: torch.device, batch: int, tokens_per_sample: int, steps: int) -> dict:
    spec = LAYOUTS[layout]()
    cfg = generator_config(preset, model_cond_dim=384 + 130, text_cond_dim=384)
    tok = WeightTokenizer(spec, cfg.token_size)
    N, D = tok.num_tokens, cfg.token_size
    net = GeneratorNet(cfg).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    diff = Diffusion()
    pos = tok.positions.to(device)[None].expand(batch, -1, -1)
    cm, ct = torch.randn(batch, cfg.model_cond_dim, device=device), torch.randn(batch, cfg.text_cond_dim, device=device)
    K = min(N, tokens_per_sample)

    def step():
        idx = torch.rand(batch, N, device=device).argsort(1)[:, :K]
        x0 = torch.randn(batch * K, D, device=device)
        x_t, t, target = diff.add_noise(x0)
        loss = (net(pos, cm, ct, torch.zeros(batch, dtype=torch.bool, device=device), idx, x_t, t) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    sync(device)
    t0 = time.time()
    for _ in range(steps):
        step()
    sync(device)
    train_s = (time.time() - t0) / steps

    net.eval()
    with torch.no_grad():
        t0 = time.time()
        p = net.prototypes(pos[:1], net.condition(cm[:1], ct[:1]))[0]
        diff.sample(lambda x, t: net.denoise(x, t, p), (N, D), steps=60, device=device)
        sync(device)
        gen_s = time.time() - t0
    return {"preset": preset, "layout": layout, "device": str(device), "lora_params": spec.num_params,
            "tokens": N, "token_size": D, "generator_params": net.num_params(), "batch": batch,
            "tokens_per_sample": K, "train_step_s": round(train_s, 4), "generate_s_ddim60": round(gen_s, 3),
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--layouts", default="tiny-llama,smollm2-135m")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens-per-sample", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    for preset in args.presets.split(","):
        for layout in args.layouts.split(","):
            print(json.dumps(bench(preset, layout, torch.device(args.device), args.batch, args.tokens_per_sample,
                                   args.steps)), flush=True)


if __name__ == "__main__":
    main()
