"""The 8-bit AdamW update of one parameter as one Triton kernel (`adamw8bit-fused` on CUDA).

Why: the same update written as torch ops and compiled by inductor (head_trainer/adam8.py) replayed at
about 165 GB/s on an H100, and torchao's at about 450 GB/s, against a memory-bound floor of 10 bytes per
parameter (read bf16 weight + gradient + two 8-bit codes, write weight + codes). Here each program owns
ROWS blocks of 256 elements and does everything in registers in one pass: dequantise both moments
through the 256-entry maps, AdamW, the block absmax, the nearest-code search, the stochastic rounding of
the weight, and one store of each output. The clip factor, lr and bias corrections are read from device
scalars, so the launch is capturable in a CUDA graph and the gradients are never rewritten.

Same numbers as `adam8.update_q8` (and so torchao's AdamW8bit): IEEE division and square root
(`div_rn`, `sqrt_rn`), the same lerp branch, search and tie rule. The stochastic-rounding bits are a hash
of (step, parameter index, element): murmur3's finaliser, about 8 integer operations an element where
Philox (torch's and Triton's generator) takes about 100, and a resumed run draws the same bits without
saved RNG state.
tests/test_adam8.py runs this kernel under the Triton interpreter on the CPU against update_q8.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 256
# blocks per program and warps: bench/diag_adam8.py --ablate on an H100 (docs/bench_adam8_ablate_h100.json, run 6),
# 214 M elements graph-replayed: 1 x 1 warp 2.21 ms against 1 x 2 2.26 (search 1), 1.42 against 1.67 (search 2,
# fast math); run 1: 2 x 4 2.50, 4 x 4 2.87, 8 x 8 3.15. A loop of block groups per program (software-pipelined
# or not) was slower in run 6 (3.3 / 1.78 ms against 2.26 / 1.67) and is gone.
ROWS = 1
NUM_WARPS = 1
SEARCH = 2  # 0: 8-probe binary search in the map; 1: arithmetic guess + 2 probes of the bounds (3.33 -> 2.87 ms);
#            2: the guess from a table indexed by the float's exponent and top mantissa bits (same codes; run 6,
#            H100: 1.97 ms against 2.26)
LUT_E0, LUT_BITS = 101, 6  # table rows: |x| below 2^(E0 - 127) in one, then one per binade up to 1.0
# the same as the kernel's constants: row offset, last row, mantissa shift / mask, cells per row, negatives' offset
_K0, _KMAX = tl.constexpr(LUT_E0 - 1), tl.constexpr(127 - LUT_E0 + 1)
_SHIFT, _MASK, _CELLS = tl.constexpr(23 - LUT_BITS), tl.constexpr(2**LUT_BITS - 1), tl.constexpr(2**LUT_BITS)
_NEG = tl.constexpr((127 - LUT_E0 + 2) * 2**LUT_BITS)
FAST = 0  # 1: reciprocals and approximate division / square root (not torchao's numbers): 2.26 -> 1.95 ms, H100
DIAG = 0  # bench/diag_adam8.py --ablate only (wrong numbers, timing): 1 no map gathers in the dequantisation,
#           2 no bounds gathers in the encoding, 4 no stochastic rounding, 8 no code search at all (a linear
#           code), 16 no block absmax (scale 1); the optimizer never sets it


def code_bounds(qmap: torch.Tensor) -> torch.Tensor:
    """(256,) fp32: entry j < 255 is the smallest fp32 x whose nearest code (adam8.quantise, its tie rule
    included) is above j; entry 255 is +inf. So the nearest code of x is the number of entries <= x, and
    a guess g within one of it is corrected by two comparisons. Bisection over the ordered fp32 bit
    patterns of each interval (q[j], q[j + 1]], on the CPU."""
    from .adam8 import quantise

    q = qmap.detach().float().cpu()

    def key(x):  # fp32 -> int64 in the same order
        b = x.view(torch.int32).long()
        return torch.where(b >= 0, b, -(b & 0x7FFFFFFF))

    def value(k):
        b = torch.where(k >= 0, k, (-k) | 0x80000000)
        return torch.where(b >= 2**31, b - 2**32, b).to(torch.int32).view(torch.float32)

    lo, hi, j = key(q[:-1]), key(q[1:]), torch.arange(255)
    while bool((hi - lo > 1).any()):
        mid = (lo + hi) // 2
        up = quantise(value(mid), q).long() > j
        hi, lo = torch.where(up, mid, hi), torch.where(up, lo, mid)
    return torch.cat([value(hi), torch.tensor([float("inf")])]).to(qmap.device)


def guess_table(qmap: torch.Tensor, signed: bool) -> torch.Tensor:
    """fp32 (cells,): for each cell of |x| (exponent row, LUT_BITS mantissa bits; both signs for the signed
    map) a guess g with every x of the cell coded g - 1, g or g + 1 by adam8.quantise (its nearest code), so
    the two bounds probes finish the search. Built on the CPU by coding each cell's two ends (codes are
    monotone in x); a cell spanning more than three codes would be an error, and none does."""
    from .adam8 import quantise

    q = qmap.detach().float().cpu()
    rows = 127 - LUT_E0 + 2  # row 0: below 2^(E0 - 127), including 0
    m = torch.arange(2**LUT_BITS, dtype=torch.float64)
    e = torch.arange(LUT_E0, 128, dtype=torch.float64).view(-1, 1) - 127
    lo = torch.cat([torch.zeros(1, m.numel(), dtype=torch.float64), torch.exp2(e) * (1 + m / 2**LUT_BITS)])
    hi = torch.cat([torch.full((1, m.numel()), 2.0 ** (LUT_E0 - 127), dtype=torch.float64),
                    torch.exp2(e) * (1 + (m + 1) / 2**LUT_BITS)])
    lo, hi = lo.float(), hi.float()  # exact: powers of two times short mantissas
    last = torch.nextafter(hi, torch.zeros(()))
    out = []
    for sign in ((1.0, -1.0) if signed else (1.0,)):
        a, b = quantise((sign * lo).clamp(-1, 1).flatten(), q).long(), quantise((sign * last).clamp(-1, 1).flatten(), q).long()
        low, span = torch.minimum(a, b), (a - b).abs()
        if int(span.max()) > 2:
            raise AssertionError(f"guess_table: a cell spans {int(span.max()) + 1} codes; use more mantissa bits")
        out.append((low + 1).clamp(1, 254))
    assert out[0].numel() == rows * 2**LUT_BITS
    return torch.cat(out).float().to(qmap.device)


def code_tables(qmap: torch.Tensor, signed: bool) -> torch.Tensor:
    """What the kernel's b_ptr points at: code_bounds (256) followed by guess_table."""
    return torch.cat([code_bounds(qmap), guess_table(qmap, signed)])


