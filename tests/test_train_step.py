"""The loader's order and slicing, tiers and dequantisation, and the train step's draws / accumulation."""

import pytest
import torch

from head_trainer.data import StepBatchSampler, collate, make_loader, sample_item
from head_trainer.optim import build_optimizer, load_optimizer, save_optimizer
from head_trainer.step import StepConfig, TrainStep, draw_noise, flow_loss
from shared.fast_expert import FastExpert
from shared.head import AlpamayoHead
from shared.store import KVSpec, Store, StoreWriter, synthetic_sample

PROV = dict(checkpoint="tiny@abc", head_config_hash="h1", processor="proc@1", prefix_mode="sft-no-cot",
            dataset_revision="r1", code_version="test")


@pytest.fixture(scope="module")
def head_cfg(tiny_head_cfg):
    return tiny_head_cfg


def _store(path, quant="none", kv_dtype="float32", n=10, cfg=None):
    spec = KVSpec(num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, hidden_size=16,
                  thumb_hw=(6, 10), kv_dtype=kv_dtype, quant=quant, store_hidden=False)
    with StoreWriter.create(str(path), PROV, spec) as w:
        for i in range(n):
            w.write(synthetic_sample(i, spec, split="train"))
    return Store.open(str(path))


def test_ranks_and_accumulation_slice_one_global_order():
    one = StepBatchSampler(list(range(7)), 4, seed=3, start=0, stop=5)
    ranks = [StepBatchSampler(list(range(7)), 1, 3, 0, 5, rank=r, world_size=2, grad_accum=2) for r in range(2)]
    for step in range(5):
        glob = one.micro_batch(step, 0)
        # position (m * world + r) * B + b
        assert [ranks[r].micro_batch(step, m)[0] for m in range(2) for r in range(2)] == glob
    seq = [one.micro_batch(s, 0) for s in range(5)]
    flat = [i for b in seq for i in b]
    assert sorted(flat[:7]) == list(range(7))  # epoch 0 is a permutation
    assert list(StepBatchSampler(list(range(7)), 4, 3, 2, 5)) == seq[2:]  # resume reads the same batches


@pytest.mark.parametrize("quant,kv_dtype", [("none", "float32"), ("none", "bfloat16"), ("int8", "bfloat16"),
                                            ("int4", "bfloat16")])
def test_loader_batches_equal_store_read(tmp_path, head_cfg, quant, kv_dtype):
    st = _store(tmp_path / "s", quant, kv_dtype, cfg=head_cfg)
    loader = make_loader(st.url, list(range(len(st))), 3, seed=1, start=0, stop=3, num_workers=0)
    sampler = StepBatchSampler(list(range(len(st))), 3, 1, 0, 3)
    for step, micro in enumerate(loader):
        (b,) = micro
        idx = sampler.micro_batch(step, 0)
        ref = collate([sample_item(st.read(i, with_hidden=False)) for i in idx])
        assert b.keys == ref.keys
        assert b.prefix.max_len % 64 == 0 and b.prefix.max_len >= ref.prefix.max_len
        b.prepare()
        for k, kr in zip(b.prefix.keys + b.prefix.values, ref.prefix.keys + ref.prefix.values):
            assert torch.equal(k[:, :, : kr.shape[2]], kr) and not k[:, :, kr.shape[2]:].any()
        assert torch.equal(b.prefix.lengths, ref.prefix.lengths) and torch.equal(b.action, ref.action)
        b.release()


def test_two_kv_slots_serve_any_accumulation(tmp_path, head_cfg):
    """Two device slots per batch shape, whatever --grad-accum: each micro-batch's K/V are copied in when
    it is prepared, into the slot the micro-batch before last has released; padding reads as zeros after
    a longer batch; a slot refilled before its release, or a batch never prepared, is a loud error."""
    from head_trainer.integrity import FiniteGuard

    st = _store(tmp_path / "s", "int8", "bfloat16", cfg=head_cfg)
    loader = make_loader(st.url, list(range(10)), 2, seed=3, start=0, stop=3, grad_accum=4, bucket=1024)
    sampler = StepBatchSampler(list(range(10)), 2, 3, 0, 3, grad_accum=4)
    for step, micro in enumerate(loader):
        for m, b in enumerate(micro):
            ref = collate([sample_item(st.read(i, with_hidden=False)) for i in sampler.micro_batch(step, m)])
            b.prepare()
            for k, kr in zip(b.prefix.keys + b.prefix.values, ref.prefix.keys + ref.prefix.values):
                assert torch.equal(k[:, :, : kr.shape[2]], kr) and not k[:, :, kr.shape[2]:].any()
            b.release()
    assert [len(slots) for slots in loader.feeder._slots.values()] == [2]  # one shape (bucket 1024), two slots

    micro = next(iter(make_loader(st.url, list(range(10)), 2, seed=3, start=0, stop=1, grad_accum=3, bucket=1024)))
    micro[0].prepare()
    with pytest.raises(RuntimeError, match="refilled before its previous batch was released"):
        micro[2].prepare()  # the same slot as micro[0], still held
    guard = FiniteGuard()
    guard.add(0, micro[1:2])
    with pytest.raises(RuntimeError, match="never prepared"):
        guard.problem("resume")


