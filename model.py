"""LLaMA-2/3, Mistral, Qwen2 and Gemma-2 in plain PyTorch, with the deep supervision of DFT next to the forward pass.

Loads and writes the official Hugging Face layout (config.json + safetensors, sharded or not) and the tokenizer the
checkpoint ships: SentencePiece `tokenizer.model` (LLaMA-2, Mistral, Gemma-2) or byte-level BPE `tokenizer.json`
(LLaMA-3, Qwen2). One module serves inference (`forward`, KV cache), training (`hidden_at` + the chunked losses of
dsft_loss.py, driven by `dft_step`) and the logit lens (`head_logits`). The families differ only in config fields.

Shape legend: B batch, T time (new tokens), S time of the keys (cache + new), D model dim, H query heads,
K key/value heads, G = H // K, E head dim, F MLP hidden dim, V vocab.

Layer convention (the likeliest off-by-one, tested against transformers): `hidden_at(tokens, k)` is the residual
stream after k blocks (1-based), before the final norm; k = n_layers is the last block's output.

    python model.py --make-tiny models/tiny-llama --family llama    # a tiny random checkpoint for demos and tests
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import sentencepiece as spm
import tokenizers
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from dsft_loss import IGNORE_INDEX, feature_cosine_loss, logit_lens_ce


class CheckpointError(ValueError):
    """A problem with a checkpoint a user handed us; the message is one line naming file, field and fix."""


# ---------------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------------

# model_type in config.json -> the checkpoints it covers.
FAMILIES = {"llama": "LLaMA-2, LLaMA-3.x", "mistral": "Mistral", "qwen2": "Qwen2, Qwen2.5", "gemma2": "Gemma-2"}
# LLaMA-3.x's RoPE frequency rescaling, as rope_type "llama3" names its parameters in config.json.
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def rope_settings(cfg: dict, model_type: str, source: str) -> tuple[float, dict | None]:
    """(theta, LLaMA-3 scaling or None) from either spelling the Hub's config.json files use: the older top-level
    `rope_theta` + `rope_scaling` most released files have, or transformers' newer `rope_parameters`. A non-null
    rope_scaling wins, as in transformers."""
    where = "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"
    rope = cfg.get(where) or {}
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise CheckpointError(f"{source}: partial_rotary_factor={partial!r} is not supported; RoPE here rotates "
                              "the whole head (1.0)")
    rope_type = rope.get("rope_type", rope.get("type", "default"))      # files before transformers 4.45 say "type"
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3" or model_type != "llama":
        raise CheckpointError(f"{source}: {where}.rope_type={rope_type!r} is not supported for model_type="
                              f"{model_type!r}; implemented: 'default' (plain RoPE) and, for LLaMA-3.x, 'llama3'")
    missing = [key for key in LLAMA3_ROPE_KEYS if key not in rope]
    if missing:
        raise CheckpointError(f"{source}: {where} has rope_type 'llama3' but no {', '.join(missing)}; "
                              "re-download config.json")
    scaling = {key: rope[key] for key in LLAMA3_ROPE_KEYS}
    if not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise CheckpointError(f"{source}: {where}.high_freq_factor={scaling['high_freq_factor']} must exceed "
                              f"low_freq_factor={scaling['low_freq_factor']} (LLaMA-3.1: 4.0 and 1.0)")
    return theta, scaling


@dataclass
class ModelArgs:
    family: str = "llama"                 # config.json's model_type, a key of FAMILIES
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    head_dim: int = 128                   # read from config.json when given: Gemma-2-2B has 256 != 2304 / 8
    hidden_dim: int = 11008               # MLP inner width
    vocab_size: int = 32000
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None      # LLaMA-3.x: the LLAMA3_ROPE_KEYS of its rope_type "llama3"
    max_seq_len: int = 4096
    tie_embeddings: bool = False          # Gemma-2, LLaMA-3.2-1B/3B, small Qwen2.5: the head is the input embedding
    # Family differences are fields, not subclasses (None = the part does not exist):
    qkv_bias: bool = False                # Qwen2: biases on the query, key and value projections
    norm_offset: float = 0.0              # Gemma-2 norms scale by (1 + weight)
    mlp_act: str = "silu"                 # "silu" (SwiGLU) | "gelu_tanh" (GeGLU)
    embed_scale: float | None = None      # Gemma-2 multiplies embeddings by sqrt(dim)
    sandwich_norm: bool = False           # Gemma-2: extra norms after attention and after the MLP
    query_scale: float | None = None      # None -> head_dim ** -0.5; Gemma-2: query_pre_attn_scalar ** -0.5
    attn_softcap: float | None = None     # Gemma-2: tanh cap on attention scores, before the mask
    final_softcap: float | None = None    # Gemma-2: tanh cap on the output logits
    # Sliding-window attention on the layers marked in sliding_layers (Gemma-2: every other layer; Mistral: all).
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = ()
    bos_id: int | None = 1                # config.json's bos_token_id; whether a BOS is added is the Tokenizer's
    eos_id: int = 2
    torch_dtype: str | None = None        # the checkpoint's storage dtype, used when we export
    hf_config: dict = field(default_factory=dict, repr=False)   # config.json as read, written back unchanged

    @classmethod
    def from_hf_config(cls, cfg: dict, source: str = "config.json") -> "ModelArgs":
        def need(key):
            if key not in cfg:
                raise CheckpointError(f"{source}: field {key!r} is missing; this is not a complete HF config.json")
            return cfg[key]

        def refuse(key, why):
            raise CheckpointError(f"{source}: {key}={cfg[key]!r} is not supported; {why}")

        model_type = cfg.get("model_type")
        if model_type not in FAMILIES:
            known = ", ".join(f"{name!r} ({models})" for name, models in FAMILIES.items())
            raise CheckpointError(f"{source}: model_type={model_type!r}; expected one of {known}")
        # Qwen2 has its q/k/v biases whatever the file says; LLaMA's attention_bias would add one on o_proj too.
        for key in ("mlp_bias", "use_bidirectional_attention") + (("attention_bias",) if model_type != "qwen2" else ()):
            if cfg.get(key):
                refuse(key, "expected false or absent")
        if model_type == "qwen2" and cfg.get("use_sliding_window"):
            refuse("use_sliding_window", "released Qwen2/Qwen2.5 checkpoints set it false; their sliding window "
                                         "is not implemented here")
        rope_theta, rope_scaling = rope_settings(cfg, model_type, source)
        n_heads = need("num_attention_heads")
        args = dict(
            family=model_type,
            dim=need("hidden_size"), n_layers=need("num_hidden_layers"), n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or need("hidden_size") // n_heads,
            hidden_dim=need("intermediate_size"), vocab_size=need("vocab_size"),
            norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=rope_theta, rope_scaling=rope_scaling,
            max_seq_len=cfg.get("max_position_embeddings", 4096),
            bos_id=cfg.get("bos_token_id", 1), eos_id=cfg.get("eos_token_id", 2),
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"), hf_config=dict(cfg),
        )
        act = cfg.get("hidden_activation") or cfg.get("hidden_act")
        n = args["n_layers"]
        if model_type != "gemma2":
            if act != "silu":
                raise CheckpointError(f"{source}: hidden_act={act!r}; model_type {model_type!r} uses 'silu'")
            args.update(tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), qkv_bias=model_type == "qwen2")
            if model_type == "mistral" and cfg.get("sliding_window"):
                args.update(sliding_window=cfg["sliding_window"], sliding_layers=(True,) * n)
        else:
            if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
                raise CheckpointError(f"{source}: hidden_activation={act!r}; Gemma-2 uses 'gelu_pytorch_tanh'")
            # Gemma-2 alternates: layers 0, 2, 4, ... (0-based) use the sliding window, unless layer_types says otherwise.
            types = cfg.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
            if len(types) != n or set(types) - {"sliding_attention", "full_attention"}:
                raise CheckpointError(f"{source}: layer_types={types!r}; expected {n} entries of "
                                      "'sliding_attention' / 'full_attention'")
            args.update(
                tie_embeddings=bool(cfg.get("tie_word_embeddings", True)), norm_offset=1.0, mlp_act="gelu_tanh",
                embed_scale=args["dim"] ** 0.5, sandwich_norm=True,
                query_scale=need("query_pre_attn_scalar") ** -0.5,
                attn_softcap=cfg.get("attn_logit_softcapping"), final_softcap=cfg.get("final_logit_softcapping"),
                sliding_window=cfg.get("sliding_window"),
                sliding_layers=tuple(t == "sliding_attention" for t in types),
            )
        if isinstance(args["eos_id"], list):        # LLaMA-3.1-Instruct, Qwen2.5-Instruct: every id that ends a turn
            args["eos_id"] = args["eos_id"][0]
        return cls(**args)



# ---------------------------------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------------------------------

def rope_inv_freq(args: ModelArgs, device=None) -> torch.Tensor:
    """RoPE's E/2 frequencies (radians per position). LLaMA-3.x's "llama3" scaling stretches the wavelengths that
    are long against its pre-training context by `factor`, keeps the short ones, and blends the band between."""
    # fp32: RoPE tables.
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2, device=device).float() / args.head_dim))
    if args.rope_scaling is None:
        return inv_freq
    s = args.rope_scaling
    wavelength = 2 * math.pi / inv_freq
    # How far each wavelength fits into the original context, mapped to a weight: 1 at or below
    # context / high_freq_factor (kept), 0 at or above context / low_freq_factor (divided by factor).
    kept = (s["original_max_position_embeddings"] / wavelength - s["low_freq_factor"]) / (
        s["high_freq_factor"] - s["low_freq_factor"])
    kept = kept.clamp(0.0, 1.0)
    return (1 - kept) * inv_freq / s["factor"] + kept * inv_freq


def rope_cos_sin(positions: torch.Tensor, args: ModelArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, E] for integer positions [B, T], in the HF half-split layout (no q/k permutation on load)."""
    # fp32: RoPE tables; computed on the fly, so there is no buffer for to_empty() to leave as garbage.
    angles = positions.float()[..., None] * rope_inv_freq(args, positions.device)      # [B, T, E/2]
    angles = torch.cat([angles, angles], dim=-1)                                        # [B, T, E]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, n, T, E] by the angles of its positions; the two halves of E are the (real, imag) parts."""
    # fp32: the rotation, as in the reference llama, so bf16 positions far apart stay distinguishable.
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos[:, None] + rotated * sin[:, None]).type_as(x)


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if cap is None else cap * torch.tanh(x / cap)


