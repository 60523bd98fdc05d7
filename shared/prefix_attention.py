"""Attention of the action queries over the frozen cached prefix, without copying the prefix.

Why: SDPA over [prefix; action] needs one (B, kv, L + T, D) key and value tensor per layer, so every
layer copies the whole cached prefix (3.4 GiB at B = 8, L = 2,993 over 36 layers), keeps that copy for
the backward pass (or recomputes it), and the backward pass writes key / value gradients for all L
prefix positions that nobody reads: the prefix is the frozen VLM's cache. With 128 queries per KV head
(2 query heads x 64 action tokens) the work is shaped like decoding, not like training attention.

So the prefix part is its own op, `prefix_attention(q, k_pre, v_pre, lengths) -> (o, lse)`: the
softmax-normalised output over the valid prefix keys and its log-sum-exp, differentiable in q only.
The caller merges it with the small action-block attention by log-sum-exp (shared/fast_expert.py), in
plain torch that torch.compile fuses. On CUDA the op is two Triton kernels that split the keys into
chunks (all SMs busy with 64 (batch, kv head) pairs) and read each prefix key and value once per pass:
a forward with an online softmax per chunk, then a log-sum-exp merge of the chunks; a backward that
computes only dq (ds = p * (dp - delta + dlse), dq = scale * ds @ k), per chunk, summed in a fixed
order (deterministic). Elsewhere (CPU) the same math runs as torch ops.
tests/test_prefix_attention.py holds both against SDPA over the concatenation, the kernels under
Triton's CPU interpreter.
"""

from __future__ import annotations

import math
import os

import torch

from .kv_quant import dequantize_int8_prefix

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without triton use the torch path
    triton = None

LOG2E = 1.4426950408889634
CHUNK = 512  # keys per program: bench/bench_prefix_attention.py on an H100, B = 8, L = 2,993, fwd + bwd of one
#             layer 0.277 ms at 512, 0.337 at 256, 0.451 at 128 (docs/bench_prefix_attention_h100.json)
BLOCK_M = 64  # query rows per program (of the 128 a KV head has at --draws 1)
BLOCK_N = 64  # keys per inner step
NUM_WARPS = 4
NUM_STAGES = 2