def test_int8_prefix_slots_hold_codes_and_scales(tmp_path, head_cfg):
    """int8_prefix: the slots are int8 codes + fp32 scales (KVPrefix.key_scales / value_scales) whose
    dequantised values, padding included, are bitwise the fp32 slots the plain feeder fills; the fast
    expert's loss over them is the same number, through the split attention and through SDPA; a store
    that is not int8 is refused."""
    st = _store(tmp_path / "s", "int8", "bfloat16", cfg=head_cfg)
    plain = make_loader(st.url, list(range(10)), 3, 1, 0, 2, dtype=torch.float32, bucket=64)
    q8 = make_loader(st.url, list(range(10)), 3, 1, 0, 2, dtype=torch.float32, bucket=64, int8_prefix=True)
    torch.manual_seed(0)
    head = AlpamayoHead(head_cfg)
    t, eps = draw_noise(5, 7, 3, 2, head_cfg.diffusion)
    for (a,), (b,) in zip(plain, q8):
        a.prepare(), b.prepare()
        assert b.prefix.quantized and b.prefix.keys[0].dtype == torch.int8 and not a.prefix.quantized
        assert tuple(b.prefix.key_scales[0].shape) == (3, head_cfg.num_kv_heads, head_cfg.head_dim)
        assert tuple(b.prefix.value_scales[0].shape) == (3, head_cfg.num_kv_heads, b.prefix.max_len)
        deq = b.prefix.dequantized(torch.float32)
        for x, y in zip(a.prefix.keys + a.prefix.values, deq.keys + deq.values):
            assert torch.equal(x, y)
        for attention in ("split", "sdpa"):
            fast = FastExpert(head, attention=attention)
            assert torch.equal(flow_loss(fast, a.action, a.prefix, t, eps), flow_loss(fast, b.action, b.prefix, t, eps))
        a.release(), b.release()
    assert q8.feeder._slots and all(s.kv.dtype == torch.int8 and s.scales for v in q8.feeder._slots.values() for s in v)
    with pytest.raises(ValueError, match="--int8-prefix reads int8 stores"):
        make_loader(_store(tmp_path / "f", cfg=head_cfg).url, [0, 1], 2, 1, 0, 1, int8_prefix=True)


def test_ram_tier_serves_the_same_batches(tmp_path, head_cfg):
    st = _store(tmp_path / "s", "int8", "bfloat16", cfg=head_cfg)
    plain = make_loader(st.url, list(range(10)), 4, 2, 0, 4)
    tiered = make_loader(st.url, list(range(10)), 4, 2, 0, 4, ram_budget_bytes=10**9)
    assert len(tiered.feeder.ram) == 10
    for (a,), (b,) in zip(plain, tiered):
        a.prepare(), b.prepare()
        assert a.keys == b.keys and all(torch.equal(x, y) for x, y in zip(a.prefix.keys, b.prefix.keys))
        a.release(), b.release()


def _batch(st, idx):
    return collate([sample_item(st.read(i, with_hidden=False)) for i in idx])


def test_draws_equal_separate_single_draw_losses(tmp_path, head_cfg):
    st = _store(tmp_path / "s", cfg=head_cfg)
    torch.manual_seed(0)
    fast = FastExpert(AlpamayoHead(head_cfg))
    b = _batch(st, [0, 1, 2])
    t, eps = draw_noise(5, 7, 3, 4, head_cfg.diffusion)  # (3, 4), (3, 4, 64, 2)
    k4 = flow_loss(fast, b.action, b.prefix, t, eps)
    singles = [flow_loss(fast, b.action, b.prefix, t[:, k:k + 1], eps[:, k:k + 1]) for k in range(4)]
    torch.testing.assert_close(k4, torch.stack(singles).mean(), rtol=1e-6, atol=1e-7)


def test_release_loss_formula_by_hand(tmp_path, head_cfg):
    """t = 0.999 (1 - r^(1/1.5)), x_t = t x + (1 - t) eps, target x - eps, MSE: the release's Stage-2 loss."""
    st = _store(tmp_path / "s", cfg=head_cfg)
    torch.manual_seed(0)
    head = AlpamayoHead(head_cfg)
    b = _batch(st, [3, 4])
    gen = torch.Generator().manual_seed(9 * 1_000_003 + 2)
    r = torch.rand(2, generator=gen)
    t = 0.999 * (1 - r ** (1 / 1.5))
    eps = torch.randn(2, 64, 2, generator=gen)
    x_t = t.view(2, 1, 1) * b.action + (1 - t.view(2, 1, 1)) * eps
    ref = ((head.velocity(x_t, t.view(2, 1, 1), b.prefix) - (b.action - eps)) ** 2).mean()
    td, ed = draw_noise(9, 2, 2, 1, head_cfg.diffusion)
    torch.testing.assert_close(flow_loss(FastExpert(head), b.action, b.prefix, td, ed), ref, rtol=1e-5, atol=1e-6)


