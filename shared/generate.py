"""A simple reference generation loop over the full-sequence forward.

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
from shared.sampling import sample
from shared.tokenizer import Tokenizer

DEMO_PRESET = "demo"
DEMO_VERSION = 1


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
