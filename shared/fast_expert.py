"""The expert's forward over a cached prefix, written for speed; equal to `AlpamayoHead.velocity`.

Same modules, same weights, same math as transformers' `Qwen3VLTextModel` with a `DynamicCache`
(tests/test_fast_expert.py holds them equal in fp32 to 1e-5); what changes is the plumbing:

- no cache object: layer i's action keys/values are concatenated after the prefix's directly;
- grouped-query attention without repeating K/V: the `group` query heads that share a KV head are
  stacked along the query axis, so SDPA sees (B, kv_heads, group * T, D) against (B, kv_heads, L + T, D);
- K draws of (t, noise) share one prefix in one pass: the K action blocks sit side by side in the
  query axis with a block-diagonal mask among them (each block sees the prefix and itself only, at the
  release positions p_i = L + delta + i), so a prefix is never copied per draw;
- one decoder layer is one function, so `torch.compile` compiles it once and reuses it for all layers
  (regional compilation: bounded compile time), and a CUDA graph can capture the whole step.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from .head import N_ACTION, AlpamayoHead, KVPrefix
from .kv_quant import dequantize_int8_prefix
from .prefix_attention import prefix_attention


def action_mask(prefix: KVPrefix, draws: int, dtype: torch.dtype, causal: bool, n_action: int = N_ACTION
                ) -> torch.Tensor:
    """Additive mask (B, 1, K*64, L_max + K*64): 0 = attend, finfo.min = blocked.

    Columns [L, L_max) (padding) are blocked; among the K action blocks each sees only itself
    (all-see-all inside the block, or lower-triangular when `causal`)."""
    device = prefix.lengths.device
    bsz, lmax, t = prefix.batch_size, prefix.max_len, draws * n_action
    keep_prefix = torch.arange(lmax, device=device).view(1, -1) < prefix.lengths.view(-1, 1)  # (B, Lmax)
    block = torch.arange(t, device=device) // n_action
    keep_action = block.view(-1, 1) == block.view(1, -1)  # (T, T) block-diagonal
    if causal:
        keep_action &= torch.ones(t, t, dtype=torch.bool, device=device).tril()
    keep = torch.cat([keep_prefix.view(bsz, 1, 1, lmax).expand(bsz, 1, t, lmax),
                      keep_action.view(1, 1, t, t).expand(bsz, 1, t, t)], dim=-1)
    return torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill(~keep, torch.finfo(dtype).min)


def rope_tables(head: AlpamayoHead, prefix: KVPrefix, draws: int, like: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (B, K*64, head_dim) for p_i = L + delta + i, the same positions for every draw."""
    base = (prefix.lengths + prefix.rope_deltas).view(-1, 1)
    pos = (base + torch.arange(N_ACTION, device=base.device).view(1, -1)).repeat(1, draws)  # (B, K*64)
    return head.expert.rotary_emb(like, pos.unsqueeze(0).expand(3, -1, -1))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pre: torch.Tensor, v_pre: torch.Tensor,
               mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """SDPA of q (B, kv, g*T, D) over [prefix; action] keys / values -> (B, kv, g*T, D)."""
    keys = torch.cat([k_pre.to(k.dtype), k], dim=2)  # (B, kv_heads, L_max + T, D)
    values = torch.cat([v_pre.to(v.dtype), v], dim=2)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)


