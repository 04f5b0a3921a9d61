"""Make checkpoints with random weights in the real Hugging Face format, and quantize checkpoints.

No model can be downloaded where hybridmoe is developed and tested, so tests and benchmarks run on
checkpoints made here: config.json as the released model writes it, safetensors shards with the
released tensor names, tokenizer.json + tokenizer_config.json. The weights are random.

Presets: tiny models of each family for tests, the built-in ``demo`` model, and the real layer
shapes of DeepSeek-V3, Qwen3-30B-A3B and Mixtral-8x7B (``layers`` keeps those within a machine).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from shared.checkpoint import Checkpoint, HFConfig, ShardWriter, WeightSpec
from shared.model import family_of
from shared.quant import QuantWeight, checkpoint_format, int4_group, quantize
from shared.tokenizer import TOKENIZER_SIZES, TOKENIZER_WRITERS, Tokenizer

_DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "attention_bias": False,
    "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 1, "first_k_dense_replace": 3,
    "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "moe_intermediate_size": 2048,
    "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1,
    "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61,
    "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "tie_word_embeddings": False,
    "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "use_cache": True, "v_head_dim": 128,
    "vocab_size": 129280,
}
_QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "attention_bias": False,
    "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 1, "decoder_sparse_step": 1, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144,
    "max_position_embeddings": 40960, "mlp_only_layers": [], "moe_intermediate_size": 768,
    "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 48, "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_scaling": None,
    "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}
_MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "attention_dropout": 0.0,
    "bos_token_id": 0, "eos_token_id": 1, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 32768, "num_attention_heads": 32,
    "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 32000,
}


def _variant(base: dict, **over) -> dict:
    cfg = copy.deepcopy(base)
    cfg.update(over)
    return cfg


# name -> (config.json, tokenizer, what it is for)
PRESETS: dict[str, tuple[dict, str, str]] = {
    "deepseek-v3": (_DEEPSEEK_V3, "deepseek", "DeepSeek-V3/R1 real shapes (671B with 61 layers)"),
    "qwen3-30b-a3b": (_QWEN3_30B_A3B, "deepseek", "Qwen3-30B-A3B real shapes (DeepSeek's tokenizer)"),
    "mixtral-8x7b": (_MIXTRAL_8X7B, "byte", "Mixtral-8x7B real shapes (byte-level tokenizer)"),
    "demo": (_variant(
        _DEEPSEEK_V3, hidden_size=256, intermediate_size=768, moe_intermediate_size=128, num_hidden_layers=4,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=128, kv_lora_rank=64,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16, n_group=4, topk_group=2,
        num_experts_per_tok=4, max_position_embeddings=16384,
        rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 4, "mscale": 1.0, "mscale_all_dim": 1.0,
                      "original_max_position_embeddings": 4096, "type": "yarn"},
    ), "deepseek", "the built-in demo: DeepSeek-V3 architecture, 4 small layers, DeepSeek's tokenizer"),
    "tiny-deepseek-v3": (_variant(
        _DEEPSEEK_V3, vocab_size=320, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
        q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
        n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3, max_position_embeddings=1024,
        rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 4, "mscale": 1.0, "mscale_all_dim": 1.0,
                      "original_max_position_embeddings": 256, "type": "yarn"},
    ), "byte", "a tiny DeepSeek-V3 for tests"),
    "tiny-qwen3-moe": (_variant(
        _QWEN3_30B_A3B, vocab_size=320, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
        num_experts_per_tok=2, max_position_embeddings=1024,
    ), "byte", "a tiny Qwen3-MoE for tests"),
    "tiny-mixtral": (_variant(
        _MIXTRAL_8X7B, vocab_size=320, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, max_position_embeddings=1024,
    ), "byte", "a tiny Mixtral for tests"),
}


def preset_config(preset: str, layers: int | None = None) -> tuple[dict, str]:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    base, tokenizer, _ = PRESETS[preset]
    cfg = copy.deepcopy(base)
    if layers is not None:
        if layers < 1:
            raise ValueError(f"--layers must be at least 1, got {layers}")
        cfg["num_hidden_layers"] = layers
        # Fewer layers keep the real proportion where they can, but always leave one MoE layer.
        if "first_k_dense_replace" in cfg:
            cfg["first_k_dense_replace"] = min(cfg["first_k_dense_replace"], layers - 1)
        if "mlp_only_layers" in cfg:
            cfg["mlp_only_layers"] = [i for i in cfg["mlp_only_layers"] if i < layers]
    return cfg, tokenizer


def _quantized_roles(fmt: str) -> tuple[str, ...]:
    """FP8 follows DeepSeek's release (every linear layer but router, embedding and head);
    INT4 is the CPU experts' format and applies to routed experts only."""
    if fmt == "fp8_b128":
        return ("linear", "experts")
    return ("experts",) if fmt.startswith("int4") else ()