@triton.jit
def _guess_code_lut(x, b_ptr, SIGNED: tl.constexpr):
    """The guess of SEARCH 2: one load from guess_table (after the 256 bounds)."""
    bits = x.to(tl.int32, bitcast=True)
    k = tl.minimum(tl.maximum(((bits >> 23) & 0xFF) - _K0, 0), _KMAX)
    m = tl.where(k == 0, 0, (bits >> _SHIFT) & _MASK)
    idx = k * _CELLS + m
    if SIGNED:
        idx += tl.where(bits < 0, _NEG, 0)
    return tl.load(b_ptr + 256 + idx).to(tl.int32)


@triton.jit
def _nearest_code(x, q_ptr):
    """Index of the nearest entry of the sorted 256-entry map at q_ptr (x in its range): 8 probes + tie."""
    c = tl.where(x >= tl.load(q_ptr + 128), 128, 0)
    c += tl.where(x >= tl.load(q_ptr + c + 64), 64, 0)
    c += tl.where(x >= tl.load(q_ptr + c + 32), 32, 0)
    c += tl.where(x >= tl.load(q_ptr + c + 16), 16, 0)
    c += tl.where(x >= tl.load(q_ptr + c + 8), 8, 0)
    c += tl.where(x >= tl.load(q_ptr + c + 4), 4, 0)
    c += tl.where(x >= tl.load(q_ptr + c + 2), 2, 0)
    c += tl.where(x >= tl.load(q_ptr + c + 1), 1, 0)
    up = tl.minimum(c + 1, 255)
    lo = tl.load(q_ptr + c)
    hi = tl.load(q_ptr + up)
    return tl.where(x - lo >= (hi - lo) * 0.5, up, c)