def _attention_split(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pre: torch.Tensor, v_pre: torch.Tensor,
                     lengths: torch.Tensor, act_mask: torch.Tensor, scale: float, k_scale: torch.Tensor | None = None,
                     v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The same attention as `_attention` without the concatenation: the prefix part by
    shared/prefix_attention.py (reads the cache in place, int8 codes too, no key / value gradients), the
    action block (B, kv, g*T, T) in fp32 here, merged by log-sum-exp. act_mask: the last T columns of the mask."""
    o_pre, lse_pre = prefix_attention(q, k_pre, v_pre, lengths, scale, k_scale, v_scale)  # (B, kv, g*T, D), (B, kv, g*T)
    s_act = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale + act_mask  # (B, kv, g*T, T)
    lse = torch.logaddexp(lse_pre, torch.logsumexp(s_act, -1))
    o = o_pre * torch.exp(lse_pre - lse)[..., None] + torch.matmul(torch.exp(s_act - lse[..., None]), v.float())
    return o.to(q.dtype)


class _LinearWgradInto(torch.autograd.Function):
    """y = x W^T whose backward accumulates dW into a buffer (one GEMM with C += A B) instead of handing a
    fresh gradient to autograd: the training step's gradient buffers are filled without a copy or an add
    per micro-batch (head_trainer/step.py, --fused-wgrad)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight, buf)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, buf = ctx.saved_tensors
        buf.addmm_(dy.reshape(-1, dy.shape[-1]).t(), x.reshape(-1, x.shape[-1]))  # (out, in) += dy^T x
        return (dy @ weight if ctx.needs_input_grad[0] else None), None, None


