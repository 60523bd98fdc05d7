"""The fast expert path equals the transformers path (AlpamayoHead.velocity), draws and compile included."""

import pytest
import torch

from shared.fast_expert import FastExpert, action_mask
from shared.head import AlpamayoHead, KVPrefix


def _prefix(cfg, lengths, deltas, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = [(torch.randn(cfg.num_layers, cfg.num_kv_heads, L, cfg.head_dim, generator=g),
              torch.randn(cfg.num_layers, cfg.num_kv_heads, L, cfg.head_dim, generator=g), L, d)
             for L, d in zip(lengths, deltas)]
    return KVPrefix.collate(items)


@pytest.fixture(scope="module")
def head(tiny_head_cfg):
    torch.manual_seed(0)
    return AlpamayoHead(tiny_head_cfg).eval()


@pytest.fixture(scope="module")
def gqa_head(tiny_text_cfg):
    """4 query heads on 2 KV heads, so grouped-query folding is exercised."""
    from shared.config import HeadConfig

    cfg = HeadConfig.from_alpamayo_config(
        {"expert_cfg": {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                        "intermediate_size": 96}, "action_in_proj_cfg": {"hidden_size": 32, "num_enc_layers": 2}},
        tiny_text_cfg)
    torch.manual_seed(1)
    return AlpamayoHead(cfg).eval()


@pytest.mark.parametrize("which", ["head", "gqa_head"])
@pytest.mark.parametrize("causal", [False, True])
def test_fast_velocity_equals_transformers_path(which, causal, request):
    head = request.getfixturevalue(which)
    head.causal = causal
    try:
        prefix = _prefix(head.cfg, [7, 11, 4], [-3, 0, 5])
        g = torch.Generator().manual_seed(1)
        x = torch.randn(3, 64, 2, generator=g)
        t = torch.rand(3, 1, 1, generator=g)
        ref = head.velocity(x, t, prefix)
        fast = FastExpert(head).velocity(x[:, None], t.view(3, 1), prefix)[:, 0]
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    finally:
        head.causal = not head.cfg.expert_non_causal_attention


def test_draws_share_the_prefix_and_equal_separate_passes(gqa_head):
    """K draws in one pass (block-diagonal action blocks) == K passes of the transformers path."""
    head = gqa_head
    prefix = _prefix(head.cfg, [9, 5], [2, -1], seed=3)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 64, 2, generator=g)
    t = torch.rand(2, 3, generator=g)
    fast = FastExpert(head).velocity(x, t, prefix)
    for k in range(3):
        ref = head.velocity(x[:, k], t[:, k].view(2, 1, 1), prefix)
        torch.testing.assert_close(fast[:, k], ref, rtol=1e-5, atol=1e-5)


def test_gradients_equal_transformers_path(gqa_head):
    head = gqa_head
    prefix = _prefix(head.cfg, [6, 8], [0, 1], seed=4)
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(2, 64, 2, generator=g), torch.rand(2, 1, 1, generator=g)
    params = [p for p in head.parameters() if p.requires_grad]
    ref = torch.autograd.grad(head.velocity(x, t, prefix).square().sum(), params)
    fast = torch.autograd.grad(FastExpert(head).velocity(x[:, None], t.view(2, 1), prefix).square().sum(), params)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_action_mask_blocks_padding_and_other_draws():
    p = KVPrefix([torch.zeros(2, 1, 3, 4)], [torch.zeros(2, 1, 3, 4)], torch.tensor([3, 1]), torch.zeros(2, dtype=torch.long))
    m = action_mask(p, 2, torch.float32, causal=False, n_action=2)  # (B, 1, 4, 3 + 4)
    blocked = m == torch.finfo(torch.float32).min
    assert m.shape == (2, 1, 4, 7)
    assert not blocked[0, 0, :, :3].any() and blocked[1, 0, :, 1:3].all() and not blocked[1, 0, :, 0].any()
    expect = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(blocked[0, 0, :, 3:], expect)
    causal = action_mask(p, 2, torch.float32, causal=True, n_action=2) == torch.finfo(torch.float32).min
    assert causal[0, 0, 0, 4] and not causal[0, 0, 1, 4] and causal[0, 0, 2, 6] and not causal[0, 0, 3, 5]


