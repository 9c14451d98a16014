"""LLaMA-2/3, Mistral, Qwen2 and Gemma-2 in plain PyTorch, with DFT's deep supervision: one module
for inference (`forward`, KV cache), training (`dft_step`) and the logit lens (`head_logits`) that
reads and writes the Hugging Face checkpoint and tokenizer files.

Shape legend: B batch, T time (new tokens), S time of the keys (cache + new), D model dim,
H query heads, K key/value heads, G = H // K, E head dim, F MLP hidden dim, V vocab.

Layer convention (the likeliest off-by-one, tested against transformers): `hidden_at(tokens, k)`
is the residual stream after k blocks (1-based), before the final norm; k = n_layers: the last.

    python model.py --make-tiny models/tiny-llama --family llama    # a tiny random checkpoint
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
    """A problem with a checkpoint a user handed us; one line naming file, field and fix."""


# --- Config ---------------------------------------------------------------------------------------

# model_type in config.json -> the checkpoints it covers.
FAMILIES = {"llama": "LLaMA-2, LLaMA-3.x", "mistral": "Mistral", "qwen2": "Qwen2, Qwen2.5",
            "gemma2": "Gemma-2"}
# LLaMA-3.x's RoPE rescaling: the parameters of rope_type "llama3" in config.json.
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                    "original_max_position_embeddings")


def rope_settings(cfg: dict, model_type: str, source: str) -> tuple[float, dict | None]:
    """(theta, LLaMA-3 scaling or None) from the top-level `rope_theta` + `rope_scaling` of most
    released files or transformers' newer `rope_parameters` (a non-null rope_scaling wins)."""
    where = "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"
    rope = cfg.get(where) or {}
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise CheckpointError(f"{source}: partial_rotary_factor={partial!r} is not supported; "
                              "RoPE here rotates the whole head (1.0)")
    rope_type = rope.get("rope_type", rope.get("type", "default"))  # "type": before 4.45
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3" or model_type != "llama":
        raise CheckpointError(f"{source}: {where}.rope_type={rope_type!r} is not supported for "
                              f"model_type={model_type!r}; expected 'default' or llama's 'llama3'")
    missing = [key for key in LLAMA3_ROPE_KEYS if key not in rope]
    if missing:
        raise CheckpointError(f"{source}: {where} has rope_type 'llama3' but no "
                              f"{', '.join(missing)}; re-download config.json")
    scaling = {key: rope[key] for key in LLAMA3_ROPE_KEYS}
    if not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise CheckpointError(f"{source}: {where}: high_freq_factor must exceed low_freq_factor "
                              f"(LLaMA-3.1: 4.0 and 1.0), found {scaling}")
    return theta, scaling


@dataclass
class ModelArgs:
    family: str = "llama"               # config.json's model_type, a key of FAMILIES
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    head_dim: int = 128                 # read when given: Gemma-2-2B has 256 != 2304 / 8
    hidden_dim: int = 11008             # MLP inner width
    vocab_size: int = 32000
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None    # LLaMA-3.x: the LLAMA3_ROPE_KEYS of rope_type "llama3"
    max_seq_len: int = 4096
    tie_embeddings: bool = False        # head = input embedding: Gemma-2, LLaMA-3.2, Qwen2.5 <= 3B
    # Family differences are fields, not subclasses (None = the part does not exist):
    qkv_bias: bool = False              # Qwen2: biases on the query, key and value projections
    norm_offset: float = 0.0            # Gemma-2 norms scale by (1 + weight)
    mlp_act: str = "silu"               # "silu" (SwiGLU) | "gelu_tanh" (GeGLU)
    embed_scale: float | None = None    # Gemma-2 multiplies embeddings by sqrt(dim)
    sandwich_norm: bool = False         # Gemma-2: extra norms after attention and after the MLP
    query_scale: float | None = None    # None: head_dim**-0.5; Gemma-2: query_pre_attn_scalar**-0.5
    attn_softcap: float | None = None   # Gemma-2: tanh cap on attention scores, before the mask
    final_softcap: float | None = None  # Gemma-2: tanh cap on the output logits
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = ()   # True: slides (Gemma-2 every other layer, Mistral all)
    bos_id: int | None = 1              # config.json's; whether a BOS is added is the Tokenizer's
    eos_id: int = 2
    torch_dtype: str | None = None      # the checkpoint's storage dtype, used when we export
    hf_config: dict = field(default_factory=dict, repr=False)  # config.json, written back as read

    @classmethod
    def from_hf_config(cls, cfg: dict, source: str = "config.json") -> "ModelArgs":
        def need(key):
            if key not in cfg:
                raise CheckpointError(f"{source}: field {key!r} is missing; re-download it")
            return cfg[key]

        model_type = cfg.get("model_type")
        if model_type not in FAMILIES:
            known = ", ".join(f"{name!r} ({models})" for name, models in FAMILIES.items())
            raise CheckpointError(f"{source}: model_type={model_type!r}; expected one of {known}")
        # Qwen2 has q/k/v biases whatever the file says; LLaMA's attention_bias would bias o_proj.
        # Qwen2's sliding window is not implemented: released Qwen2/Qwen2.5 files set it false.
        for key in ("mlp_bias", "use_bidirectional_attention", "attention_bias",
                    "use_sliding_window"):
            if cfg.get(key) and not (key == "attention_bias" and model_type == "qwen2"):
                raise CheckpointError(f"{source}: {key}={cfg[key]} is unsupported; expected false")
        rope_theta, rope_scaling = rope_settings(cfg, model_type, source)
        n_heads = need("num_attention_heads")
        args = dict(
            family=model_type, dim=need("hidden_size"), n_layers=need("num_hidden_layers"),
            n_heads=n_heads, n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or need("hidden_size") // n_heads,
            hidden_dim=need("intermediate_size"), vocab_size=need("vocab_size"),
            norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=rope_theta,
            rope_scaling=rope_scaling, max_seq_len=cfg.get("max_position_embeddings", 4096),
            bos_id=cfg.get("bos_token_id", 1), eos_id=cfg.get("eos_token_id", 2),
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"), hf_config=dict(cfg))
        act = cfg.get("hidden_activation") or cfg.get("hidden_act")
        acts = ("gelu_pytorch_tanh", "gelu_tanh") if model_type == "gemma2" else ("silu",)
        if act not in acts:
            raise CheckpointError(f"{source}: hidden_act={act!r}; {model_type} uses {acts[0]!r}")
        n = args["n_layers"]
        if model_type != "gemma2":
            args.update(tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                        qkv_bias=model_type == "qwen2")
            if model_type == "mistral" and cfg.get("sliding_window"):
                args.update(sliding_window=cfg["sliding_window"], sliding_layers=(True,) * n)
        else:
            # Layers 0, 2, 4, ... (0-based) slide, unless layer_types says otherwise.
            types = cfg.get("layer_types") or [
                "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
            if len(types) != n or set(types) - {"sliding_attention", "full_attention"}:
                raise CheckpointError(f"{source}: layer_types={types!r}; expected {n} entries of "
                                      "'sliding_attention' / 'full_attention'")
            args.update(
                tie_embeddings=bool(cfg.get("tie_word_embeddings", True)), norm_offset=1.0,
                mlp_act="gelu_tanh", embed_scale=args["dim"] ** 0.5, sandwich_norm=True,
                query_scale=need("query_pre_attn_scalar") ** -0.5,
                attn_softcap=cfg.get("attn_logit_softcapping"),
                final_softcap=cfg.get("final_logit_softcapping"),
                sliding_window=cfg.get("sliding_window"),
                sliding_layers=tuple(t == "sliding_attention" for t in types))
        if isinstance(args["eos_id"], list):  # LLaMA-3.1, Qwen2.5 Instruct: every id ending a turn
            args["eos_id"] = args["eos_id"][0]
        return cls(**args)


# --- Pure helpers ---------------------------------------------------------------------------------

def rope_inv_freq(args: ModelArgs, device=None) -> torch.Tensor:
    """RoPE's E/2 frequencies (radians per position). LLaMA-3.x's "llama3" scaling divides those
    of long wavelengths by `factor`, keeps the short ones, and blends the band between."""
    # fp32: RoPE tables.
    exponents = torch.arange(0, args.head_dim, 2, device=device).float() / args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** exponents)
    if args.rope_scaling is None:
        return inv_freq
    s = args.rope_scaling
    wavelength = 2 * math.pi / inv_freq
    # Weight 1 (kept) at wavelengths <= context / high_freq_factor, 0 >= context / low_freq_factor.
    kept = (s["original_max_position_embeddings"] / wavelength - s["low_freq_factor"]) / (
        s["high_freq_factor"] - s["low_freq_factor"])
    kept = kept.clamp(0.0, 1.0)
    return (1 - kept) * inv_freq / s["factor"] + kept * inv_freq


def rope_cos_sin(positions: torch.Tensor, args: ModelArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, E] of positions [B, T] in HF's half-split layout (no q/k permutation)."""
    # fp32: RoPE tables, computed on the fly: no buffer for to_empty() to leave as garbage.
    angles = positions.float()[..., None] * rope_inv_freq(args, positions.device)  # [B, T, E/2]
    angles = torch.cat([angles, angles], dim=-1)                                    # [B, T, E]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, n, T, E] by its positions' angles; E's two halves are (real, imag) parts."""
    # fp32: the rotation, as in the reference llama, so far-apart bf16 positions stay distinct.
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos[:, None] + rotated * sin[:, None]).type_as(x)


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if cap is None else cap * torch.tanh(x / cap)


