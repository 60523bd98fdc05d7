"""The head: release names/shapes, explicit attention mask, positions, padding, loss."""

import pytest
import torch

from shared.head import AlpamayoHead, KVPrefix, expert_attention_mask, expert_position_ids


def _prefix(cfg, lengths, deltas, seed=0, pad_to=None, garbage=0.0):
    g = torch.Generator().manual_seed(seed)
    items = []
    for L, d in zip(lengths, deltas):
        k = torch.randn(cfg.num_layers, cfg.num_kv_heads, L, cfg.head_dim, generator=g)
        v = torch.randn(cfg.num_layers, cfg.num_kv_heads, L, cfg.head_dim, generator=g)
        items.append((k, v, L, d))
    p = KVPrefix.collate(items)
    if pad_to and pad_to > p.max_len:
        extra = pad_to - p.max_len
        p.keys = [torch.nn.functional.pad(k, (0, 0, 0, extra)) for k in p.keys]
        p.values = [torch.nn.functional.pad(v, (0, 0, 0, extra)) for v in p.values]
    if garbage:
        for t in p.keys + p.values:
            for b, L in enumerate(lengths):
                t[b, :, L:] = garbage
    return p


@pytest.fixture()
def head(tiny_head_cfg):
    torch.manual_seed(0)
    return AlpamayoHead(tiny_head_cfg).eval()


def test_state_dict_names_follow_the_release(head):
    keys = set(head.state_dict())
    n_layers = head.cfg.num_layers
    assert len(keys) == n_layers * 11 + 1 + 10 + 3 + 2 + 4  # 416 at release size
    assert "expert.embed_tokens.weight" not in keys
    for k in ("action_in_proj.sinus.0.freqs", "action_in_proj.sinus.1.freqs",
              "action_in_proj.timestep_fourier_encoder.freqs", "action_in_proj.encoder.trunk.6.bias",
              "action_in_proj.encoder.trunk.5.weight", "action_in_proj.norm.bias", "action_out_proj.weight",
              "action_space.curvature_std", "expert.norm.weight", "expert.layers.1.self_attn.k_norm.weight"):
        assert k in keys, k
    freqs = head.action_in_proj.sinus[0].freqs
    assert freqs.shape == (1, 10)
    torch.testing.assert_close(freqs[0], torch.tensor([100 ** (k / 9) for k in range(10)]))


def test_position_ids_continue_the_prefix():
    p = KVPrefix([torch.zeros(2, 1, 5, 4)], [torch.zeros(2, 1, 5, 4)], torch.tensor([5, 3]), torch.tensor([-2592, -648]))
    pos = expert_position_ids(p, 64)
    assert pos.shape == (3, 2, 64)
    assert (pos[0] == pos[1]).all() and (pos[1] == pos[2]).all()
    assert pos[0, 0].tolist() == list(range(5 - 2592, 5 - 2592 + 64))
    assert pos[0, 1, 0].item() == 3 - 648


def test_mask_values():
    p = KVPrefix([torch.zeros(2, 1, 4, 4)], [torch.zeros(2, 1, 4, 4)], torch.tensor([4, 2]), torch.zeros(2, dtype=torch.long))
    m = expert_attention_mask(p, torch.float32, 3)
    assert m.shape == (2, 1, 3, 7)
    neg = torch.finfo(torch.float32).min
    assert (m[0] == 0).all()
    assert (m[1, 0, :, 2:4] == neg).all() and (m[1, 0, :, :2] == 0).all() and (m[1, 0, :, 4:] == 0).all()
    mc = expert_attention_mask(p, torch.float32, 3, causal=True)
    assert mc[0, 0, 0, 5].item() == neg and mc[0, 0, 2, 4].item() == 0 and mc[0, 0, 0, 4].item() == 0


def test_action_block_is_bidirectional_and_mask_is_explicit(head, tiny_head_cfg):
    """Token 0 must react to the last waypoint (release inference), whatever transformers does with None."""
    seen_masks = []
    hook = head.expert.layers[0].self_attn.register_forward_hook(
        lambda mod, args, kwargs, out: seen_masks.append(kwargs.get("attention_mask")), with_kwargs=True)
    p = _prefix(tiny_head_cfg, [9], [-3])
    x = torch.randn(1, 64, 2)
    t = torch.full((1, 1, 1), 0.3)
    out1 = head.velocity(x, t, p)
    x2 = x.clone()
    x2[0, -1] += 1.0
    out2 = head.velocity(x2, t, p)
    hook.remove()
    assert (out1[0, 0] - out2[0, 0]).abs().max() > 1e-5  # bidirectional
    assert all(m is not None and m.shape == (1, 1, 64, 9 + 64) for m in seen_masks)
    head.causal = True
    c1, c2 = head.velocity(x, t, p), head.velocity(x2, t, p)
    torch.testing.assert_close(c1[0, :63], c2[0, :63], rtol=0, atol=0)  # causal option: earlier tokens blind
    assert (c1[0, 63] - c2[0, 63]).abs().max() > 1e-5


def test_right_padding_is_invisible(head, tiny_head_cfg):
    """A batch padded to a longer length (with garbage in the pad) equals each sample alone."""
    lengths, deltas = [7, 12], [-5, 3]
    padded = _prefix(tiny_head_cfg, lengths, deltas, pad_to=15, garbage=50.0)
    x = torch.randn(2, 64, 2)
    t = torch.tensor([0.2, 0.7]).view(2, 1, 1)
    both = head.velocity(x, t, padded)
    for b, L in enumerate(lengths):
        single = KVPrefix([k[b:b + 1, :, :L] for k in padded.keys], [v[b:b + 1, :, :L] for v in padded.values],
                          padded.lengths[b:b + 1], padded.rope_deltas[b:b + 1])
        torch.testing.assert_close(head.velocity(x[b:b + 1], t[b:b + 1], single), both[b:b + 1], rtol=1e-5, atol=1e-5)


def test_prefix_changes_prediction(head, tiny_head_cfg):
    x, t = torch.randn(1, 64, 2), torch.full((1, 1, 1), 0.5)
    a = head.velocity(x, t, _prefix(tiny_head_cfg, [10], [0], seed=1))
    b = head.velocity(x, t, _prefix(tiny_head_cfg, [10], [0], seed=2))
    assert (a - b).abs().max() > 1e-4


def test_loss_backpropagates_into_head_only(head, tiny_head_cfg):
    head.train()
    p = _prefix(tiny_head_cfg, [6, 8], [0, 0])
    for k in p.keys:
        k.requires_grad_(False)
    loss = head.flow_matching_loss(torch.randn(2, 64, 2), p, torch.Generator().manual_seed(0), draws=2)
    loss.backward()
    assert loss.item() > 0
    grads = {n: q.grad for n, q in head.named_parameters()}
    assert grads["action_out_proj.weight"] is not None and grads["expert.layers.0.self_attn.q_proj.weight"].abs().sum() > 0
    assert grads["action_in_proj.encoder.trunk.0.weight"].abs().sum() > 0