def test_compiled_layer_equals_plain(gqa_head):
    """torch.compile of one decoder layer (reused by every layer) gives the plain path's numbers."""
    head = gqa_head
    prefix = _prefix(head.cfg, [8, 8], [0, 3], seed=6)
    g = torch.Generator().manual_seed(7)
    x, t = torch.randn(2, 2, 64, 2, generator=g), torch.rand(2, 2, generator=g)
    plain = FastExpert(head).velocity(x, t, prefix)
    compiled = FastExpert(head, compile=True).velocity(x, t, prefix)
    torch.testing.assert_close(compiled, plain, rtol=1e-5, atol=1e-5)


def _saved_bytes(fn, inputs) -> tuple[torch.Tensor, int]:
    """Bytes of the distinct storages autograd keeps for the backward pass while `fn` runs, leaving out
    the storages of `inputs` (the cached prefix: kept by reference, not copied)."""
    skip = {x.untyped_storage().data_ptr() for x in inputs}
    seen: dict[int, int] = {}

    def pack(x):
        st = x.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = fn()
    return out, sum(seen.values())


@pytest.mark.parametrize("compile", [False, True])
def test_attention_recompute_equals_and_keeps_no_prefix_copy(gqa_head, compile):
    """recompute_attention: the same gradients, without a saved [prefix; action] copy per layer."""
    head = gqa_head
    L = 512  # a long prefix, so its per-layer copy dominates what is saved
    prefix = _prefix(head.cfg, [L, L - 40], [0, 2], seed=8)
    g = torch.Generator().manual_seed(9)
    x, t = torch.randn(2, 2, 64, 2, generator=g), torch.rand(2, 2, generator=g)
    params = [p for p in head.parameters() if p.requires_grad]
    runs = {}
    for rec in (False, True):
        fast = FastExpert(head, compile=compile, recompute_attention=rec)
        v, saved = _saved_bytes(lambda f=fast: f.velocity(x, t, prefix), prefix.keys + prefix.values)
        runs[rec] = (torch.autograd.grad(v.square().sum(), params), saved)
    for a, b in zip(runs[True][0], runs[False][0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    cfg = head.cfg
    copy = cfg.num_layers * 2 * 2 * cfg.num_kv_heads * (L + 2 * 64) * cfg.head_dim * 4  # K and V, B=2, fp32
    if not compile:  # compiled graphs save their own choice of tensors; the eager count is exact
        assert runs[False][1] - runs[True][1] >= copy
    assert runs[True][1] < runs[False][1]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("compile", [False, True])
def test_split_attention_equals_sdpa_path_values_and_gradients(gqa_head, causal, compile):
    """attention="split" (prefix attention read in place + the action block, merged by log-sum-exp):
    the velocity and every parameter gradient of the SDPA path, with padding (unequal lengths), 2 draws
    (block-diagonal action blocks) and the causal variant; compiled too."""
    head = gqa_head
    head.causal = causal
    try:
        prefix = _prefix(head.cfg, [37, 90, 5], [0, 2, -1], seed=10)
        g = torch.Generator().manual_seed(11)
        x, t = torch.randn(3, 2, 64, 2, generator=g), torch.rand(3, 2, generator=g)
        params = [p for p in head.parameters() if p.requires_grad]
        out = {}
        for attention in ("sdpa", "split"):
            v = FastExpert(head, compile=compile, attention=attention).velocity(x, t, prefix)
            out[attention] = (v, torch.autograd.grad(v.square().sum(), params))
        torch.testing.assert_close(out["split"][0], out["sdpa"][0], rtol=1e-5, atol=1e-5)
        for a, b in zip(out["split"][1], out["sdpa"][1]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    finally:
        head.causal = not head.cfg.expert_non_causal_attention


def test_split_attention_keeps_no_prefix_copy(gqa_head):
    """What autograd saves with attention="split" is independent of the prefix length (no copy of it)."""
    head = gqa_head
    g = torch.Generator().manual_seed(12)
    x, t = torch.randn(2, 1, 64, 2, generator=g), torch.rand(2, 1, generator=g)
    saved = []
    for L in (64, 512):
        prefix = _prefix(head.cfg, [L, L], [0, 0], seed=13)
        _, n = _saved_bytes(lambda p=prefix: FastExpert(head, attention="split").velocity(x, t, p),
                            prefix.keys + prefix.values)
        saved.append(n)
    assert saved[0] == saved[1] > 0


def test_unknown_attention_is_refused(gqa_head):
    with pytest.raises(ValueError, match="attention must be one of"):
        FastExpert(gqa_head, attention="flash")