def attention_rule(start: int, q_pos, k_pos, k_valid, window: int | None):
    """may_attend(b, h, q, s): may query q (sequence index start + q) see key s? Causal, real keys
    only (k_valid [B, S]), on sliding layers only keys fewer than `window` positions back (q_pos
    [B, T], k_pos [B, S]); a query always sees itself, so no padding row softmaxes into NaN. One
    rule for flex_attention (its mask_mod) and attention_mask_4d (on broadcast index grids)."""
    def may_attend(b, h, q, s):
        allowed = (s <= start + q) & k_valid[b, s]
        if window is not None:
            allowed = allowed & (q_pos[b, q] - k_pos[b, s] < window)
        return allowed | (s == start + q)
    return may_attend


def attention_mask_4d(may_attend, B: int, H: int | None, T: int, S: int, device) -> torch.Tensor:
    """The rule as a boolean mask [B, 1, T, S]; called as create_block_mask is."""
    b = torch.arange(B, device=device)[:, None, None, None]
    q = torch.arange(T, device=device)[:, None]
    return may_attend(b, H, q, torch.arange(S, device=device))


def is_right_padded(*masks: torch.Tensor) -> bool:
    """Is every row of every [B, T] mask its real tokens, then padding? One host sync for all."""
    return bool(torch.stack([(m[:, 1:] <= m[:, :-1]).all() for m in masks]).all())


@functools.cache
def compiled_flex_attention():
    """flex_attention is fused only under torch.compile: one copy per process, on first use."""
    return torch.compile(flex_attention)


