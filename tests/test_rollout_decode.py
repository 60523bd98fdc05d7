"""The static-cache rollout decoder against transformers `generate` (the release's path), token for token."""

import pytest
import torch
from transformers import LogitsProcessorList

import cache_builder.rollout as rollout
from cache_builder.decode import RolloutDecoder, grouped_decode_attention
from cache_builder.vlm import load_vlm
from shared.checkpoint import AlpamayoCheckpoint
from shared.data import iter_samples, open_dataset, write_synthetic_world
from shared.prompt import MaskTrajTokens, build_vlm_inputs
from shared.qwen_files import alpamayo_token_ids, load_processor


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("decode_world")
    write_synthetic_world(root, n_clips=2, seed=3, width=160, height=96, duration_s=12.0, kinds=["sharp-left", "straight"])
    ck = AlpamayoCheckpoint.open(tiny_checkpoint)
    proc = load_processor(str(ck.vlm_base))
    samples = list(iter_samples(open_dataset(root), open_dataset(root).clip_ids(), "default", "front-only"))[:2]
    inputs = [build_vlm_inputs(proc, s, mode="rollout") for s in samples]
    assert inputs[0]["input_ids"].shape == inputs[1]["input_ids"].shape
    vlm = load_vlm(ck, torch.float32)
    batch = {k: torch.cat([x[k] for x in inputs]) for k in
             ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw", "pixel_values")}
    return vlm, proc, batch, [s.key for s in samples], inputs


class StopAfter(MaskTrajTokens):
    """Still masks <iN>; from call `at` on, only `token` may be sampled (a row's stop, on cue)."""

    at: int = 3
    token: int = 0

    def __init__(self, traj_start):
        super().__init__(traj_start)
        self.calls = 0

    def __call__(self, input_ids, scores):
        scores = super().__call__(input_ids, scores)
        self.calls += 1
        if self.calls > self.at:
            keep = scores[:, self.token].clone()
            scores[:] = float("-inf")
            scores[:, self.token] = keep
        return scores


def _both(vlm, proc, batch, max_new, monkeypatch=None, seed=11):
    ref = rollout.reference_generate(vlm, proc, batch, seed, max_new, keep_hidden=True)
    dec = rollout.make_decoder(vlm, proc)
    assert isinstance(dec, RolloutDecoder) and not dec.graphs  # CPU: the same steps, run eagerly
    got = dec(batch, max_new, keep_hidden=True, seed=seed)
    return ref, got


def _assert_same(ref, got):
    assert torch.equal(got.sequences, ref.sequences)
    n = ref.in_cache
    assert got.in_cache == n
    torch.testing.assert_close(got.keys[:, :, :, :n], ref.keys[:, :, :, :n], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.values[:, :, :, :n], ref.values[:, :, :, :n], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.hidden[:, :n], ref.hidden[:, :n], rtol=1e-5, atol=1e-5)
    assert torch.equal(got.rope_deltas, ref.rope_deltas)


def test_decoder_samples_what_generate_samples(setup):
    """Seeded sampling at the release settings for 12 tokens: same tokens, same cache, same hidden states."""
    vlm, proc, batch, _, _ = setup
    ref, got = _both(vlm, proc, batch, 12)
    P = batch["input_ids"].shape[1]
    assert ref.sequences.shape == (2, P + 12) and ref.in_cache == P + 11
    assert not torch.equal(ref.sequences[0, P:], ref.sequences[1, P:])  # two rows that really differ
    _assert_same(ref, got)


def test_decoder_stops_one_token_after_traj_future_start_as_generate(setup, monkeypatch):
    vlm, proc, batch, _, _ = setup
    ids = alpamayo_token_ids(proc.tokenizer)
    monkeypatch.setattr(StopAfter, "token", ids["traj_future_start"])
    monkeypatch.setattr(rollout, "MaskTrajTokens", StopAfter)
    ref, got = _both(vlm, proc, batch, 40)
    P = batch["input_ids"].shape[1]
    # 3 free tokens, <|traj_future_start|>, then one more (which is only sampled, never forwarded)
    assert ref.sequences.shape[1] == P + 5 and (ref.sequences[:, P + 3] == ids["traj_future_start"]).all()
    _assert_same(ref, got)


def test_rows_finished_by_eos_are_padded_as_generate_pads_them(setup, monkeypatch):
    """One row ends on <|im_end|> at once: generate pads it while the other row runs on; so does the decoder."""
    vlm, proc, batch, _, _ = setup
    ids = alpamayo_token_ids(proc.tokenizer)

    class EndRow0(MaskTrajTokens):
        def __call__(self, input_ids, scores):
            scores = super().__call__(input_ids, scores)
            scores[0, :] = float("-inf")
            scores[0, ids["im_end"]] = 0.0
            scores[1, ids["im_end"]] = float("-inf")
            return scores

    monkeypatch.setattr(rollout, "MaskTrajTokens", EndRow0)
    monkeypatch.setattr(vlm.generation_config, "eos_token_id", [ids["im_end"]])
    ref, got = _both(vlm, proc, batch, 6)
    P = batch["input_ids"].shape[1]
    assert ref.sequences[0, P] == ids["im_end"] and (ref.sequences[0, P + 1:] == ids["pad"]).all()
    _assert_same(ref, got)


def test_build_prefixes_from_the_decoder(setup, monkeypatch):
    """Every row stops (forced after 3 tokens), so every row has a prefix from the generation's cache:
    the decoder's equal generate's, and they are copies (the next batch reuses the decoder's buffers)."""
    vlm, proc, _, keys, inputs = setup
    ids = alpamayo_token_ids(proc.tokenizer)
    monkeypatch.setattr(StopAfter, "token", ids["traj_future_start"])
    monkeypatch.setattr(rollout, "MaskTrajTokens", StopAfter)
    dec = rollout.make_decoder(vlm, proc)
    a = rollout.generate_prefixes(vlm, proc, keys, inputs, seed=5, max_new_tokens=40, decoder=dec)
    b = rollout.generate_prefixes(vlm, proc, keys, inputs, seed=5, max_new_tokens=40)
    P = inputs[0]["input_ids"].shape[1]
    for (xa, ca, pa), (xb, cb, pb) in zip(a, b):
        assert torch.equal(xa["input_ids"], xb["input_ids"]) and ca == cb
        assert xa["prefix_len"] == P + 4 and int(xa["input_ids"][0, -1]) == ids["traj_future_start"]
        assert pa is not None and pb is not None  # the copy check below always runs
        assert pa.k.shape[2] == xa["prefix_len"]
        for got, ref in ((pa.k, pb.k), (pa.v, pb.v), (pa.hidden, pb.hidden)):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(pa.rope_delta, pb.rope_delta)
    k0, v0 = a[0][2].k.clone(), a[0][2].v.clone()
    rollout.generate_prefixes(vlm, proc, keys[::-1], inputs[::-1], seed=9, max_new_tokens=40, decoder=dec)
    assert torch.equal(a[0][2].k, k0) and torch.equal(a[0][2].v, v0)


def test_grouped_decode_attention_equals_repeated_heads():
    """Query heads sharing a KV head, as one short query: equal to repeating K/V per query head."""
    torch.manual_seed(0)
    B, Hq, Hkv, T, D = 2, 8, 2, 7, 16
    q, k, v = torch.randn(B, Hq, 1, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    mask = torch.arange(T).view(1, 1, 1, T).expand(B, 1, 1, T) <= torch.tensor([3, 6]).view(B, 1, 1, 1)
    out, _ = grouped_decode_attention(None, q, k, v, mask, scaling=0.25)
    rep = Hq // Hkv
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), attn_mask=mask, scale=0.25)
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="one query token"):
        grouped_decode_attention(None, torch.randn(B, Hq, 2, D), k, v, None)


def test_decoder_refuses_an_attention_kernel_it_does_not_drive(setup, monkeypatch):
    vlm, proc, _, _, _ = setup
    monkeypatch.setattr(vlm.config.text_config, "_attn_implementation_internal", "flash_attention_2")
    assert rollout.make_decoder(vlm, proc) is None  # the build then runs generate
    with pytest.raises(ValueError, match="flash_attention_2"):
        RolloutDecoder(vlm, LogitsProcessorList(), 1, 2, 0, ())
