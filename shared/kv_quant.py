"""KV-cache quantisers for the cache store: int8 (K per channel, V per token) and KIVI-style int4.

Why these two (docs/CACHE_FORMAT.md, /work/shared/docs/kv-storage.md §3.3): lossless codecs only buy
1.2-1.3x on bf16 KV; int8 buys 2x at <1% relative RMSE, int4-KIVI 3.2x at ~4-8%. Keys have fixed
large-magnitude outlier *channels*, so keys are scaled per channel (over tokens); values are scaled
per token (over channels).

Everything is torch so it runs where the tensors live: on the GPU right after prefill (cache-build)
and on the GPU right before the expert (head-train). Scales are rounded *up* to their stored dtype
before the codes are computed, so the stored (scale, zero) reproduce the encoder's grid exactly and
the per-element error is bounded by half a step (tests/test_store_quant.py checks this).

Shapes: K, V are (layers, kv_heads, L, head_dim). Codes of K and V are stacked as
(layers, 2, kv_heads, L, Dc) with Dc = head_dim (int8) or head_dim // 2 (int4, two codes per byte,
low nibble = even channel). Every parameter tensor has `layers` as its first axis so a layer subset
of a stored sample can be dequantised from that subset of codes and parameters alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QUANT_METHODS = ("none", "int8", "int4")
INT4_GROUP = 32  # KIVI group size: K groups of 32 tokens, V groups of 32 channels


@dataclass
class QuantizedKV:
    codes: torch.Tensor  # (layers, 2, kv_heads, L, Dc) int8 (int8) or uint8 (int4, packed)
    params: dict[str, torch.Tensor]  # name -> (layers, ...) scale / zero tensors (see quantize_kv)


def _round_up_f16(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> fp16 never rounding below x (so |x| / scale16 stays inside the code range)."""
    h = x.clamp(max=65504.0).to(torch.float16)
    low = h.float() < x
    return torch.where(low, torch.nextafter(h, torch.full_like(h, float("inf"))), h)


def _round_down_f16(x: torch.Tensor) -> torch.Tensor:
    h = x.clamp(min=-65504.0, max=65504.0).to(torch.float16)
    high = h.float() > x
    return torch.where(high, torch.nextafter(h, torch.full_like(h, float("-inf"))), h)


def int4_group(head_dim: int, group: int = INT4_GROUP) -> int:
    """Channel group for V: 32, or the whole head when head_dim < 32 (tiny test models)."""
    g = min(group, head_dim)
    if head_dim % g or head_dim % 2:
        raise ValueError(f"int4 needs an even head_dim divisible by {g}; got head_dim={head_dim}")
    return g