# --- Modules --------------------------------------------------------------------------------------

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
    """Each layer's keys and values for decoding: k[l], v[l] [B, K, max_len, E], `length` filled."""

    def __init__(self, args: ModelArgs, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, args.n_kv_heads, max_len, args.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.length = 0


@dataclass
class SharedPrefix:
    """A prompt's keys and values for sequences that continue it: kv[l] = (k [B, K, Tp, E],
    v [B, Tp, K*E]) as block l returned them; row b's prompt is its first lengths[b] positions."""
    kv: list
    lengths: torch.Tensor    # [B]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.head_dim = args.head_dim
        self.scale = args.query_scale if args.query_scale is not None else args.head_dim ** -0.5
        self.softcap = args.attn_softcap
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, mask, kv_slot=None, start=0, past=None):
        """-> (output [B, T, D], own keys [B, K, T, E] and values [B, T, K*E]). mask: None
        (causal), a BlockMask (flex) or a boolean [B, 1, T, S]. kv_slot: a decoding cache, set at
        [start, start + T); past: keys and values as returned here, attended to first."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)     # [B, H, T, E]
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, K, T, E]
        # The values leave the block as the projection wrote them, not as a view (FSDP2 warns
        # about views among a block's outputs); a Linear with a bias (Qwen2) returns a view.
        v = (self.wv(x) if self.wv.bias is None
             else F.linear(x, self.wv.weight) + self.wv.bias)                       # [B, T, K*E]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        own = (k, v)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=1)
        v = v.view(B, -1, self.n_kv_heads, self.head_dim).transpose(1, 2)         # [B, K, S, E]
        if kv_slot is not None:
            cache_k, cache_v = kv_slot
            cache_k[:, :, start:start + T] = k
            cache_v[:, :, start:start + T] = v
            k, v = cache_k[:, :, :start + T], cache_v[:, :, :start + T]             # [B, K, S, E]

        if isinstance(mask, BlockMask):
            # In a compiled block dynamo compiles flex itself; on CPU it runs unfused (tests).
            compiled = q.is_cuda and not torch.compiler.is_compiling()
            flex = compiled_flex_attention() if compiled else flex_attention
            # fp32: flex's scores, its score_mod (Gemma-2's softcap, before the mask), softmax.
            out = flex(q, k, v, score_mod=self.capped_score if self.softcap is not None else None,
                       block_mask=mask, scale=self.scale, enable_gqa=True)
        elif self.softcap is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                 scale=self.scale, enable_gqa=True)
        else:
            # Gemma-2 caps the scores before the mask, which SDPA cannot do: attend by hand,
            # grouped, so the K key/value heads serve their G query heads uncopied.
            G = self.n_heads // self.n_kv_heads
            qg = q.view(B, self.n_kv_heads, G, T, self.head_dim)                   # [B, K, G, T, E]
            scores = (qg @ k[:, :, None].transpose(-1, -2)).float() * self.scale  # [B, K, G, T, S]
            # fp32: score softcap and softmax.
            scores = softcap(scores, self.softcap)
            scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
            out = scores.softmax(-1).type_as(v) @ v[:, :, None]                    # [B, K, G, T, E]
            out = out.view(B, self.n_heads, T, self.head_dim)                       # [B, H, T, E]
        return self.wo(out.transpose(1, 2).reshape(B, T, -1)), own

    def capped_score(self, score, b, h, q, s):
        """flex_attention's score_mod for Gemma-2 (the indices are unused)."""
        return softcap(score, self.softcap)


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)); SwiGLU (LLaMA), GeGLU with tanh-GELU (Gemma-2)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w_gate = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w_up = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w_down = nn.Linear(args.hidden_dim, args.dim, bias=False)
        gelu_tanh = functools.partial(F.gelu, approximate="tanh")
        self.act = F.silu if args.mlp_act == "silu" else gelu_tanh

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
        self.output = (None if args.tie_embeddings
                       else nn.Linear(args.dim, args.vocab_size, bias=False))
        # Where a mask is needed: True flex_attention, False the reference (SDPA with a boolean
        # mask, by hand under a softcap), None flex on CUDA. A KV cache takes the reference.
        self.use_flex: bool | None = None

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None):
        """Random init for tiny models; apart from __init__, so a meta build allocates nothing."""
        device = generator.device if generator is not None else None  # None: each p's own
        for name, p in self.named_parameters():
            noise = torch.randn(p.shape, generator=generator, device=device or p.device)
            if name.endswith("norm.weight"):
                p.copy_(1.0 - self.args.norm_offset + 0.1 * noise)
            else:
                p.copy_(0.02 * noise)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def _run(self, tokens, layers: tuple[int, ...], attention_mask=None,
             cache: KVCache | None = None, prefix: SharedPrefix | None = None,
             record_kv: list | None = None):
        """The residual stream after each block count in `layers`. With `prefix`, `tokens`
        continue each row's prompt; `record_kv` collects every block's keys and values."""
        B, T = tokens.shape
        device = tokens.device
        n_run = max(layers)
        if min(layers) < 0 or n_run > self.args.n_layers:
            raise ValueError(f"layers={layers}: expected block counts in 0..{self.args.n_layers}")
        start = cache.length if cache is not None else 0
        mask = (attention_mask.bool() if attention_mask is not None
                else torch.ones(B, start + T, dtype=torch.bool, device=device))
        # Positions count real tokens only: a padded row gets the positions it has alone.
        k_pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        k_valid = mask
        if prefix is not None:   # keys: row b's prompt (positions 0..P_b-1), then these from P_b
            Tp = prefix.kv[0][0].shape[2]
            prompt_pos = torch.arange(Tp, device=device).expand(B, -1)
            k_pos = torch.cat([prompt_pos, prefix.lengths[:, None] + k_pos], dim=1)
            k_valid = torch.cat([prompt_pos < prefix.lengths[:, None], mask], dim=1)
            start = Tp
        q_pos = k_pos[:, start:]
        window = self.args.sliding_window

        if (cache is None and prefix is None and self.args.attn_softcap is None and not window
                and (attention_mask is None or is_right_padded(mask))):
            # Causal alone will do: no real token sees a right-padded row's pads, and nothing
            # reads their outputs. Without a mask SDPA can take its flash kernel.
            masks = (None, None)
        else:
            flex = self.use_flex if self.use_flex is not None else device.type == "cuda"
            build = create_block_mask if flex and cache is None else attention_mask_4d
            rule = functools.partial(attention_rule, start, q_pos, k_pos, k_valid)
            S = k_pos.shape[1]
            # Mistral's layers all slide: no full mask to build then.
            all_slide = window and all(self.args.sliding_layers[:n_run])
            full = None if all_slide else build(rule(None), B, None, T, S, device=device)
            sliding = build(rule(window), B, None, T, S, device=device) if window else full
            masks = (full, sliding)
        cos, sin = rope_cos_sin(q_pos, self.args)

        h = self.tok_embeddings(tokens)                                             # [B, T, D]
        if self.args.embed_scale is not None:
            # Gemma-2 rounds sqrt(dim) to the activation dtype before scaling, as its reference.
            h = h * torch.tensor(self.args.embed_scale, dtype=h.dtype)
        states = {0: h}                        # only the requested layers are kept
        for i, block in enumerate(self.layers[:n_run]):
            slot = (cache.k[i], cache.v[i]) if cache is not None else None
            past = prefix.kv[i] if prefix is not None else None
            h, kv = block(h, cos, sin, masks, slot, start, past)
            if i + 1 in layers:
                states[i + 1] = h
            if record_kv is not None:
                record_kv.append(kv)
        if cache is not None:
            cache.length += T
        return tuple(states[k] for k in layers)

    def hidden_at(self, tokens, layers, attention_mask=None):
        """The residual stream after k blocks, k an int or a tuple of them: blocks 1..max run."""
        if isinstance(layers, int):
            return self._run(tokens, (layers,), attention_mask)[0]
        return self._run(tokens, tuple(layers), attention_mask)

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """final norm -> head -> final softcap, fp32 [B, T, V]: the output at N, else the lens."""
        # fp32: final logits and their softcap.
        return softcap(F.linear(self.norm(h), self.head_weight).float(), self.args.final_softcap)

    def forward(self, tokens, attention_mask=None, cache: KVCache | None = None,
                last_only: bool = False):
        """Logits [B, T, V] (fp32); last_only: [B, 1, V] (a prefill; Gemma-2's V is 256k)."""
        h = self._run(tokens, (self.args.n_layers,), attention_mask, cache)[0]
        return self.head_logits(h[:, -1:] if last_only else h)

    def dft_step(self, batch: dict, mode: str, cfg: DFTConfig, counts: dict) -> dict:
        """dft_step below, as a method so that FSDP2 can register it as a forward method."""
        return dft_step(self, batch, mode, cfg, counts)

    def init_cache(self, batch_size: int, max_len: int) -> KVCache:
        p = self.tok_embeddings.weight
        return KVCache(self.args, batch_size, max_len, p.device, p.dtype)

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu") -> "Transformer":
        """The model of an HF checkpoint dir, read shard by shard, each tensor assigned in place."""
        with torch.device("meta"):
            model = cls(read_args(path))
        state = {name: tensor.to(device=device, dtype=dtype)
                 for name, tensor in iter_checkpoint(path, model)}
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval()

    def save_pretrained(self, path, max_shard_bytes: int = 5 * 2**30):
        """HF layout, source torch_dtype, in shards of at most max_shard_bytes, one in memory at
        a time, in `<path>.tmp` renamed when complete (no half checkpoint). Under FSDP every rank
        calls this (each tensor is gathered from all), rank 0 writes."""
        from torch.distributed.tensor import DTensor     # here, not at the top: see load_weights

        is_writer = not dist.is_initialized() or dist.get_rank() == 0
        dtype = DTYPES.get(self.args.torch_dtype or "")
        shards = [{}]                   # file by file: HF name -> ours, in hf_names' order
        shard_bytes = 0
        for name, hf in hf_names(self.args).items():
            p = self.get_parameter(name)
            nbytes = p.numel() * (dtype or p.dtype).itemsize
            if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
                shards.append({})
                shard_bytes = 0
            shards[-1][hf] = name
            shard_bytes += nbytes
        n = len(shards)
        files = ([SINGLE_FILE] if n == 1
                 else [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)])
        tmp = Path(str(path) + ".tmp")
        if is_writer:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        for file, shard in zip(files, shards):
            tensors = {}
            for hf, name in shard.items():
                t = self.get_parameter(name).detach()
                if isinstance(t, DTensor):
                    t = t.full_tensor()
                if is_writer:
                    tensors[hf] = t.to(device="cpu", dtype=dtype or t.dtype).contiguous()
            if is_writer:
                save_file(tensors, str(tmp / file), metadata={"format": "pt"})
        if is_writer:
            if n > 1:
                total = sum((tmp / file).stat().st_size for file in files)
                weight_map = {hf: file for file, shard in zip(files, shards) for hf in shard}
                index = {"metadata": {"total_size": total}, "weight_map": weight_map}
                (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
            config = dict(self.args.hf_config) or hf_config_of(self.args)
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
            replace_dir(tmp, Path(path))
        if dist.is_initialized():
            dist.barrier()      # nobody reads the export before rank 0 has renamed it into place


# --- Deep supervision (DFT) -----------------------------------------------------------------------
# Losses on inner layers of the model above. S: the paper states it; I: our inference where
# it is silent (a DFTConfig field with that default).
#
#   L = L_TFT + L_LC + L_ET                          (S; I: weighted by lc_weight, et_weight)
#   L_TFT = -log P(y_tgt | x_tgt; blocks 1..N, head)  ordinary fine-tuning                (S)
# Logits-based: the head (final norm (I) + W_out) reads an inner layer, frozen (S: LC, I: ET):
#   L_LC = -log P(x_en | x_tgt; blocks 1..i, head)   on the sequence [x_tgt ; x_en] (I)  (S)
#   L_ET = -log P(y_en | x_tgt; blocks 1..j, head)   on the sequence [x_tgt ; y_en] (I)  (S)
# Feature-based: h_k = residual stream after block k, pooled over the query's content (I):
#   L_LC = 1 - cos(h_i(x_en), h_i(x_tgt))                                                 (S)
#   L_ET = 1 - cos(h_N(x_en), h_j(x_tgt))        h_N(x_en) after the final norm (I)       (S)

# sft: English pairs, tft: target-language pairs, both L_TFT alone; the dft modes add LC and ET.
MODES = ("sft", "tft", "dft-logits", "dft-feature")
LOSS_TYPES = ("logits", "feature", "none")


@dataclass
class DFTConfig:
    lc_type: str | None = None      # None: the mode's; set one to mix the forms (S: allowed)
    et_type: str | None = None
    lc_layer: int | None = None     # i, a 1-based block count; None: default_layers
    et_layer: int | None = None     # j
    lc_weight: float = 1.0          # (I) the paper does not weight; 0 skips the pass
    et_weight: float = 1.0
    lc_content_only: bool = True    # (I) LC predicts x_en's instruction+input, not template words
    pooling: str = "mean"           # (I) feature losses: mean over the query's content | "last"
    detach_teacher: bool = True     # (I) a feature loss's English side is a teacher: no gradient
    teacher_norm: bool = True       # (I) ET's teacher h_N(x_en) after the final norm, as HF's
    chunk_size: int = 1024          # tokens per chunk of the logit-lens cross-entropy
    prefix_share: bool = True       # logits LC/ET: reuse x_tgt's keys and values of the TFT pass

    def types(self, mode: str) -> tuple[str, str]:
        """The (LC, ET) loss types a mode runs: "logits" | "feature" | "none"."""
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; expected one of {', '.join(MODES)}")
        base = {"dft-logits": "logits", "dft-feature": "feature"}.get(mode, "none")
        lc, et = self.lc_type or base, self.et_type or base
        if mode == "sft" and (lc, et) != ("none", "none"):
            raise ValueError("mode 'sft' (English only) has no LC/ET: drop --lc-type/--et-type")
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
                raise ValueError(f"{name}={k}: the model has {args.n_layers} blocks; "
                                 f"expected 1..{args.n_layers}")
        return i, j


def default_layers(n_layers: int, family: str) -> tuple[int, int]:
    """(i, j): LLaMA-2-7B (32 blocks) 2, 15 (S: best ET; I: LC where the entropy drops),
    Gemma-2-2B (26) 2, 12 (I: the same relative depth); other depths scale."""
    ref_depth, ref_j = (26, 12) if family == "gemma2" else (32, 15)
    i = max(1, round(2 * n_layers / ref_depth))
    j = min(n_layers, max(i + 1, round(ref_j * n_layers / ref_depth)))
    return i, j


def lens_labels(batch: dict, kind: str, cfg: DFTConfig) -> torch.Tensor:
    """Logit-lens targets of "lc" or "et". LC's are by default x_en's content only, since x_tgt
    holds the same template words to copy (lc_content marks labels, not tokens)."""
    labels = batch[f"{kind}_labels"]
    if kind == "lc" and cfg.lc_content_only:
        labels = labels.masked_fill(batch["lc_content"] == 0, IGNORE_INDEX)
    return labels


def count_targets(batch: dict, mode: str, cfg: DFTConfig) -> dict[str, int]:
    """Targets per part, supervised tokens (CE) or examples (features), for dft_step's counts."""
    counts = {"tft": int((batch["tft_labels"] != IGNORE_INDEX).sum()), "lc": 0, "et": 0}
    for part, loss_type in zip(("lc", "et"), cfg.types(mode)):
        if loss_type == "logits":
            counts[part] = int((lens_labels(batch, part, cfg) != IGNORE_INDEX).sum())
        elif loss_type == "feature":
            counts[part] = batch["tft_tokens"].shape[0]      # examples
    return counts


def dft_step(model: Transformer, batch: dict, mode: str, cfg: DFTConfig, counts: dict) -> dict:
    """One micro-batch of L -> {"loss", "tft", "lc", "et"}: each part's sum over the step's
    global count, so all micro-batches on all ranks add up to the global mean."""
    lc_type, et_type = cfg.types(mode)
    i, j = cfg.layers(model.args)
    N = model.args.n_layers
    zero = torch.zeros((), device=batch["tft_tokens"].device)

    def lens_ce(h, labels, freeze_head):
        return logit_lens_ce(h, model.norm, model.head_weight, labels, cfg.chunk_size,
                             model.args.final_softcap, "sum", freeze_head=freeze_head)

    # L_TFT on [x_tgt ; y_tgt]; head and final norm train. By causality the same pass holds
    # h_i(x_tgt) and h_j(x_tgt) at the prompt positions: the feature losses' students.
    share = cfg.prefix_share and "logits" in (lc_type, et_type)
    if share and not is_right_padded(batch["tft_mask"], batch["lc_mask"], batch["et_mask"]):
        raise ValueError("dft_step: prefix_share (--prefix-share) reads x_tgt at each row's start: "
                         "pad the batch on the right, as prepare_data.collate does, or turn it off")
    tft_kv = [] if share else None
    h_i, h_j, h_N = model._run(batch["tft_tokens"], (i, j, N), batch["tft_mask"], record_kv=tft_kv)
    sums = {"tft": lens_ce(h_N, batch["tft_labels"], False), "lc": zero, "et": zero}

    # Logits-based: blocks 1..k on [x_tgt ; English], frozen head. Shared: only the English part
    # runs, on x_tgt's keys and values from the TFT pass (the same, by causality).
    for kind, loss_type, k, h_tft in (("lc", lc_type, i, h_i), ("et", et_type, j, h_j)):
        if loss_type != "logits":
            continue
        labels = lens_labels(batch, kind, cfg)
        if share:
            h, labels = continue_prompt(model, batch, kind, k, h_tft, tft_kv, labels)
        else:
            h = model.hidden_at(batch[f"{kind}_tokens"], k, batch[f"{kind}_mask"])
        sums[kind] = lens_ce(h, labels, True)

    # Feature-based: one pass of the English query gives both teachers, h_i(x_en), h_N(x_en).
    pairs = {"lc": (lc_type, h_i, i), "et": (et_type, h_j, N)}    # kind: (type, student, layer)
    feature = [kind for kind, (loss_type, _, _) in pairs.items() if loss_type == "feature"]
    if feature:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not cfg.detach_teacher):
            layers = tuple(pairs[kind][2] for kind in feature)
            hidden = model.hidden_at(batch["en_tokens"], layers, batch["en_mask"])
            teachers = dict(zip(feature, hidden))
            if "et" in teachers and cfg.teacher_norm:
                teachers["et"] = model.norm(teachers["et"])
        for kind in feature:
            sums[kind] = feature_cosine_loss(pairs[kind][1], teachers[kind], batch["tgt_content"],
                                             batch["en_content"], cfg.pooling,
                                             cfg.detach_teacher, "sum")

    parts = {part: total / max(counts[part], 1) for part, total in sums.items()}
    parts["loss"] = parts["tft"] + cfg.lc_weight * parts["lc"] + cfg.et_weight * parts["et"]
    return parts