def test_accumulation_equals_the_large_batch(tmp_path, head_cfg):
    st = _store(tmp_path / "s", cfg=head_cfg)
    heads = []
    for accum in (1, 2):
        torch.manual_seed(0)
        head = AlpamayoHead(head_cfg)
        params = [p for p in head.parameters() if p.requires_grad]
        step = TrainStep(head, params, build_optimizer(params, "adamw", 1e-3), StepConfig(seed=1, grad_accum=accum))
        loader = make_loader(st.url, list(range(10)), 4 // accum, seed=1, start=0, stop=3, grad_accum=accum)
        for s, micro in enumerate(loader):
            step(micro, 1e-3, s)
        heads.append(head.state_dict())
    for k in heads[0]:
        torch.testing.assert_close(heads[1][k], heads[0][k], rtol=1e-5, atol=1e-6)


def test_optimizer_state_round_trip(tmp_path):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 128))
    opt = build_optimizer([p], "adamw", 1e-2)
    p.grad = torch.randn_like(p)
    opt.step()
    save_optimizer(opt, tmp_path / "o.safetensors")
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = build_optimizer([q], "adamw", 1e-2)
    load_optimizer(opt2, tmp_path / "o.safetensors")
    assert set(opt.state[p]) == set(opt2.state[q]) == {"step", "exp_avg", "exp_avg_sq"}
    assert all(torch.equal(opt.state[p][k], opt2.state[q][k]) for k in opt.state[p])
    g = torch.randn_like(p)
    p.grad, q.grad = g, g.clone()
    opt.step()
    opt2.step()
    assert torch.equal(p, q)
    with pytest.raises(ValueError, match="--optimizer 'sgd'"):
        build_optimizer([p], "sgd", 1e-2)


@pytest.mark.parametrize("name", ["adamw8bit", "adamwfp8"])
def test_quantised_optimizer_state_round_trip(tmp_path, name):
    """torchao's quantised states (codes + block scales) survive safetensors and continue bit-exactly."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 128))  # >= 4096 elements: torchao quantises the states
    opt = build_optimizer([p], name, 1e-2)
    p.grad = torch.randn_like(p)
    opt.step()
    save_optimizer(opt, tmp_path / "o.safetensors")
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = build_optimizer([q], name, 1e-2)
    load_optimizer(opt2, tmp_path / "o.safetensors")
    a, b = opt.state[p]["exp_avg"], opt2.state[q]["exp_avg"]
    assert type(a) is type(b) and type(a).__name__ != "Tensor"
    assert torch.equal(a.dequantize(), b.dequantize())
    g = torch.randn_like(p)
    p.grad, q.grad = g, g.clone()
    opt.step()
    opt2.step()
    assert torch.equal(p, q)


@pytest.mark.parametrize("accum, compile, checkpoint", [(1, False, False), (3, False, True), (2, True, False)])
def test_fused_wgrad_trains_as_autograd_does(tmp_path, head_cfg, accum, compile, checkpoint):
    """--fused-wgrad: the expert linears' backward GEMMs accumulate dW into the gradient buffers the update
    reads. Two fp32 steps (micro-batches accumulated, layers recomputed or compiled) give the losses, gradients
    and weights of autograd's own path; the other parameters keep autograd's gradients; a later step built on
    the same head without the flag leaves no buffer behind; --trainable projections has nothing to fuse."""
    from head_trainer.trainable import apply_trainable

    st = _store(tmp_path / "s", cfg=head_cfg)
    micro = [_batch(st, [2 * m, 2 * m + 1]) for m in range(accum)]
    out = []
    for fused in (False, True):
        torch.manual_seed(0)
        head = AlpamayoHead(head_cfg)
        params = apply_trainable(head, "all")
        ts = TrainStep(head, params, build_optimizer(params, "adamw", 1e-3),
                       StepConfig(seed=4, grad_accum=accum, compile=compile, checkpoint=checkpoint, fused_wgrad=fused))
        losses = [float(ts(micro, 1e-3, step).loss) for step in range(2)]
        out.append((losses, [p.grad.clone() for p in params], [p.detach().clone() for p in params], ts))
    (l0, g0, w0, _), (l1, g1, w1, ts) = out
    assert len(ts._wgrad) == 7 * head_cfg.num_layers
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-7)
    for a, b in zip(g0 + w0, g1 + w1):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    head = ts.head
    plain = TrainStep(head, ts.params, ts.opt, StepConfig(seed=4))
    assert not plain._wgrad and not any(hasattr(m, "wgrad_into") for m in head.expert.modules())
    frozen = AlpamayoHead(head_cfg)
    with pytest.raises(ValueError, match="--fused-wgrad needs trainable expert linear weights"):
        TrainStep(frozen, apply_trainable(frozen, "projections"),
                  build_optimizer(apply_trainable(frozen, "projections"), "adamw", 1e-3), StepConfig(fused_wgrad=True))
