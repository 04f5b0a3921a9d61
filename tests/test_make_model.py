"""make-model and quantize write real-format checkpoints; the CLI drives them and generate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shared.checkpoint import Checkpoint, HFConfig
from shared.make_model import PRESETS, make_model, preset_config, quantize_checkpoint
from shared.model import family_of, load_model
from shared.tokenizer import Tokenizer


@pytest.mark.parametrize("preset,quant", [(p, q) for p in ("tiny-deepseek-v3", "tiny-qwen3-moe", "tiny-mixtral")
                                          for q in ("bf16", "fp8", "int4_g32")])
def test_tiny_presets_load_and_run(tiny_models, preset, quant):
    path = tiny_models[preset, quant]
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in path.iterdir()}
    model = load_model(path)
    tok = Tokenizer(path)
    ids = torch.tensor([tok.encode("hello experts")])
    logits = model(ids)
    assert logits.shape == (1, ids.shape[1], 320) and torch.isfinite(logits).all()


def test_same_seed_same_weights(tmp_path):
    a = make_model("tiny-mixtral", tmp_path / "a", seed=3)
    b = make_model("tiny-mixtral", tmp_path / "b", seed=3)
    c = make_model("tiny-mixtral", tmp_path / "c", seed=4)
    name = "model.layers.1.block_sparse_moe.experts.2.w2.weight"
    ta, tb, tc = (Checkpoint(p).get(name) for p in (a, b, c))
    assert torch.equal(ta, tb) and not torch.equal(ta, tc)


@pytest.mark.parametrize("preset,expect", [
    ("deepseek-v3", {"hidden_size": 7168, "n_routed_experts": 256, "moe_intermediate_size": 2048,
                     "num_experts_per_tok": 8}),
    ("qwen3-30b-a3b", {"hidden_size": 2048, "num_experts": 128, "moe_intermediate_size": 768}),
    ("mixtral-8x7b", {"hidden_size": 4096, "num_local_experts": 8, "intermediate_size": 14336}),
])
def test_real_shape_presets(preset, expect):
    cfg, _ = preset_config(preset, layers=2)
    assert cfg["num_hidden_layers"] == 2 and all(cfg[k] == v for k, v in expect.items())
    view = HFConfig(cfg, Path("config.json"))
    fam = family_of(view)
    specs = {s.name: s for s in fam.weight_specs(fam.args_from_config(view))}
    experts = [s for s in specs.values() if s.role == "experts"]
    assert experts, "two layers of a real preset keep at least one MoE layer"
    if preset == "deepseek-v3":
        assert specs["model.layers.1.mlp.experts.{e}.gate_proj"].shape == (256, 2048, 7168)
        assert specs["model.layers.1.mlp.experts.{e}.down_proj"].shape == (256, 7168, 2048)
        assert specs["model.layers.0.mlp.gate_proj"].shape == (18432, 7168)  # dense first layer


def test_quantize_checkpoint_experts_only(tiny_models, tmp_path):
    src = tiny_models["tiny-deepseek-v3", "bf16"]
    dst = quantize_checkpoint(src, tmp_path / "q", "fp8")
    ckpt = Checkpoint(dst)
    assert ckpt.get("model.layers.1.mlp.experts.0.up_proj.weight").dtype == torch.float8_e4m3fn
    assert ckpt.get("model.layers.1.self_attn.o_proj.weight").dtype == torch.bfloat16
    assert json.loads((dst / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    assert (dst / "tokenizer.json").is_file()
    ids = torch.randint(0, 258, (1, 12), generator=torch.Generator().manual_seed(0))
    a, b = load_model(src, dtype=torch.float32)(ids), load_model(dst, dtype=torch.float32)(ids)
    # FP8 experts: close, not equal (a routing near-tie may flip for a token or two).
    assert 0 < (a - b).abs().mean() < 0.1 * a.abs().mean()
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.98
    with pytest.raises(ValueError, match="already fp8_b128"):
        quantize_checkpoint(dst, tmp_path / "qq", "int4_g32")


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def test_cli_make_model_and_generate(tmp_path):
    r = _cli("make-model", "--preset", "tiny-qwen3-moe", "--out", str(tmp_path / "m"), "--quant", "int4_g32")
    assert r.returncode == 0, r.stderr
    assert "qwen3_moe, 3 layers" in r.stdout
    r = _cli("generate", "--model", str(tmp_path / "m"), "--prompt", "abc", "--max-tokens", "5", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("abc") and "tokens in" in r.stderr


def test_cli_errors_are_one_line(tmp_path):
    r = _cli("generate", "--model", str(tmp_path / "missing"), "--prompt", "x")
    assert r.returncode == 2 and "no such checkpoint folder" in r.stderr and "Traceback" not in r.stderr
    r = _cli("make-model", "--preset", "nope", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "unknown preset 'nope'" in r.stderr
    assert set(PRESETS) <= set(_cli("make-model", "--list").stdout.split())
