"""Bad checkpoints fail with one clear error that names the file and the field or tensor."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from shared.checkpoint import CheckpointError
from shared.model import load_model


@pytest.fixture
def ckpt(tiny_models, tmp_path):
    path = tmp_path / "m"
    shutil.copytree(tiny_models["tiny-qwen3-moe", "bf16"], path)
    return path


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        load_model(tmp_path / "nope")


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        load_model(ckpt)


def test_config_not_json(ckpt):
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        load_model(ckpt)


def test_no_safetensors(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors files"):
        load_model(ckpt)


def test_unknown_model_type(ckpt):
    _edit_config(ckpt, model_type="llama", architectures=["LlamaForCausalLM"])
    with pytest.raises(CheckpointError, match=r"config\.json: model_type 'llama'.*not supported.*deepseek_v3"):
        load_model(ckpt)


def test_missing_field(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["hidden_size"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: missing field 'hidden_size'"):
        load_model(ckpt)


def test_wrong_field_type(ckpt):
    _edit_config(ckpt, num_experts="eight")
    with pytest.raises(CheckpointError, match=r"field 'num_experts' = 'eight' should be int"):
        load_model(ckpt)


def test_shape_contradicts_config(ckpt):
    _edit_config(ckpt, moe_intermediate_size=48)
    with pytest.raises(CheckpointError) as e:
        load_model(ckpt)
    msg = str(e.value)
    assert "model.safetensors" in msg and "experts.0.gate_proj.weight" in msg
    assert "moe_intermediate_size" in msg and "[48, 64]" in msg and "[32, 64]" in msg


def test_missing_tensor(ckpt):
    tensors = load_file(ckpt / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_norm.weight"]
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.self_attn\.k_norm\.weight' is missing"):
        load_model(ckpt)


def test_index_names_missing_shard(tiny_models, tmp_path):
    from shared.make_model import make_model

    path = make_model("tiny-mixtral", tmp_path / "sharded", max_shard_bytes=20_000)
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 2 and (path / "model.safetensors.index.json").is_file()
    load_model(path)  # loads across shards
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=f"names {shards[1].name}, which is missing"):
        load_model(path)


def test_fp8_scale_with_wrong_dtype(tiny_models, tmp_path):
    path = tmp_path / "m"
    shutil.copytree(tiny_models["tiny-mixtral", "fp8"], path)
    tensors = load_file(path / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors[name] = tensors[name].to(torch.bfloat16)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match="must be float8_e4m3fn"):
        load_model(path)


def test_unsupported_rope(ckpt):
    _edit_config(ckpt, rope_scaling={"type": "dynamic", "factor": 2.0})
    with pytest.raises(CheckpointError, match="rope type 'dynamic' is not supported"):
        load_model(ckpt)