def continue_prompt(model: Transformer, batch, kind: str, k: int, h_prompt, prompt_kv, labels):
    """Layer-k states and labels of [x_tgt ; rest] from x_tgt's last position on: blocks 1..k
    run on rest only, on x_tgt's prompt_kv; x_tgt's last state comes from h_prompt."""
    tokens, mask = batch[f"{kind}_tokens"], batch[f"{kind}_mask"]
    P = batch["tgt_prompt_len"]                                                    # [B]
    T = tokens.shape[1]
    n_rest = max(int((mask.sum(1) - P).max()), 1)
    at = P[:, None] + torch.arange(n_rest, device=tokens.device)   # [B, n] positions of rest
    rest = tokens.gather(1, at.clamp(max=T - 1))
    rest_mask = mask.gather(1, at.clamp(max=T - 1)) * (at < T)
    Tp = int(P.max())
    prefix = SharedPrefix([(keys[:, :, :Tp], values[:, :Tp]) for keys, values in prompt_kv[:k]], P)
    h_rest = model._run(rest, (k,), rest_mask, prefix=prefix)[0]                  # [B, n, D]
    last = (P - 1)[:, None, None].expand(-1, 1, h_prompt.shape[-1])
    h_seam = h_prompt.gather(1, last)                                             # [B, 1, D]
    at = torch.cat([P[:, None] - 1, at], dim=1)                                   # [B, 1 + n]
    labels = labels.gather(1, at.clamp(max=T - 1)).masked_fill(at >= T, IGNORE_INDEX)
    return torch.cat([h_seam, h_rest], dim=1), labels


