"""The memory estimate's terms by hand, the budget refusal, and byte parsing."""

import pytest

from head_trainer.memory import WORKSPACE_BYTES, check_budget, estimate, parse_bytes, state_bytes_per_param


def test_terms_by_hand(tiny_head_cfg):
    cfg = tiny_head_cfg  # 2 layers, 2 KV heads, head_dim 16; expert hidden 32, 2 heads, MLP 96
    est = estimate(cfg, n_params=1000, n_trainable=600, dtype="bfloat16", optimizer="adamw8bit", batch=3,
                   max_len=128, kv_slots=2)
    assert est.weights == 2000 and est.gradients == 1200
    assert est.optimizer == pytest.approx(600 * (2 + 8 / 256))
    assert est.kv_inputs == 2 * (2 * 2 * 3 * 2 * 128 * 16 * 2)  # slots x layers x K/V x B x H x L x D x bf16
    q8 = estimate(cfg, 1000, 600, "bfloat16", "adamw8bit", 3, 128, kv_slots=2, kv_dtype="int8")  # --int8-prefix
    assert q8.kv_inputs == 2 * (2 * 2 * 3 * 2 * 128 * 16 + 2 * 3 * 2 * (16 + 128) * 4)  # codes + fp32 scales
    tokens = 3 * 64
    per_token = 2 * (8 * 32 + 4 * 32 + 6 * 32 + 4 * 96) + 4 * (2 * 32 + 32 + 32)
    per_layer = tokens * per_token + 3 * 2 * 32 * (128 + 64) * 2
    assert est.activations == 2 * per_layer
    assert est.workspace == WORKSPACE_BYTES
    assert est.total == pytest.approx(2000 + 1200 + est.optimizer + est.kv_inputs + est.activations + WORKSPACE_BYTES)
    # eager, one micro-batch: gradients are freed before the forward, the peak holds the larger of the two
    eager = estimate(cfg, 1000, 600, "bfloat16", "adamw8bit", 3, 128, kv_slots=2, grads_persist=False)
    assert eager.total == pytest.approx(est.total - min(est.gradients, est.activations))
    ck = estimate(cfg, 1000, 600, "bfloat16", "adamw8bit", 3, 128, kv_slots=2, checkpoint=True)
    assert ck.activations == 2 * tokens * 32 * 2 + per_layer < est.activations
    copy = 3 * 2 * 32 * (128 + 64) * 2  # one layer's [prefix; action] K/V: kept by one layer at a time
    ra = estimate(cfg, 1000, 600, "bfloat16", "adamw8bit", 3, 128, kv_slots=2, recompute_attention=True)
    assert ra.activations == 2 * tokens * per_token + copy
    # --trainable projections: the frozen linears' inputs (two normed hidden states, the MLP product) go
    fr = estimate(cfg, 1000, 600, "bfloat16", "adamw8bit", 3, 128, kv_slots=2, trainable="projections")
    assert fr.activations == est.activations - 2 * tokens * 2 * (2 * 32 + 96)
    assert estimate(cfg, 1000, 600, "bfloat16", "adamw8bit", 3, 128, kv_slots=2, trainable="lora") == est
    # --attention split: no prefix copy at all; fp32 prefix output + lse and the action block's scores per token
    sp = estimate(cfg, 1000, 600, "bfloat16", "adamw8bit", 3, 128, kv_slots=2, attention="split")
    assert sp.activations == 2 * tokens * (per_token + 4 * (32 + 2 * (1 + 64)))
    # a compiled layer (--compile): 2/3 of the per-token bytes, the prefix copy unchanged
    co = estimate(cfg, 1000, 600, "bfloat16", "adamw8bit", 3, 128, kv_slots=2, compiled=True)
    assert co.activations == pytest.approx(2 * (tokens * per_token * 2 / 3 + 3 * 2 * 32 * (128 + 64) * 2))
    sp2 = estimate(cfg, 1000, 600, "bfloat16", "adamw8bit", 3, 4096, kv_slots=2, attention="split")
    assert sp2.activations == sp.activations  # independent of the prefix length