def attention_rule(start: int, q_pos, k_pos, k_valid, window: int | None):
    """may_attend(b, h, q, s): may query q (the q-th of this call's T queries, sequence index start + q) see key s
    (of all S keys)? Causal in sequence order, real keys only (k_valid [B, S]), and for sliding layers only keys
    fewer than `window` positions back (q_pos [B, T], k_pos [B, S]). Every query also sees itself, so a padding row
    never softmaxes an empty set into NaN (its output is never read). One rule for both attentions: flex_attention
    calls it per index as its mask_mod (h unused), attention_mask_4d evaluates it on broadcast index grids."""
    def may_attend(b, h, q, s):
        allowed = (s <= start + q) & k_valid[b, s]
        if window is not None:
            allowed = allowed & (q_pos[b, q] - k_pos[b, s] < window)
        return allowed | (s == start + q)
    return may_attend


def attention_mask_4d(may_attend, B: int, H: int | None, T: int, S: int, device) -> torch.Tensor:
    """The rule as a boolean mask [B, 1, T, S] for the reference attention; called as create_block_mask is."""
    b = torch.arange(B, device=device)[:, None, None, None]
    q = torch.arange(T, device=device)[:, None]
    return may_attend(b, H, q, torch.arange(S, device=device))


def is_right_padded(*masks: torch.Tensor) -> bool:
    """Is every row of every [B, T] mask its real tokens followed by padding? One host-device sync for all."""
    return bool(torch.stack([(m[:, 1:] <= m[:, :-1]).all() for m in masks]).all())


@functools.cache
def compiled_flex_attention():
    """flex_attention's fused kernels exist only under torch.compile: one compiled copy per process, made on first
    use (compiling at import would add seconds to every start-up)."""
    return torch.compile(flex_attention)