# --- Checkpoint IO: the one place that knows the HF names -----------------------------------------

CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(flag: str, device_type: str) -> str:
    """--dtype auto|bf16|fp32 -> bf16|fp32; auto: bf16 on CUDA, fp32 on CPU (bf16 ~100x slower)."""
    return flag if flag != "auto" else "bf16" if device_type == "cuda" else "fp32"


def write_atomic(path: Path, text: str) -> None:
    """Write `path` under a temporary name, then rename it: a kill never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def replace_dir(staging: Path, target: Path) -> None:
    """Put the complete dir `staging` in `target`'s place. The old target is renamed aside, then
    removed: a kill leaves it whole (maybe as target.old), never half deleted or mixed."""
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.rename(target, old)
    os.rename(staging, target)
    shutil.rmtree(old, ignore_errors=True)


def hf_names(args: ModelArgs) -> dict[str, str]:
    """Our parameter name -> its name in the official HF safetensors files, in file order."""
    block = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
             "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
             "feed_forward.w_gate": "mlp.gate_proj", "feed_forward.w_up": "mlp.up_proj",
             "feed_forward.w_down": "mlp.down_proj", "attn_norm": "input_layernorm"}
    if args.sandwich_norm:     # Gemma-2: four norms per block
        block.update({"attn_post_norm": "post_attention_layernorm",
                      "ffn_norm": "pre_feedforward_layernorm",
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
        raise CheckpointError(f"{path}: not a JSON object; re-download {path.name}")
    return value


# The Hub organisation of the model names people pass as --model, for a download command.
HUB_ORGS = {"llama": "meta-llama", "meta-llama": "meta-llama", "gemma": "google",
            "mistral": "mistralai", "qwen": "Qwen"}


def missing_model_message(model_dir: Path, missing: str = CONFIG_NAME) -> str:
    """One line: model_dir lacks `missing`; download it, or try a tiny model (not in model_dir)."""
    name = model_dir.name
    org = next((o for prefix, o in HUB_ORGS.items() if name.lower().startswith(prefix)), "ORG")
    return (f"{model_dir}/{missing}: not found; download the model with: huggingface-cli download "
            f"{org}/{name} --local-dir {model_dir} (gated models: accept the licence on the Hub "
            "first); or, for a try-out, make a tiny random model with: python model.py "
            "--make-tiny models/tiny-llama --family llama, and pass --model models/tiny-llama")


def read_args(path) -> ModelArgs:
    path = Path(path)
    config = path / CONFIG_NAME
    if not config.is_file():
        raise CheckpointError(missing_model_message(path))
    return ModelArgs.from_hf_config(json_file(config), str(config))


def check_checkpoint(path, model: Transformer) -> list[Path]:
    """The safetensors files of a checkpoint dir (one, or the shards its index names), checked from
    the headers only: one error lists every missing, unexpected or wrong-shape tensor."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = json_file(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' object; re-download the index")
        files = [path / f for f in dict.fromkeys(weight_map.values())]
    elif (path / SINGLE_FILE).is_file():
        files = [path / SINGLE_FILE]
    else:
        raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}; expected HF safetensors")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{index}: missing shard(s) {', '.join(missing)}; download them all")
    ours = {name: p.shape for name, p in model.named_parameters()}
    expected = {hf: tuple(ours[name]) for name, hf in hf_names(model.args).items()}
    seen, problems = set(), []
    for f in files:
        try:
            with safe_open(f, framework="pt") as sf:
                for key in sf.keys():
                    shape = tuple(sf.get_slice(key).get_shape())
                    if key == "lm_head.weight" and model.args.tie_embeddings:
                        continue   # a tied head some exporters save anyway: the embedding is it
                    if key not in expected:
                        problems.append(f"unexpected {key} in {f.name}")
                    elif shape != expected[key]:
                        problems.append(f"{key} in {f.name} has shape {list(shape)}, "
                                        f"expected {list(expected[key])}")
                    seen.add(key)
        except (OSError, SafetensorError) as e:
            raise CheckpointError(f"{f}: unreadable safetensors ({e}); re-download it") from None
    problems += [f"missing {key}" for key in expected if key not in seen]
    if problems:
        more = f"; ... {len(problems) - 12} more" if len(problems) > 12 else ""
        raise CheckpointError(f"{path}: checkpoint does not match its config.json: "
                              f"{'; '.join(problems[:12])}{more}")
    return files


