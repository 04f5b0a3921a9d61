"""Comparing the logits of two decode paths that differ only in fp32 rounding."""

from __future__ import annotations


def assert_paths_agree(results: dict, other: dict) -> None:
    """The same tokens, and logits that agree as far as the expert kernels let them. The kernels
    round their activations (to bf16; FP8's one-token kernel to fp16, summing in fp16), so a
    difference at fp32's rounding can move one of those roundings by a step, and that step's
    logits by up to about 1e-3 of the largest: every step within 5e-3 of it, and the median step
    within 1e-4 (a path that computed something else would be off at every step)."""
    assert results.keys() == other.keys()
    gaps = []
    for rid, events in results.items():
        assert [e.token for e in events] == [e.token for e in other[rid]], rid
        for a, b in zip(events, other[rid], strict=True):
            scale = max(a.logits.abs().max().item(), 1.0)
            gaps.append((a.logits - b.logits).abs().max().item() / scale)
    gaps.sort()
    assert gaps[-1] <= 5e-3, gaps[-1]
    assert gaps[len(gaps) // 2] <= 1e-4, gaps