# ---------------------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.eps = args.norm_eps
        self.offset = args.norm_offset
        self.weight = nn.Parameter(torch.empty(args.dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32: norm statistics and scale (Gemma-2 applies its (1 + w) in fp32 too).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (self.offset + self.weight.float())).type_as(x)


class KVCache:
    """Keys and values of every layer for greedy decoding: k[l], v[l] are [B, K, max_len, E]; `length` filled."""

    def __init__(self, args: ModelArgs, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, args.n_kv_heads, max_len, args.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.length = 0


@dataclass
class SharedPrefix:
    """The keys and values of a prompt that several sequences of an example begin with (DFT's x_tgt), as one pass
    computed them: kv[l] = (k [B, K, Tp, E], v [B, Tp, K*E]) as block l returned them; row b's prompt is its first
    lengths[b] positions. Sequences that continue the prompt run only their own tokens and attend to these
    (differentiably, so their losses still reach the prompt's states)."""
    kv: list
    lengths: torch.Tensor    # [B]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.scale = args.query_scale if args.query_scale is not None else args.head_dim ** -0.5
        self.softcap = args.attn_softcap
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, mask, kv_slot=None, start=0, past=None):
        """-> (output [B, T, D], this call's own keys [B, K, T, E] and values [B, T, K*E]). mask: None (causal:
        SDPA's fused kernels), a flex_attention BlockMask, or a boolean [B, 1, T, S] (the reference attention).
        kv_slot: a decoding cache written in place at [start, start + T); past: keys and values, as returned here,
        to attend to before these tokens (differentiable)."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)       # [B, H, T, E]
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)    # [B, K, T, E]
        # The values leave the block as the projection wrote them, not as a view of it: FSDP2 hooks its
        # pre-backward unshard on a block's outputs and warns about views (an in-place op on one drops the hook).
        # A Linear with a bias (Qwen2) returns a view of its 2-D result, so its bias is added apart.
        v = self.wv(x) if self.wv.bias is None else F.linear(x, self.wv.weight) + self.wv.bias   # [B, T, K*E]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        own = (k, v)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=1)
        v = v.view(B, -1, self.n_kv_heads, self.head_dim).transpose(1, 2)           # [B, K, S, E]
        if kv_slot is not None:
            cache_k, cache_v = kv_slot
            cache_k[:, :, start:start + T] = k
            cache_v[:, :, start:start + T] = v
            k, v = cache_k[:, :, :start + T], cache_v[:, :, :start + T]               # [B, K, S, E]

        if isinstance(mask, BlockMask):
            # Inside a compiled block dynamo compiles flex_attention itself; on CPU it runs unfused (tests).
            flex = compiled_flex_attention() if q.is_cuda and not torch.compiler.is_compiling() else flex_attention
            # fp32: flex's scores, its score_mod (Gemma-2's softcap, before the mask) and softmax.
            out = flex(q, k, v, score_mod=self.capped_score if self.softcap is not None else None,
                       block_mask=mask, scale=self.scale, enable_gqa=True)
        elif self.softcap is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                 scale=self.scale, enable_gqa=True)
        else:
            # Gemma-2 caps the scores before the mask, which SDPA cannot express: attend by hand, grouped so
            # that the K key/value heads serve their G query heads without being copied.
            G = self.n_heads // self.n_kv_heads
            qg = q.view(B, self.n_kv_heads, G, T, self.head_dim)                       # [B, K, G, T, E]
            scores = (qg @ k[:, :, None].transpose(-1, -2)).float() * self.scale        # [B, K, G, T, S]
            # fp32: score softcap and softmax.
            scores = softcap(scores, self.softcap)
            scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
            out = (scores.softmax(-1).type_as(v) @ v[:, :, None]).view(B, self.n_heads, T, self.head_dim)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1)), own

    def capped_score(self, score, b, h, q, s):
        """flex_attention's score_mod for Gemma-2 (the indices are unused)."""
        return softcap(score, self.softcap)


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)); SwiGLU for LLaMA-2, GeGLU with tanh-GELU for Gemma-2."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w_gate = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w_up = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w_down = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.act = F.silu if args.mlp_act == "silu" else functools.partial(F.gelu, approximate="tanh")

    def forward(self, x):
        return self.w_down(self.act(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = MLP(args)
        self.attn_norm = RMSNorm(args)
        self.ffn_norm = RMSNorm(args)
        self.attn_post_norm = RMSNorm(args) if args.sandwich_norm else None
        self.ffn_post_norm = RMSNorm(args) if args.sandwich_norm else None
        self.sliding = bool(args.sliding_layers and args.sliding_layers[layer_id])

    def forward(self, x, cos, sin, masks, kv_slot=None, start=0, past=None):
        """-> (x after the block, the attention's keys and values of these tokens)."""
        mask = masks[1] if self.sliding else masks[0]
        h, kv = self.attention(self.attn_norm(x), cos, sin, mask, kv_slot, start, past)
        if self.attn_post_norm is not None:
            h = self.attn_post_norm(h)
        x = x + h
        h = self.feed_forward(self.ffn_norm(x))
        if self.ffn_post_norm is not None:
            h = self.ffn_post_norm(h)
        return x + h, kv


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args)
        self.output = None if args.tie_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        # Attention where a mask is needed (padding other than on the right, Gemma-2's softcap and window, prefix
        # sharing): True flex_attention, False the reference (SDPA with a boolean mask, by hand under a softcap);
        # None: flex on CUDA, the reference elsewhere. Decoding with a cache always takes the reference.
        self.use_flex: bool | None = None

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None):
        """Random init for from-scratch tiny models (real runs load weights); separate from __init__ so that a
        meta-device build allocates nothing."""
        device = generator.device if generator is not None else None     # None: each parameter's own device
        for name, p in self.named_parameters():
            noise = torch.randn(p.shape, generator=generator, device=device or p.device)
            if name.endswith("norm.weight"):
                p.copy_(1.0 - self.args.norm_offset + 0.1 * noise)
            else:
                p.copy_(0.02 * noise)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    # --- the forward pass ----------------------------------------------------------------------------------------

    def _run(self, tokens, layers: tuple[int, ...], attention_mask=None, cache: KVCache | None = None,
             prefix: SharedPrefix | None = None, record_kv: list | None = None):
        """Run blocks 1..max(layers) and return the residual stream after each block in `layers`. With `prefix`,
        `tokens` continue each row's shared prompt; `record_kv` collects every block's keys and values."""
        B, T = tokens.shape
        device = tokens.device
        n_run = max(layers)
        if min(layers) < 0 or n_run > self.args.n_layers:
            raise ValueError(f"layers={layers}: expected block counts in 0..{self.args.n_layers}")
        start = cache.length if cache is not None else 0
        mask = attention_mask.bool() if attention_mask is not None else torch.ones(B, start + T, dtype=torch.bool,
                                                                                     device=device)
        # Positions count real tokens only, so a left- or right-padded row gets the positions it has alone.
        k_pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        k_valid = mask
        if prefix is not None:           # keys: row b's prompt (positions 0..P_b-1), then these tokens from P_b on
            Tp = prefix.kv[0][0].shape[2]
            prompt_pos = torch.arange(Tp, device=device).expand(B, -1)
            k_pos = torch.cat([prompt_pos, prefix.lengths[:, None] + k_pos], dim=1)
            k_valid = torch.cat([prompt_pos < prefix.lengths[:, None], mask], dim=1)
            start = Tp
        q_pos = k_pos[:, start:]
        window = self.args.sliding_window

        if (cache is None and prefix is None and self.args.attn_softcap is None and not window
                and (attention_mask is None or is_right_padded(mask))):
            # Causal alone will do: a right-padded row's pads come after its real tokens, so no real token sees
            # them, and nothing reads the pads' own outputs. Without a mask SDPA can take its flash kernel. (The
            # padding check costs one host-device sync per pass, not per block.)
            masks = (None, None)
        else:
            flex = cache is None and (self.use_flex if self.use_flex is not None else device.type == "cuda")
            build = create_block_mask if flex else attention_mask_4d
            rule = functools.partial(attention_rule, start, q_pos, k_pos, k_valid)
            S = k_pos.shape[1]
            full = build(rule(None), B, None, T, S, device=device)
            masks = (full, build(rule(window), B, None, T, S, device=device) if window else full)
        cos, sin = rope_cos_sin(q_pos, self.args)

        h = self.tok_embeddings(tokens)                                               # [B, T, D]
        if self.args.embed_scale is not None:
            # Gemma-2 rounds sqrt(dim) to the activation dtype before scaling, as its reference does.
            h = h * torch.tensor(self.args.embed_scale, dtype=h.dtype)
        states = {0: h}                      # only the requested layers are kept (no_grad inference holds no more)
        for i, block in enumerate(self.layers[:n_run]):
            slot = (cache.k[i], cache.v[i]) if cache is not None else None
            h, kv = block(h, cos, sin, masks, slot, start, prefix.kv[i] if prefix is not None else None)
            if i + 1 in layers:
                states[i + 1] = h
            if record_kv is not None:
                record_kv.append(kv)
        if cache is not None:
            cache.length += T
        return tuple(states[k] for k in layers)

    def hidden_at(self, tokens, layers, attention_mask=None):
        """Residual stream after block k (1-based, before the final norm) for k in `layers` (an int -> one tensor
        [B, T, D]; a tuple -> a tuple). Runs only blocks 1..max(layers): what the deep supervision needs."""
        if isinstance(layers, int):
            return self._run(tokens, (layers,), attention_mask)[0]
        return self._run(tokens, tuple(layers), attention_mask)

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """final norm -> head -> final softcap, as fp32 logits [B, T, V]: the model's output at k = n_layers and the
        logit lens at any other layer."""
        # fp32: final logits and their softcap.
        return softcap(F.linear(self.norm(h), self.head_weight).float(), self.args.final_softcap)

    def forward(self, tokens, attention_mask=None, cache: KVCache | None = None, last_only: bool = False):
        """Logits [B, T, V] (fp32) for inference and evaluation; training uses hidden_at + chunked losses.
        last_only: logits of the last position only, [B, 1, V] (a decoding prefill; Gemma-2's V is 256k)."""
        h = self._run(tokens, (self.args.n_layers,), attention_mask, cache)[0]
        return self.head_logits(h[:, -1:] if last_only else h)

    def dft_step(self, batch: dict, mode: str, cfg: DFTConfig, counts: dict) -> dict:
        """One micro-batch of the DFT loss (the module function dft_step below). A method, so that FSDP2
        can register it as a forward method and unshard the root's parameters for it."""
        return dft_step(self, batch, mode, cfg, counts)

    def init_cache(self, batch_size: int, max_len: int) -> KVCache:
        p = self.tok_embeddings.weight
        return KVCache(self.args, batch_size, max_len, p.device, p.dtype)

    # --- checkpoints ----------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu") -> "Transformer":
        """Whole model from an HF checkpoint dir, shard by shard, each tensor assigned in place (no 2x memory)."""
        args = read_args(path)
        with torch.device("meta"):
            model = cls(args)
        state = {}
        for name, tensor in iter_checkpoint(path, model):
            state[name] = tensor.to(device=device, dtype=dtype)
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval()

    def save_pretrained(self, path, max_shard_bytes: int = 5 * 2**30):
        save_pretrained(self, path, max_shard_bytes)


# ---------------------------------------------------------------------------------------------------------------------
# Deep supervision (DFT): losses on inner layers of the model above. S: the paper states it;
# I: our inference where it is silent (a DFTConfig field with that default).
#
#   L = L_TFT + L_LC + L_ET                          (S; I: weighted by lc_weight, et_weight)
#   L_TFT = -log P(y_tgt | x_tgt; blocks 1..N, head)  ordinary fine-tuning                (S)
# Logits-based: the head (final norm (I) + W_out) reads an inner layer, frozen (S: LC, I: ET):
#   L_LC = -log P(x_en | x_tgt; blocks 1..i, head)   on the sequence [x_tgt ; x_en] (I)  (S)
#   L_ET = -log P(y_en | x_tgt; blocks 1..j, head)   on the sequence [x_tgt ; y_en] (I)  (S)
# Feature-based: h_k = residual stream after block k, pooled over the query's content (I):
#   L_LC = 1 - cos(h_i(x_en), h_i(x_tgt))                                                 (S)
#   L_ET = 1 - cos(h_N(x_en), h_j(x_tgt))        h_N(x_en) after the final norm (I)       (S)
# ---------------------------------------------------------------------------------------------------------------------

