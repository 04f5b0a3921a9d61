"""Building blocks shared by the model families: norms, RoPE, MLPs, routers, experts, the stack.

Shape legend: B = batch, T = tokens, D = hidden size, H = query heads, K = key/value heads,
Dh = head dim, E = routed experts, k = experts per token, I = expert intermediate size.

Attention, the router and the routed experts are separate modules so that the engines can run
the experts on the CPU kernels and the rest elsewhere. Weights are buffers, not parameters: these
modules serve inference only.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shared.checkpoint import CheckpointError, HFConfig
from shared.quant import QuantWeight, dequantize_fast

# A faster y = x W^T for some shapes (the engines' CPU decode sets the kernels' BF16 GEMV here for
# the few-token case): called with one weight, or a tuple of weights for the same x (then it
# returns a tuple of outputs); it returns None to decline. Scoped to a context, never a module global.
LINEAR_OVERRIDE: contextvars.ContextVar[Callable[[torch.Tensor, Any], Any] | None] = \
    contextvars.ContextVar("LINEAR_OVERRIDE", default=None)


class QuantLinear(nn.Module):
    """A linear layer's weight [out, in] kept as the checkpoint stores it (FP8 128x128 blocks, INT4
    groups): DeepSeek's FP8 release quantizes attention, shared experts and dense layers too.
    Decode reads every one of those weights once a token, so the CPU kernels' GEMV takes it as it
    is (half the bytes of BF16); the torch paths dequantize it per call (:meth:`dense`), and an
    engine that keeps it resident on a GPU dequantizes it once there. Its data and scale are
    buffers, so ``.to(device)`` and the weight store treat them as any other weight.

    ``keep_dense``: keep the dequantized weight made by :meth:`dense` for the next calls (twice the
    memory, none of the per-call work): a CPU prefill engine, whose GEMMs over long chunks want
    the dense form, sets it."""

    def __init__(self, w: QuantWeight) -> None:
        super().__init__()
        if w.fmt == "dense" or len(w.shape) != 2:
            raise ValueError(f"QuantLinear holds a quantized [out, in] weight, got {w.fmt} {list(w.shape)}")
        self.fmt, self.shape = w.fmt, tuple(w.shape)
        self.register_buffer("data", w.data)
        self.register_buffer("scale", w.scale)
        self.keep_dense = False
        self._dense: tuple | None = None  # ((data pointer, device, dtype), the dequantized weight)

    def quant(self) -> QuantWeight:
        return QuantWeight(self.fmt, self.data, self.scale, self.shape)

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """The real-valued weight in ``dtype``: made for the call, or kept (``keep_dense``)."""
        key = (self.data.data_ptr(), self.data.device, dtype)
        if self._dense is not None and self._dense[0] == key:
            return self._dense[1]
        w = dequantize_fast(self.quant(), dtype)
        self._dense = (key, w) if self.keep_dense else None
        return w

    def extra_repr(self) -> str:
        return f"{self.fmt}, shape={list(self.shape)}"


Linear = torch.Tensor | QuantLinear  # a linear layer's weight as the model modules hold it


def set_linear(module: nn.Module, name: str, w: torch.Tensor | QuantWeight) -> None:
    """Give ``module`` the linear weight ``name``: a buffer for a plain tensor (or a dense
    QuantWeight's), a :class:`QuantLinear` submodule for a quantized one."""
    if isinstance(w, QuantWeight):
        if w.fmt != "dense":
            module.add_module(name, QuantLinear(w))
            return
        w = w.data
    module.register_buffer(name, w)


def dense_weight(w: Linear, dtype: torch.dtype) -> torch.Tensor:
    """A linear weight as a plain tensor: a tensor as it is, a quantized one dequantized to dtype."""
    return w.dense(dtype) if isinstance(w, QuantLinear) else w


def as_quant(w: Linear) -> QuantWeight:
    """A linear weight as a :class:`QuantWeight` (a plain tensor as ``dense``), as the kernels take it."""
    return w.quant() if isinstance(w, QuantLinear) else QuantWeight("dense", w, None, tuple(w.shape))


def linear(x: torch.Tensor, w: Linear) -> torch.Tensor:
    """``F.linear(x, w)``, or the context's override when it takes the shape."""
    fast = LINEAR_OVERRIDE.get()
    if fast is not None and (y := fast(x, w)) is not None:
        return y
    return F.linear(x, dense_weight(w, x.dtype))


def linears(x: torch.Tensor, ws: tuple[Linear, ...]) -> tuple[torch.Tensor, ...]:
    """``F.linear(x, w)`` for each w, or the context's override for all of them in one call when it
    takes them (one read of x, one fork of the kernels' threads)."""
    fast = LINEAR_OVERRIDE.get()
    if fast is not None and (ys := fast(x, tuple(ws))) is not None:
        return ys
    return tuple(F.linear(x, dense_weight(w, x.dtype)) for w in ws)


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim in fp32, as transformers does, back in x's dtype, times weight
    (which broadcasts). Through torch's fused op: one op instead of five, where decode runs this
    several times a layer on a row or two and each op's dispatch is the cost."""
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


# --- rotary position embedding ------------------------------------------------------------------


def rope_parameters(cfg: HFConfig) -> dict:
    """The RoPE settings, from ``rope_parameters`` (transformers >= 5) or ``rope_scaling`` +
    ``rope_theta`` (the released checkpoints)."""
    params = dict(cfg.get("rope_parameters", None, dict) or cfg.get("rope_scaling", None, dict) or {})
    params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0, (int, float)))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    if params["rope_type"] not in ("default", "yarn"):
        raise cfg.fail(f"rope type {params['rope_type']!r} is not supported (supported: default, yarn)")
    if params["rope_type"] == "yarn":
        params.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings", None))
        if not params.get("factor") or not params.get("original_max_position_embeddings"):
            raise cfg.fail("yarn rope scaling needs 'factor' and 'original_max_position_embeddings'")
    return params


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_inv_freq(params: dict, dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] and the factor applied to cos/sin (YaRN's attention factor)."""
    base = float(params["rope_theta"])
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if params["rope_type"] == "default":
        return inv_freq, 1.0
    factor = float(params["factor"])
    original = params["original_max_position_embeddings"]
    mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast, beta_slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # 1 where the frequency is kept as trained, 0 where interpolated
    inv_freq = inv_freq / factor * (1 - extrapolation) + inv_freq * extrapolation
    return inv_freq, float(attention_factor)


class Rotary(nn.Module):
    """cos/sin tables for given positions; ``interleaved`` pairs (x0, x1), (x2, x3)... (DeepSeek)
    or halves (x[:d/2], x[d/2:]) (Llama-style)."""

    def __init__(self, params: dict, dim: int, interleaved: bool) -> None:
        super().__init__()
        inv_freq, self.attention_factor = rope_inv_freq(params, dim)
        self.register_buffer("inv_freq", inv_freq)
        self.interleaved = interleaved
        self._last: tuple | None = None  # (key, positions, cos, sin, doubled cos, signed sin), see cos_sin

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The tables for ``positions``. Every layer of a step asks for the same positions, so the
        last answer is kept, against a copy of the positions it was for (a comparison is one op;
        the tables are eight)."""
        last = self._last
        if (last is not None and last[0] == (positions.shape, positions.device, dtype)
                and torch.equal(last[1], positions)):
            return last[2], last[3]
        freqs = positions.float()[..., None] * self.inv_freq  # [..., Dh/2]
        cos, sin = (freqs.cos() * self.attention_factor).to(dtype), (freqs.sin() * self.attention_factor).to(dtype)
        self._last = ((positions.shape, positions.device, dtype), positions.clone(), cos, sin, *self._doubled(cos, sin))
        return cos, sin

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, heads, T, Dr]; cos/sin [B or 1, T, Dr/2]. The output puts the rotated pairs in
        halves whichever the input layout: dot products, hence attention, do not see the order.

        With halves (x1, x2) the result is (x1 cos - x2 sin, x2 cos + x1 sin), computed as
        x (cos, cos) + roll(x) (-sin, sin): the same products and sums, rounded the same way, in
        four ops instead of seven (the doubled tables are kept with the last cos_sin answer)."""
        if self.interleaved:  # pairs -> halves
            x = x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)
        last = self._last
        cc, ss = last[4:] if last is not None and last[2] is cos and last[3] is sin else self._doubled(cos, sin)
        return x * cc + x.roll(x.shape[-1] // 2, dims=-1) * ss

    @staticmethod
    def _doubled(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat((cos, cos), -1).unsqueeze(1), torch.cat((-sin, sin), -1).unsqueeze(1)


def suffix_causal_mask(T: int, L: int, device: torch.device) -> torch.Tensor | None:
    """For T new tokens that are the last T of L: [T, L] bool, True where a query may attend
    (every earlier token and itself); None when T == 1 (the one new token sees everything)."""
    if T == 1:
        return None
    return torch.ones(T, L, dtype=torch.bool, device=device).tril(L - T)


def suffix_causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """scaled_dot_product_attention of q [H, T, Dq] (the last T of L positions) over k [H or K, L,
    Dq] and v [H or K, L, Dv], each query seeing every earlier position and itself.

    torch's fused kernels (flash attention, on a GPU and on the CPU) take only 4-D [batch, heads,
    length, dim] with one width for q, k and v; anything else falls back to the math path, which
    builds the [H, T, L] scores and, on the CPU, ran 7-15x slower at prefill shapes (bf16, 1024
    tokens: 301 against 20 ms a layer at Qwen3-30B-A3B's heads). So the call is 4-D, and MLA's
    narrower v is padded with zeros, which come out as zero columns and are cut off. On a GPU
    the causal mask is torch's lower-right bias (no [T, L] mask: a 4K-token chunk's scores at
    DeepSeek-V3's 128 heads are 4 GiB), with grouped K/V repeated to the query heads for it; on
    the CPU, whose flash kernel takes a mask and grouped K/V, the explicit mask (none when the
    chunk is the whole sequence: ``is_causal``)."""
    T, L = q.shape[-2], k.shape[-2]
    dv = v.shape[-1]
    if dv < q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - dv))
    if q.device.type == "cuda" and T > 1:
        from torch.nn.attention.bias import causal_lower_right

        if k.shape[0] != q.shape[0]:
            k, v = (t.repeat_interleave(q.shape[0] // t.shape[0], dim=0) for t in (k, v))
        out = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=causal_lower_right(T, L),
                                             scale=scale)
    else:
        whole = T == L  # (the causal mask then is torch's own)
        out = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=whole, scale=scale,
                                             attn_mask=None if whole else suffix_causal_mask(T, L, q.device),
                                             enable_gqa=k.shape[0] != q.shape[0])
    return out[0, ..., :dv]