def use_triton(t: torch.Tensor) -> bool:
    """The kernels run on CUDA, and on the CPU only under Triton's interpreter (the tests); fp64 never."""
    return (triton is not None and t.dtype != torch.float64
            and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"))


# -- the torch path (CPU; the reference the kernels are tested against) -----------------------------
def _acc(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / output dtype: fp32, or fp64 for fp64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _scores(q: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, H, M, L) scaled scores in _acc, -inf beyond each row's prefix length."""
    a = _acc(q.dtype)
    s = torch.matmul(q.to(a), k.to(a).transpose(-1, -2)) * scale
    keep = torch.arange(k.shape[2], device=k.device).view(1, 1, 1, -1) < lengths.view(-1, 1, 1, 1)
    return s.masked_fill(~keep, float("-inf"))


def _probs(s: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """exp(s - lse), 0 at masked keys (also in a row with no valid key, where lse is -inf)."""
    return torch.where(torch.isinf(s), 0.0, torch.exp(s - lse[..., None]))


def _dequant(q, k, v, k_scale, v_scale):
    """int8 codes -> _acc(q) values: K scaled per channel (k_scale (B, H, D)), V per token (v_scale (B, H, L))."""
    return (k, v) if k_scale is None else dequantize_int8_prefix(k, v, k_scale, v_scale, _acc(q.dtype))


def _fwd_torch(q, k, v, lengths, scale, k_scale=None, v_scale=None):
    """A row with no valid key (length 0) gives o = 0, lse = -inf, as the kernel does."""
    k, v = _dequant(q, k, v, k_scale, v_scale)
    s = _scores(q, k, lengths, scale)
    lse = torch.logsumexp(s, -1)
    o = torch.matmul(_probs(s, lse), v.to(s.dtype))
    return o, lse


def _bwd_torch(q, k, v, lengths, do, lse, dm, scale, k_scale=None, v_scale=None):
    k, v = _dequant(q, k, v, k_scale, v_scale)
    p = _probs(_scores(q, k, lengths, scale), lse)
    ds = p * (torch.matmul(do.to(p.dtype), v.to(p.dtype).transpose(-1, -2)) - dm[..., None])
    return torch.matmul(ds, k.to(p.dtype)) * scale


# -- the Triton kernels ------------------------------------------------------------------------------
if triton is not None:

    LN2, LOG2E_K = tl.constexpr(math.log(2)), tl.constexpr(LOG2E)

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        """a @ b, fp32 accumulate; IEEE (fp32 inputs) keeps full fp32 products instead of TF32."""
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        else:
            return tl.dot(a, b)

    @triton.jit
    def _fwd_kernel(Q, K, V, LEN, OUT, LSE, KS, VS, sqb, sqh, sqm, skb, skh, skn, svb, svh, svn,
                    H, M, n_split, chunk, scale2, L_MAX,
                    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr, QUANT: tl.constexpr):
        """One (batch x head, query block, key chunk): normalised partial output and its log-sum-exp (natural
        log). With one chunk these are the op's outputs, no merge."""
        bh, pm, ps = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b, h = bh // H, bh % H
        rows = pm * BM + tl.arange(0, BM)
        cols = tl.arange(0, D)
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqm + cols[None, :], mask=rows[:, None] < M, other=0.0)
        if QUANT:  # int8 keys scaled per channel: q . (s * k) = (q * s) . k
            q = (q.to(tl.float32) * tl.load(KS + bh * D + cols)[None, :]).to(q.dtype)
        start = ps * chunk
        end = tl.minimum(start + chunk, tl.load(LEN + b))
        m_i = tl.full([BM], float("-inf"), tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, D], tl.float32)
        for n0 in range(start, end, BN):
            keys = n0 + tl.arange(0, BN)
            valid = keys < end
            k = tl.load(K + b * skb + h * skh + keys[:, None] * skn + cols[None, :], mask=valid[:, None],
                        other=0.0).to(q.dtype)
            s = tl.where(valid[None, :], _dot(q, tl.trans(k), IEEE) * scale2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + b * svb + h * svh + keys[:, None] * svn + cols[None, :], mask=valid[:, None],
                        other=0.0).to(q.dtype)
            if QUANT:  # int8 values scaled per token: sum_j p_j (s_j v_j)
                pv = p * tl.load(VS + bh * L_MAX + keys, mask=valid, other=0.0)[None, :]
            else:
                pv = p
            acc = acc * alpha[:, None] + _dot(pv.to(v.dtype), v, IEEE)
            m_i = m_new
        has = l_i > 0
        o = tl.where(has[:, None], acc / tl.where(has, l_i, 1.0)[:, None], 0.0)
        lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * LN2, float("-inf"))
        part = bh * n_split + ps
        tl.store(OUT + (part * M + rows[:, None]) * D + cols[None, :], o, mask=rows[:, None] < M)
        tl.store(LSE + part * M + rows, lse, mask=rows < M)

    @triton.jit
    def _bwd_kernel(Q, K, V, LEN, DO, LSE, DM, DQ, KS, VS, sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdb, sdh,
                    sdm, slb, slh, sdmb, sdmh, H, M, n_split, chunk, scale, scale2, L_MAX,
                    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr, QUANT: tl.constexpr):
        """One (batch x head, query block, key chunk): the chunk's share of dq (fp32; with one chunk, dq).

        DO (B, H, M, D) any float dtype, cast to q's here; LSE (B, H, M) the merged log-sum-exp (natural
        log); DM (B, H, M) = delta - dlse."""
        bh, pm, ps = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b, h = bh // H, bh % H
        rows = pm * BM + tl.arange(0, BM)
        cols = tl.arange(0, D)
        rmask = rows < M
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqm + cols[None, :], mask=rmask[:, None], other=0.0)
        if QUANT:
            ks = tl.load(KS + bh * D + cols)
            q = (q.to(tl.float32) * ks[None, :]).to(q.dtype)
        do = tl.load(DO + b * sdb + h * sdh + rows[:, None] * sdm + cols[None, :], mask=rmask[:, None],
                     other=0.0).to(q.dtype)
        lse2 = tl.load(LSE + b * slb + h * slh + rows, mask=rmask, other=0.0) * LOG2E_K
        dm = tl.load(DM + b * sdmb + h * sdmh + rows, mask=rmask, other=0.0)
        start = ps * chunk
        end = tl.minimum(start + chunk, tl.load(LEN + b))
        acc = tl.zeros([BM, D], tl.float32)
        for n0 in range(start, end, BN):
            keys = n0 + tl.arange(0, BN)
            valid = keys < end
            k = tl.load(K + b * skb + h * skh + keys[:, None] * skn + cols[None, :], mask=valid[:, None],
                        other=0.0).to(q.dtype)
            v = tl.load(V + b * svb + h * svh + keys[:, None] * svn + cols[None, :], mask=valid[:, None],
                        other=0.0).to(q.dtype)
            s = _dot(q, tl.trans(k), IEEE) * scale2
            p = tl.where(valid[None, :], tl.exp2(s - lse2[:, None]), 0.0)
            dp = _dot(do, tl.trans(v), IEEE)
            if QUANT:  # do . (s_j v_j) = s_j (do . v_j)
                dp = dp * tl.load(VS + bh * L_MAX + keys, mask=valid, other=0.0)[None, :]
            ds = p * (dp - dm[:, None])
            acc += _dot(ds.to(k.dtype), k, IEEE)
        if QUANT:  # d/dq of (q * s) . k: the per-channel scale once, at the end
            acc = acc * ks[None, :]
        part = bh * n_split + ps
        tl.store(DQ + (part * M + rows[:, None]) * D + cols[None, :], acc * scale, mask=rmask[:, None])


