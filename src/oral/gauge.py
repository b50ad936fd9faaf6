"""The LoRA gauge: B A = (B G)(G^-1 A) for any invertible G, so equal adapters can look different.

The canonical form (balanced SVD: B = U sqrt(S), A = sqrt(S) V^T, signs fixed) picks one G per
module, so the generator sees one target per adapter; `random_gauge` / `apply_gauge` make the
equivalent adapters that test it, `factorize` turns weight updates back into factors.
"""

import math
from typing import Mapping

import torch

from oral.lora import LoraSpec


def delta_weight(spec: LoraSpec, state: Mapping[str, torch.Tensor], name: str, scaled: bool = True) -> torch.Tensor:
    """The module's weight update (out, in): scaling * B @ A (or B @ A with scaled=False)."""
    m = spec[name]
    delta = state[m.key_B].double() @ state[m.key_A].double()  # (out, in)
    return delta * m.scaling(spec.use_rslora) if scaled else delta


def _balanced_factors(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """B (out, r), A (r, in) -> U sqrt(S), sqrt(S) V^T of B@A, signs fixed; float64, never forming B@A."""
    Qb, Rb = torch.linalg.qr(B)  # (out, r), (r, r)
    Qa, Ra = torch.linalg.qr(A.T)  # (in, r), (r, r)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T)  # core (r, r) = U S Vh
    U = Qb @ U  # (out, r)
    V = Qa @ Vh.T  # (in, r)
    # Fix each singular pair's sign: the largest-magnitude entry of U's column is positive.
    idx = U.abs().argmax(dim=0)  # (r,)
    signs = torch.sign(U[idx, torch.arange(U.shape[1])])
    signs[signs == 0] = 1.0
    U, V = U * signs, V * signs
    root = S.sqrt()  # (r,)
    return U * root, (V * root).T  # (out, r), (r, in)


def canonicalize(spec: LoraSpec, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The balanced SVD gauge: B = U sqrt(S), A = sqrt(S) V^T with signs fixed, B@A unchanged.

    Any gauge form of an adapter maps to the same canonical tensors (up to float error, and up to
    rotations inside repeated singular values). The result is itself a plain PEFT state.
    """
    out = {}
    for m in spec.modules:
        A, B = state[m.key_A], state[m.key_B]
        Bc, Ac = _balanced_factors(B.double(), A.double())
        out[m.key_A] = Ac.to(A.dtype).contiguous()
        out[m.key_B] = Bc.to(B.dtype).contiguous()
    return out


def apply_gauge(spec: LoraSpec, state: Mapping[str, torch.Tensor], gauges: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Another form of the same adapter: B -> B G, A -> G^-1 A for each module's (r, r) matrix G."""
    out = dict(state)
    for m in spec.modules:
        if m.name not in gauges:
            continue
        G = gauges[m.name].double()
        A, B = state[m.key_A], state[m.key_B]
        out[m.key_B] = (B.double() @ G).to(B.dtype)
        out[m.key_A] = torch.linalg.solve(G, A.double()).to(A.dtype)
    return out


def random_gauge(spec: LoraSpec, seed: int = 0, cond: float = 10.0) -> dict[str, torch.Tensor]:
    """A random invertible (r, r) matrix per module with condition number about `cond`."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in spec.modules:
        Q1, _ = torch.linalg.qr(torch.randn(m.rank, m.rank, generator=g, dtype=torch.float64))
        Q2, _ = torch.linalg.qr(torch.randn(m.rank, m.rank, generator=g, dtype=torch.float64))
        s = torch.logspace(0, math.log10(cond), m.rank, dtype=torch.float64)
        out[m.name] = Q1 @ torch.diag(s) @ Q2
    return out


def factorize(spec: LoraSpec, deltas: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Dense weight updates {module name: (out, in)} -> a canonical state (truncated SVD to each rank).

    The inverse of `delta_weight` for updates of rank <= r: scaling is divided out.
    """
    out = {}
    for m in spec.modules:
        D = deltas[m.name].double() / m.scaling(spec.use_rslora)  # (out, in)
        U, S, Vh = torch.linalg.svd(D, full_matrices=False)
        B = U[:, : m.rank] * S[: m.rank]  # (out, r)
        A = Vh[: m.rank]  # (r, in)
        Bc, Ac = _balanced_factors(B, A)
        out[m.key_A] = Ac.to(dtype).contiguous()
        out[m.key_B] = Bc.to(dtype).contiguous()
    return out


def module_norms(spec: LoraSpec, state: Mapping[str, torch.Tensor]) -> list[dict]:
    """Per module: Frobenius norms of A, B and of the scaled update B@A (via r x r Gram matrices)."""
    rows = []
    for m in spec.modules:
        A, B = state[m.key_A].double(), state[m.key_B].double()
        # ||B A||_F^2 = trace((A A^T)(B^T B)), no (out, in) matrix formed.
        sq = torch.trace((A @ A.T) @ (B.T @ B)).clamp_min(0).item()
        rows.append({
            "name": m.name,
            "norm_A": A.norm().item(),
            "norm_B": B.norm().item(),
            "norm_delta": math.sqrt(sq) * m.scaling(spec.use_rslora),
        })
    return rows


def update_distance(spec: LoraSpec, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """How far adapter a's update is from adapter b's, module by module, never forming an (out, in) matrix:
    {"cosine": mean over modules of cos(dW_a, dW_b), "rel_l2": mean over modules of |dW_a - dW_b| / |dW_b|}.
    Both adapters must have `spec`'s layout (ranks may differ per adapter only through their tensors)."""
    cos, rel = [], []
    for m in spec.modules:
        Aa, Ba, Ab, Bb = (t.double() for t in (a[m.key_A], a[m.key_B], b[m.key_A], b[m.key_B]))
        # <Ba Aa, Bb Ab>_F = trace((Bb^T Ba)(Aa Ab^T)): r x r products only
        ab = torch.trace((Bb.T @ Ba) @ (Aa @ Ab.T)).item()
        aa = torch.trace((Ba.T @ Ba) @ (Aa @ Aa.T)).clamp_min(0).item()
        bb = torch.trace((Bb.T @ Bb) @ (Ab @ Ab.T)).clamp_min(0).item()
        cos.append(ab / math.sqrt(aa * bb) if aa > 0 and bb > 0 else 0.0)
        rel.append(math.sqrt(max(aa + bb - 2 * ab, 0.0) / bb) if bb > 0 else math.inf)
    return {"cosine": sum(cos) / len(cos), "rel_l2": sum(rel) / len(rel)}