def test_release_plan_terms(tiny_head_cfg):
    """At release size the 24 GB plan's fixed terms: bf16 weights + grads, 8-bit states."""
    n = 2_280_592_386
    assert state_bytes_per_param("adamw", 4) == 8 and state_bytes_per_param("adamw8bit", 2) == pytest.approx(2.03125)
    est = estimate(tiny_head_cfg, n, n, "bfloat16", "adamw8bit", 1, 64)
    assert (est.weights + est.gradients + est.optimizer) / 2**30 == pytest.approx(2_280_592_386 * 6.03125 / 2**30)  # 12.81 GiB
    with pytest.raises(ValueError, match="--optimizer 'lion'"):
        state_bytes_per_param("lion", 2)


def test_budget_refusal_names_what_to_change(tiny_head_cfg):
    n = 2_280_592_386
    est = estimate(tiny_head_cfg, n, n, "float32", "adamw", 8, 2993)  # 34 GiB of weights, grads, states
    with pytest.raises(ValueError) as exc:
        check_budget(est, 24 * 2**30, batch=8, checkpoint=False, optimizer="adamw")
    msg = str(exc.value)
    assert msg.startswith("estimated peak") and "\n" not in msg
    for hint in ("--attention split", "--recompute-attention", "--gradient-checkpointing", "--optimizer adamw8bit",
                 "--batch-size 4 with --grad-accum 2"):
        assert hint in msg
    with pytest.raises(ValueError) as exc:  # a flag already given is not suggested again
        check_budget(est, 24 * 2**30, batch=8, checkpoint=False, optimizer="adamw", recompute_attention=True)
    assert "--recompute-attention" not in str(exc.value)
    with pytest.raises(ValueError) as exc:  # split attention keeps no copy: neither attention hint applies
        check_budget(est, 24 * 2**30, batch=8, checkpoint=False, optimizer="adamw", attention="split")
    assert "--recompute-attention" not in str(exc.value) and "--attention split" not in str(exc.value)
    with pytest.raises(ValueError) as exc:  # an int8 store under split attention: its codes in the slots first
        check_budget(est, 24 * 2**30, batch=8, checkpoint=False, optimizer="adamw", attention="split", int8_store=True)
    assert "try --int8-prefix or " in str(exc.value)
    with pytest.raises(ValueError) as exc:
        check_budget(est, 24 * 2**30, 8, False, "adamw", attention="split", int8_store=True, int8_prefix=True)
    assert "--int8-prefix" not in str(exc.value)
    check_budget(est, est.total / 0.9 + 1, batch=8, checkpoint=False, optimizer="adamw")  # fits: no error
    with pytest.raises(ValueError, match="exceeds 90 % of --gpu-memory-budget"):  # the allocator's headroom
        check_budget(est, est.total + 1, batch=8, checkpoint=False, optimizer="adamw")


@pytest.mark.parametrize("text,value", [("24GiB", 24 * 2**30), ("24 GB", 24e9), ("2.4e10", 2.4e10), ("512MiB", 2**29)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


def test_parse_bytes_refuses_garbage():
    with pytest.raises(ValueError, match="--gpu-memory-budget 'lots'"):
        parse_bytes("lots")


def test_release_head_counts_on_meta(tiny_text_cfg):
    """The release head: 2,280,592,386 parameters; projections only; LoRA r=16 on every expert linear."""
    from transformers import Qwen3VLTextConfig

    from head_trainer.memory import count_params
    from shared.config import RELEASE_EXPERT_OVERRIDES, HeadConfig

    text = Qwen3VLTextConfig(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                             head_dim=128, intermediate_size=12288, vocab_size=155697).to_dict()
    cfg = HeadConfig.from_alpamayo_config({"expert_cfg": RELEASE_EXPERT_OVERRIDES}, text)
    n, n_all = count_params(cfg, "all")
    assert n == n_all == 2_280_592_386
    proj = count_params(cfg, "projections")[1]
    layer = 2 * 2048 * 2048 + 2 * 2048 * 1024 + 3 * 2048 * 8256 + 2 * 128 + 2 * 2048
    assert proj == n - (36 * layer + 2048)  # the expert: 36 layers without embeddings, plus its final norm
    per_layer = 16 * ((2048 + 2048) + 2 * (2048 + 1024) + (2048 + 2048) + 2 * (2048 + 8256) + (8256 + 2048))
    assert count_params(cfg, "lora", 16) == (n + 36 * per_layer, proj + 36 * per_layer)
