"""Per-request sampling: parameters, validation, and the choice of the next token with logprobs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """What a request asks of the sampler. ``temperature`` 0 is greedy; ``top_k`` 0 and
    ``top_p`` 1 turn those filters off; ``logprobs`` N returns the chosen token's logprob and the
    N most likely (None: none). Logprobs are of the model's distribution, before temperature
    and filters, as OpenAI's API reports them."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    extra: dict = field(default_factory=dict)

    def validate(self) -> SamplingParams:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not 0 <= self.temperature <= 100:
            raise ValueError(f"temperature must lie in [0, 100], got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must lie in [0, 20], got {self.logprobs!r}")
        return self


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]. Greedy when temperature is 0."""
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"bad sampling parameters: temperature={temperature}, top_p={top_p}, top_k={top_k}")
    if temperature == 0:  # max's indices are argmax's (the first maximum), 2.7x as fast on the CPU
        return logits.max(dim=-1).indices  # (a 152K vocabulary: 79 us against 214)
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


@dataclass
class Choice:
    token: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


def choose(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> Choice:
    """One sequence's next token from its logits [V]."""
    token = int(sample(logits.unsqueeze(0), params.temperature, params.top_p, params.top_k, generator)[0])
    if params.logprobs is None:
        return Choice(token)
    lp = logits.float().log_softmax(-1)
    top = lp.topk(params.logprobs) if params.logprobs else None
    pairs = list(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else []
    return Choice(token, float(lp[token]), pairs)
