"""DeepSeek-V3 / R1 (``DeepseekV3ForCausalLM``): MLA attention, dense-first layers, and MoE with
shared experts, sigmoid scoring, a score-correction bias and group-limited top-k routing.

Shape legend: B = batch, T = tokens, D = hidden, H = heads, L = kv_lora_rank (the latent),
R = qk_rope_head_dim, N = qk_nope_head_dim, V = v_head_dim, E = routed experts, k = top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from shared.checkpoint import HFConfig, WeightSpec
from shared.layers import (
    CausalLM,
    DecoderLayer,
    DenseMLP,
    MoE,
    QuantLinear,
    RMSNorm,
    Rotary,
    RoutedExperts,
    causal_attention,
    dense_weight,
    linear,
    linears,
    rope_parameters,
    set_linear,
    suffix_causal_mask,
    suffix_causal_sdpa,
    yarn_mscale,
)

MODEL_TYPES = ("deepseek_v3",)
ARCHITECTURES = ("DeepseekV3ForCausalLM",)


@dataclass(frozen=True)
class Args:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    first_k_dense_replace: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    rms_norm_eps: float
    rope: dict
    rope_interleave: bool
    tie_word_embeddings: bool

    @classmethod
    def from_config(cls, cfg: HFConfig) -> Args:
        """Read and validate the fields of config.json."""
        if cfg.get("scoring_func", "sigmoid") != "sigmoid":
            raise cfg.fail(f"scoring_func {cfg.get('scoring_func')!r} is not supported (DeepSeek-V3 uses sigmoid)")
        if cfg.get("hidden_act", "silu") != "silu":
            raise cfg.fail(f"hidden_act {cfg.get('hidden_act')!r} is not supported (expected silu)")
        if cfg.get("attention_bias", False):
            raise cfg.fail("attention_bias = true is not supported")
        args = cls(
            vocab_size=cfg.positive("vocab_size"),
            hidden_size=cfg.positive("hidden_size"),
            intermediate_size=cfg.positive("intermediate_size"),
            moe_intermediate_size=cfg.positive("moe_intermediate_size"),
            num_hidden_layers=cfg.positive("num_hidden_layers"),
            num_attention_heads=cfg.positive("num_attention_heads"),
            q_lora_rank=cfg.get("q_lora_rank", None, int),
            kv_lora_rank=cfg.positive("kv_lora_rank"),
            qk_nope_head_dim=cfg.positive("qk_nope_head_dim"),
            qk_rope_head_dim=cfg.positive("qk_rope_head_dim"),
            v_head_dim=cfg.positive("v_head_dim"),
            n_routed_experts=cfg.positive("n_routed_experts"),
            n_shared_experts=cfg.get("n_shared_experts", 0, int),
            num_experts_per_tok=cfg.positive("num_experts_per_tok"),
            n_group=cfg.get("n_group", 1, int),
            topk_group=cfg.get("topk_group", 1, int),
            first_k_dense_replace=cfg.get("first_k_dense_replace", 0, int),
            norm_topk_prob=cfg.get("norm_topk_prob", True, bool),
            routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0, (int, float))),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6, (int, float))),
            rope=rope_parameters(cfg),
            rope_interleave=cfg.get("rope_interleave", True, bool),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False, bool),
        )
        if args.n_routed_experts % args.n_group:
            raise cfg.fail(f"n_routed_experts={args.n_routed_experts} is not a multiple of n_group={args.n_group}")
        if not 1 <= args.topk_group <= args.n_group:
            raise cfg.fail(f"topk_group={args.topk_group} must lie in [1, n_group={args.n_group}]")
        per_group = args.n_routed_experts // args.n_group
        if args.num_experts_per_tok > args.topk_group * per_group:
            raise cfg.fail(f"num_experts_per_tok={args.num_experts_per_tok} exceeds the experts of "
                           f"topk_group={args.topk_group} groups")
        return args

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace


def args_from_config(cfg: HFConfig) -> Args:
    return Args.from_config(cfg)


def weight_specs(a: Args) -> list[WeightSpec]:
    D, H, E = a.hidden_size, a.num_attention_heads, a.n_routed_experts
    specs = [WeightSpec("model.embed_tokens.weight", (a.vocab_size, D), "embed", "vocab_size, hidden_size")]
    for i in range(a.num_hidden_layers):
        p = f"model.layers.{i}"
        specs += [WeightSpec(f"{p}.input_layernorm.weight", (D,), "vector", "hidden_size"),
                  WeightSpec(f"{p}.post_attention_layernorm.weight", (D,), "vector", "hidden_size")]
        s = f"{p}.self_attn"
        if a.q_lora_rank is None:
            specs.append(WeightSpec(f"{s}.q_proj", (H * a.qk_head_dim, D), "linear",
                                    "num_attention_heads * (qk_nope_head_dim + qk_rope_head_dim), hidden_size"))
        else:
            specs += [
                WeightSpec(f"{s}.q_a_proj", (a.q_lora_rank, D), "linear", "q_lora_rank, hidden_size"),
                WeightSpec(f"{s}.q_a_layernorm.weight", (a.q_lora_rank,), "vector", "q_lora_rank"),
                WeightSpec(f"{s}.q_b_proj", (H * a.qk_head_dim, a.q_lora_rank), "linear",
                           "num_attention_heads * (qk_nope_head_dim + qk_rope_head_dim), q_lora_rank"),
            ]
        specs += [
            WeightSpec(f"{s}.kv_a_proj_with_mqa", (a.kv_lora_rank + a.qk_rope_head_dim, D), "linear",
                       "kv_lora_rank + qk_rope_head_dim, hidden_size"),
            WeightSpec(f"{s}.kv_a_layernorm.weight", (a.kv_lora_rank,), "vector", "kv_lora_rank"),
            WeightSpec(f"{s}.kv_b_proj", (H * (a.qk_nope_head_dim + a.v_head_dim), a.kv_lora_rank), "linear",
                       "num_attention_heads * (qk_nope_head_dim + v_head_dim), kv_lora_rank"),
            WeightSpec(f"{s}.o_proj", (D, H * a.v_head_dim), "linear", "hidden_size, num_attention_heads * v_head_dim"),
        ]
        m = f"{p}.mlp"
        if not a.is_moe(i):
            specs += _mlp_specs(m, a.intermediate_size, D, "intermediate_size")
            continue
        I = a.moe_intermediate_size
        ex = "n_routed_experts, moe_intermediate_size, hidden_size"
        specs += [
            WeightSpec(f"{m}.gate", (E, D), "router", "n_routed_experts, hidden_size"),
            WeightSpec(f"{m}.gate.e_score_correction_bias", (E,), "bias", "n_routed_experts"),
            WeightSpec(m + ".experts.{e}.gate_proj", (E, I, D), "experts", ex),
            WeightSpec(m + ".experts.{e}.up_proj", (E, I, D), "experts", ex),
            WeightSpec(m + ".experts.{e}.down_proj", (E, D, I), "experts",
                       "n_routed_experts, hidden_size, moe_intermediate_size"),
        ]
        if a.n_shared_experts:
            specs += _mlp_specs(f"{m}.shared_experts", I * a.n_shared_experts, D,
                                "moe_intermediate_size * n_shared_experts")
    specs.append(WeightSpec("model.norm.weight", (D,), "vector", "hidden_size"))
    if not a.tie_word_embeddings:
        specs.append(WeightSpec("lm_head", (a.vocab_size, D), "router", "vocab_size, hidden_size"))
    return specs


def _mlp_specs(prefix: str, inter: int, hidden: int, field: str) -> list[WeightSpec]:
    return [WeightSpec(f"{prefix}.gate_proj", (inter, hidden), "linear", f"{field}, hidden_size"),
            WeightSpec(f"{prefix}.up_proj", (inter, hidden), "linear", f"{field}, hidden_size"),
            WeightSpec(f"{prefix}.down_proj", (hidden, inter), "linear", f"hidden_size, {field}")]


class MLAttention(nn.Module):
    """Multi-head latent attention. The full-sequence form expands the latent into per-head K/V;
    the decode engine uses the absorbed form over the cached latent instead."""

    def __init__(self, a: Args, w: dict, prefix: str, rotary: Rotary) -> None:
        super().__init__()
        self.a, self.rotary = a, rotary
        get = lambda n: w[f"{prefix}.{n}"]  # noqa: E731
        if a.q_lora_rank is None:
            set_linear(self, "q_proj", get("q_proj"))
            self.q_a_proj = self.q_a_norm = None
        else:
            set_linear(self, "q_a_proj", get("q_a_proj"))
            self.q_a_norm = RMSNorm(get("q_a_layernorm.weight"), 1e-6)
            set_linear(self, "q_b_proj", get("q_b_proj"))
        set_linear(self, "kv_a_proj", get("kv_a_proj_with_mqa"))
        self.kv_a_norm = RMSNorm(get("kv_a_layernorm.weight"), 1e-6)
        set_linear(self, "kv_b_proj", get("kv_b_proj"))
        set_linear(self, "o_proj", get("o_proj"))
        self._absorbed: tuple | None = None  # see absorbed_weights
        self.scale = a.qk_head_dim**-0.5
        if a.rope["rope_type"] != "default" and a.rope.get("mscale_all_dim"):
            self.scale *= yarn_mscale(float(a.rope["factor"]), float(a.rope["mscale_all_dim"])) ** 2

    def query_latent(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> q [B, T, H, N + R], the normalised latent [B, T, L] and the rope key
        [B, T, R] (rope not yet applied; the latent and rope key are what the KV cache stores per
        token). The two projections of x (q_a or q, and kv_a) go to the linear together: decode's
        kernel GEMV reads x once for both."""
        q_in = self.q_proj if self.q_a_proj is None else self.q_a_proj
        q, kv = linears(x, (q_in, self.kv_a_proj))
        if self.q_a_proj is not None:
            q = linear(self.q_a_norm(q), self.q_b_proj)
        latent, k_rope = kv.split([self.a.kv_lora_rank, self.a.qk_rope_head_dim], dim=-1)
        return q.unflatten(-1, (self.a.num_attention_heads, self.a.qk_head_dim)), self.kv_a_norm(latent), k_rope

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        a = self.a
        B, T, _ = x.shape
        q, latent, k_rope = self.query_latent(x)
        q_nope, q_rope = q.transpose(1, 2).split([a.qk_nope_head_dim, a.qk_rope_head_dim], dim=-1)  # [B, H, T, *]
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        q_rope = self.rotary.apply(q_rope, cos, sin)
        k_rope = self.rotary.apply(k_rope.unsqueeze(1), cos, sin)  # [B, 1, T, R]
        kv = F.linear(latent, dense_weight(self.kv_b_proj, latent.dtype))
        kv = kv.unflatten(-1, (a.num_attention_heads, -1)).transpose(1, 2)
        k_nope, v = kv.split([a.qk_nope_head_dim, a.v_head_dim], dim=-1)  # [B, H, T, N], [B, H, T, V]
        k = torch.cat((k_nope, k_rope.expand(-1, a.num_attention_heads, -1, -1)), dim=-1)
        out = causal_attention(torch.cat((q_nope, q_rope), dim=-1), k, v, self.scale)
        return linear(out, self.o_proj)

    # The cached form the engines use. A token's cache entry is the normalised latent and the
    # rope key, rope applied: kv_lora_rank + qk_rope_head_dim values, not per-head K/V.

    @property
    def kv_width(self) -> int:
        return self.a.kv_lora_rank + self.a.qk_rope_head_dim

    def project(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D], positions [N] -> queries [N, H, N + R] (rope applied), entries [N, kv_width]."""
        a = self.a
        q, latent, k_rope = self.query_latent(x)
        q_nope, q_rope = q.split([a.qk_nope_head_dim, a.qk_rope_head_dim], dim=-1)
        cos, sin = self.rotary.cos_sin(positions.unsqueeze(0), x.dtype)
        q_rope = self.rotary.apply(q_rope.transpose(0, 1).unsqueeze(0), cos, sin)[0].transpose(0, 1)
        k_rope = self.rotary.apply(k_rope.unsqueeze(0).unsqueeze(0), cos, sin)[0, 0]
        return torch.cat((q_nope, q_rope), dim=-1), torch.cat((latent, k_rope), dim=-1)

    def attend(self, q: torch.Tensor, kv: torch.Tensor, absorbed: bool = False) -> torch.Tensor:
        """One sequence: q [T, H, N + R] for its last T tokens, kv [L, kv_width] -> [T, H * V].

        ``absorbed`` (decode): W_UK is folded into the query and W_UV applied after the weighted
        sum, so attention runs over the L cached latents directly, with no per-head K/V expanded.
        Otherwise (prefill) the latents are expanded through kv_b_proj into per-head K and V."""
        a = self.a
        H, L = a.num_attention_heads, kv.shape[0]
        latent, k_rope = kv.split([a.kv_lora_rank, a.qk_rope_head_dim], dim=-1)
        q_nope, q_rope = q.split([a.qk_nope_head_dim, a.qk_rope_head_dim], dim=-1)
        if not absorbed:
            kvb = F.linear(latent, dense_weight(self.kv_b_proj, latent.dtype))
            kvb = kvb.view(L, H, -1).transpose(0, 1)  # [H, L, N + V]
            k_nope, v = kvb.split([a.qk_nope_head_dim, a.v_head_dim], dim=-1)
            k = torch.cat((k_nope, k_rope.expand(H, L, -1)), dim=-1)
            return suffix_causal_sdpa(q.transpose(0, 1), k, v, self.scale).transpose(0, 1).flatten(1)
        mask = suffix_causal_mask(q.shape[0], L, q.device)
        w_uk, w_uv = self.absorbed_weights()  # [H, N, C], [H, V, C]
        dt = w_uk.dtype  # (fp32 on the CPU: see absorbed_weights)
        latent, k_rope, q_rope = latent.to(dt), k_rope.to(dt), q_rope.to(dt)
        q_lat = torch.bmm(q_nope.transpose(0, 1).to(dt), w_uk).transpose(0, 1)  # [T, H, C]
        scores = (torch.einsum("thc,lc->thl", q_lat, latent) + torch.einsum("thr,lr->thl", q_rope, k_rope)).float()
        scores = scores * self.scale
        if mask is not None:
            scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
        o_lat = torch.einsum("thl,lc->thc", scores.softmax(dim=-1).to(dt), latent)
        o = torch.bmm(o_lat.transpose(0, 1), w_uv.transpose(1, 2))  # [H, T, V]
        return o.transpose(0, 1).to(q.dtype).flatten(1)

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, N, C] and W_UV [H, V, C] of kv_b_proj for the absorbed form: views of it, or,
        for a CPU weight narrower than fp32, fp32 copies made once (this layer then holds kv_b_proj
        twice, 2x its bf16 size in fp32: 67 MB at DeepSeek-V3's shapes), and the absorbed form then
        computes in fp32. torch's CPU bmm at one token ran 3x slower in bf16 than in fp32 there
        (both products: 8.8 against 2.8 ms a layer), and the einsums over the strided views copied
        both each call. A quantized kv_b_proj (FP8) is dequantized into the fp32 copies: 4x the
        checkpoint's bytes, which decode then reads a step (67 against 17 MB a DeepSeek-V3 layer)."""
        w = self.kv_b_proj
        d = w.data if isinstance(w, QuantLinear) else w
        key = (d.data_ptr(), d.device, d.dtype)
        if self._absorbed is None or self._absorbed[0] != key:
            a = self.a
            copy = isinstance(w, QuantLinear) or (w.device.type == "cpu" and w.dtype != torch.float32)
            heads, width = a.num_attention_heads, a.qk_nope_head_dim + a.v_head_dim
            v = (dense_weight(w, torch.float32).float() if copy else w).view(heads, width, a.kv_lora_rank)
            w_uk, w_uv = v.split([a.qk_nope_head_dim, a.v_head_dim], dim=1)
            self._absorbed = (key, *((w_uk.contiguous(), w_uv.contiguous()) if copy else (w_uk, w_uv)))
        return self._absorbed[1], self._absorbed[2]

    def output(self, o: torch.Tensor) -> torch.Tensor:
        return linear(o, self.o_proj)


