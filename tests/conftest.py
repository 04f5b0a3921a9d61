from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests' own helpers (hf_models)


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device; none is visible"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep the demo model and other caches out of the user's home."""
    monkeypatch.setenv("HYBRIDMOE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """make-model's tiny presets in every format, made once per session: {(preset, quant): path}."""
    from shared.make_model import make_model

    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for preset in ("tiny-deepseek-v3", "tiny-qwen3-moe", "tiny-mixtral"):
        for quant in ("bf16", "fp8", "int4_g32"):
            out[preset, quant] = make_model(preset, root / f"{preset}-{quant}", quant=quant, seed=1)
    return out
