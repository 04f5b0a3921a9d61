"""Expert backends for the model runner: the CPU kernels (whole-layer MoE call, optionally on a
background pool so that attention overlaps it), a check of which backend a model can use, and the
hybrid placement (attention and dense parts on a GPU, routed experts left in host memory)."""

from __future__ import annotations

from concurrent.futures import Future

import torch

from cython_kernels import api
from shared.layers import CausalLM, MoE, QuantLinear, RoutedExperts

KERNEL_FORMATS = ("dense", "fp8_b128", "int4_g32", "int4_g128")


def kernel_unsupported_reason(model: CausalLM) -> str | None:
    """Why the CPU kernels cannot run this model's routed experts, or None if they can."""
    for layer in model.layers:
        if isinstance(layer.ffn, MoE):
            ex = layer.ffn.experts
            g = ex.weight("gate")
            if g.data.device.type != "cpu":
                return f"routed experts are on {g.data.device}, the kernels need host memory"
            if ex.fmt not in KERNEL_FORMATS or (ex.fmt == "dense" and g.data.dtype != torch.bfloat16):
                return f"routed experts are {ex.fmt} {g.data.dtype}; the kernels take bf16, fp8 or int4"
    return None


def place_except_experts(model: CausalLM, device: str | torch.device) -> CausalLM:
    """Move every weight but the routed experts to ``device``: embeddings, attention, norms,
    routers, shared experts, dense layers and the LM head. The routed experts stay where they are
    (host memory, where the CPU kernels read them). Tied weights stay one tensor. In place.

    On a GPU, quantized linear layers (:class:`QuantLinear`: an FP8 checkpoint's attention,
    shared experts and dense layers) are dequantized to the model's dtype once, there: the
    device's torch ops then read them as they did (none dequantized per call); on the CPU they
    stay as stored, for the kernels' GEMV."""
    device = torch.device(device)
    if device.type != "cpu":
        for mod in list(model.modules()):
            for name, child in list(mod._modules.items()):
                if isinstance(child, QuantLinear):
                    del mod._modules[name]
                    mod.register_buffer(name, child.to(device).dense(model.dtype))
    moved: dict[tuple, torch.Tensor] = {}
    for mod in model.modules():
        if isinstance(mod, RoutedExperts):
            continue
        if mod._parameters:
            raise TypeError(f"{type(mod).__name__} holds parameters; the model keeps its weights as buffers")
        for name, buf in mod._buffers.items():
            if buf is None or buf.device == device:
                continue
            key = (buf.device, buf.data_ptr(), buf.dtype, tuple(buf.shape), buf.stride())
            if key not in moved:
                moved[key] = buf.to(device)
            mod._buffers[name] = moved[key]
    return model


class KernelExperts:
    """Routed experts through ``cython_kernels``: one whole-layer call per step. With a
    ``pool`` the calls run on its background thread (no GIL held) and ``start`` returns at once.

    Hidden states on a GPU (attention there, experts in host memory) are copied to the CPU for
    the call and the output back to the GPU in ``finish``: a few KB per token each way."""

    def __init__(self, threads: int | None = None, pool: api.MoEPool | None = None, variant: str | None = None):
        self.threads, self.pool, self.variant = threads, pool, variant
        # each layer's experts bound once (api.Experts: their weights checked once), by module;
        # the module is kept beside its binding so that its id stays its own
        self._bound: dict[int, tuple[RoutedExperts, api.Experts]] = {}

    def bound(self, experts: RoutedExperts) -> api.Experts:
        hit = self._bound.get(id(experts))
        if hit is None:
            hit = self._bound[id(experts)] = (experts, api.Experts(
                experts.weight("gate"), experts.weight("up"), experts.weight("down"), variant=self.variant,
                threads=self.threads))
        return hit[1]

    def start(self, layer: int, experts: RoutedExperts, x: torch.Tensor, ids: torch.Tensor,
              weights: torch.Tensor) -> tuple[Future | torch.Tensor, torch.device]:
        ex = self.bound(experts)
        home = x.device
        if home.type != "cpu":
            x, ids, weights = x.to("cpu"), ids.to("cpu"), weights.to("cpu")
        weights = weights.float()
        return (self.pool.submit(x, ids, weights, ex) if self.pool is not None else ex(x, ids, weights)), home

    def finish(self, handle: tuple[Future | torch.Tensor, torch.device]) -> torch.Tensor:
        out, home = handle
        return (out.result() if isinstance(out, Future) else out).to(home)
