"""The head: release names/shapes, explicit attention mask, positions, padding, loss."""

import json

import pytest
import torch

from shared.config import HeadConfig
from shared.head import AlpamayoHead, KVPrefix, expert_attention_mask, expert_position_ids

# Qwen3-VL-8B's text_config as its config.json ships it (transformers 4.57 form), and the release's
# expert_cfg / action_in_proj_cfg (docs/alpamayo-r1-head.md §1.2, §1.3, §2). Written out, not imported.
RELEASE_TEXT_CONFIG = {
    "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643, "dtype": "bfloat16",
    "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 12288, "max_position_embeddings": 262144, "model_type": "qwen3_vl_text",
    "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
    "rope_theta": 5000000, "use_cache": True, "vocab_size": 155697,
}
RELEASE_HEAD_CFG = {
    "expert_cfg": {"hidden_size": 2048, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
                   "intermediate_size": 8256},
    "action_in_proj_cfg": {"hidden_size": 512, "max_freq": 100.0, "num_enc_layers": 2, "num_fourier_feats": 20},
}


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


def test_release_size_head_has_416_tensors_and_2_280_592_386_parameters():
    """The README's numbers, on the meta device (no memory): the checkpoint's non-vlm tensors and the 2.3 B head."""
    cfg = HeadConfig.from_alpamayo_config(RELEASE_HEAD_CFG, RELEASE_TEXT_CONFIG)
    with torch.device("meta"):
        head = AlpamayoHead(cfg)
    state = head.state_dict()
    assert len(state) == 416
    assert sum(p.numel() for p in head.parameters()) == 2_280_592_386
    assert sum(p.numel() for n, p in head.named_parameters() if n.startswith("expert.")) == 2_279_238_656
    assert sum(p.numel() for p in head.action_in_proj.parameters()) == 1_349_632
    assert state["expert.layers.35.mlp.gate_proj.weight"].shape == (8256, 2048)
    assert state["expert.layers.0.self_attn.k_proj.weight"].shape == (1024, 2048)
    assert state["action_in_proj.encoder.trunk.0.weight"].shape == (512, 60)
    assert state["action_in_proj.encoder.trunk.6.weight"].shape == (2048, 512)


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
    action = torch.randn(2, 64, 2)
    loss = head.flow_matching_loss(action, p, torch.Generator().manual_seed(0), draws=2)
    loss.backward()
    # the release formula by hand from the same generator: u ~ Beta(1.5, 1) by inverse CDF, t = 0.999 (1 - u),
    # x_t = t x + (1 - t) eps, target x - eps, plain mean of squares over B x 64 x 2
    g = torch.Generator().manual_seed(0)
    u = torch.rand(4, generator=g) ** (1 / 1.5)
    t = (0.999 * (1 - u)).view(4, 1, 1)
    eps = torch.randn(4, 64, 2, generator=g)
    x = action.repeat_interleave(2, 0)  # each prefix twice, (sample 0, sample 0, sample 1, sample 1)
    with torch.no_grad():
        pred = head.velocity(t * x + (1 - t) * eps, t, p.repeat_interleave(2))
    ref = ((pred - (x - eps)) ** 2).sum() / (4 * 64 * 2)
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-6, atol=0)
    grads = {n: q.grad for n, q in head.named_parameters()}
    assert grads["action_out_proj.weight"] is not None and grads["expert.layers.0.self_attn.q_proj.weight"].abs().sum() > 0
    assert grads["action_in_proj.encoder.trunk.0.weight"].abs().sum() > 0


def _release_euler(step_fn, batch_size, noise, inference_step):
    """The release's FlowMatching._euler (diffusion/flow_matching.py), re-implemented independently."""
    x = noise
    time_steps = torch.linspace(0.0, 1.0, inference_step + 1)
    for i in range(inference_step):
        dt = (time_steps[i + 1] - time_steps[i]).view(1, 1, 1).expand(batch_size, 1, 1)
        t_start = time_steps[i].view(1, 1, 1).expand(batch_size, 1, 1)
        x = x + dt * step_fn(x=x, t=t_start)
    return x


@pytest.mark.parametrize("steps", [10, 7])
def test_sampler_equals_the_release_sampler_bitwise(head, tiny_head_cfg, steps):
    """Same noise, same prefix -> the release's trajectory, bit for bit (the grid is linspace, not i/n)."""
    p = _prefix(tiny_head_cfg, [9, 5], [-3, 2])
    ours = head.sample_actions(p, num_samples=3, num_steps=steps, generator=torch.Generator().manual_seed(7))
    rep = p.repeat_interleave(3)
    noise = torch.randn((6, 64, 2), generator=torch.Generator().manual_seed(7))
    ref = _release_euler(lambda x, t: head.velocity(x, t, rep), 6, noise, steps)
    assert torch.equal(ours, ref.view(2, 3, 64, 2))


def test_building_a_head_leaves_its_config_unchanged(tiny_checkpoint):
    """transformers' config class writes into the nested rope dict it is given; the head builds from a copy,
    so a HeadConfig (and the hash stores and runs record) is the same before and after."""
    from shared.checkpoint import AlpamayoCheckpoint

    cfg = AlpamayoCheckpoint.open(tiny_checkpoint).head_config()
    before = (cfg.hash(), json.dumps(cfg.expert, sort_keys=True))
    with torch.device("meta"):
        AlpamayoHead(cfg)
    assert (cfg.hash(), json.dumps(cfg.expert, sort_keys=True)) == before
