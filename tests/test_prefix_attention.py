"""shared/prefix_attention.py: the torch path (CPU) and the Triton kernels (under the interpreter) against
an fp64 softmax and against SDPA over the concatenated prefix."""

import pytest
import torch

from shared.prefix_attention import _bwd_torch, _fwd_torch, prefix_attention


def test_torch_path_equals_softmax_over_the_valid_keys():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g, dtype=torch.float64) for _ in range(3))
    lengths = torch.tensor([5, 2])
    o, lse = _fwd_torch(q, k, v, lengths, 0.3)
    for b, n in enumerate(lengths.tolist()):
        s = q[b] @ k[b, :, :n].transpose(-1, -2) * 0.3
        torch.testing.assert_close(o[b], torch.softmax(s, -1) @ v[b, :, :n].double())
        torch.testing.assert_close(lse[b], torch.logsumexp(s, -1))


def test_dq_is_the_autograd_gradient_through_both_outputs():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 2, 6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, 9, 8, generator=g, dtype=torch.float64) for _ in range(2))
    lengths = torch.tensor([9, 4])
    go, gl = torch.randn(2, 2, 6, 8, generator=g, dtype=torch.float64), torch.randn(2, 2, 6, generator=g,
                                                                                   dtype=torch.float64)
    o, lse = _fwd_torch(q, k, v, lengths, 0.3)
    (dq,) = torch.autograd.grad((o * go).sum() + (lse * gl).sum(), q)
    dm = (go * o.detach()).sum(-1) - gl
    torch.testing.assert_close(_bwd_torch(q.detach(), k, v, lengths, go, lse.detach(), dm, 0.3), dq)
    o2, lse2 = prefix_attention(q, k, v, lengths, 0.3)  # the op's autograd = the same
    (dq2,) = torch.autograd.grad((o2 * go).sum() + (lse2 * gl).sum(), q)
    torch.testing.assert_close(dq2, dq)


def test_an_empty_prefix_gives_zero_weight_not_nan():
    """length 0: o = 0 and lse = -inf (the merge weighs it 0), finite zero dq."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 1, 3, 4, generator=g, requires_grad=True)
    k, v = torch.randn(2, 1, 5, 4, generator=g), torch.randn(2, 1, 5, 4, generator=g)
    o, lse = prefix_attention(q, k, v, torch.tensor([0, 5]), 0.5)
    assert torch.equal(o[0], torch.zeros_like(o[0])) and torch.isneginf(lse[0]).all() and torch.isfinite(lse[1]).all()
    (dq,) = torch.autograd.grad(o.sum() + torch.logaddexp(lse, torch.zeros_like(lse)).sum(), q)
    assert torch.isfinite(dq).all() and torch.equal(dq[0], torch.zeros_like(dq[0]))


def test_a_prefix_that_requires_grad_is_refused():
    q, k = torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 3, 4, requires_grad=True)
    with pytest.raises(ValueError, match="frozen"):
        prefix_attention(q, k, k.detach(), torch.tensor([3]), 1.0)


def test_triton_kernels_under_the_interpreter():
    """The CUDA kernels run by Triton's CPU interpreter in a fresh process (Triton reads TRITON_INTERPRET
    when a kernel is decorated): tests/prefix_attention_check.py, small tiles so several chunks, empty
    chunks and partial blocks all run."""
    pytest.importorskip("triton")
    from triton_interpret import run_script

    assert run_script("prefix_attention_check.py").count("ok ") == 4


def _int8_prefix(B=2, H=2, L=30, D=8, seed=0):
    from shared import kv_quant

    g = torch.Generator().manual_seed(seed)
    return kv_quant.int8_prefix(torch.randn(B, H, L, D, generator=g) * 3, torch.randn(B, H, L, D, generator=g))


def test_int8_prefix_equals_its_dequantised_values_on_the_torch_path():
    """The torch path dequantises exactly as kv_quant.dequantize_kv (codes x scale in fp32), so the op on
    int8 codes + scales is bitwise the op on the dequantised fp32 prefix: values and dq."""
    from shared import kv_quant

    kc, vc, ks, vs = _int8_prefix()
    k, v = kv_quant.dequantize_kv(kv_quant.QuantizedKV(torch.stack((kc, vc), 1), {
        "k_scale": ks[:, :, None, :], "v_scale": vs[..., None]}), "int8")
    q = torch.randn(2, 2, 6, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    lengths = torch.tensor([30, 11])
    out = []
    for args in ((kc, vc, ks, vs), (k, v, None, None)):
        o, lse = prefix_attention(q, args[0], args[1], lengths, 0.3, args[2], args[3])
        (dq,) = torch.autograd.grad(o.square().sum() + lse.sum(), q)
        out.append((o, lse, dq))
    for a, b in zip(*out):
        assert torch.equal(a, b)


def test_int8_prefix_inputs_are_checked():
    kc, vc, ks, vs = _int8_prefix()
    q = torch.zeros(2, 2, 6, 8)
    lengths = torch.tensor([30, 11])
    with pytest.raises(ValueError, match="both k_scale and v_scale"):
        prefix_attention(q, kc, vc, lengths, 1.0, ks, None)
    with pytest.raises(ValueError, match="int8 codes"):
        prefix_attention(q, kc.float(), vc.float(), lengths, 1.0, ks, vs)
    with pytest.raises(ValueError, match=r"v_scale \(2, 2, 29\)"):
        prefix_attention(q, kc, vc, lengths, 1.0, ks, vs[..., :29])
