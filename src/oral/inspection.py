"""`oral inspect`: what a PEFT LoRA adapter dir holds (spec, sizes, token count, norms, validity)."""

from pathlib import Path
from typing import Any

from oral.gauge import module_norms
from oral.lora import LoraSpec, adapter_problems, load_adapter, read_provenance
from oral.tokens import WeightTokenizer


def describe_adapter(path: str | Path, base_model: Any = None, token_size: int = 128) -> dict:
    """Everything `oral inspect` prints: spec, sizes, token count, per-module norms, validity.

    Never raises on a malformed adapter whose files can be read: problems land in `problems`.
    """
    path = Path(path)
    spec, state = load_adapter(path, validate=False)
    problems = adapter_problems(spec, state, base_model)
    norms = {}
    for m in spec.modules:
        A, B = state.get(m.key_A), state.get(m.key_B)
        if A is not None and B is not None and tuple(A.shape) == m.shape_A and tuple(B.shape) == m.shape_B:
            norms[m.name] = module_norms(LoraSpec((m,), None, spec.use_rslora), {m.key_A: A, m.key_B: B})[0]
    modules = []
    for m in spec.modules:
        n = norms.get(m.name, {})
        modules.append({
            "name": m.name, "in": m.in_features, "out": m.out_features, "rank": m.rank, "alpha": m.alpha,
            "layer": spec.layer_of(m.name), "type": m.module_type,
            "norms": {k: n.get(k) for k in ("norm_A", "norm_B", "norm_delta")},
        })
    return {
        "path": str(path),
        "base_model_name_or_path": spec.base_model_name_or_path,
        "target_modules": list(spec.target_modules) if isinstance(spec.target_modules, tuple) else spec.target_modules,
        "use_rslora": spec.use_rslora,
        "num_modules": len(spec),
        "num_layers": len(spec.layers),
        "module_types": spec.module_types,
        "ranks": sorted({m.rank for m in spec.modules}),
        "num_params": spec.num_params,
        "token_size": token_size,
        "num_tokens": WeightTokenizer(spec, token_size).num_tokens,
        "valid": not problems,
        "problems": problems,
        "provenance": read_provenance(path),
        "modules": modules,
    }