# ---------------------------------------------------------------- int8
def _int8_keys(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k (l, h, L, D) -> codes int8 (l, h, L, D), scale fp32 (l, h, 1, D): symmetric, per channel."""
    kf = k.float()
    scale = kf.abs().amax(dim=2, keepdim=True) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(kf / scale).clamp_(-127, 127).to(torch.int8)
    return codes, scale


def _int8_values(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """v (l, h, L, D) -> codes int8 (l, h, L, D), scale fp16 (l, h, L, 1): symmetric, per token."""
    vf = v.float()
    s = vf.abs().amax(dim=3, keepdim=True) / 127.0
    s16 = _round_up_f16(s)
    s16 = torch.where(s16 > 0, s16, torch.ones_like(s16))
    codes = torch.round(vf / s16.float()).clamp_(-127, 127).to(torch.int8)
    return codes, s16


# ---------------------------------------------------------------- int4 (KIVI, asymmetric)
def _minmax_q4(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit over `dim` (a group axis of x): codes uint8 in [0, 15], scale, zero fp16."""
    lo = x.amin(dim=dim, keepdim=True)
    hi = x.amax(dim=dim, keepdim=True)
    z16 = _round_down_f16(lo)
    s16 = _round_up_f16((hi - z16.float()) / 15.0)
    s16 = torch.where(s16 > 0, s16, torch.ones_like(s16))
    codes = torch.round((x - z16.float()) / s16.float()).clamp_(0, 15).to(torch.uint8)
    return codes, s16, z16


def _pack4(codes: torch.Tensor) -> torch.Tensor:
    """(..., D) uint8 in [0,15] -> (..., D/2) uint8; low nibble = even channel."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def _unpack4(packed: torch.Tensor) -> torch.Tensor:
    """(..., D/2) uint8 -> (..., D) uint8."""
    out = torch.stack((packed & 0x0F, packed >> 4), dim=-1)
    return out.flatten(-2)


def _int4_keys(k: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k (l, h, L, D) -> packed (l, h, L, D/2), scale/zero fp16 (l, h, ceil(L/g), D): per channel,
    grouped along tokens. The last group is padded by repeating the last token (no effect on min/max)."""
    l_, h, L, D = k.shape
    kf = k.float()
    G = -(-L // group)
    pad = G * group - L
    if pad:
        kf = torch.cat([kf, kf[:, :, -1:].expand(l_, h, pad, D)], dim=2)
    codes, s, z = _minmax_q4(kf.view(l_, h, G, group, D), dim=3)
    codes = codes.view(l_, h, G * group, D)[:, :, :L]
    return _pack4(codes), s.squeeze(3), z.squeeze(3)


def _int4_values(v: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """v (l, h, L, D) -> packed (l, h, L, D/2), scale/zero fp16 (l, h, L, D/g): per token, grouped
    along channels."""
    l_, h, L, D = v.shape
    g = int4_group(D, group)
    codes, s, z = _minmax_q4(v.float().view(l_, h, L, D // g, g), dim=4)
    return _pack4(codes.view(l_, h, L, D)), s.squeeze(4), z.squeeze(4)


# ---------------------------------------------------------------- public API
def quantize_kv(k: torch.Tensor, v: torch.Tensor, method: str, group: int = INT4_GROUP) -> QuantizedKV:
    """k, v (layers, kv_heads, L, head_dim), any float dtype, any device -> QuantizedKV.

    int8 params: k_scale fp32 (l, h, 1, D), v_scale fp16 (l, h, L, 1).
    int4 params: k_scale, k_zero fp16 (l, h, ceil(L/32), D); v_scale, v_zero fp16 (l, h, L, D/32).
    """
    if k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"k and v must both be (layers, kv_heads, L, head_dim); got {tuple(k.shape)}, {tuple(v.shape)}")
    if method == "int8":
        kc, ks = _int8_keys(k)
        vc, vs = _int8_values(v)
        return QuantizedKV(torch.stack((kc, vc), dim=1), {"k_scale": ks, "v_scale": vs})
    if method == "int4":
        int4_group(k.shape[-1], group)  # validates head_dim
        kc, ks, kz = _int4_keys(k, group)
        vc, vs, vz = _int4_values(v, group)
        return QuantizedKV(
            torch.stack((kc, vc), dim=1), {"k_scale": ks, "k_zero": kz, "v_scale": vs, "v_zero": vz}
        )
    raise ValueError(f"unknown quantisation {method!r}; expected one of {QUANT_METHODS[1:]}")


def int8_values(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """int8 codes x scale (broadcast) in fp32 (fp64 for an fp64 dtype), then one cast to `dtype`."""
    a = torch.promote_types(dtype, torch.float32)
    return (codes.to(a) * scale.to(a)).to(dtype)


def dequantize_int8_prefix(k: torch.Tensor, v: torch.Tensor, k_scale: torch.Tensor, v_scale: torch.Tensor,
                           dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The split attention's int8 layout -> values: k, v codes (B, H, L, D), k_scale (B, H, D) per key channel,
    v_scale (B, H, L) per value token (KVPrefix.key_scales / value_scales); the numbers of dequantize_kv."""
    return int8_values(k, k_scale[:, :, None, :], dtype), int8_values(v, v_scale[..., None], dtype)


def int8_prefix(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, H, L, D) K / V -> that layout: k codes, v codes (int8), k_scale (B, H, D), v_scale (B, H, L) fp32
    (quantize_kv's int8 with the batch as its layer axis)."""
    q = quantize_kv(k, v, "int8")
    return (q.codes[:, 0].contiguous(), q.codes[:, 1].contiguous(), q.params["k_scale"][:, :, 0].float(),
            q.params["v_scale"][..., 0].float().contiguous())


def dequantize_kv(
    q: QuantizedKV, method: str, dtype: torch.dtype = torch.float32, group: int = INT4_GROUP
) -> tuple[torch.Tensor, torch.Tensor]:
    """QuantizedKV -> (k, v), each (layers, kv_heads, L, head_dim) in `dtype`, on the codes' device.

    Arithmetic in fp32, then one cast: call it on the GPU (move codes + params there first)."""
    codes = q.codes
    p = {n: t.to(codes.device) for n, t in q.params.items()}
    if method == "int8":
        return int8_values(codes[:, 0], p["k_scale"], dtype), int8_values(codes[:, 1], p["v_scale"], dtype)
    if method == "int4":
        kc = _unpack4(codes[:, 0]).float()  # (l, h, L, D)
        vc = _unpack4(codes[:, 1]).float()
        L, D = kc.shape[2], kc.shape[3]
        ks = p["k_scale"].float().repeat_interleave(group, dim=2)[:, :, :L]
        kz = p["k_zero"].float().repeat_interleave(group, dim=2)[:, :, :L]
        g = int4_group(D, group)
        vs = p["v_scale"].float().repeat_interleave(g, dim=3)
        vz = p["v_zero"].float().repeat_interleave(g, dim=3)
        return (kc * ks + kz).to(dtype), (vc * vs + vz).to(dtype)
    raise ValueError(f"unknown quantisation {method!r}; expected one of {QUANT_METHODS[1:]}")


def code_shape(method: str, num_layers: int, num_kv_heads: int, L: int, head_dim: int) -> tuple[int, ...]:
    """Shape of the stored codes array (layers, 2, kv_heads, L, Dc)."""
    dc = head_dim // 2 if method == "int4" else head_dim
    return (num_layers, 2, num_kv_heads, L, dc)


def param_shapes(
    method: str, num_layers: int, num_kv_heads: int, L: int, head_dim: int, group: int = INT4_GROUP
) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, numpy dtype str) of each stored quantisation parameter (for size estimates)."""
    l_, h = num_layers, num_kv_heads
    if method == "int8":
        return {"k_scale": ((l_, h, 1, head_dim), "float32"), "v_scale": ((l_, h, L, 1), "float16")}
    if method == "int4":
        G = -(-L // group)
        ng = head_dim // int4_group(head_dim, group)
        return {
            "k_scale": ((l_, h, G, head_dim), "float16"),
            "k_zero": ((l_, h, G, head_dim), "float16"),
            "v_scale": ((l_, h, L, ng), "float16"),
            "v_zero": ((l_, h, L, ng), "float16"),
        }
    return {}


def rel_rmse(x: torch.Tensor, xhat: torch.Tensor) -> float:
    """||x̂ - x|| / ||x||, the error metric quoted in docs/CACHE_FORMAT.md."""
    x = x.double()
    return float((xhat.double() - x).norm() / x.norm().clamp_min(1e-30))
