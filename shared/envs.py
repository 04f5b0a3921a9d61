"""Every environment variable hybridmoe reads, in one place."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """HYBRIDMOE_CACHE, else $XDG_CACHE_HOME/hybridmoe, else ~/.cache/hybridmoe: the demo model."""
    if path := os.environ.get("HYBRIDMOE_CACHE"):
        return Path(path)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hybridmoe"


def kernel_variant() -> str | None:
    """HYBRIDMOE_KERNEL forces a CPU kernel variant (avx512_bf16, generic)."""
    return os.environ.get("HYBRIDMOE_KERNEL") or None