def _linear(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """mod(x), or, where the step gave the layer a gradient buffer (`wgrad_into`), the same product whose dW
    lands in that buffer."""
    buf = getattr(mod, "wgrad_into", None)
    if buf is None or not torch.is_grad_enabled():
        return mod(x)
    return _LinearWgradInto.apply(x, mod.weight, buf)


def _mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Qwen3-VL's text MLP, down(act(gate(x)) * up(x)), through _linear."""
    return _linear(mlp.down_proj, mlp.act_fn(_linear(mlp.gate_proj, x)) * _linear(mlp.up_proj, x))


FUSED_WGRAD_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                       "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # per expert layer: what _linear routes


def decoder_layer(layer: nn.Module, h: torch.Tensor, k_pre: torch.Tensor, v_pre: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                  recompute_attention: bool = False, lengths: torch.Tensor | None = None,
                  k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """One Qwen3-VL text decoder layer over [prefix; action tokens].

    h: (B, T, hidden); k_pre, v_pre: (B, kv_heads, L_max, D) post-RoPE keys / raw values of the prefix;
    cos, sin: (B, T, D); mask: (B, 1, g*T, L_max + T) additive (repeated per query group) or None
    -> (B, T, hidden).
    `recompute_attention`: SDPA saves its keys and values for the backward pass, i.e. a copy of the
    whole prefix per layer (3.4 GiB at B = 8, L = 2,993 over 36 layers); recomputing the concatenation
    and the attention in the backward keeps only references to the cached prefix (one layer's copy at
    a time) for about one extra attention forward.
    `lengths` (B,) given: the split attention (`_attention_split`), which keeps no copy at all; `mask`
    is then only read in its last T columns. k_scale (B, kv_heads, D) / v_scale (B, kv_heads, L_max): k_pre /
    v_pre are int8 codes (KVPrefix.key_scales), read in place by the split attention, dequantised for SDPA."""
    if k_scale is not None and lengths is None:  # SDPA over an int8 prefix: this layer's dequantised copy
        k_pre, v_pre = dequantize_int8_prefix(k_pre, v_pre, k_scale, v_scale, h.dtype)
    attn = layer.self_attn
    bsz, t, _ = h.shape
    d = attn.head_dim
    n_kv = k_pre.shape[1]
    group = attn.num_key_value_groups
    x = layer.input_layernorm(h)
    q = attn.q_norm(_linear(attn.q_proj, x).view(bsz, t, -1, d)).transpose(1, 2)  # (B, heads, T, D)
    k = attn.k_norm(_linear(attn.k_proj, x).view(bsz, t, -1, d)).transpose(1, 2)  # (B, kv_heads, T, D)
    v = _linear(attn.v_proj, x).view(bsz, t, -1, d).transpose(1, 2)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    q = q * c + _rotate_half(q) * s
    k = k * c + _rotate_half(k) * s
    q = q.reshape(bsz, n_kv, group * t, d)  # heads j*group..j*group+group-1 share KV head j
    if lengths is not None:
        o = _attention_split(q, k, v, k_pre, v_pre, lengths, mask[..., -k.shape[2]:], attn.scaling, k_scale, v_scale)
    elif recompute_attention and torch.is_grad_enabled():
        o = torch.utils.checkpoint.checkpoint(_attention, q, k, v, k_pre, v_pre, mask, attn.scaling,
                                              use_reentrant=False)
    else:
        o = _attention(q, k, v, k_pre, v_pre, mask, attn.scaling)
    o = o.reshape(bsz, n_kv * group, t, d).transpose(1, 2).reshape(bsz, t, -1)
    h = h + _linear(attn.o_proj, o)
    return h + _mlp(layer.mlp, layer.post_attention_layernorm(h))


ATTENTION = ("sdpa", "split")


def resolve_attention(choice: str, device: torch.device | str) -> str:
    """--attention auto: split on CUDA (its Triton kernels: 7.2 against 8.6 ms per sample at B = 8 on an H100),
    sdpa elsewhere (split's CPU path is plain torch ops: 3.3x slower than SDPA in the demo's head-train)."""
    if choice != "auto":
        return choice
    return "split" if torch.device(device).type == "cuda" else "sdpa"


class FastExpert:
    """velocity(x_t, t, prefix) for K draws per prefix, optionally with a compiled decoder layer.

    x_t: (B, K, 64, 2); t: (B, K) -> (B, K, 64, 2) fp32 velocity. `compile` = torch.compile the layer
    once (shapes static per bucket); `checkpoint` = recompute each layer in the backward pass;
    `recompute_attention` = recompute only the attention core (see decoder_layer); `attention`: "sdpa"
    over the concatenated [prefix; action] or "split" (prefix read in place, see `_attention_split`)."""

    def __init__(self, head: AlpamayoHead, compile: bool = False, checkpoint: bool = False,
                 recompute_attention: bool = False, attention: str = "sdpa"):
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
        self.head = head
        self.checkpoint = checkpoint
        self.split = attention == "split"
        # layer recompute covers it; the split attention keeps no prefix copy to drop
        self.recompute_attention = recompute_attention and not checkpoint and not self.split
        if compile:  # one graph per batch shape, reused by every layer; allow many bucket shapes
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            # compiled kernels persist across runs (a second run of the same shapes skips the compile)
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path.home() / ".cache" / "alpamayo-headtune" / "inductor"))
        self.layer_fn = torch.compile(decoder_layer, dynamic=False) if compile else decoder_layer

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, prefix: KVPrefix,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
        head = self.head
        bsz, draws = x_t.shape[:2]
        emb = head.action_in_proj(x_t.reshape(bsz * draws, N_ACTION, 2), t.reshape(bsz * draws, 1, 1))
        h = emb.view(bsz, draws * N_ACTION, -1)  # (B, K*64, hidden)
        cos, sin = rope_tables(head, prefix, draws, h)
        if mask is None:
            mask = action_mask(prefix, draws, h.dtype, head.causal)
        group = head.expert.layers[0].self_attn.num_key_value_groups
        mask = mask.repeat(1, 1, group, 1)  # (B, 1, g*K*64, L_max + K*64): once per pass, not per layer
        for i, layer in enumerate(head.expert.layers):
            scales = (prefix.key_scales[i], prefix.value_scales[i]) if prefix.quantized else (None, None)
            args = (layer, h, prefix.keys[i], prefix.values[i], cos, sin, mask, self.recompute_attention,
                    prefix.lengths if self.split else None, *scales)
            if self.checkpoint and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(self.layer_fn, *args, use_reentrant=False)
            else:
                h = self.layer_fn(*args)
        out = head.action_out_proj(head.expert.norm(h)).float()  # (B, K*64, 2)
        return out.view(bsz, draws, N_ACTION, 2)