# sft: English pairs, tft: target-language pairs, both L_TFT alone; the dft modes add LC and ET.
MODES = ("sft", "tft", "dft-logits", "dft-feature")
LOSS_TYPES = ("logits", "feature", "none")


@dataclass
class DFTConfig:
    lc_type: str | None = None        # None: set by the mode; "logits" | "feature" | "none" mixes (the paper allows it)
    et_type: str | None = None
    lc_layer: int | None = None       # 1-based block count i; None: default_layers
    et_layer: int | None = None       # j
    lc_weight: float = 1.0            # the paper's loss is unweighted (I: weights exposed; 0 skips the pass)
    et_weight: float = 1.0
    lc_content_only: bool = True      # (I) LC predicts x_en's instruction+input, not the English template words
    pooling: str = "mean"             # (I) feature losses: mean over the query's content tokens | "last"
    detach_teacher: bool = True       # (I) the English side of a feature loss is a teacher: no gradient
    teacher_norm: bool = True         # (I) the ET teacher h_N(x_en) is the final-norm output, as HF's last hidden state
    chunk_size: int = 1024            # tokens per chunk of the logit-lens cross-entropy
    prefix_share: bool = True         # logits LC/ET: run only the English suffix on the TFT pass's x_tgt keys/values

    def types(self, mode: str) -> tuple[str, str]:
        """The (LC, ET) loss types a mode runs: "logits" | "feature" | "none"."""
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; expected one of {', '.join(MODES)}")
        base = {"sft": "none", "tft": "none", "dft-logits": "logits", "dft-feature": "feature"}[mode]
        lc, et = self.lc_type or base, self.et_type or base
        if mode == "sft" and (lc, et) != ("none", "none"):
            raise ValueError("mode 'sft' trains on English data only: it has no LC/ET losses (drop --lc-type/--et-type)")
        for name, t in (("lc_type", lc), ("et_type", et)):
            if t not in LOSS_TYPES:
                raise ValueError(f"{name}={t!r}; expected one of {', '.join(LOSS_TYPES)}")
        return (lc if self.lc_weight else "none"), (et if self.et_weight else "none")

    def layers(self, args: ModelArgs) -> tuple[int, int]:
        i_default, j_default = default_layers(args.n_layers, args.family)
        i = self.lc_layer if self.lc_layer is not None else i_default
        j = self.et_layer if self.et_layer is not None else j_default
        for name, k in (("lc_layer", i), ("et_layer", j)):
            if not 1 <= k <= args.n_layers:
                raise ValueError(f"{name}={k}: the model has {args.n_layers} blocks; expected 1..{args.n_layers}")
        return i, j


def default_layers(n_layers: int, family: str) -> tuple[int, int]:
    """(i, j) for LC and ET: LLaMA-2-7B (32 blocks) 2 and 15 (the paper's best ET layer; LC where its entropy curve
    says conversion ends), Gemma-2-2B (26) 2 and 12 (I: the same relative depth); other depths scale."""
    ref_depth, ref_j = (26, 12) if family == "gemma2" else (32, 15)
    i = max(1, round(2 * n_layers / ref_depth))
    j = min(n_layers, max(i + 1, round(ref_j * n_layers / ref_depth)))
    return i, j


def lc_labels(batch: dict, cfg: DFTConfig) -> torch.Tensor:
    """LC targets: all of x_en, or (default) only its instruction+input tokens, since the English template words
    also stand in x_tgt and could simply be copied. lc_content is in label space (marks labels, not tokens)."""
    if not cfg.lc_content_only:
        return batch["lc_labels"]
    return batch["lc_labels"].masked_fill(batch["lc_content"] == 0, IGNORE_INDEX)


def count_targets(batch: dict, mode: str, cfg: DFTConfig) -> dict[str, int]:
    """How many targets each loss part has in this micro-batch: supervised tokens for cross-entropy parts, examples
    for feature parts. train.py sums these over an optimizer step on all ranks and hands the totals to dft_step."""
    lc_type, et_type = cfg.types(mode)
    n_examples = batch["tft_tokens"].shape[0]
    counts = {"tft": int((batch["tft_labels"] != IGNORE_INDEX).sum()), "lc": 0, "et": 0}
    if lc_type == "logits":
        counts["lc"] = int((lc_labels(batch, cfg) != IGNORE_INDEX).sum())
    elif lc_type == "feature":
        counts["lc"] = n_examples
    if et_type == "logits":
        counts["et"] = int((batch["et_labels"] != IGNORE_INDEX).sum())
    elif et_type == "feature":
        counts["et"] = n_examples
    return counts


def dft_step(model: Transformer, batch: dict, mode: str, cfg: DFTConfig, counts: dict) -> dict:
    """One micro-batch of L = L_TFT + w_LC L_LC + w_ET L_ET. Each part is this micro-batch's sum
    divided by the optimizer step's global count (count_targets, summed over micro-batches and ranks), so the
    parts of all micro-batches on all ranks add up to the global mean. No [B, T, V] logits tensor is built."""
    lc_type, et_type = cfg.types(mode)
    i, j = cfg.layers(model.args)
    N = model.args.n_layers
    zero = torch.zeros((), device=batch["tft_tokens"].device)

    def ce(h, labels, frozen_head):
        return logit_lens_ce(h, model.norm, model.head_weight, labels, cfg.chunk_size, model.args.final_softcap,
                             "sum", freeze_head=frozen_head)

    def cosine(student, teacher, teacher_content):
        return feature_cosine_loss(student, teacher, batch["tgt_content"], teacher_content, cfg.pooling,
                                   cfg.detach_teacher, "sum")

    def per(part, total):
        return total / max(counts[part], 1)

    # L_TFT: the ordinary next-token loss on [x_tgt ; y_tgt]; head and final norm train. By causality the same
    # pass holds h_i(x_tgt) and h_j(x_tgt) at the prompt positions: the feature losses' students, for free.
    share = cfg.prefix_share and "logits" in (lc_type, et_type)
    if share and not is_right_padded(batch["tft_mask"], batch["lc_mask"], batch["et_mask"]):
        raise ValueError("dft_step: prefix sharing (prefix_share, train.py --prefix-share) reads x_tgt at the "
                         "start of each row: pad the batch on the right, as prepare_data.collate does, or turn "
                         "it off")
    tft_kv = [] if share else None
    h_i, h_j, h_N = model._run(batch["tft_tokens"], (i, j, N), batch["tft_mask"], record_kv=tft_kv)
    parts = {"tft": per("tft", ce(h_N, batch["tft_labels"], False)), "lc": zero, "et": zero}

    # Logits-based: blocks 1..i on [x_tgt ; x_en] predict x_en, blocks 1..j on [x_tgt ; y_en] predict y_en,
    # through the frozen final norm + head (the logit lens). x_tgt's states in these sequences are, by
    # causality, exactly those of the TFT pass: the shared path runs only the English part on its keys/values.
    for kind, loss_type, k, h_tft in (("lc", lc_type, i, h_i), ("et", et_type, j, h_j)):
        if loss_type != "logits":
            continue
        labels = lc_labels(batch, cfg) if kind == "lc" else batch["et_labels"]
        if share:
            h, labels = continue_prompt(model, batch, kind, k, h_tft, tft_kv, labels)
        else:
            h = model.hidden_at(batch[f"{kind}_tokens"], k, batch[f"{kind}_mask"])
        parts[kind] = per(kind, ce(h, labels, True))

    # Feature-based: one pass of the English query gives the teachers h_i(x_en) (LC) and h_N(x_en) (ET).
    teacher_layers = tuple(k for k, t in ((i, lc_type), (N, et_type)) if t == "feature")
    if teacher_layers:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not cfg.detach_teacher):
            en = dict(zip(teacher_layers, model.hidden_at(batch["en_tokens"], teacher_layers, batch["en_mask"])))
            if et_type == "feature" and cfg.teacher_norm:
                en[N] = model.norm(en[N])
        if lc_type == "feature":
            parts["lc"] = per("lc", cosine(h_i, en[i], batch["en_content"]))
        if et_type == "feature":
            parts["et"] = per("et", cosine(h_j, en[N], batch["en_content"]))

    parts["loss"] = parts["tft"] + cfg.lc_weight * parts["lc"] + cfg.et_weight * parts["et"]
    return parts