def iter_checkpoint(path, model: Transformer, files: list[Path] | None = None):
    """(our name, tensor) file by file, after checking all headers against the model."""
    files = files if files is not None else check_checkpoint(path, model)
    ours = {hf: name for name, hf in hf_names(model.args).items()}
    for f in files:
        with safe_open(f, framework="pt") as sf:
            for key in sf.keys():
                if key in ours:
                    yield ours[key], sf.get_tensor(key)


def load_weights(model: nn.Module, path) -> None:
    """Fill a model built on meta then to_empty, also under fully_shard. Under torchrun rank 0
    reads and broadcasts file by file: no rank holds more than a file plus its model share."""
    if not dist.is_initialized():
        params = dict(model.named_parameters())
        state = {name: tensor.to(device=params[name].device, dtype=params[name].dtype)
                 for name, tensor in iter_checkpoint(path, model)}
        model.load_state_dict(state, strict=True, assign=True)
        return
    # Imported here: DTensor pulls in sympy, ~2 s at each start of the scripts that never shard.
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    rank = dist.get_rank()
    checked = [None]                # rank 0's files, or its error message
    if rank == 0:
        try:
            checked = [check_checkpoint(path, model)]
        except CheckpointError as e:
            checked = [str(e)]
    dist.broadcast_object_list(checked, src=0)     # every rank fails together rather than hang
    if isinstance(checked[0], str):
        raise CheckpointError(checked[0])
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    for f in checked[0]:
        shard = dict(iter_checkpoint(path, model, [f])) if rank == 0 else {}
        set_model_state_dict(model, shard, options=options)


def hf_config_of(args: ModelArgs) -> dict:
    """The config.json of a model built from ModelArgs (the tiny checkpoints), spelled as the
    released files are (top-level rope_theta, rope_scaling)."""
    cfg = {"architectures": [f"{args.family.capitalize()}ForCausalLM"], "model_type": args.family,
           "hidden_size": args.dim, "intermediate_size": args.hidden_dim,
           "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
           "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
           "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps,
           "rope_theta": args.rope_theta, "max_position_embeddings": args.max_seq_len,
           "bos_token_id": args.bos_id, "eos_token_id": args.eos_id,
           "tie_word_embeddings": args.tie_embeddings, "torch_dtype": args.torch_dtype or "float32"}
    if args.family != "gemma2":
        rope_scaling = dict(args.rope_scaling, rope_type="llama3") if args.rope_scaling else None
        cfg.update(hidden_act="silu", pad_token_id=None, rope_scaling=rope_scaling)
    if args.family == "llama":
        cfg.update(attention_bias=False, mlp_bias=False)
    elif args.family == "mistral":
        cfg.update(sliding_window=args.sliding_window)
    elif args.family == "qwen2":
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=args.n_layers)
    else:
        cfg.update(hidden_activation="gelu_pytorch_tanh", hidden_act="gelu_pytorch_tanh",
                   attention_bias=False, query_pre_attn_scalar=round(args.query_scale ** -2),
                   attn_logit_softcapping=args.attn_softcap,
                   final_logit_softcapping=args.final_softcap,
                   sliding_window=args.sliding_window, pad_token_id=0,
                   layer_types=["sliding_attention" if s else "full_attention"
                                for s in args.sliding_layers])
    return cfg


# --- Tokenizer ------------------------------------------------------------------------------------

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")  # in this order: LLaMA-2, Gemma-2 ship both


class Tokenizer:
    """A checkpoint's `tokenizer.model` (SentencePiece: LLaMA-2, Mistral, Gemma-2), else its
    `tokenizer.json` (byte-level BPE: LLaMA-3, Qwen2). `encode(text, bos=True)` gives transformers'
    ids with add_special_tokens=True; bos_id is None where nothing precedes a text (Qwen2). With no
    pad token (LLaMA) we pad, under a 0 mask and -100 label only, with 0 (SentencePiece) or EOS."""

    def __init__(self, path):
        path = Path(path)
        if path.is_dir():
            path = next((path / n for n in TOKENIZER_FILES if (path / n).is_file()), path)
        if not path.is_file():
            raise CheckpointError(missing_model_message(path, " or ".join(TOKENIZER_FILES)))
        self.path = path
        data = path.read_bytes()
        self.sp = None
        self.bpe = None
        if path.suffix == ".json":
            self._read_tokenizer_json(data)
            # Its EOS and pad come from tokenizer_config.json: prepared data depends on them.
            data += f"\nbos={self.bos_id} eos={self.eos_id} pad={self.pad_id}".encode()
        else:
            self._read_sentencepiece(data)
        self.sha256 = hashlib.sha256(data).hexdigest()

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
        except Exception as e:  # the Rust library raises a bare Exception for a file it can't read
            raise CheckpointError(f"{self.path}: not a tokenizers file ({e}); re-download "
                                  "tokenizer.json") from None
        # The BOS is what the post-processor puts before a text (LLaMA-3; Qwen2 puts none).
        plain = self.bpe.encode("a", add_special_tokens=False).ids
        full = self.bpe.encode("a", add_special_tokens=True).ids
        before = full[:len(full) - len(plain)]
        if full[len(before):] != plain or len(before) > 1:
            raise CheckpointError(f"{self.path}: its post_processor turns ids {plain} into {full}; "
                                  "expected at most one BOS in front and nothing after")
        self.bos_id = before[0] if before else None
        config = json_file(self.path.parent / "tokenizer_config.json")
        eos_id = self._special_id(config, "eos_token")
        self.eos_id = eos_id if eos_id is not None else model_eos_id(self.path.parent)
        self.pad_id = self._special_id(config, "pad_token", default=self.eos_id)
        self.vocab_size = self.bpe.get_vocab_size(with_added_tokens=True)

    def _special_id(self, config: dict, key: str, default: int | None = None) -> int | None:
        """The id of tokenizer_config.json's `key` (a string or an AddedToken), else `default`."""
        token = config.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        if token is None:
            return default
        token_id = self.bpe.token_to_id(token)
        if token_id is None:
            raise CheckpointError(f"{self.path.parent / 'tokenizer_config.json'}: {token!r} is "
                                  f"not a token of {self.path}; re-download both files")
        return token_id

    def _bos(self, bos: bool) -> list[int]:
        return [self.bos_id] if bos and self.bos_id is not None else []

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = (self.sp.encode(text) if self.sp is not None
               else self.bpe.encode(text, add_special_tokens=False).ids)
        return self._bos(bos) + ids

    def encode_with_offsets(self, text: str, bos: bool = True):
        """(ids, each token's [start, end) in characters of `text`) from one encoding; a token
        holding part of a character's bytes covers that whole character."""
        if self.bpe is not None:
            encoding = self.bpe.encode(text, add_special_tokens=False)  # offsets in characters
            ids, spans = encoding.ids, list(encoding.offsets)
        else:
            ids = self.sp.encode(text)
            spans = self._sentencepiece_spans(text, ids)
        head = self._bos(bos)
        return head + ids, [(0, 0)] * len(head) + spans

    def _sentencepiece_spans(self, text: str, ids: list[int]) -> list[tuple[int, int]]:
        # Each piece's surface bytes: 1 for a byte-fallback <0xNN>, else its text, ▁ = space.
        pieces = self.sp.id_to_piece(ids)
        sizes = [1 if len(p) == 6 and p.startswith("<0x") and p.endswith(">")
                 else len(p.replace("\u2581", " ").encode()) for p in pieces]
        data = text.encode()
        shift = sum(sizes) - len(data)        # 1 when SentencePiece added its dummy-prefix space
        if shift not in (0, 1):
            raise ValueError(f"{self.path}: pieces do not add up to the text ({shift:+d} bytes); "
                             "this tokenizer normalises text, which span mapping does not support")
        char_at = [k for k, ch in enumerate(text) for _ in ch.encode()]  # byte -> char offset
        spans, pos = [], -shift
        for size in sizes:
            start, pos = max(pos, 0), pos + size
            spans.append((char_at[start], char_at[pos - 1] + 1) if pos > start else (0, 0))
        return spans

    def decode(self, ids) -> str:
        kept = [int(i) for i in ids if int(i) not in {self.bos_id, self.eos_id, self.pad_id}]
        return (self.sp.decode(kept) if self.sp is not None
                else self.bpe.decode(kept, skip_special_tokens=True))

    def piece(self, token_id: int) -> str:
        """An id's vocabulary entry as the tokenizer spells it: "▁Paris", "<0x0A>", "ĠParis";
        "<id N>" past the vocabulary (a model's embedding table may be padded beyond it)."""
        if not 0 <= token_id < self.vocab_size:
            return f"<id {token_id}>"
        return (self.sp.id_to_piece(token_id) if self.sp is not None
                else self.bpe.id_to_token(token_id))


