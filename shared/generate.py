"""Sampling, and a simple reference generation loop over the full-sequence forward.

The loop recomputes the whole sequence at every step (no KV cache): it is the plain reference
that the engines are compared with, and what ``hybridmoe generate`` runs on a small model.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from shared import envs
from shared.layers import CausalLM
from shared.tokenizer import Tokenizer

DEMO_PRESET = "demo"
DEMO_VERSION = 1


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]. Greedy when temperature is 0."""
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"bad sampling parameters: temperature={temperature}, top_p={top_p}, top_k={top_k}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(dim=-1) - sorted_p > top_p  # keep the smallest set reaching top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate(model: CausalLM, tokenizer: Tokenizer, prompt: str, max_tokens: int = 32,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             seed: int | None = None) -> Iterator[int]:
    """Yield generated token ids until ``max_tokens`` or the end-of-sequence token."""
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    for _ in range(max_tokens):
        logits = model(torch.tensor([ids]))[:, -1]
        token = int(sample(logits, temperature, top_p, top_k, gen)[0])
        yield token
        if token == tokenizer.eos_token_id:
            return
        ids.append(token)


def demo_model_path(progress: bool = False) -> Path:
    """The built-in demo checkpoint, made on first use and kept in the cache folder."""
    from shared.make_model import make_model

    path = envs.cache_dir() / f"demo-v{DEMO_VERSION}"
    if (path / "config.json").is_file():
        return path
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    make_model(DEMO_PRESET, tmp, quant="fp8", seed=0, progress=progress)
    try:
        tmp.rename(path)  # atomic: a concurrent maker's copy wins, ours is dropped
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
