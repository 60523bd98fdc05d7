"""Run by tests/test_adam8.py in a fresh process with TRITON_INTERPRET=1 (Triton reads it when a kernel
is decorated): the Triton kernel of adamw8bit-fused on CPU tensors against the eager torch path.
bench/diag_adam8.py --check runs the same checks on CUDA (DEVICE = "cuda")."""

import torch
from triton_interpret import main, run_each

from head_trainer.adam8 import AdamW8bitFused, dynamic_map, quantise

DEVICE = "cpu"


def shapes():
    g = torch.Generator().manual_seed(0)
    # quantised (a a partial last program: 17 blocks), small (plain moments), not a block multiple
    return [t.to(DEVICE) for t in (torch.randn(64, 128, generator=g), torch.randn(17, 256, generator=g),
                                   torch.randn(100, generator=g), torch.randn(4100, generator=g))]


def run(backend, dtype, steps, clip=False, start=None):
    ps = [torch.nn.Parameter((p if start is None else q).clone().to(dtype)) for p, q in zip(shapes(), start or shapes())]
    opt = AdamW8bitFused(ps, lr=1e-2, weight_decay=0.1, backend=backend)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in ps:
            p.grad = (torch.randn(p.shape, generator=g) * (10 if clip else 1)).to(DEVICE, dtype)
        opt.clip_and_step(1.0) if clip else opt.step()
    return ps, opt


def check_both_searches_are_quantise():
    """The kernel's code search, every variant (binary search; arithmetic guess + bounds; table guess +
    bounds), equals adam8.quantise exactly: on random values over the range (uniform and log-uniform down
    to 2^-30), every map entry, every bound and the fp32 neighbours of both, and +-0."""
    from head_trainer.adam8_triton import code_bounds, code_tables, encode

    g = torch.Generator().manual_seed(3)
    n = 200_000 if DEVICE == "cpu" else 20_000_000
    for signed in (True, False):
        q = torch.tensor(dynamic_map(signed))
        b = code_bounds(q)
        lo = -1.0 if signed else 0.0
        sign = (torch.randint(0, 2, (n,), generator=g) * 2 - 1) if signed else 1
        x = torch.cat([torch.rand(n, generator=g) * (1 - lo) + lo, (torch.rand(n, generator=g) * -30).exp2() * sign,
                       q, b[:-1], torch.nextafter(b[:-1], torch.tensor(-2.0)), torch.nextafter(q, torch.tensor(2.0)),
                       torch.nextafter(q, torch.tensor(-2.0)), torch.tensor([0.0, -0.0, 1.0, lo])]).clamp(lo, 1.0)
        ref = quantise(x, q)
        t = code_tables(q, signed)
        for search in (0, 1, 2):
            got = encode(x.to(DEVICE), q.to(DEVICE), t.to(DEVICE), signed, search).cpu()
            assert torch.equal(got, ref), (signed, search, int((got != ref).sum()))


def _close_to_eager(clip: bool, rtol: float, code_share: float, scales: bool) -> None:
    """4 fp32 steps through the kernel against the eager path: weights within rtol (atol 1e-6), codes at most
    one apart on at most code_share of the elements, block scales (if asked) within 1 ulp."""
    a, oa = run("eager", torch.float32, 4, clip)
    b, ob = run("triton", torch.float32, 4, clip)
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pb, pa, rtol=rtol, atol=1e-6)
    for pa, pb in zip(a[:2], b[:2]):
        sa, sb = oa.state[pa], ob.state[pb]
        for k in ("m_codes", "v_codes"):
            diff = (sa[k].int() - sb[k].int()).abs()
            assert diff.max() <= 1 and (diff > 0).float().mean() <= code_share, (k, int((diff > 0).sum()))
        if scales:
            torch.testing.assert_close(sb["m_scale"], sa["m_scale"], rtol=2e-7, atol=0)
            torch.testing.assert_close(sb["v_scale"], sa["v_scale"], rtol=2e-7, atol=0)


def check_fp32_equals_eager():
    """fp32 weights (no rounding): weights within 2 ulp or 1e-6 (the eager CPU lerp fuses a multiply-add;
    on CUDA the small tensors' compiled update differs from eager by up to 6e-7), codes equal but for
    near-ties (at most 1 in 1000, one code apart), block scales within 1 ulp; the same with the clip folded in."""
    for clip in (False, True):
        _close_to_eager(clip, rtol=3e-7, code_share=1e-3, scales=True)


