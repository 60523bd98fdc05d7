"""What trains and in which dtype: head dtypes on every build path, projections / LoRA selection,
LoRA merged into official names (equal forward), EMA."""

import pytest
import torch

from head_trainer.ema import EMA
from head_trainer.trainable import apply_trainable, official_state
from shared.checkpoint import AlpamayoCheckpoint, head_from_state
from shared.head import KVPrefix


@pytest.fixture(scope="module")
def base(tiny_checkpoint):
    ckpt = AlpamayoCheckpoint.open(tiny_checkpoint)
    return ckpt, ckpt.head_config(), ckpt.head_state_dict()


def _batch(cfg, seed=0):
    e = cfg.expert
    layers, heads, dim = e["num_hidden_layers"], e["num_key_value_heads"], e["head_dim"]
    g = torch.Generator().manual_seed(seed)
    items = [(torch.randn(layers, heads, n, dim, generator=g), torch.randn(layers, heads, n, dim, generator=g), n, d)
             for n, d in ((7, 0), (5, -3))]
    return KVPrefix.collate(items), torch.randn(2, 64, 2, generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_build_path_gives_the_requested_dtype(base, dtype):
    ckpt, cfg, state = base
    for head in (head_from_state(cfg, state, dtype), ckpt.load_head(dtype)):
        assert {p.dtype for p in head.parameters()} == {dtype}
        assert head.action_in_proj.sinus[0].freqs.dtype == dtype  # saved buffers follow the weights
        assert {b.dtype for b in head.action_space.buffers()} == {torch.float32}  # solver constants stay fp32
    bf16_state = {k: v.to(torch.bfloat16) for k, v in state.items()}
    assert {p.dtype for p in head_from_state(cfg, bf16_state).parameters()} == {torch.bfloat16}  # None = stored


def test_projections_and_lora_select_their_parameters(base):
    _, cfg, state = base
    head = head_from_state(cfg, state)
    params = apply_trainable(head, "projections")
    names = {n for n, p in head.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(("action_in_proj.", "action_out_proj.")) for n in names)
    assert len(params) == len(names) == sum(1 for n, _ in head.named_parameters() if not n.startswith("expert."))
    head = head_from_state(cfg, state)
    apply_trainable(head, "lora", lora_rank=4, lora_alpha=8.0, lora_targets="q_proj,down_proj")
    lora = {n for n, p in head.named_parameters() if p.requires_grad and n.startswith("expert.")}
    n_layers = cfg.expert["num_hidden_layers"]
    assert len(lora) == 2 * 2 * n_layers and all(".lora_A." in n or ".lora_B." in n for n in lora)
    assert all(("q_proj" in n) or ("down_proj" in n) for n in lora)
    first = apply_trainable(head, "lora", lora_rank=4, lora_alpha=8.0, lora_targets="q_proj,down_proj")
    apply_trainable(head, "all")  # everything trains; lora again freezes the base and trains the same adapters
    again = apply_trainable(head, "lora", lora_rank=4, lora_alpha=8.0, lora_targets="q_proj,down_proj")
    assert [id(p) for p in again] == [id(p) for p in first]  # kept, not injected a second time
    assert {n for n, p in head.named_parameters() if p.requires_grad and n.startswith("expert.")} == lora
    with pytest.raises(ValueError, match="--trainable"):
        apply_trainable(head_from_state(cfg, state), "some")


def test_lora_merges_into_official_names_with_the_same_forward(base):
    _, cfg, state = base
    head = head_from_state(cfg, state).eval()
    apply_trainable(head, "lora", lora_rank=4, lora_alpha=8.0)
    merged0 = official_state(head)
    assert set(merged0) == set(state) and all(torch.equal(merged0[k], state[k]) for k in state)  # B = 0 at init
    with torch.no_grad():
        for n, p in head.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    merged = official_state(head)
    name = "expert.layers.1.self_attn.q_proj"
    a = dict(head.named_parameters())[f"{name}.lora_A.default.weight"]
    b = dict(head.named_parameters())[f"{name}.lora_B.default.weight"]
    assert torch.allclose(merged[f"{name}.weight"], state[f"{name}.weight"] + 2.0 * b @ a, atol=1e-6)  # alpha/r = 2
    assert torch.equal(merged["expert.norm.weight"], state["expert.norm.weight"])  # untargeted: untouched
    plain = head_from_state(cfg, merged).eval()
    prefix, action = _batch(cfg)
    x, t = torch.randn(2, 64, 2), torch.full((2, 1, 1), 0.3)
    with torch.no_grad():
        assert torch.allclose(head.velocity(x, t, prefix), plain.velocity(x, t, prefix), atol=1e-5)


def test_ema_update_and_bitwise_swap():
    p = [torch.nn.Parameter(torch.tensor([1.0, 2.0])), torch.nn.Parameter(torch.tensor([[3.0]]))]
    ema = EMA({"a": p[0], "b": p[1]}, decay=0.5, device="cpu", dtype="float32", every=2)
    with torch.no_grad():
        p[0].add_(2.0)
        p[1].mul_(0.0)
    ema.update(p, step=0)  # not an update step with every=2
    assert torch.equal(ema.shadow[0], torch.tensor([1.0, 2.0]))
    ema.update(p, step=1)  # decay**2 = 0.25: shadow + 0.75 (p - shadow)
    assert torch.allclose(ema.shadow[0], torch.tensor([2.5, 3.5])) and torch.allclose(ema.shadow[1], torch.tensor([[0.75]]))
    raw = [x.detach().clone() for x in p]
    with ema.swapped_in(p):
        assert torch.equal(p[0].detach(), ema.shadow[0])
    assert all(torch.equal(x.detach(), r) for x, r in zip(p, raw))
    with pytest.raises(ValueError, match="ema"):
        EMA({"a": p[0]}, decay=1.0)
