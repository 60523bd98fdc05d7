"""The design's core claim: a prefix read back from the cache drives the head exactly like the live VLM.

Reference path = the release's inference step written out independently: the VLM's own cache object,
position ids arange(64) + offset + rope_deltas, an all-zero additive float mask over
[prefix | 64 action tokens], action_out_proj on the last 64 hidden states.
"""

import numpy as np
import pytest
import torch

from cache_builder.cache_build import BuildConfig, build
from cache_builder.vlm import cache_layers, load_vlm, prefill
from shared.checkpoint import AlpamayoCheckpoint
from shared.data import load_sample, open_dataset, write_synthetic_world
from shared.head import KVPrefix
from shared.prompt import build_vlm_inputs
from shared.qwen_files import alpamayo_token_ids, load_processor
from shared.store import Store


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    write_synthetic_world(root, n_clips=2, seed=1, width=192, height=108, duration_s=12.0,
                          kinds=["sharp-left", "straight"])
    return root


@pytest.fixture(scope="module")
def parts(tiny_checkpoint, world):
    ck = AlpamayoCheckpoint.open(tiny_checkpoint)
    proc = load_processor(str(ck.vlm_base))
    vlm = load_vlm(ck, torch.float32)
    head = ck.load_head(torch.float32).eval()
    ds = open_dataset(world)
    sample = load_sample(ds, ds.clip_ids()[0], 5_100_000, "full")
    return ck, proc, vlm, head, sample


def _reference_velocity(head, vlm, inputs, x, t):
    """Release-style expert step on the live VLM cache (no crop needed: one call per fresh forward)."""
    with torch.no_grad():
        out = vlm.model(**{k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw",
                                                  "mm_token_type_ids")}, use_cache=True)
        cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
        L = inputs["input_ids"].shape[1]
        offset = L  # first <|traj_future_start|> index + 1: the prompt ends with it
        deltas = getattr(out, "rope_deltas", None)
        deltas = vlm.model.rope_deltas if deltas is None else deltas
        pos = (torch.arange(64) + offset + deltas.view(-1, 1)).unsqueeze(0).expand(3, -1, -1)
        mask = torch.zeros(1, 1, 64, L + 64, dtype=torch.float32)
        emb = head.action_in_proj(x, t)
        kw = {"cache" if "cache" in head.expert.forward.__code__.co_varnames else "past_key_values": cache}
        h = head.expert(inputs_embeds=emb, position_ids=pos, attention_mask=mask, use_cache=True, **kw)
        return head.action_out_proj(h.last_hidden_state[:, -64:])


def test_head_from_cache_equals_head_on_live_vlm(parts, tiny_checkpoint, world, tmp_path):
    ck, proc, vlm, head, sample = parts
    store_url = str(tmp_path / "store")
    cfg = BuildConfig(dataset=str(world), checkpoint=str(tiny_checkpoint), out=store_url, kv_dtype="float32",
                      clips=sample.clip_id, batch_size=1)
    summary = build(cfg)
    assert summary["written"] == 1
    st = Store.open(store_url)
    rec = st.read(sample.key)
    prefix = KVPrefix.collate([(rec.k, rec.v, rec.prefix_len, rec.rope_delta)])
    g = torch.Generator().manual_seed(0)
    for t_val in (0.0, 0.37, 0.9):
        x = torch.randn(1, 64, 2, generator=g)
        t = torch.full((1, 1, 1), t_val)
        ref = _reference_velocity(head, vlm, build_vlm_inputs(proc, sample, mode="teacher"), x, t)
        with torch.no_grad():
            got = head.velocity(x, t, prefix)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # the stored GT action is the checkpoint action space's fit of the sample's poses
    asp = ck.action_space()
    want = asp.traj_to_action(*[torch.as_tensor(a, dtype=torch.float32)[None] for a in (
        sample.ego_history_xyz, sample.ego_history_rot, sample.ego_future_xyz, sample.ego_future_rot)])[0]
    assert torch.equal(torch.from_numpy(rec.gt_action), want)


def test_stored_kv_equals_live_forward_bitwise(parts, tiny_checkpoint, world, tmp_path):
    ck, proc, vlm, head, sample = parts
    for kv_dtype, tdtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        url = str(tmp_path / kv_dtype)
        build(BuildConfig(dataset=str(world), checkpoint=str(tiny_checkpoint), out=url, kv_dtype=kv_dtype,
                          clips=sample.clip_id))
        rec = Store.open(url).read(sample.key)
        live_vlm = vlm if tdtype == torch.float32 else load_vlm(ck, torch.bfloat16)
        x = build_vlm_inputs(proc, sample, mode="teacher")
        pf = prefill(live_vlm, x, x["prefix_len"])
        assert rec.k.dtype == tdtype and torch.equal(rec.k, pf.keys[:, 0]) and torch.equal(rec.v, pf.values[:, 0])
        assert torch.equal(rec.hidden, pf.hidden[0])
        assert rec.rope_delta == int(pf.rope_deltas[0])
        assert torch.equal(rec.token_ids, x["input_ids"][0])


def test_prefix_forward_equals_teacher_forced_forward_cropped(parts):
    """Official Stage 2 runs the whole teacher-forced sequence and crops after <|traj_future_start|>."""
    ck, proc, vlm, head, sample = parts
    ids = alpamayo_token_ids(proc.tokenizer)
    x = build_vlm_inputs(proc, sample, mode="teacher")
    L = x["prefix_len"]
    tail = [ids["traj_future"]] * 128 + [ids["traj_future_end"], ids["im_end"]]
    tail += proc.tokenizer("\n", add_special_tokens=False)["input_ids"]
    full = dict(x)
    full["input_ids"] = torch.cat([x["input_ids"], torch.tensor([tail])], dim=1)
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    full["mm_token_type_ids"] = torch.cat([x["mm_token_type_ids"], torch.zeros(1, len(tail), dtype=torch.long)], 1)
    with torch.no_grad():
        out = vlm.model(**{k: full[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw",
                                                "mm_token_type_ids")}, use_cache=True)
    cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
    full_k = torch.stack([k for k, _ in cache_layers(cache)])[:, :, :, :L]
    pf = prefill(vlm, x, L)
    torch.testing.assert_close(full_k, pf.keys, rtol=1e-5, atol=1e-5)


def test_rope_delta_matches_image_grid(parts):
    """delta = sum over images of (max(t, h/2, w/2) - t*h*w/4): each image spans fewer positions than tokens."""
    ck, proc, vlm, head, sample = parts
    x = build_vlm_inputs(proc, sample, mode="teacher")
    pf = prefill(vlm, x, x["prefix_len"], keep_hidden=False)
    grid = x["image_grid_thw"].numpy()
    want = int(sum(max(t, h // 2, w // 2) - t * h * w // 4 for t, h, w in grid))
    assert int(pf.rope_deltas[0]) == want
    assert np.all(grid[:, 1:] == grid[0, 1:])