class GroupLimitedRouter(nn.Module):
    """Sigmoid scores; experts chosen by score + correction bias within the ``topk_group`` groups
    whose two best experts score highest; weights from the uncorrected scores."""

    def __init__(self, a: Args, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.a = a
        # [E, D], kept in fp32: the scores are computed in fp32, as transformers does, and
        # converting the 256 x 7168 gate on every call wrote 7.3 MB a layer per decode step
        self.register_buffer("weight", weight.float())
        self.register_buffer("bias", bias)  # [E] fp32

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> expert ids [T, k] (int64), weights [T, k] (float32)."""
        a = self.a
        scores = F.linear(x.float(), self.weight).sigmoid()  # [T, E]
        choice = scores + self.bias
        if a.n_group > 1:
            groups = choice.unflatten(-1, (a.n_group, -1))  # [T, G, E/G]
            group_score = groups.topk(2, dim=-1).values.sum(-1) if groups.shape[-1] > 1 else groups[..., 0]
            keep = torch.zeros_like(group_score, dtype=torch.bool)
            keep.scatter_(1, group_score.topk(a.topk_group, dim=-1).indices, True)
            choice = groups.masked_fill(~keep.unsqueeze(-1), float("-inf")).flatten(1)
        ids = choice.topk(a.num_experts_per_tok, dim=-1).indices
        weights = scores.gather(1, ids)
        if a.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, weights * a.routed_scaling_factor


def build(a: Args, w: dict) -> CausalLM:
    rotary = Rotary(a.rope, a.qk_rope_head_dim, interleaved=a.rope_interleave)
    layers = []
    for i in range(a.num_hidden_layers):
        p = f"model.layers.{i}"
        m = f"{p}.mlp"
        if a.is_moe(i):
            experts = RoutedExperts(*(w[m + ".experts.{e}." + n] for n in ("gate_proj", "up_proj", "down_proj")))
            shared = _mlp(w, f"{m}.shared_experts") if a.n_shared_experts else None
            router = GroupLimitedRouter(a, w[f"{m}.gate"], w[f"{m}.gate.e_score_correction_bias"])
            ffn: nn.Module = MoE(router, experts, shared)
        else:
            ffn = _mlp(w, m)
        layers.append(DecoderLayer(
            MLAttention(a, w, f"{p}.self_attn", rotary), ffn,
            RMSNorm(w[f"{p}.input_layernorm.weight"], a.rms_norm_eps),
            RMSNorm(w[f"{p}.post_attention_layernorm.weight"], a.rms_norm_eps),
        ))
    embed = w["model.embed_tokens.weight"]
    lm_head = embed if a.tie_word_embeddings else w["lm_head"]
    return CausalLM(embed, layers, RMSNorm(w["model.norm.weight"], a.rms_norm_eps), lm_head, a)


def _mlp(w: dict, prefix: str) -> DenseMLP:
    return DenseMLP(w[f"{prefix}.gate_proj"], w[f"{prefix}.up_proj"], w[f"{prefix}.down_proj"])