@triton.jit
def _guess_code(x, SIGNED: tl.constexpr):
    """The nearest code of x in bitsandbytes' dynamic map, to within one, by arithmetic: the decade from
    log10 |x|, then the position among that decade's evenly spaced values (2^i signed, 2^(i+1) unsigned
    in decade i = 0..6, midpoints of linspace(0.1, 1) x 10^(i-6)). Off-by-one decades land within one."""
    a = tl.abs(x)
    i = tl.minimum(tl.maximum(tl.floor(tl.log2(tl.maximum(a, 1e-30)) * 0.30102999566398120) + 7.0, 0.0), 6.0)
    per = tl.exp2(i + (0.0 if SIGNED else 1.0))  # values in this decade
    kf = (a / tl.exp2((i - 6.0) * 3.321928094887362) - 0.1) * per / 0.9 - 0.5
    k = tl.minimum(tl.maximum(tl.floor(kf + 0.5), -1.0), per - 1.0)
    if SIGNED:  # positives from 128 (0 at 127, 1.0 at 255), negatives mirrored about 127
        pos = 128.0 + per - 1.0 + k
        return tl.where(x < 0, 254.0 - pos, pos).to(tl.int32)
    else:  # 0 at 0, 1.0 at 255
        return (1.0 + per - 2.0 + k).to(tl.int32)


@triton.jit
def _nearest_code_bounds(x, b_ptr, SIGNED: tl.constexpr):
    """Nearest code by the bounds table (code_bounds): the guess, corrected by two comparisons."""
    g = tl.minimum(tl.maximum(_guess_code(x, SIGNED), 1), 254)
    return g - 1 + (x >= tl.load(b_ptr + g - 1)).to(tl.int32) + (x >= tl.load(b_ptr + g)).to(tl.int32)


@triton.jit
def _code(x, q_ptr, b_ptr, SIGNED: tl.constexpr, SEARCH: tl.constexpr):
    """The nearest code of x (already in the map's range) by the search SEARCH picks."""
    if SEARCH == 2:
        g = _guess_code_lut(x, b_ptr, SIGNED)
        return g - 1 + (x >= tl.load(b_ptr + g - 1)).to(tl.int32) + (x >= tl.load(b_ptr + g)).to(tl.int32)
    elif SEARCH == 1:
        return _nearest_code_bounds(x, b_ptr, SIGNED)
    else:
        return _nearest_code(x, q_ptr)


@triton.jit
def _encode_kernel(x_ptr, q_ptr, b_ptr, out_ptr, n, SIGNED: tl.constexpr, SEARCH: tl.constexpr, BLOCK: tl.constexpr):
    """Codes of x by either search: what the checks compare with quantise."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr + offs, _code(x, q_ptr, b_ptr, SIGNED, SEARCH).to(tl.uint8), mask=offs < n)


def encode(x: torch.Tensor, qmap: torch.Tensor, bounds: torch.Tensor, signed: bool, search: int = SEARCH) -> torch.Tensor:
    """uint8 codes of a 1-D fp32 tensor through the kernel's search (for checks)."""
    out = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    _encode_kernel[(triton.cdiv(x.numel(), 1024),)](x, qmap, bounds, out, x.numel(), SIGNED=signed, SEARCH=search,
                                                     BLOCK=1024)
    return out