def continue_prompt(model: Transformer, batch, kind: str, k: int, h_prompt, prompt_kv: list, labels):
    """Layer-k states and labels of the `kind` sequence [x_tgt ; rest] from position P-1 on, running blocks 1..k
    on `rest` only, attending to x_tgt's keys and values from the TFT pass (h_prompt: that pass's layer-k states).
    The seam: rest's first token is predicted from x_tgt's last position, whose state only the TFT pass has."""
    tokens, mask, P = batch[f"{kind}_tokens"], batch[f"{kind}_mask"], batch["tgt_prompt_len"]
    B, T = tokens.shape
    n_rest = max(int((mask.sum(1) - P).max()), 1)
    at = P[:, None] + torch.arange(n_rest, device=tokens.device)                    # [B, n] positions of rest
    rest, rest_mask = tokens.gather(1, at.clamp(max=T - 1)), mask.gather(1, at.clamp(max=T - 1)) * (at < T)
    prefix = SharedPrefix([(kk[:, :, :int(P.max())], vv[:, :int(P.max())]) for kk, vv in prompt_kv[:k]], P)
    h_rest = model._run(rest, (k,), rest_mask, prefix=prefix)[0]                     # [B, n, D]
    h_seam = h_prompt.gather(1, (P - 1)[:, None, None].expand(-1, 1, h_prompt.shape[-1]))  # [B, 1, D]
    at = torch.cat([P[:, None] - 1, at], dim=1)                                     # [B, 1 + n]
    return torch.cat([h_seam, h_rest], dim=1), labels.gather(1, at.clamp(max=T - 1)).masked_fill(at >= T, IGNORE_INDEX)


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoint IO: the one place that knows the HF names
# ---------------------------------------------------------------------------------------------------------------------

CONFIG_NAME, SINGLE_FILE, INDEX_FILE = "config.json", "model.safetensors", "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(flag: str, device_type: str) -> str:
    """--dtype auto|bf16|fp32 of train.py and evaluate.py -> bf16 | fp32. auto: bf16 on CUDA, fp32 on CPU
    (bf16 matmuls are ~100x slower than fp32 on CPUs)."""
    return flag if flag != "auto" else "bf16" if device_type == "cuda" else "fp32"


def write_atomic(path: Path, text: str) -> None:
    """Write `path` under a temporary name, then rename it into place: a kill never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def hf_names(args: ModelArgs) -> dict[str, str]:
    """Our parameter name -> the name in the official HF safetensors files, in file order."""
    block = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
             "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
             "feed_forward.w_gate": "mlp.gate_proj", "feed_forward.w_up": "mlp.up_proj",
             "feed_forward.w_down": "mlp.down_proj", "attn_norm": "input_layernorm"}
    if args.sandwich_norm:     # Gemma-2: four norms per block
        block.update({"attn_post_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
                      "ffn_post_norm": "post_feedforward_layernorm"})
    else:                      # LLaMA: HF calls the pre-MLP norm "post_attention_layernorm"
        block["ffn_norm"] = "post_attention_layernorm"
    names = {"tok_embeddings.weight": "model.embed_tokens.weight"}
    for i in range(args.n_layers):
        for ours, theirs in block.items():
            names[f"layers.{i}.{ours}.weight"] = f"model.layers.{i}.{theirs}.weight"
        if args.qkv_bias:      # Qwen2
            for ours in ("attention.wq", "attention.wk", "attention.wv"):
                names[f"layers.{i}.{ours}.bias"] = f"model.layers.{i}.{block[ours]}.bias"
    names["norm.weight"] = "model.norm.weight"
    if not args.tie_embeddings:
        names["output.weight"] = "lm_head.weight"
    return names


def json_file(path: Path) -> dict:
    """A checkpoint's JSON object file; {} when it is absent."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); re-download {path.name}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: a JSON {type(value).__name__}, expected an object; re-download {path.name}")
    return value


# Hub organisations of the model names people pass as --model, for the download command of a missing model.
HUB_ORGS = {"llama": "meta-llama", "meta-llama": "meta-llama", "gemma": "google", "mistral": "mistralai",
            "qwen": "Qwen"}


def missing_model_message(model_dir: Path, missing: str = CONFIG_NAME) -> str:
    """One line: `missing` is not in model_dir; how to download the real model there, and a tiny random model
    for a try-out (under its own name: a random model must never sit under a real model's name)."""
    name = model_dir.name
    org = next((o for prefix, o in HUB_ORGS.items() if name.lower().startswith(prefix)), "ORG")
    tiny = Path("models/tiny-llama")
    return (f"{model_dir}/{missing}: not found; download the model with: huggingface-cli download "
            f"{org}/{name} --local-dir {model_dir} (gated models: accept the licence on the Hub first); or, "
            f"for a try-out, make a tiny random model with: python model.py --make-tiny {tiny} --family llama, "
            f"and pass --model {tiny}")


def read_args(path) -> ModelArgs:
    path = Path(path)
    config = path / CONFIG_NAME
    if not config.is_file():
        raise CheckpointError(missing_model_message(path))
    return ModelArgs.from_hf_config(json_file(config), str(config))


def checkpoint_files(path) -> list[Path]:
    """The safetensors files of a checkpoint dir (one file, or the shards its index names)."""
    path = Path(path)
    if (path / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path / INDEX_FILE}: no valid 'weight_map' ({e!r}); re-download the index") from None
        files = [path / f for f in dict.fromkeys(weight_map.values())]
    elif (path / SINGLE_FILE).is_file():
        files = [path / SINGLE_FILE]
    else:
        raise CheckpointError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found; expected official HF safetensors")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{path / INDEX_FILE}: shard file(s) missing: {', '.join(missing)}; download them all")
    return files


def check_checkpoint(path, model: Transformer) -> list[Path]:
    """Read only the safetensors headers and raise one error listing every missing, unexpected or wrong-shape tensor."""
    ours = {name: p.shape for name, p in model.named_parameters()}
    expected = {hf: (name, ours[name]) for name, hf in hf_names(model.args).items()}
    files, seen, problems = checkpoint_files(path), set(), []
    for f in files:
        try:
            with safe_open(f, framework="pt") as sf:
                for key in sf.keys():
                    shape = tuple(sf.get_slice(key).get_shape())
                    if key == "lm_head.weight" and model.args.tie_embeddings:
                        continue   # tied head saved anyway by some exporters: the embedding is the head
                    if key not in expected:
                        problems.append(f"unexpected {key} in {f.name}")
                    elif shape != tuple(expected[key][1]):
                        problems.append(f"{key} in {f.name} has shape {list(shape)}, expected {list(expected[key][1])}")
                    seen.add(key)
        except (OSError, SafetensorError) as e:
            raise CheckpointError(f"{f}: not a readable safetensors file ({e}); re-download it") from None
    problems += [f"missing {key}" for key in expected if key not in seen]
    if problems:
        shown = "; ".join(problems[:12]) + (f"; ... {len(problems) - 12} more" if len(problems) > 12 else "")
        raise CheckpointError(f"{path}: checkpoint does not match its config.json: {shown}")
    return files


def iter_checkpoint(path, model: Transformer, files: list[Path] | None = None):
    """Yield (our name, tensor) file by file, after checking the whole checkpoint's headers against the model."""
    files = files if files is not None else check_checkpoint(path, model)
    ours = {hf: name for name, hf in hf_names(model.args).items()}
    for f in files:
        with safe_open(f, framework="pt") as sf:
            for key in sf.keys():
                if key in ours:
                    yield ours[key], sf.get_tensor(key)


