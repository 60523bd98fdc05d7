"""adamw8bit-fused: the numbers of torchao's AdamW8bit (its independent implementation is the reference),
the folded clip, stochastic rounding, and state files."""

import pytest
import torch

from head_trainer.adam8 import AdamW8bitFused, bf16_stochastic, dynamic_map, quantise
from head_trainer.optim import build_optimizer, load_optimizer, save_optimizer

torchao_optim = pytest.importorskip("torchao.optim")


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    # quantised (2 shapes), small (< 4096: moments in the parameter dtype), not a block multiple
    return [torch.randn(64, 128, generator=g), torch.randn(32, 256, generator=g), torch.randn(100, generator=g),
            torch.randn(4100, generator=g)]


def _run(opt_cls, shapes, steps, **kw):
    ps = [torch.nn.Parameter(p.clone()) for p in shapes]
    opt = opt_cls(ps, lr=1e-2, weight_decay=0.1, **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        opt.step()
    return ps, opt


def test_maps_are_bitsandbytes_dynamic_maps():
    from torchao.optim.quant_utils import create_dynamic_map

    assert dynamic_map(True) == create_dynamic_map(signed=True)
    assert dynamic_map(False) == create_dynamic_map(signed=False)
    assert len(set(dynamic_map(True))) == 256 and 0.0 in dynamic_map(True) and max(dynamic_map(True)) == 1.0


def test_quantise_is_the_nearest_code():
    qmap = torch.tensor(dynamic_map(True))
    x = torch.cat([torch.rand(20000) * 2 - 1, qmap, torch.tensor([-1.0, 0.0, 1.0])])
    codes = quantise(x, qmap).long()
    brute = (x[:, None] - qmap[None]).abs()
    best = brute.min(1).values
    assert torch.equal(brute.gather(1, codes[:, None])[:, 0], best)  # ties may pick either neighbour
    assert torch.equal(quantise(qmap, qmap).long(), torch.arange(256))


@pytest.mark.parametrize("compiled", [False, True])
def test_equals_torchao_adamw8bit_in_fp32(compiled):
    """Eager: within fp32 rounding of torchao (which compiles its step); compiled: bitwise, codes included."""
    shapes = _params()
    a, oa = _run(torchao_optim.AdamW8bit, shapes, 4)
    b, ob = _run(AdamW8bitFused, shapes, 4, compile=compiled)
    for pa, pb in zip(a, b):
        if compiled:
            assert torch.equal(pa, pb)
        else:
            torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6)
    for pa, pb in zip(a[:2], b[:2]):  # quantised states: same codes and block scales
        sa, sb = oa.state[pa], ob.state[pb]
        assert torch.equal(sa["exp_avg"].codes.reshape(-1), sb["m_codes"])
        assert torch.equal(sa["exp_avg_sq"].codes.reshape(-1), sb["v_codes"])
        torch.testing.assert_close(sa["exp_avg"].scale, sb["m_scale"], rtol=1e-6, atol=0)
    assert "m" in ob.state[b[2]] and "m" in ob.state[b[3]]  # small / not a block multiple: plain moments
    assert ob.state[b[3]]["m"].dtype == torch.float32


def test_clip_folded_into_the_update_equals_clip_then_step():
    shapes = _params(3)
    ref = [torch.nn.Parameter(p.clone()) for p in shapes]
    new = [torch.nn.Parameter(p.clone()) for p in shapes]
    o_ref, o_new = AdamW8bitFused(ref, lr=1e-2), AdamW8bitFused(new, lr=1e-2)
    g = torch.Generator().manual_seed(5)
    for scale in (10.0, 0.01):  # clipped, then not clipped
        grads = [scale * torch.randn(p.shape, generator=g) for p in shapes]
        for p, q, gr in zip(ref, new, grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        n_ref = torch.nn.utils.clip_grad_norm_(ref, 1.0)
        o_ref.step()
        n_new = o_new.clip_and_step(1.0)
        torch.testing.assert_close(n_new, n_ref, rtol=1e-6, atol=0)
        for p, q in zip(ref, new):
            torch.testing.assert_close(q, p, rtol=0, atol=1e-6)
        for q, gr in zip(new, grads):
            assert torch.equal(q.grad, gr)  # the gradients are not rewritten


def test_bf16_stochastic_rounding_is_unbiased_between_neighbours():
    torch.manual_seed(0)
    lo = torch.tensor(1.0, dtype=torch.bfloat16)
    hi = torch.nextafter(lo, torch.tensor(2.0, dtype=torch.bfloat16))
    x = torch.full((200_000,), float(lo) + 0.25 * (float(hi) - float(lo)))
    r = bf16_stochastic(x)
    assert set(r.unique().tolist()) == {float(lo), float(hi)}
    assert abs((r == hi).float().mean().item() - 0.25) < 0.005
    neg = bf16_stochastic(-x)
    assert torch.equal(neg.abs().unique(), r.unique())  # away from zero for negatives too
    exact = torch.tensor([1.0, -2.5, 0.0])
    assert torch.equal(bf16_stochastic(exact).float(), exact)


def test_bf16_weights_take_updates_smaller_than_half_an_ulp():
    """Round-to-nearest would leave every weight at 1.0; stochastic rounding moves the mean by the update."""
    p = torch.nn.Parameter(torch.ones(8192, dtype=torch.bfloat16))
    opt = AdamW8bitFused([p], lr=1e-4)
    torch.manual_seed(0)
    for _ in range(20):
        p.grad = torch.ones_like(p)
        opt.step()
    moved = 1.0 - p.float().mean().item()
    assert 20 * 1e-4 * 0.8 < moved < 20 * 1e-4 * 1.2  # Adam's step is ~lr for a constant gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_file_round_trip_continues_bitwise(tmp_path, dtype):
    """torch's load_state_dict casts state to the parameter dtype: codes must come back uint8, scales fp32."""
    b, ob = _run(AdamW8bitFused, [p.to(dtype) for p in _params()], 2)
    save_optimizer(ob, tmp_path / "o.safetensors")
    c = [torch.nn.Parameter(p.detach().clone()) for p in b]
    oc = build_optimizer(c, "adamw8bit-fused", 1e-2, weight_decay=0.1)
    load_optimizer(oc, tmp_path / "o.safetensors")
    for p, q in zip(b, c):
        for k, v in ob.state[p].items():
            assert oc.state[q][k].dtype == v.dtype and torch.equal(oc.state[q][k], v), k
    g = torch.Generator().manual_seed(9)
    for p, q in zip(b, c):
        p.grad = torch.randn(p.shape, generator=g).to(dtype)
        q.grad = p.grad.clone()
    torch.manual_seed(4)  # stochastic rounding draws from the global generator
    ob.step()
    torch.manual_seed(4)
    oc.step()
    for p, q in zip(b, c):
        assert torch.equal(p, q)
    assert float(oc.state[c[0]]["step"]) == 3.0


def test_triton_kernel_equals_the_torch_update_under_the_interpreter():
    """The CUDA kernel (head_trainer/adam8_triton.py) run by Triton's CPU interpreter, in a fresh process
    because Triton reads TRITON_INTERPRET when the kernel is decorated: tests/adam8_interpreter_check.py."""
    pytest.importorskip("triton")
    from triton_interpret import run_script

    assert run_script("adam8_interpreter_check.py").count("ok ") == 6
