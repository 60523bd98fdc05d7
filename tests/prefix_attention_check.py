"""Run by tests/test_prefix_attention.py in a fresh process with TRITON_INTERPRET=1 (Triton reads it when a
kernel is decorated): the Triton kernels of shared/prefix_attention.py on CPU tensors against the torch
path and against SDPA over the concatenated [prefix; action]. bench/bench_prefix_attention.py --check runs
the same checks on CUDA (run_checks("cuda"), release-sized chunks)."""

import torch
from triton_interpret import main, run_each

import shared.prefix_attention as pa
from shared.kv_quant import int8_prefix

DEVICE = "cpu"


def _inputs(B, H, M, L, D, lengths, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, M, D, generator=g).to(DEVICE, dtype)
    k = torch.randn(B, H, L, D, generator=g).to(DEVICE, dtype)
    v = torch.randn(B, H, L, D, generator=g).to(DEVICE, dtype)
    return q, k, v, torch.tensor(lengths, device=DEVICE)


def _reference(q, k, v, lengths, scale, go, gl):
    """o, lse and dq of the plain softmax in fp64 (autograd), the independent reference."""
    q = q.double().requires_grad_()
    keep = torch.arange(k.shape[2], device=k.device).view(1, 1, 1, -1) < lengths.view(-1, 1, 1, 1)
    s = (q @ k.double().transpose(-1, -2) * scale).masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, -1)
    o = torch.softmax(s, -1) @ v.double()
    ((o * go.double()).sum() + (lse * gl.double()).sum()).backward()
    return o.detach(), lse.detach(), q.grad


def check_op_fp32():
    """Forward (o, lse) and dq (through both outputs) of the kernels equal the fp64 softmax to fp32
    rounding: lengths that end mid-block, a chunk with no valid key, query rows not a block multiple,
    a non-contiguous q."""
    q, k, v, lengths = _inputs(3, 2, 40, 300, 32, [300, 77, 1], torch.float32)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # (B, H, M, D) view with H and M strides swapped
    q.requires_grad_()
    assert pa.use_triton(q)
    o, lse = pa.prefix_attention(q, k, v, lengths, 0.17)
    g = torch.Generator().manual_seed(1)
    go, gl = torch.randn(o.shape, generator=g).to(DEVICE), torch.randn(lse.shape, generator=g).to(DEVICE)
    ((o * go).sum() + (lse * gl).sum()).backward()
    ro, rl, rdq = _reference(q.detach(), k, v, lengths, 0.17, go, gl)
    for got, ref in ((o, ro), (lse, rl), (q.grad, rdq)):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def check_one_chunk_and_empty_rows():
    """With the whole prefix in one chunk the kernels write the outputs themselves (no merge): the same
    values as the fp64 softmax, as with 64-key chunks merged (on CUDA too, where the default chunk is
    longer than these prefixes). A sample with no valid key gives o = 0, lse = -inf and dq = 0, with one
    chunk and with several."""
    chunk = pa.CHUNK
    try:
        for pa.CHUNK in (64, 1024):
            check_op_fp32()
        for pa.CHUNK in (64, 1024):
            q, k, v, lengths = _inputs(2, 1, 20, 150, 16, [0, 150], torch.float32, seed=6)
            q.requires_grad_()
            o, lse = pa.prefix_attention(q, k, v, lengths, 0.3)
            (dq,) = torch.autograd.grad(o.sum() + torch.logaddexp(lse, torch.zeros_like(lse)).sum(), q)
            assert torch.equal(o[0], torch.zeros_like(o[0])) and torch.isneginf(lse[0]).all(), pa.CHUNK
            assert torch.equal(dq[0], torch.zeros_like(dq[0])) and torch.isfinite(dq).all(), pa.CHUNK
            assert torch.isfinite(o[1]).all() and torch.isfinite(lse[1]).all()
    finally:
        pa.CHUNK = chunk