@triton.jit
def _fmix32(h):
    """murmur3's 32-bit finaliser: a bijection of uint32 whose every output bit depends on every input bit."""
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit(do_not_specialize=["salt"])
def _adamw8_kernel(p_ptr, g_ptr, mc_ptr, ms_ptr, vc_ptr, vs_ptr, qm_ptr, qv_ptr, bm_ptr, bv_ptr, coef_ptr, lr_ptr,
                   c1_ptr, c2_ptr, step_ptr, n_blocks, salt, w1, w2, eps, wd,
                   SR: tl.constexpr, SEARCH: tl.constexpr, FAST: tl.constexpr, ROWS: tl.constexpr,
                   BLOCK: tl.constexpr, DIAG: tl.constexpr = 0):
    """The update of this program's ROWS blocks of 256 elements."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < n_blocks
    offs = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]  # (ROWS, BLOCK) element offsets
    mask = rmask[:, None]
    coef = tl.load(coef_ptr)
    lr = tl.load(lr_ptr)
    c1 = tl.load(c1_ptr)  # 1 - beta1^step
    c2 = tl.load(c2_ptr)  # sqrt(1 - beta2^step)

    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * coef
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mc = tl.load(mc_ptr + offs, mask=mask, other=0).to(tl.int32)
    vc = tl.load(vc_ptr + offs, mask=mask, other=0).to(tl.int32)
    if DIAG & 1:
        m = (mc - 127).to(tl.float32) * (1.0 / 127.0)
        v = vc.to(tl.float32) * (1.0 / 255.0)
    else:
        m = tl.load(qm_ptr + mc)
        v = tl.load(qv_ptr + vc)
    m = m * tl.load(ms_ptr + rows, mask=rmask, other=0.0)[:, None]
    v = v * tl.load(vs_ptr + rows, mask=rmask, other=0.0)[:, None]

    p = p - lr * wd * p
    m = m + w1 * (g - m)  # torch.lerp(m, g, w1) for w1 < 0.5
    v = v + w2 * (g * g - v)
    if DIAG & 16:
        m_absmax = tl.full((ROWS,), 1.0, tl.float32)
        v_absmax = tl.full((ROWS,), 1.0, tl.float32)
    else:
        m_absmax = tl.maximum(tl.max(tl.abs(m), axis=1), 1e-12)  # (ROWS,)
        v_absmax = tl.maximum(tl.max(tl.abs(v), axis=1), 1e-12)
    if FAST:  # per-row reciprocals, one approximate division and square root: about 1 ulp from torchao
        p = p - (lr / c1) * m / (tl.sqrt(v) * (1.0 / c2) + eps)
        xm = m * (1.0 / m_absmax)[:, None]
        xv = v * (1.0 / v_absmax)[:, None]
    else:  # IEEE division and square root in torchao's order: its numbers
        denom = tl.math.div_rn(tl.math.sqrt_rn(v), c2) + eps
        p = p - tl.math.div_rn(lr * tl.math.div_rn(m, c1), denom)
        xm = tl.math.div_rn(m, m_absmax[:, None])
        xv = tl.math.div_rn(v, v_absmax[:, None])
    if DIAG & 8:
        tl.store(mc_ptr + offs, (xm * 127.0 + 127.0).to(tl.int32).to(tl.uint8), mask=mask)
        tl.store(vc_ptr + offs, (xv * 255.0).to(tl.int32).to(tl.uint8), mask=mask)
    elif DIAG & 2:
        tl.store(mc_ptr + offs, tl.minimum(tl.maximum(_guess_code(xm, True), 0), 255).to(tl.uint8), mask=mask)
        tl.store(vc_ptr + offs, tl.minimum(tl.maximum(_guess_code(xv, False), 0), 255).to(tl.uint8), mask=mask)
    else:
        tl.store(mc_ptr + offs, _code(xm, qm_ptr, bm_ptr, True, SEARCH).to(tl.uint8), mask=mask)
        tl.store(vc_ptr + offs, _code(xv, qv_ptr, bv_ptr, False, SEARCH).to(tl.uint8), mask=mask)
    tl.store(ms_ptr + rows, m_absmax, mask=rmask)
    tl.store(vs_ptr + rows, v_absmax, mask=rmask)

    if SR and not (DIAG & 4):  # fp32 -> bf16 away from zero with probability (low 16 bits) / 2^16
        seed = _fmix32((tl.load(step_ptr).to(tl.uint32) * 1000003 + salt).to(tl.uint32))
        rand = (_fmix32(offs.to(tl.uint32) * 0x9E3779B1 + seed) >> 16).to(tl.int32)  # 16 uniform bits
        bits = p.to(tl.int32, bitcast=True)
        trunc = bits & -65536
        p = tl.where(rand < (bits & 0xFFFF), trunc + 0x10000, trunc).to(tl.float32, bitcast=True)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)


def update_q8_triton(p: torch.Tensor, g: torch.Tensor, coef: torch.Tensor, lr: torch.Tensor, c1: torch.Tensor,
                     c2: torch.Tensor, step: torch.Tensor, m_codes: torch.Tensor, m_scale: torch.Tensor,
                     v_codes: torch.Tensor, v_scale: torch.Tensor, qm: torch.Tensor, qv: torch.Tensor, bm: torch.Tensor,
                     bv: torch.Tensor, salt: int, beta1: float, beta2: float, eps: float, wd: float, sr: bool) -> None:
    """In place: p (n = k * 256 elements, contiguous), codes (n,) uint8, scales (k,) fp32; scalars 0-dim;
    bm, bv: code_bounds of the maps qm, qv."""
    if not (p.is_contiguous() and g.is_contiguous()):
        raise ValueError("adamw8bit-fused needs contiguous parameters and gradients")
    if p.numel() >= 2**31:  # int32 offsets in the kernel
        raise ValueError(f"adamw8bit-fused: a parameter of {p.numel():,} elements is over the kernel's 2^31")
    n_blocks = p.numel() // BLOCK
    grid = (triton.cdiv(n_blocks, ROWS),)
    _adamw8_kernel[grid](p, g, m_codes, m_scale, v_codes, v_scale, qm, qv, bm, bv, coef, lr, c1, c2, step, n_blocks,
                         salt, 1 - beta1, 1 - beta2, eps, wd, SR=sr, SEARCH=SEARCH, FAST=FAST, ROWS=ROWS,
                         BLOCK=BLOCK, num_warps=NUM_WARPS, DIAG=DIAG)