def check_fast_variant_is_close():
    """FAST = 1 (reciprocals, approximate division and square root on CUDA): within 1e-5 of the eager
    path, codes at most one apart on at most 1 % of the elements."""
    from head_trainer import adam8_triton

    adam8_triton.FAST = 1
    try:
        _close_to_eager(False, rtol=1e-5, code_share=1e-2, scales=False)
    finally:
        adam8_triton.FAST = 0


def check_bf16_rounds_to_a_neighbour_without_bias():
    """bf16 weights, one step from the same state: every weight is one of the two bf16 neighbours of the
    fp32 update (the eager path on the same values in fp32), rounded up as often as its fraction says."""
    start = [p.to(torch.bfloat16).float() for p in shapes()]
    ref, _ = run("eager", torch.float32, 1, start=start)
    out, _ = run("triton", torch.bfloat16, 1, start=start)
    ups, fracs = [], []
    for r, o in zip(ref[:2], out[:2]):  # the quantised tensors go through the kernel
        r = r.detach().reshape(-1)
        down = r.bfloat16()
        down = torch.where(down.float().abs() > r.abs(), torch.nextafter(down, torch.zeros_like(down)), down)
        up = torch.nextafter(down, down * 2 + torch.sign(r).bfloat16())
        o = o.detach().reshape(-1)
        assert torch.all((o == down) | (o == up)), "a weight left its two bf16 neighbours"
        ups.append((o == up).float())
        fracs.append(((r - down.float()) / (up.float() - down.float())).clamp(0, 1))
    ups, fracs = torch.cat(ups), torch.cat(fracs)
    assert abs(ups.mean().item() - fracs.mean().item()) < 0.02, (ups.mean().item(), fracs.mean().item())


def check_bf16_draws_repeat_and_differ():
    """The kernel's tensors come out bitwise the same from the same run twice (draws keyed by step and
    parameter, no generator state), and two equal tensors in one optimizer get different draws."""
    torch.manual_seed(0)
    a, _ = run("triton", torch.bfloat16, 3)
    torch.manual_seed(1)  # moves only the small tensors' draws (torch's generator)
    b, _ = run("triton", torch.bfloat16, 3)
    assert all(torch.equal(x, y) for x, y in zip(a[:2], b[:2]))
    same = torch.randn(4096, generator=torch.Generator().manual_seed(2)).to(DEVICE, torch.bfloat16)
    ps = [torch.nn.Parameter(same.clone()) for _ in range(2)]
    opt = AdamW8bitFused(ps, lr=1e-3, backend="triton")
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    assert not torch.equal(ps[0], ps[1])


def check_layouts_and_searches_are_bitwise_the_same():
    """Other block layouts (ROWS, NUM_WARPS) and the other code searches (SEARCH 0 / 1 / 2 give the same codes)
    leave weights, codes and scales bitwise as the shipped kernel does, bf16 with stochastic rounding and fp32
    with the clip, including a program whose last block falls past the tensor (ROWS 2 over odd block counts)."""
    from head_trainer import adam8_triton as k

    shipped = (k.ROWS, k.NUM_WARPS, k.SEARCH)
    for dtype, clip in ((torch.bfloat16, False), (torch.float32, True)):
        torch.manual_seed(0)  # the small tensors' stochastic rounding draws from torch's generator
        ref, oref = run("triton", dtype, 3, clip)
        for variant in ((2, 2, shipped[2]), (1, 2, 1), (1, 1, 0), (1, 4, 2)):
            k.ROWS, k.NUM_WARPS, k.SEARCH = variant
            try:
                torch.manual_seed(0)
                got, ogot = run("triton", dtype, 3, clip)
            finally:
                k.ROWS, k.NUM_WARPS, k.SEARCH = shipped
            assert all(torch.equal(a, b) for a, b in zip(ref, got)), variant
            for pa, pb in zip(ref[:2], got[:2]):
                sa, sb = oref.state[pa], ogot.state[pb]
                assert all(torch.equal(sa[n], sb[n]) for n in ("m_codes", "v_codes", "m_scale", "v_scale")), variant


CHECKS = ("check_both_searches_are_quantise", "check_fp32_equals_eager", "check_fast_variant_is_close",
          "check_bf16_rounds_to_a_neighbour_without_bias", "check_bf16_draws_repeat_and_differ",
          "check_layouts_and_searches_are_bitwise_the_same")


def run_checks(device: str) -> None:
    """Every check on `device` ("cpu" under TRITON_INTERPRET=1, or "cuda"), one line per check passed."""
    global DEVICE
    DEVICE = device
    run_each(globals(), CHECKS, device)


if __name__ == "__main__":
    main(run_checks)