def check_int8_prefix():
    """int8 codes read in place (q scaled per key channel, probabilities per value token, dq scaled at the
    end) equal the fp64 softmax over the dequantised prefix, forward and dq, with several chunks and one."""
    q, k, v, lengths = _inputs(2, 2, 40, 300, 32, [300, 77], torch.float32, seed=7)
    kc, vc, ks, vs = int8_prefix(k, v)
    g = torch.Generator().manual_seed(8)
    go, gl = torch.randn(q.shape, generator=g).to(DEVICE), torch.randn(q.shape[:3], generator=g).to(DEVICE)
    kd, vd = kc.float() * ks[:, :, None, :], vc.float() * vs[..., None]
    ro, rl, rdq = _reference(q, kd, vd, lengths, 0.17, go, gl)
    chunk = pa.CHUNK
    try:
        for pa.CHUNK in (64, 1024):
            qq = q.clone().requires_grad_()
            o, lse = pa.prefix_attention(qq, kc, vc, lengths, 0.17, ks, vs)
            ((o * go).sum() + (lse * gl).sum()).backward()
            for got, ref in ((o, ro), (lse, rl), (qq.grad, rdq)):
                torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    finally:
        pa.CHUNK = chunk


def check_op_bf16():
    """bf16 inputs: within bf16 rounding of the fp64 softmax (the kernels accumulate in fp32). CUDA only:
    Triton 3.9's interpreter computes bf16 `tl.dot` wrongly (lse of 6e9 on a 16 x 16 case)."""
    q, k, v, lengths = _inputs(2, 2, 64, 200, 32, [200, 130], torch.bfloat16, seed=2)
    q.requires_grad_()
    o, lse = pa.prefix_attention(q, k, v, lengths, 0.17)
    go = torch.randn(o.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    (o * go).sum().backward()
    ro, rl, rdq = _reference(q.detach(), k, v, lengths, 0.17, go, torch.zeros_like(lse))
    torch.testing.assert_close(o.double(), ro, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lse.double(), rl, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(q.grad.double(), rdq, rtol=5e-2, atol=5e-2)


def check_merged_attention_equals_sdpa():
    """fast_expert's split attention (kernels + the action block, log-sum-exp merge) equals SDPA over the
    concatenation with the additive mask, values and q / k / v gradients, fp32, 2 draws."""
    from shared.fast_expert import _attention, _attention_split

    B, H, T, D, L = 2, 2, 2 * 8, 32, 150
    q, kp, vp, lengths = _inputs(B, H, 2 * T, L, D, [150, 61], torch.float32, seed=4)
    g = torch.Generator().manual_seed(5)
    k, v = (torch.randn(B, H, T, D, generator=g).to(DEVICE) for _ in range(2))
    keep_pre = torch.arange(L, device=DEVICE).view(1, -1) < lengths.view(-1, 1)
    block = torch.arange(T, device=DEVICE) // 8
    keep = torch.cat([keep_pre.view(B, 1, 1, L).expand(B, 1, T, L),
                      (block.view(-1, 1) == block.view(1, -1)).view(1, 1, T, T).expand(B, 1, T, T)], -1)
    mask = torch.zeros(keep.shape, device=DEVICE).masked_fill(~keep, torch.finfo(torch.float32).min)
    mask = mask.repeat(1, 1, 2, 1)  # two query heads per KV head
    grads = []
    for split in (False, True):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        if split:
            o = _attention_split(*leaves, kp, vp, lengths, mask[..., -T:], 0.2)
        else:
            o = _attention(*leaves, kp, vp, mask, 0.2)
        o.square().sum().backward()
        grads.append([o.detach()] + [x.grad for x in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


CHECKS = ("check_op_fp32", "check_merged_attention_equals_sdpa", "check_one_chunk_and_empty_rows", "check_int8_prefix",
          "check_op_bf16")


def run_checks(device: str) -> None:
    """Every check on `device` ("cpu" under TRITON_INTERPRET=1 with small blocks, or "cuda")."""
    global DEVICE
    DEVICE = device
    if device == "cpu":  # small tiles so every path (several chunks, partial blocks) runs on small inputs
        pa.CHUNK, pa.BLOCK_M, pa.BLOCK_N = 64, 16, 16
    run_each(globals(), CHECKS if device != "cpu" else CHECKS[:-1], device)


if __name__ == "__main__":
    main(run_checks)
