"""Load a Hugging Face MoE checkpoint into one of the model families.

The family is chosen by config.json's ``model_type`` (or, failing that, ``architectures``), never
by guessing from shapes. Every family module offers the same four names: ``MODEL_TYPES``,
``ARCHITECTURES``, ``args_from_config(cfg)``, ``weight_specs(args)`` and ``build(args, weights)``.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

from shared import deepseek_v3, mixtral, qwen3_moe
from shared.checkpoint import Checkpoint, CheckpointError, HFConfig, load_weights
from shared.layers import CausalLM

FAMILIES: tuple[ModuleType, ...] = (deepseek_v3, qwen3_moe, mixtral)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def family_of(cfg: HFConfig) -> ModuleType:
    model_type = cfg.get("model_type", None, str)
    architectures = cfg.get("architectures", [], list)
    for fam in FAMILIES:
        if model_type in fam.MODEL_TYPES:
            return fam
    if model_type is None:
        for fam in FAMILIES:
            if any(a in fam.ARCHITECTURES for a in architectures):
                return fam
    supported = ", ".join(f"{t} ({a})" for f in FAMILIES for t, a in zip(f.MODEL_TYPES, f.ARCHITECTURES, strict=True))
    raise cfg.fail(f"model_type {model_type!r} (architectures {architectures}) is not supported; "
                   f"supported: {supported}")


def config_dtype(cfg: HFConfig) -> torch.dtype:
    """The checkpoint's compute dtype (``dtype``, or the older ``torch_dtype``); bf16 if unsaid."""
    name = cfg.get("dtype", None, str) or cfg.get("torch_dtype", "bfloat16", str)
    if name not in DTYPES:
        raise cfg.fail(f"dtype {name!r} is not supported; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> CausalLM:
    """Load the checkpoint folder ``path``; ``model(input_ids [B, T])`` returns logits [B, T, V].

    ``dtype`` is the compute dtype (default: the checkpoint's). FP8/INT4 weights stay in their
    format (the routed experts, and the other linear layers of a checkpoint that quantizes them, as
    DeepSeek's FP8 release does: see :class:`shared.layers.QuantLinear`); the router and LM head
    are read as ``dtype`` tensors.
    """
    ckpt = Checkpoint(path)
    fam = family_of(ckpt.config)
    dtype = dtype or config_dtype(ckpt.config)
    weights = load_weights(ckpt, fam.weight_specs(fam.args_from_config(ckpt.config)), dtype)
    return build_model(ckpt.config, weights, device)


def build_model(cfg: HFConfig, weights: dict, device: str | torch.device = "cpu") -> CausalLM:
    """The model of ``cfg``'s family over ``weights`` (as :func:`load_weights` returns them, or
    as the shared-memory store maps them: the tensors are used in place, not copied)."""
    fam = family_of(cfg)
    model = fam.build(fam.args_from_config(cfg), weights)
    model.family = fam.__name__.rsplit(".", 1)[-1]
    return model.to(device).eval()


__all__ = ["load_model", "build_model", "family_of", "config_dtype", "CheckpointError", "FAMILIES"]