def load_weights(model: nn.Module, path) -> None:
    """Fill a model built on the meta device (and moved with to_empty), also one wrapped by FSDP2's fully_shard.

    Under torchrun only rank 0 reads the files; each shard file is broadcast to the other ranks, which keep just
    their slice, so no rank ever holds more than one shard file plus its own share of the model."""
    if not dist.is_initialized():
        state = {}
        for name, tensor in iter_checkpoint(path, model):
            p = model.get_parameter(name)
            state[name] = tensor.to(device=p.device, dtype=p.dtype)
        model.load_state_dict(state, strict=True, assign=True)
        return
    # Imported here: DTensor pulls in sympy, ~2 s at every start of the scripts that never shard.
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    rank = dist.get_rank()
    files, error = None, None
    if rank == 0:
        try:
            files = check_checkpoint(path, model)
        except CheckpointError as e:
            error = str(e)
    message = [error, len(files) if files else 0]
    dist.broadcast_object_list(message, src=0)        # every rank fails together rather than hang
    if message[0]:
        raise CheckpointError(message[0])
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    for i in range(message[1]):
        shard = dict(iter_checkpoint(path, model, [files[i]])) if rank == 0 else {}
        set_model_state_dict(model, shard, options=options)


class ShardWriter:
    """Writes tensors, given in a fixed order, into safetensors shards of at most `max_shard_bytes`.

    A safetensors header needs every shape of its file first, so at most one shard is held in memory. Files go to
    `<path>.tmp` and the dir is renamed when complete: a crash never leaves a half checkpoint under `path`."""

    def __init__(self, path, max_shard_bytes: int):
        self.path, self.tmp = Path(path), Path(str(path) + ".tmp")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.max_shard_bytes = max_shard_bytes
        self.pending, self.pending_bytes, self.shards, self.weight_map = {}, 0, [], {}

    def add(self, name: str, tensor: torch.Tensor):
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += nbytes

    def _flush(self):
        name = f"shard-{len(self.shards):05d}.safetensors"
        save_file(self.pending, str(self.tmp / name), metadata={"format": "pt"})
        self.shards.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self, extra_files: dict[str, str]):
        if self.pending or not self.shards:
            self._flush()
        total = 0
        if len(self.shards) == 1:
            os.rename(self.tmp / self.shards[0][0], self.tmp / SINGLE_FILE)
        else:
            n = len(self.shards)
            for k, (name, keys) in enumerate(self.shards):
                final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
                os.rename(self.tmp / name, self.tmp / final)
                total += (self.tmp / final).stat().st_size
                self.weight_map.update({key: final for key in keys})
            index = {"metadata": {"total_size": total}, "weight_map": self.weight_map}
            (self.tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        for name, text in extra_files.items():
            (self.tmp / name).write_text(text)
        if self.path.exists():
            shutil.rmtree(self.path)
        os.rename(self.tmp, self.path)


def save_pretrained(model: Transformer, path, max_shard_bytes: int = 5 * 2**30):
    """Write `model` in the HF layout. Under FSDP every rank must call this (each full tensor is gathered in the same
    order on all ranks); rank 0 writes. dtype defaults to the source checkpoint's torch_dtype."""
    from torch.distributed.tensor import DTensor     # here, not at the top: as in load_weights

    is_writer = not dist.is_initialized() or dist.get_rank() == 0
    args = model.args
    dtype = DTYPES.get(args.torch_dtype or "")
    writer = ShardWriter(path, max_shard_bytes) if is_writer else None
    for name, hf in hf_names(args).items():
        t = model.get_parameter(name).detach()
        if isinstance(t, DTensor):
            t = t.full_tensor()
        if writer is not None:
            writer.add(hf, t.to(device="cpu", dtype=dtype or t.dtype))
    if writer is not None:
        config = dict(args.hf_config) or hf_config_of(args)
        writer.close({CONFIG_NAME: json.dumps(config, indent=2) + "\n"})
    if dist.is_initialized():
        dist.barrier()      # nobody reads the export before rank 0 has renamed it into place


def hf_config_of(args: ModelArgs) -> dict:
    """The official config.json of a model built from ModelArgs (used for the tiny random checkpoints), spelled as
    the released files are (top-level rope_theta, rope_scaling)."""
    architecture = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                    "gemma2": "Gemma2ForCausalLM"}[args.family]
    cfg = {"architectures": [architecture],
           "model_type": args.family, "hidden_size": args.dim, "intermediate_size": args.hidden_dim,
           "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
           "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim, "vocab_size": args.vocab_size,
           "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta, "max_position_embeddings": args.max_seq_len,
           "bos_token_id": args.bos_id, "eos_token_id": args.eos_id, "tie_word_embeddings": args.tie_embeddings,
           "torch_dtype": args.torch_dtype or "float32"}
    if args.family != "gemma2":
        cfg.update(hidden_act="silu", pad_token_id=None,
                   rope_scaling=dict(args.rope_scaling, rope_type="llama3") if args.rope_scaling else None)
    if args.family == "llama":
        cfg.update(attention_bias=False, mlp_bias=False)
    elif args.family == "mistral":
        cfg.update(sliding_window=args.sliding_window)
    elif args.family == "qwen2":
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=args.n_layers)
    else:
        cfg.update(hidden_activation="gelu_pytorch_tanh", hidden_act="gelu_pytorch_tanh", attention_bias=False,
                   query_pre_attn_scalar=round(args.query_scale ** -2), attn_logit_softcapping=args.attn_softcap,
                   final_logit_softcapping=args.final_softcap, sliding_window=args.sliding_window, pad_token_id=0,
                   layer_types=["sliding_attention" if s else "full_attention" for s in args.sliding_layers])
    return cfg


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------------

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")     # in this order: LLaMA-2 and Gemma-2 ship both