def _launch_args(q, k, v):
    B, H, M, D = q.shape
    for name, t in (("q", q), ("k_pre", k), ("v_pre", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"prefix_attention: {name} must have a contiguous last dim, got strides {t.stride()}")
    n_split = triton.cdiv(k.shape[2], CHUNK)
    grid = (B * H, triton.cdiv(M, BLOCK_M), n_split)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3])
    return B, H, M, D, n_split, grid, strides


def _scales(q, k_scale, v_scale):
    """Contiguous fp32 scales for the kernels ((B*H, D), (B*H, L_max)), or q as an unread placeholder."""
    if k_scale is None:
        return q, q
    return k_scale.float().contiguous(), v_scale.float().contiguous()


def _fwd_triton(q, k, v, lengths, scale, k_scale=None, v_scale=None):
    B, H, M, D, n_split, grid, strides = _launch_args(q, k, v)
    o = torch.empty(B * H, n_split, M, D, device=q.device, dtype=torch.float32)
    lse = torch.empty(B * H, n_split, M, device=q.device, dtype=torch.float32)
    _fwd_kernel[grid](q, k, v, lengths, o, lse, *_scales(q, k_scale, v_scale), *strides, H, M, n_split, CHUNK,
                      scale * LOG2E, k.shape[2], D=D, BM=BLOCK_M, BN=BLOCK_N, IEEE=q.dtype == torch.float32,
                      QUANT=k_scale is not None, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    if n_split == 1:  # the kernel wrote the outputs: no merge kernels
        return o.view(B, H, M, D), lse.view(B, H, M)
    total = torch.logsumexp(lse, dim=1)  # over chunks
    w = torch.exp(lse - total[:, None]).nan_to_num_(0.0)  # empty chunks weigh 0; a row with no key: all 0
    return (w[..., None] * o).sum(1).view(B, H, M, D), total.view(B, H, M)


def _bwd_triton(q, k, v, lengths, do, lse, dm, scale, k_scale=None, v_scale=None):
    B, H, M, D, n_split, grid, strides = _launch_args(q, k, v)
    if do.stride(-1) != 1:
        do = do.contiguous()
    lse, dm = lse.float(), dm.float()
    dq = torch.empty(B * H, n_split, M, D, device=q.device, dtype=torch.float32)
    _bwd_kernel[grid](q, k, v, lengths, do, lse, dm, dq, *_scales(q, k_scale, v_scale), *strides,
                      *do.stride()[:3], *lse.stride()[:2], *dm.stride()[:2], H, M, n_split, CHUNK, scale,
                      scale * LOG2E, k.shape[2], D=D, BM=BLOCK_M, BN=BLOCK_N, IEEE=q.dtype == torch.float32,
                      QUANT=k_scale is not None, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return (dq if n_split == 1 else dq.sum(1)).view(B, H, M, D)


# -- the op ------------------------------------------------------------------------------------------
@torch.library.custom_op("alpamayo_headtune::prefix_attention", mutates_args=())
def _prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, scale: float,
                      k_scale: torch.Tensor | None = None,
                      v_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    fn = _fwd_triton if use_triton(q) else _fwd_torch
    return fn(q, k, v, lengths, scale, k_scale, v_scale)


@_prefix_attention.register_fake
def _(q, k, v, lengths, scale, k_scale=None, v_scale=None):
    return q.new_empty(q.shape, dtype=_acc(q.dtype)), q.new_empty(q.shape[:3], dtype=_acc(q.dtype))


@torch.library.custom_op("alpamayo_headtune::prefix_attention_dq", mutates_args=())
def _prefix_attention_dq(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
                         do: torch.Tensor, lse: torch.Tensor, dm: torch.Tensor, scale: float,
                         k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    fn = _bwd_triton if use_triton(q) else _bwd_torch
    return fn(q, k, v, lengths, do, lse, dm, scale, k_scale, v_scale)


@_prefix_attention_dq.register_fake
def _(q, k, v, lengths, do, lse, dm, scale, k_scale=None, v_scale=None):
    return q.new_empty(q.shape, dtype=_acc(q.dtype))


def _setup(ctx, inputs, output):
    q, k, v, lengths, scale, k_scale, v_scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, lengths, o, lse, k_scale, v_scale)
    ctx.scale = scale


def _backward(ctx, do, dlse):
    q, k, v, lengths, o, lse, k_scale, v_scale = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(o)
    dm = (do * o).sum(-1)  # delta: the softmax's own term
    if dlse is not None:
        dm = dm - dlse  # d lse / d s_ij = p_ij
    dq = _prefix_attention_dq(q, k, v, lengths, do, lse, dm, ctx.scale, k_scale, v_scale)
    return dq.to(q.dtype), None, None, None, None, None, None


_prefix_attention.register_autograd(_backward, setup_context=_setup)


def prefix_attention(q: torch.Tensor, k_pre: torch.Tensor, v_pre: torch.Tensor, lengths: torch.Tensor,
                     scale: float, k_scale: torch.Tensor | None = None,
                     v_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of q over each sample's first `lengths[b]` prefix keys.

    q (B, H, M, D); k_pre, v_pre (B, H, L_max, D), no gradient (the frozen cache); lengths (B,) int (0: o = 0,
    lse = -inf, which the log-sum-exp merge weighs 0)
    -> o (B, H, M, D), lse (B, H, M) (natural log), both fp32 (fp64 for fp64 q). Differentiable in q, o and lse both.
    int8 prefixes (the store's int8 codes, shared/kv_quant.py, read without a dequantised copy): k_pre, v_pre
    int8 with k_scale (B, H, D) per key channel and v_scale (B, H, L_max) per value token, the values being
    codes x scale."""
    if k_pre.requires_grad or v_pre.requires_grad:
        raise ValueError("prefix_attention: the cached prefix is frozen; its keys / values must not require grad")
    if (k_scale is None) != (v_scale is None):
        raise ValueError("prefix_attention: int8 prefixes need both k_scale and v_scale")
    if k_scale is not None:
        B, H, L, D = k_pre.shape
        if k_pre.dtype != torch.int8 or v_pre.dtype != torch.int8:
            raise ValueError(f"prefix_attention: scales come with int8 codes, got {k_pre.dtype} / {v_pre.dtype}")
        if tuple(k_scale.shape) != (B, H, D) or tuple(v_scale.shape) != (B, H, L):
            raise ValueError(f"prefix_attention: k_scale {tuple(k_scale.shape)} / v_scale {tuple(v_scale.shape)} "
                             f"do not match int8 codes {(B, H, L, D)}: want {(B, H, D)} / {(B, H, L)}")
    elif k_pre.dtype != q.dtype:  # a store kept in another dtype than the head's (a copy; rare)
        k_pre, v_pre = k_pre.to(q.dtype), v_pre.to(q.dtype)
    return _prefix_attention(q, k_pre, v_pre, lengths.to(torch.int32), float(scale), k_scale, v_scale)