DECODE_ATTENTION_MAX_T = 16


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """A few new tokens against one sequence's cache: q [T, H, Dh] (the last T of L positions),
    k and v [K, L, Dh] with H a multiple of K (head h reads kv head h // (H // K)) -> [T, H * Dh].

    Two fp32 batched matmuls per kv head group. On the CPU this is about ten times faster than
    scaled_dot_product_attention for decode shapes (which handles enable_gqa and strided K/V
    slowly there), and as exact: scores and softmax in fp32 whatever the cache dtype."""
    T, H, Dh = q.shape
    K, L = k.shape[0], k.shape[1]
    G = H // K
    qg = q.float().view(T, K, G, Dh).permute(1, 2, 0, 3).reshape(K, G * T, Dh)
    s = torch.bmm(qg, k.float().transpose(1, 2)).mul_(scale)  # [K, G * T, L]
    if T > 1:  # token t sees positions up to L - T + t
        s.view(K, G, T, L).masked_fill_(~suffix_causal_mask(T, L, q.device), float("-inf"))
    o = torch.bmm(torch.softmax(s, dim=-1), v.float())  # [K, G * T, Dh]
    return o.view(K, G, T, Dh).permute(2, 0, 1, 3).reshape(T, H * Dh).to(q.dtype)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, H, T, Dh], k [B, H or K, T, Dh], v [B, H or K, T, Dv] -> [B, T, H * Dv]."""
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                         enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(1, 2).flatten(2)


# --- feed-forward -------------------------------------------------------------------------------


class DenseMLP(nn.Module):
    """SiLU-gated MLP: dense layers and shared experts."""

    def __init__(self, gate: torch.Tensor | QuantWeight, up: torch.Tensor | QuantWeight,
                 down: torch.Tensor | QuantWeight) -> None:
        super().__init__()
        set_linear(self, "gate", gate)  # [I, D]
        set_linear(self, "up", up)  # [I, D]
        set_linear(self, "down", down)  # [D, I]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = linears(x, (self.gate, self.up))
        return linear(F.silu(g) * u, self.down)


class SoftmaxTopKRouter(nn.Module):
    """Softmax over all experts, then top-k (Mixtral, Qwen3-MoE)."""

    def __init__(self, weight: torch.Tensor, top_k: int, norm_topk_prob: bool) -> None:
        super().__init__()
        self.register_buffer("weight", weight)  # [E, D]
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> expert ids [T, k] (int64), weights [T, k] (float32)."""
        probs = F.softmax(linear(x, self.weight).float(), dim=-1)
        weights, ids = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return ids, weights