def special_token(config: dict, key: str) -> str | None:
    """A special token's text in tokenizer_config.json: a string, or an AddedToken object holding its content."""
    value = config.get(key)
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    """The tokenizer a checkpoint ships, read by the library that defines its format: SentencePiece's
    `tokenizer.model` (LLaMA-2, Mistral, Gemma-2) by sentencepiece, else `tokenizer.json` (LLaMA-3, Qwen2: byte-level
    BPE) by Hugging Face's tokenizers. `encode(text, bos=True)` gives transformers' ids with add_special_tokens=True.

    bos_id is None when the model puts nothing before a text (Qwen2). Without a pad token (LLaMA-2, LLaMA-3) we pad
    with a filler that only ever sits under a 0 attention mask and a -100 label: SentencePiece id 0 (`<unk>`), or
    for tokenizer.json the EOS."""

    def __init__(self, path):
        path = Path(path)
        if path.is_dir():
            found = [path / name for name in TOKENIZER_FILES if (path / name).is_file()]
            path = found[0] if found else path
        if not path.is_file():
            raise CheckpointError(missing_model_message(path, " or ".join(TOKENIZER_FILES)))
        self.path = path
        data = path.read_bytes()
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.sp = None
        self.bpe = None
        if path.suffix == ".json":
            self._read_tokenizer_json(data)
        else:
            self._read_sentencepiece(data)

    def _read_sentencepiece(self, data: bytes):
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(data)
        except (RuntimeError, OSError) as e:
            raise CheckpointError(f"{self.path}: not a SentencePiece model ({e})") from None
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else 0
        self.vocab_size = self.sp.get_piece_size()

    def _read_tokenizer_json(self, data: bytes):
        try:
            self.bpe = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        except Exception as e:        # the Rust library raises a bare Exception for a file it cannot read
            raise CheckpointError(f"{self.path}: not a tokenizers file ({e}); re-download tokenizer.json") from None
        config_file = self.path.parent / "tokenizer_config.json"
        config = json_file(config_file)
        # The BOS is what the post-processor puts before a text: LLaMA-3 <|begin_of_text|>, Qwen2 nothing.
        plain = self.bpe.encode("a", add_special_tokens=False).ids
        full = self.bpe.encode("a", add_special_tokens=True).ids
        before = full[:len(full) - len(plain)]
        if full[len(before):] != plain or len(before) > 1:
            raise CheckpointError(f"{self.path}: its post_processor turns the ids {plain} of a text into {full}; "
                                  "expected at most one BOS in front and nothing after")
        self.bos_id = before[0] if before else None
        eos = special_token(config, "eos_token")
        self.eos_id = self._token_id(eos, config_file) if eos is not None else model_eos_id(self.path.parent)
        pad = special_token(config, "pad_token")
        self.pad_id = self._token_id(pad, config_file) if pad is not None else self.eos_id
        self.vocab_size = self.bpe.get_vocab_size(with_added_tokens=True)

    def _token_id(self, token: str, where: Path) -> int:
        token_id = self.bpe.token_to_id(token)
        if token_id is None:
            raise CheckpointError(f"{where}: {token!r} is not a token of {self.path}; re-download both files")
        return token_id

    def _bos(self, bos: bool) -> list[int]:
        return [self.bos_id] if bos and self.bos_id is not None else []

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text) if self.sp is not None else self.bpe.encode(text, add_special_tokens=False).ids
        return self._bos(bos) + ids + [self.eos_id] * eos

    def encode_with_offsets(self, text: str, bos: bool = True) -> tuple[list[int], list[tuple[int, int]]]:
        """ids of `text` and each token's [start, end) in characters of `text`, from one encoding (so spans of
        a template's fields can be found in the joint encoding a user's prompt gets at inference). A token holding
        part of a character's bytes covers that whole character."""
        if self.bpe is not None:
            encoding = self.bpe.encode(text, add_special_tokens=False)    # offsets in characters of `text`
            ids, spans = encoding.ids, list(encoding.offsets)
        else:
            ids, spans = self.sp.encode(text), self._sentencepiece_spans(text)
        head = self._bos(bos)
        return head + ids, [(0, 0)] * len(head) + spans

    def _sentencepiece_spans(self, text: str) -> list[tuple[int, int]]:
        # Surface bytes of each piece: byte-fallback pieces <0xNN> are one byte, others their text with ▁ = space.
        sizes = [1 if len(p) == 6 and p.startswith("<0x") and p.endswith(">") else len(p.replace("\u2581", " ").encode())
                 for p in self.sp.id_to_piece(self.sp.encode(text))]
        data = text.encode()
        shift = sum(sizes) - len(data)        # 1 when SentencePiece added its dummy-prefix space
        if shift not in (0, 1):
            raise ValueError(f"{self.path}: pieces do not add up to the text ({shift:+d} bytes); this tokenizer "
                             "normalises text, which span mapping does not support")
        char_at = [k for k, ch in enumerate(text) for _ in ch.encode()]     # byte offset -> character offset
        spans, pos = [], -shift
        for size in sizes:
            start, pos = max(pos, 0), pos + size
            spans.append((char_at[start], char_at[pos - 1] + 1) if pos > start else (0, 0))
        return spans

    def decode(self, ids) -> str:
        kept = [int(i) for i in ids if int(i) not in {self.bos_id, self.eos_id, self.pad_id}]
        return self.sp.decode(kept) if self.sp is not None else self.bpe.decode(kept, skip_special_tokens=True)

    def piece(self, token_id: int) -> str:
        """The vocabulary entry of an id as the tokenizer spells it: "▁Paris", "<0x0A>" (SentencePiece), "ĠParis"."""
        return self.sp.id_to_piece(token_id) if self.sp is not None else self.bpe.id_to_token(token_id)


def model_eos_id(folder: Path) -> int:
    """The model's end-of-text id where tokenizer_config.json names none: the first of generation_config.json's
    (else config.json's) eos_token_id, which LLaMA-3.1 and Qwen2.5 give as a list of the ids that end a turn."""
    for name in ("generation_config.json", CONFIG_NAME):
        eos = json_file(folder / name).get("eos_token_id")
        if eos not in (None, []):
            return eos[0] if isinstance(eos, list) else eos
    raise CheckpointError(f"{folder}: no EOS token; expected eos_token in tokenizer_config.json or eos_token_id in "
                          "generation_config.json / config.json")


# ---------------------------------------------------------------------------------------------------------------------
# Tiny random checkpoints (tests and the demo)
# ---------------------------------------------------------------------------------------------------------------------

TINY = {
    "llama": dict(family="llama", dim=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=160,
                  norm_eps=1e-5, max_seq_len=1024),
    # LLaMA-3.2-1B's kind: tied head, theta 500000 and the llama3 rescaling, its pre-training context shrunk to 64
    # positions so that the rescaled and blended bands fall among the frequencies of a 16-wide head.
    "llama3": dict(family="llama", dim=64, n_layers=4, n_heads=4, n_kv_heads=1, head_dim=16, hidden_dim=224,
                   norm_eps=1e-5, rope_theta=500000.0, max_seq_len=1024, tie_embeddings=True,
                   rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=64)),
    "mistral": dict(family="mistral", dim=64, n_layers=4, n_heads=4, n_kv_heads=1, head_dim=16, hidden_dim=224,
                    norm_eps=1e-5, max_seq_len=1024, sliding_window=16),
    "qwen2": dict(family="qwen2", dim=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=176,
                  norm_eps=1e-6, rope_theta=1000000.0, max_seq_len=1024, qkv_bias=True),
    "gemma2": dict(family="gemma2", dim=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=128,
                   norm_eps=1e-6, max_seq_len=1024, tie_embeddings=True, norm_offset=1.0, mlp_act="gelu_tanh",
                   embed_scale=8.0, sandwich_norm=True, query_scale=32 ** -0.5, attn_softcap=50.0,
                   final_softcap=30.0, sliding_window=16),
}

# The pre-tokenizer splits of the released tokenizer.json files (LLaMA-3 groups up to 3 digits, Qwen2 none).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")

# Each tiny family's tokenizer as its released models have it: transformers' class for it, the special tokens
# (None: there is none), and for byte-level BPE the pre-tokenizer split, NFC normalisation and further specials.
TINY_TOKENIZERS = {
    "llama": dict(tokenizer_class="LlamaTokenizer", bos="<s>", eos="</s>", unk="<unk>", pad=None),
    "mistral": dict(tokenizer_class="LlamaTokenizer", bos="<s>", eos="</s>", unk="<unk>", pad=None),
    "gemma2": dict(tokenizer_class="GemmaTokenizer", bos="<bos>", eos="<eos>", unk="<unk>", pad="<pad>"),
    "llama3": dict(tokenizer_class="PreTrainedTokenizerFast", bos="<|begin_of_text|>", eos="<|end_of_text|>",
                   unk=None, pad=None, split=LLAMA3_SPLIT, nfc=False,
                   extra=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    "qwen2": dict(tokenizer_class="Qwen2Tokenizer", bos=None, eos="<|endoftext|>", unk=None, pad="<|endoftext|>",
                  split=QWEN2_SPLIT, nfc=True, extra=("<|im_start|>", "<|im_end|>")),
}


def train_sentencepiece(texts, vocab_size: int, family: str) -> bytes:
    """A byte-fallback BPE SentencePiece model on `texts`, with the special-token ids and pieces of the family.
    Gemma's tokenizer adds no dummy-prefix space before a text, LLaMA's and Mistral's do."""
    spec = TINY_TOKENIZERS[family]
    if family == "gemma2":
        ids = dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece=spec["pad"])
    else:
        ids = dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    out = io.BytesIO()
    # As in LLaMA-2's vocabulary, a newline gets no piece (byte fallback <0x0A>), so no piece spans a line break.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([t.replace("\n", " ") for t in texts]), model_writer=out, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=family != "gemma2", hard_vocab_limit=False,
        character_coverage=0.995, max_sentence_length=1 << 16, minloglevel=2, bos_piece=spec["bos"],
        eos_piece=spec["eos"], unk_piece=spec["unk"], **ids)
    return out.getvalue()