def model_eos_id(folder: Path) -> int:
    """The EOS where tokenizer_config.json names none: the first eos_token_id (LLaMA-3.1 and
    Qwen2.5 list every id that ends a turn) of generation_config.json, else of config.json."""
    for name in ("generation_config.json", CONFIG_NAME):
        eos = json_file(folder / name).get("eos_token_id")
        if eos not in (None, []):
            return eos[0] if isinstance(eos, list) else eos
    raise CheckpointError(f"{folder}: no EOS token; expected eos_token in tokenizer_config.json "
                          "or eos_token_id in generation_config.json / config.json")


# --- Tiny random checkpoints (tests and the demo) -------------------------------------------------

TINY_BASE = dict(dim=64, n_layers=4, n_heads=4, head_dim=16, max_seq_len=1024, norm_eps=1e-5)
TINY = {
    "llama": dict(TINY_BASE, family="llama", n_kv_heads=2, hidden_dim=160),
    # LLaMA-3.2-1B's kind: tied head, theta 500000, llama3 rescaling; a pre-training context of
    # 64 puts the rescaled and blended bands among a 16-wide head's frequencies.
    "llama3": dict(TINY_BASE, family="llama", n_kv_heads=1, hidden_dim=224, rope_theta=500000.0,
                   tie_embeddings=True,
                   rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=64)),
    "mistral": dict(TINY_BASE, family="mistral", n_kv_heads=1, hidden_dim=224, sliding_window=16),
    "qwen2": dict(TINY_BASE, family="qwen2", n_kv_heads=2, hidden_dim=176, norm_eps=1e-6,
                  rope_theta=1000000.0, qkv_bias=True),
    "gemma2": dict(TINY_BASE, family="gemma2", n_kv_heads=2, head_dim=32, hidden_dim=128,
                   norm_eps=1e-6, tie_embeddings=True, norm_offset=1.0, mlp_act="gelu_tanh",
                   embed_scale=8.0, sandwich_norm=True, query_scale=32 ** -0.5,
                   attn_softcap=50.0, final_softcap=30.0, sliding_window=16),
}

# The released tokenizer.json files' splits (LLaMA-3 groups up to 3 digits, Qwen2 none).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")

# Each tiny family's tokenizer as released: transformers' class, the special tokens (None: none)
# and, for byte-level BPE, the pre-tokenizer split, NFC normalisation and further specials.
TINY_TOKENIZERS = {
    "llama": dict(tokenizer_class="LlamaTokenizer", bos="<s>", eos="</s>", unk="<unk>", pad=None),
    "gemma2": dict(tokenizer_class="GemmaTokenizer", bos="<bos>", eos="<eos>", unk="<unk>",
                   pad="<pad>"),
    "llama3": dict(tokenizer_class="PreTrainedTokenizerFast", bos="<|begin_of_text|>",
                   eos="<|end_of_text|>", unk=None, pad=None, split=LLAMA3_SPLIT, nfc=False,
                   extra=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    "qwen2": dict(tokenizer_class="Qwen2Tokenizer", bos=None, eos="<|endoftext|>", unk=None,
                  pad="<|endoftext|>", split=QWEN2_SPLIT, nfc=True,
                  extra=("<|im_start|>", "<|im_end|>")),
}
TINY_TOKENIZERS["mistral"] = TINY_TOKENIZERS["llama"]     # Mistral-7B's is LLaMA-2's kind


def train_sentencepiece(texts, vocab_size: int, family: str) -> bytes:
    """A byte-fallback BPE SentencePiece model on `texts`, with the family's special-token ids
    and pieces. Gemma's adds no dummy-prefix space before a text, LLaMA's and Mistral's do."""
    spec = TINY_TOKENIZERS[family]
    if family == "gemma2":
        ids = dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece=spec["pad"])
    else:
        ids = dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    out = io.BytesIO()
    # As in LLaMA-2's vocabulary no piece holds a newline (byte fallback <0x0A>).
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([t.replace("\n", " ") for t in texts]), model_writer=out,
        vocab_size=vocab_size, model_type="bpe", byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=family != "gemma2", hard_vocab_limit=False, character_coverage=0.995,
        max_sentence_length=1 << 16, minloglevel=2, bos_piece=spec["bos"],
        eos_piece=spec["eos"], unk_piece=spec["unk"], **ids)
    return out.getvalue()


def bos_processor(tok: tokenizers.Tokenizer, bos: str) -> tokenizers.processors.PostProcessor:
    """The released files' post-processor that puts `bos` before a text (and each of a pair)."""
    return tokenizers.processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])


