"""Sampling and the reference generation loop, on the built-in demo model."""

from __future__ import annotations

import pytest
import torch

from shared.generate import demo_model_path, generate
from shared.model import load_model
from shared.sampling import sample
from shared.tokenizer import Tokenizer


def test_sample_greedy_and_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]])
    assert sample(logits).item() == 1
    assert sample(logits, temperature=1.0, top_k=1).item() == 1
    g = torch.Generator().manual_seed(0)
    draws = {sample(logits, temperature=1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {1, 3}
    draws = {sample(logits, temperature=5.0, top_p=0.3, generator=g).item() for _ in range(100)}
    assert draws == {1}  # at T=5 token 1 alone holds 0.31 of the mass: the smallest set reaching 0.3
    with pytest.raises(ValueError):
        sample(logits, temperature=-1)


def test_greedy_takes_the_first_maximum_as_argmax_does():
    g = torch.Generator().manual_seed(1)
    logits = torch.randint(0, 50, (8, 151936), generator=g).float()  # many ties at the maximum
    logits[3, 7] = logits[3, 151935] = 1e4
    for dt in (torch.float32, torch.bfloat16):
        assert torch.equal(sample(logits.to(dt)), logits.to(dt).argmax(dim=-1))
    assert sample(logits)[3].item() == 7


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(4, 50)
    a = sample(logits, 1.0, generator=torch.Generator().manual_seed(7))
    b = sample(logits, 1.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_demo_model_is_made_once_and_generates():
    path = demo_model_path()
    assert demo_model_path() == path and (path / "config.json").is_file()
    model, tok = load_model(path, dtype=torch.float32), Tokenizer(path)
    assert model.family == "deepseek_v3" and tok.vocab_size == 129280
    out = list(generate(model, tok, "The quick brown fox", max_tokens=6))
    assert 1 <= len(out) <= 6
    # Greedy generation is the argmax of the full-sequence forward at every step.
    ids = tok.encode("The quick brown fox")
    for token in out:
        assert token == int(model(torch.tensor([ids]))[0, -1].argmax())
        ids.append(token)


@pytest.mark.parametrize("kind", ["byte", "deepseek"])
def test_incremental_decoder_equals_decoding_everything(tmp_path, kind):
    from shared.tokenizer import TOKENIZER_SIZES, TOKENIZER_WRITERS, IncrementalDecoder, Tokenizer

    TOKENIZER_WRITERS[kind](tmp_path)
    tok = Tokenizer(tmp_path)
    gen = torch.Generator().manual_seed(0)
    texts = ["Hello, world! ünïcødé 漢字 🙂 end", "  leading spaces\nand lines\ttabs"]
    for ids in [tok.encode(t, add_bos=False) for t in texts] + [
            torch.randint(2, TOKENIZER_SIZES[kind], (200,), generator=gen).tolist()]:
        dec = IncrementalDecoder(tok)
        released = "".join(dec.push(t) for t in ids) + dec.flush()
        assert released == dec.text == tok.decode(ids)