def sentencepiece_as_tokenizer_json(sp_bytes: bytes, family: str) -> tokenizers.Tokenizer:
    """The `tokenizers` equivalent of a SentencePiece BPE model (what the Hub's tokenizer.json files hold), so that
    transformers loads it without protobuf. SentencePiece joins, at each step, the adjacent pair whose joined piece
    scores highest; a tokenizers BPE joins the pair ranked first: ranking every split of a piece into two pieces
    by that piece's score makes the two agree."""
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(sp_bytes)
    n = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    special = [i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
    normal = {sp.id_to_piece(i) for i in range(n) if i not in special and not sp.is_byte(i)}
    ranked = sorted((-sp.get_score(vocab[piece]), vocab[piece], vocab[piece[:cut]], vocab[piece[cut:]])
                    for piece in normal for cut in range(1, len(piece))
                    if piece[:cut] in normal and piece[cut:] in normal)
    merges = [(sp.id_to_piece(left), sp.id_to_piece(right)) for _, _, left, right in ranked]
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, merges, unk_token=sp.id_to_piece(sp.unk_id()),
                                                     fuse_unk=True, byte_fallback=True))
    decode = [tokenizers.decoders.Replace("\u2581", " "), tokenizers.decoders.ByteFallback(),
              tokenizers.decoders.Fuse()]
    if family == "gemma2":
        tok.normalizer = tokenizers.normalizers.Replace(" ", "\u2581")
    else:       # the dummy prefix: one "▁" before the text
        tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
        decode.append(tokenizers.decoders.Strip(" ", 1, 0))
    tok.decoder = tokenizers.decoders.Sequence(decode)
    tok.add_special_tokens([tokenizers.AddedToken(sp.id_to_piece(i), special=True, normalized=False)
                            for i in special])
    bos = sp.id_to_piece(sp.bos_id())
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, sp.bos_id())])
    return tok


def train_byte_level_bpe(texts, vocab_size: int, family: str) -> tokenizers.Tokenizer:
    """A byte-level BPE tokenizer on `texts`, built as LLaMA-3's and Qwen2's tokenizer.json are: regex split, bytes
    as characters, the special tokens after the learnt vocabulary, BOS (if any) put in front by the post-processor."""
    spec = TINY_TOKENIZERS[family]
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    if spec["nfc"]:
        tok.normalizer = tokenizers.normalizers.NFC()
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Split(tokenizers.Regex(spec["split"]), behavior="isolated"),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = tokenizers.decoders.ByteLevel()
    specials = list(dict.fromkeys(t for t in (spec["bos"], spec["eos"], spec["pad"], *spec["extra"]) if t))
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size - len(specials), show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in specials])
    byte_level = tokenizers.processors.ByteLevel(trim_offsets=False)
    bos = spec["bos"]
    if bos is None:
        tok.post_processor = byte_level
    else:
        tok.post_processor = tokenizers.processors.Sequence([byte_level, tokenizers.processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])])
    return tok


def tiny_tokenizer_files(texts, vocab_size: int, family: str) -> dict[str, bytes]:
    """File name -> content of a tiny family's tokenizer: tokenizer.model (SentencePiece families) and the
    tokenizer.json, tokenizer_config.json and special_tokens_map.json with which transformers' AutoTokenizer
    loads it (no protobuf needed) and gives our ids."""
    spec = TINY_TOKENIZERS[family]
    files = {}
    if "split" in spec:
        tok = train_byte_level_bpe(texts, vocab_size, family)
    else:
        files["tokenizer.model"] = train_sentencepiece(texts, vocab_size, family)
        tok = sentencepiece_as_tokenizer_json(files["tokenizer.model"], family)
    files["tokenizer.json"] = tok.to_str().encode()
    special = {f"{kind}_token": spec[kind] for kind in ("bos", "eos", "unk", "pad")}
    config = dict(tokenizer_class=spec["tokenizer_class"], **special, clean_up_tokenization_spaces=False)
    if "split" not in spec:     # SentencePiece families: transformers' default for these classes, said explicitly
        config.update(add_bos_token=True, add_eos_token=False, legacy=False)
    if family == "gemma2":      # else GemmaTokenizer adds a <mask> token our tiny vocabulary does not have
        config["mask_token"] = None
    files["tokenizer_config.json"] = (json.dumps(config, indent=2) + "\n").encode()
    tokens_map = {key: value for key, value in special.items() if value is not None}
    if spec.get("extra"):
        tokens_map["additional_special_tokens"] = list(spec["extra"])
    files["special_tokens_map.json"] = (json.dumps(tokens_map, indent=2) + "\n").encode()
    return files


def write_tiny_checkpoint(path, family: str, texts, vocab_size: int | None = None, seed: int = 0,
                          **arg_overrides) -> Path:
    """A tiny random model in the official HF layout + its family's kind of tokenizer trained on `texts`.
    Refuses a dir that already holds a checkpoint; builds next to it and moves the files in when complete."""
    if family not in TINY:
        raise ValueError(f"family={family!r}; expected one of {', '.join(TINY)}")
    path = Path(path)
    held = sorted(f.name for f in path.glob("*") if f.name in (CONFIG_NAME, INDEX_FILE) or f.suffix == ".safetensors")
    if held:
        raise ValueError(f"{path}: already holds a checkpoint ({', '.join(held)}); choose another dir or remove it")
    staging = path.with_name(path.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name, data in tiny_tokenizer_files(texts, vocab_size or 2048, family).items():
        (staging / name).write_bytes(data)
    tok = Tokenizer(staging)
    fields = dict(TINY[family], vocab_size=tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id, **arg_overrides)
    if fields.get("sliding_window") and "sliding_layers" not in fields:
        n = fields["n_layers"]
        fields["sliding_layers"] = tuple(i % 2 == 0 for i in range(n)) if family == "gemma2" else (True,) * n
    args = ModelArgs(**fields)
    args.hf_config = hf_config_of(args)
    torch.manual_seed(seed)
    model = Transformer(args)
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    save_pretrained(model, staging / "weights")
    for f in (staging / "weights").iterdir():
        os.replace(f, staging / f.name)
    (staging / "weights").rmdir()
    generation = {key: value for key, value in (("bos_token_id", tok.bos_id), ("eos_token_id", tok.eos_id))
                  if value is not None}
    (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    # config.json goes in last: a dir without it is no checkpoint, whatever an interruption left there.
    path.mkdir(parents=True, exist_ok=True)
    for f in sorted(staging.iterdir(), key=lambda f: f.name == CONFIG_NAME):
        os.replace(f, path / f.name)
    staging.rmdir()
    return path


SAMPLE_DIR = Path(__file__).resolve().parent / "data" / "sample"     # the bundled parallel Alpaca sample


def alpaca_texts(files) -> list[str]:
    """Every non-empty instruction, input and output of Alpaca-format files, to train a tiny tokenizer on."""
    return [row[k] for f in files for row in json.loads(Path(f).read_text(encoding="utf-8"))
            for k in ("instruction", "input", "output") if row.get(k)]


def sample_texts() -> list[str]:
    """Texts of the bundled Alpaca sample (all languages)."""
    return alpaca_texts(sorted(SAMPLE_DIR.glob("alpaca_*.json")))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--make-tiny", metavar="DIR", required=True,
                        help="write a tiny random checkpoint (official HF layout + the family's tokenizer files) to "
                             "DIR; refuses a DIR that already holds one")
    parser.add_argument("--family", choices=list(TINY), default="llama",
                        help="llama (LLaMA-2), llama3 (LLaMA-3.x), mistral, qwen2 (Qwen2/2.5) or gemma2 "
                             "(default: %(default)s)")
    parser.add_argument("--texts", nargs="*", metavar="FILE.json",
                        help="Alpaca-format files to train the tokenizer on (default: the bundled "
                             "data/sample/alpaca_*.json)")
    parser.add_argument("--vocab-size", type=int, default=2048, help="tokenizer vocabulary (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: %(default)s)")
    a = parser.parse_args(argv)
    try:
        texts = alpaca_texts(a.texts) if a.texts else sample_texts()
        if not texts:
            raise ValueError("no texts to train the tokenizer on; pass --texts FILE.json (Alpaca format)")
        out = write_tiny_checkpoint(a.make_tiny, a.family, texts, a.vocab_size, a.seed)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote a tiny random {a.family} checkpoint to {out}")


if __name__ == "__main__":
    main()