class RoutedExperts(nn.Module):
    """One layer's routed experts, stacked: gate/up [E, I, D], down [E, D, I], in any format.

    ``forward`` is the pure-torch reference: each chosen expert's weights are dequantized and
    applied with ``F.linear``. The engines replace it with the CPU kernels' whole-layer call.
    """

    def __init__(self, gate: QuantWeight, up: QuantWeight, down: QuantWeight) -> None:
        super().__init__()
        self.num_experts = gate.shape[0]
        self.fmt = gate.fmt
        self._shapes = {}
        for name, w in (("gate", gate), ("up", up), ("down", down)):
            if w.fmt != self.fmt or w.shape[0] != self.num_experts:
                raise ValueError(f"experts' {name} weight is {w.fmt} {w.shape}, gate is {gate.fmt} {gate.shape}")
            # Buffers, so that .to(device) moves them; the format travels beside them.
            self.register_buffer(f"{name}_data", w.data)
            self.register_buffer(f"{name}_scale", w.scale)
            self._shapes[name] = w.shape

    def weight(self, name: str) -> QuantWeight:
        """The stacked weight ``gate``, ``up`` or ``down``."""
        return QuantWeight(self.fmt, getattr(self, f"{name}_data"), getattr(self, f"{name}_scale"),
                           self._shapes[name])

    def expert(self, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(self.weight(name)[e].dequantize(dtype) for name in ("gate", "up", "down"))

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, D], ids [T, k], weights [T, k] -> [T, D]."""
        return experts_forward(x, ids, weights, self.weight("gate"), self.weight("up"), self.weight("down"))


def experts_forward(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate: QuantWeight,
                    up: QuantWeight, down: QuantWeight, first: int = 0,
                    dequantize=None) -> torch.Tensor:
    """The pure-torch routed experts: each chosen expert's weights dequantized and applied with
    ``F.linear``. gate/up/down hold experts ``first .. first + E - 1`` (a rank's or a staging
    slot's share); choices of other experts contribute nothing. ``dequantize(w, dtype)`` may
    replace ``w.dequantize(dtype)`` with an equal, faster one."""
    out = torch.zeros_like(x)
    E, k = gate.shape[0], ids.shape[1]
    # The choices sorted by expert (stable: each expert's tokens in order), and each expert's count
    # read back once: one device-to-host sync per call, not one per expert.
    flat = ids.flatten() - first
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat.clamp(-1, E).add(1), minlength=E + 2).tolist()
    toks, w_sorted = order // k, weights.flatten()[order]
    start = counts[0]  # choices of experts before ``first`` (another rank's)
    for e, n in enumerate(counts[1 : E + 1]):
        if n:
            tok, we = toks[start : start + n], w_sorted[start : start + n]
            g, u, d = (dequantize(w[e], x.dtype) if dequantize else w[e].dequantize(x.dtype) for w in (gate, up, down))
            xe = x[tok]
            ye = F.linear(F.silu(F.linear(xe, g)) * F.linear(xe, u), d)
            out.index_add_(0, tok, (ye * we[:, None]).to(x.dtype))
        start += n
    return out


class MoE(nn.Module):
    """Router + routed experts (+ shared experts)."""

    def __init__(self, router: nn.Module, experts: RoutedExperts, shared: DenseMLP | None = None) -> None:
        super().__init__()
        self.router, self.experts, self.shared = router, experts, shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        ids, weights = self.router(flat)
        out = self.experts(flat, ids, weights)
        if self.shared is not None:
            out = out + self.shared(flat)
        return out.view_as(x)


# --- the stack ----------------------------------------------------------------------------------


class DecoderLayer(nn.Module):
    def __init__(self, attn: nn.Module, ffn: nn.Module, input_norm: RMSNorm, post_norm: RMSNorm) -> None:
        super().__init__()
        self.attn, self.ffn = attn, ffn
        self.input_norm, self.post_norm = input_norm, post_norm

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = x + self.attn(self.input_norm(x), positions)
        return h + self.ffn(self.post_norm(h))


class CausalLM(nn.Module):
    """Embedding, decoder layers, final norm, LM head. ``forward`` runs the full sequence with no
    cache: the reference that the engines' cached prefill and decode are checked against."""

    def __init__(self, embed: torch.Tensor, layers: list[DecoderLayer], norm: RMSNorm,
                 lm_head: torch.Tensor, args: object) -> None:
        super().__init__()
        self.register_buffer("embed", embed)  # [V, D]
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.register_buffer("lm_head", lm_head)  # [V, D]
        self.args = args

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] (int64) -> logits [B, T, V] (float32)."""
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an integer tensor [batch, tokens], got "
                             f"{input_ids.dtype} {list(input_ids.shape)}")
        vocab = self.embed.shape[0]
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
            raise ValueError(f"token ids must lie in [0, {vocab}); got [{int(input_ids.min())}, "
                             f"{int(input_ids.max())}]")
        input_ids = input_ids.to(self.device)
        positions = torch.arange(input_ids.shape[1], device=self.device).unsqueeze(0)
        x = F.embedding(input_ids, self.embed)
        for layer in self.layers:
            x = layer(x, positions)
        return F.linear(self.norm(x), self.lm_head).float()


def check_divisible(cfg: HFConfig, a: str, b: str) -> None:
    if cfg.get(a) % cfg.get(b):
        raise CheckpointError(f"{cfg.path}: {a}={cfg.get(a)} is not a multiple of {b}={cfg.get(b)}")


class GQAttention(nn.Module):
    """Grouped-query attention with RoPE and optional per-head q/k RMSNorm (Qwen3)."""

    def __init__(self, w: dict, prefix: str, heads: int, kv_heads: int, head_dim: int,
                 rotary: Rotary, qk_norm_eps: float | None = None) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.rotary = heads, kv_heads, head_dim, rotary
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            set_linear(self, n, w[f"{prefix}.{n}"])
        self.q_norm = self.k_norm = None
        if qk_norm_eps is not None:
            self.q_norm = RMSNorm(w[f"{prefix}.q_norm.weight"], qk_norm_eps)
            self.k_norm = RMSNorm(w[f"{prefix}.k_norm.weight"], qk_norm_eps)

    def qkv(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [B, T, D] -> q [B, H, T, Dh], k and v [B, K, T, Dh], rope applied."""
        q, k, v = self._qkv_heads(x, positions)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _qkv_heads(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [B, T, D] -> q [B, T, H, Dh], k and v [B, T, K, Dh], rope applied. q and k go through
        the norms and rope as one tensor (each head's rows are independent, so the results are
        the same as head group by head group): in decode every op counts, not its size."""
        H, K, Dh = self.heads, self.kv_heads, self.head_dim
        q, k, v = linears(x, (self.q_proj, self.k_proj, self.v_proj))
        q, k, v = q.unflatten(-1, (H, Dh)), k.unflatten(-1, (K, Dh)), v.unflatten(-1, (K, Dh))
        qk = torch.cat((q, k), dim=-2)  # [B, T, H + K, Dh]
        if self.q_norm is not None:  # RMSNorm's math, with q_norm's weight on q's heads, k_norm's on k's
            w = torch.cat((self.q_norm.weight.expand(H, Dh), self.k_norm.weight.expand(K, Dh)))
            qk = rms_norm(qk, w, self.q_norm.eps)
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        qk = self.rotary.apply(qk.transpose(1, 2), cos, sin).transpose(1, 2)  # [B, T, H + K, Dh]
        q, k = qk.split([H, K], dim=-2)
        return q, k, v

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x, positions)
        return linear(causal_attention(q, k, v, self.head_dim**-0.5), self.o_proj)

    # The cached form the engines use: project a flat batch of tokens, attend one sequence at a
    # time over its cache, project out. A token's cache entry is its K and V, rope applied.

    @property
    def kv_width(self) -> int:
        return 2 * self.kv_heads * self.head_dim

    def project(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D], positions [N] -> queries [N, H, Dh], cache entries [N, kv_width]."""
        q, k, v = self._qkv_heads(x.unsqueeze(0), positions.unsqueeze(0))  # [1, N, heads, Dh]
        return q[0], torch.cat((k[0], v[0]), dim=1).flatten(1)

    def attend(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """One sequence: q [T, H, Dh] for its last T tokens, kv [L, kv_width] -> [T, H * Dh]."""
        L = kv.shape[0]
        k, v = kv.view(L, 2, self.kv_heads, self.head_dim).permute(1, 2, 0, 3)  # each [K, L, Dh]
        if q.device.type == "cpu" and q.shape[0] <= DECODE_ATTENTION_MAX_T:  # (a GPU's SDPA is fine)
            return decode_attention(q, k, v, self.head_dim**-0.5)
        return suffix_causal_sdpa(q.transpose(0, 1), k, v, self.head_dim**-0.5).transpose(0, 1).flatten(1)

    def attend_paged(self, q: torch.Tensor, cache: torch.Tensor, blocks: list[torch.Tensor], block_size: int,
                     lengths: list[int]) -> torch.Tensor:
        """n sequences' one new token each, q [n, H, Dh], over their first ``lengths`` positions,
        read in place from one paged cache on the CPU (the kernels' decode attention, one call for
        all of them; no gather) -> [n, H * Dh]."""
        from cython_kernels import api  # the kernels are optional for the model code

        K, Dh = self.kv_heads, self.head_dim
        o = api.decode_attention_batch(q, cache, blocks, block_size, lengths, kv_heads=K, k_off=0, k_head=Dh,
                                       v_off=K * Dh, v_head=Dh, dv=Dh, scale=Dh**-0.5)
        return o.flatten(1).to(q.dtype)

    def output(self, o: torch.Tensor) -> torch.Tensor:
        return linear(o, self.o_proj)