def _quant_config(fmt: str) -> dict | None:
    if fmt == "fp8_b128":
        return {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
    if fmt.startswith("int4"):
        return {"quant_method": "hybridmoe_int4", "bits": 4, "symmetric": True, "group_size": int4_group(fmt),
                "modules": "routed_experts"}
    return None


def _random(spec_shape: tuple[int, ...], role: str, gen: torch.Generator) -> torch.Tensor:
    if role == "vector":
        return (1.0 + 0.05 * torch.randn(spec_shape, generator=gen, device=gen.device)).to(torch.bfloat16)
    if role == "bias":
        return 0.01 * torch.randn(spec_shape, generator=gen, device=gen.device)
    std = 1.0 if role == "embed" else spec_shape[-1] ** -0.5  # variance-preserving linear layers
    w = torch.empty(spec_shape, dtype=torch.float32, device=gen.device)
    w.normal_(0.0, std, generator=gen)
    return w


def make_model(preset: str, out: str | Path, layers: int | None = None, quant: str = "bf16", seed: int = 0,
               max_shard_bytes: int = 4 << 30, progress: bool = False, device: str = "cpu") -> Path:
    """Write a random-weight checkpoint of ``preset`` to ``out``; returns the folder.

    ``device`` draws and quantizes the weights there: a GPU makes a real-shaped DeepSeek-V3 layer
    (11 GB of FP8 experts) in seconds instead of minutes. The random stream is the device's, so
    the same seed gives different weights on the CPU and on a GPU."""
    cfg, tokenizer = preset_config(preset, layers)
    fmt = checkpoint_format(quant)
    if cfg["vocab_size"] < TOKENIZER_SIZES[tokenizer]:
        raise ValueError(f"preset {preset}: vocab_size {cfg['vocab_size']} is smaller than its tokenizer")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if qc := _quant_config(fmt):
        cfg["quantization_config"] = qc
    view = HFConfig(cfg, out / "config.json")
    fam = family_of(view)
    specs = fam.weight_specs(fam.args_from_config(view))
    writer = ShardWriter(out, max_shard_bytes)
    gen = torch.Generator(device).manual_seed(seed)
    roles = _quantized_roles(fmt)
    for spec in tqdm(specs, desc=f"make-model {preset}", unit="tensor", disable=not progress):
        _write_spec(writer, spec, fmt if spec.role in roles else "dense", gen)
    writer.close()
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    TOKENIZER_WRITERS[tokenizer](out)
    return out


def _write_spec(writer: ShardWriter, spec: WeightSpec, fmt: str, gen: torch.Generator) -> None:
    if spec.role == "experts":
        for prefix in spec.expert_prefixes():
            writer.add_linear(prefix, _as(fmt, _random(spec.shape[1:], "linear", gen), prefix))
    elif spec.role in ("linear", "router"):
        writer.add_linear(spec.name, _as(fmt, _random(spec.shape, spec.role, gen), spec.name))
    elif spec.role == "bias":
        writer.add(spec.name, _random(spec.shape, spec.role, gen))
    else:
        writer.add(spec.name, _random(spec.shape, spec.role, gen).to(torch.bfloat16))


def _as(fmt: str, w: torch.Tensor, name: str) -> QuantWeight:
    try:
        return quantize(w.to(torch.bfloat16) if fmt == "dense" else w, fmt)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from e


def quantize_checkpoint(src: str | Path, dst: str | Path, quant: str, max_shard_bytes: int = 4 << 30,
                        progress: bool = False) -> Path:
    """Copy a BF16 checkpoint with its routed experts' weights quantized to FP8 or INT4.

    Everything else is copied as it is; tokenizer and other side files come along.
    """
    fmt = checkpoint_format(quant)
    if fmt == "dense":
        raise ValueError("quantize needs a format: fp8, int4 (groups of 128) or int4_g32")
    ckpt = Checkpoint(src)
    fam = family_of(ckpt.config)
    specs = fam.weight_specs(fam.args_from_config(ckpt.config))
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(dst, max_shard_bytes)
    expert_names = set()
    for spec in tqdm(specs, desc="quantize", unit="tensor", disable=not progress):
        if spec.role != "experts":
            continue
        for prefix in spec.expert_prefixes():
            w = ckpt.linear(prefix, spec.shape[1:], spec.why)
            if w.fmt != "dense":
                raise ValueError(f"{ckpt.file_of(prefix + '.weight')}: {prefix} is already {w.fmt}")
            writer.add_linear(prefix, _as(fmt, w.data, prefix))
            expert_names.add(prefix + ".weight")
    for name in ckpt.names():
        if name not in expert_names:
            writer.add(name, ckpt.get(name))
    writer.close()
    cfg = dict(ckpt.config.data)
    cfg["quantization_config"] = {**_quant_config(fmt), "modules": "routed_experts"}
    (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for side in Path(src).iterdir():
        if side.is_file() and side.suffix != ".safetensors" and side.name not in (
                "config.json", "model.safetensors.index.json"):
            shutil.copyfile(side, dst / side.name)
    return dst


def describe(folder: str | Path) -> str:
    """One line about a checkpoint folder: family, layers, experts, bytes on disk."""
    ckpt = Checkpoint(folder)
    size = sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
    tok = Tokenizer(folder)
    return (f"{folder}: {family_of(ckpt.config).__name__.rsplit('.', 1)[-1]}, "
            f"{ckpt.config.get('num_hidden_layers')} layers, {size / 2**30:.2f} GiB, vocab {tok.vocab_size}")