def sentencepiece_as_tokenizer_json(sp_bytes: bytes, family: str) -> tokenizers.Tokenizer:
    """The tokenizer.json of a SentencePiece BPE model (transformers then needs no protobuf).
    SentencePiece joins the adjacent pair whose joined piece scores highest, tokenizers' BPE the
    pair ranked first: ranking every split of a piece in two by that piece's score agrees."""
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(sp_bytes)
    n = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    special = [i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
    normal = {sp.id_to_piece(i) for i in range(n) if i not in special and not sp.is_byte(i)}
    ranked = sorted((-sp.get_score(vocab[piece]), vocab[piece], vocab[piece[:cut]],
                     vocab[piece[cut:]])
                    for piece in normal for cut in range(1, len(piece))
                    if piece[:cut] in normal and piece[cut:] in normal)
    merges = [(sp.id_to_piece(left), sp.id_to_piece(right)) for _, _, left, right in ranked]
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(
        vocab, merges, unk_token=sp.id_to_piece(sp.unk_id()), fuse_unk=True, byte_fallback=True))
    decode = [tokenizers.decoders.Replace("\u2581", " "), tokenizers.decoders.ByteFallback(),
              tokenizers.decoders.Fuse()]
    if family == "gemma2":
        tok.normalizer = tokenizers.normalizers.Replace(" ", "\u2581")
    else:       # the dummy prefix: one "▁" before the text
        tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
        decode.append(tokenizers.decoders.Strip(" ", 1, 0))
    tok.decoder = tokenizers.decoders.Sequence(decode)
    tok.add_special_tokens([tokenizers.AddedToken(sp.id_to_piece(i), special=True,
                                                  normalized=False) for i in special])
    tok.post_processor = bos_processor(tok, sp.id_to_piece(sp.bos_id()))
    return tok


def train_byte_level_bpe(texts, vocab_size: int, family: str) -> tokenizers.Tokenizer:
    """Byte-level BPE on `texts` as in LLaMA-3's and Qwen2's tokenizer.json: regex split, bytes
    as characters, specials after the learnt vocabulary, the BOS (if any) by the post-processor."""
    spec = TINY_TOKENIZERS[family]
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    if spec["nfc"]:
        tok.normalizer = tokenizers.normalizers.NFC()
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Split(tokenizers.Regex(spec["split"]), behavior="isolated"),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = tokenizers.decoders.ByteLevel()
    specials = [t for t in (spec["bos"], spec["eos"], spec["pad"], *spec["extra"]) if t]
    specials = list(dict.fromkeys(specials))
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size - len(specials), show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                            for t in specials])
    byte_level = tokenizers.processors.ByteLevel(trim_offsets=False)
    tok.post_processor = (byte_level if spec["bos"] is None else tokenizers.processors.Sequence(
        [byte_level, bos_processor(tok, spec["bos"])]))
    return tok


def tiny_tokenizer_files(texts, vocab_size: int, family: str) -> dict[str, bytes]:
    """File name -> content of a tiny tokenizer: tokenizer.model (SentencePiece) and the files
    with which transformers' AutoTokenizer loads it (no protobuf needed) and gives our ids."""
    spec = TINY_TOKENIZERS[family]
    special = {f"{kind}_token": spec[kind] for kind in ("bos", "eos", "unk", "pad")}
    config = dict(tokenizer_class=spec["tokenizer_class"], **special,
                  clean_up_tokenization_spaces=False)
    tokens_map = {key: value for key, value in special.items() if value is not None}
    files = {}
    if "split" in spec:
        tok = train_byte_level_bpe(texts, vocab_size, family)
        tokens_map["additional_special_tokens"] = list(spec["extra"])
    else:
        files["tokenizer.model"] = train_sentencepiece(texts, vocab_size, family)
        tok = sentencepiece_as_tokenizer_json(files["tokenizer.model"], family)
        # transformers' defaults for SentencePiece, said explicitly
        config.update(add_bos_token=True, add_eos_token=False, legacy=False)
    if family == "gemma2":      # else GemmaTokenizer adds a <mask> our tiny vocabulary lacks
        config["mask_token"] = None
    files["tokenizer.json"] = tok.to_str().encode()
    files["tokenizer_config.json"] = (json.dumps(config, indent=2) + "\n").encode()
    files["special_tokens_map.json"] = (json.dumps(tokens_map, indent=2) + "\n").encode()
    return files


def write_tiny_checkpoint(path, family: str, texts, vocab_size: int | None = None, seed: int = 0,
                          **arg_overrides) -> Path:
    """A tiny random model in the HF layout + its family's kind of tokenizer trained on `texts`.
    Refuses a dir that holds a checkpoint; builds next to it and moves the files in when done."""
    if family not in TINY:
        raise ValueError(f"family={family!r}; expected one of {', '.join(TINY)}")
    path = Path(path)
    held = sorted(f.name for f in path.glob("*")
                  if f.name in (CONFIG_NAME, INDEX_FILE) or f.suffix == ".safetensors")
    if held:
        raise ValueError(f"{path}: already holds a checkpoint ({', '.join(held)}); use another dir")
    staging = path.with_name(path.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name, data in tiny_tokenizer_files(texts, vocab_size or 2048, family).items():
        (staging / name).write_bytes(data)
    tok = Tokenizer(staging)
    fields = dict(TINY[family], vocab_size=tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id,
                  **arg_overrides)
    if fields.get("sliding_window") and "sliding_layers" not in fields:
        n = fields["n_layers"]          # Gemma-2 alternates; the others slide on every layer
        fields["sliding_layers"] = tuple(family != "gemma2" or i % 2 == 0 for i in range(n))
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**fields))
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    model.save_pretrained(staging / "weights")
    for f in (staging / "weights").iterdir():
        os.replace(f, staging / f.name)
    (staging / "weights").rmdir()
    generation = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id}
    generation = {key: value for key, value in generation.items() if value is not None}
    (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    # config.json goes in last: a dir without it is no checkpoint, whatever an interruption left.
    path.mkdir(parents=True, exist_ok=True)
    for f in sorted(staging.iterdir(), key=lambda f: f.name == CONFIG_NAME):
        os.replace(f, path / f.name)
    staging.rmdir()
    return path


SAMPLE_DIR = Path(__file__).resolve().parent / "data" / "sample"  # the bundled Alpaca sample


def sample_texts(files=None) -> list[str]:
    """Every non-empty instruction, input and output of Alpaca files (default: the sample)."""
    files = files or sorted(SAMPLE_DIR.glob("alpaca_*.json"))
    return [row[k] for f in files for row in json.loads(Path(f).read_text(encoding="utf-8"))
            for k in ("instruction", "input", "output") if row.get(k)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--make-tiny", metavar="DIR", required=True,
                        help="write a tiny random HF checkpoint + tokenizer to DIR, if it has none")
    parser.add_argument("--family", choices=list(TINY), default="llama",
                        help="llama is LLaMA-2, llama3 LLaMA-3.x (default: %(default)s)")
    parser.add_argument("--texts", nargs="*", metavar="FILE.json",
                        help="Alpaca files for the tokenizer (default: data/sample/alpaca_*.json)")
    parser.add_argument("--vocab-size", type=int, default=2048,
                        help="tokenizer vocabulary (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="weights' seed (default: %(default)s)")
    a = parser.parse_args(argv)
    try:
        texts = sample_texts(a.texts)
        if not texts:
            raise ValueError("no texts to train the tokenizer on; pass --texts FILE.json")
        out = write_tiny_checkpoint(a.make_tiny, a.family, texts, a.vocab_size, a.seed)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote a tiny random {a.family} checkpoint to {out}")


if __name__ == "__main__":
    main()
