"""Prompt layout with the tiny offline processor: token layout, Alpamayo ids, spec reference, rollout helpers."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from shared import prompt as P
from shared.history_tokens import history_token_ids
from shared.images import preprocess_images
from shared.qwen_files import (
    QWEN3_VL_CHAT_TEMPLATE,
    QWEN_ADDED_TOKENS,
    SPECIAL_TOKENS_KEYS,
    add_alpamayo_tokens,
    alpamayo_token_ids,
    load_processor,
    write_tiny_processor,
)
from shared.sample import Sample

COT = "The lead vehicle brakes for a pedestrian, so slow down and keep the lane."
# The release's strings, written out (chat_template/conversation.py:51-94: system text; the instruction
# is the component templates joined with ", then " plus a final "."). Not taken from shared.prompt.
RELEASE_SYSTEM = "You are a driving assistant that generates safe and accurate actions."
RELEASE_TRAJ_INSTRUCTION = "output the future trajectory."
RELEASE_COT_INSTRUCTION = "output the chain-of-thought reasoning of the driving process, then output the future trajectory."


def make_sample(h: int, w: int, *, constant: bool = False, cot: str | None = None) -> Sample:
    """4 cameras x 4 frames; constant=True fills image (cam, frame) with 10*cam + frame to check order."""
    rng = np.random.default_rng(0)
    if constant:
        vals = (10 * np.arange(4)[:, None] + np.arange(4)[None, :]).astype(np.uint8)  # (cam, frame)
        images = np.broadcast_to(vals[:, :, None, None, None], (4, 4, 3, h, w)).copy()
    else:
        images = rng.integers(0, 256, (4, 4, 3, h, w), dtype=np.uint8)
    t = np.arange(-15, 1) * 0.1
    return Sample(
        clip_id="clip",
        t0_us=5_100_000,
        images=images,
        camera_names=(
            "camera_cross_left_120fov",
            "camera_front_wide_120fov",
            "camera_cross_right_120fov",
            "camera_front_tele_30fov",
        ),
        camera_indices=np.array([0, 1, 2, 6]),
        frame_timestamps_us=np.zeros((4, 4), np.int64),
        ego_history_xyz=np.stack([8 * t, 0.05 * t**2, 0.01 * t], axis=1),
        ego_history_rot=np.tile(np.eye(3), (16, 1, 1)),
        ego_future_xyz=np.zeros((64, 3)),
        ego_future_rot=np.tile(np.eye(3), (64, 1, 1)),
        cot=cot,
    )


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_processor")
    write_tiny_processor(d)
    return d


@pytest.fixture(scope="module")
def processor(tiny_dir):
    return load_processor(str(tiny_dir))


def reference_ids(
    tok, ids: dict, n_images: int, per_image: int, bins, mode: str, cot: str | None = None
) -> list[int]:
    """The spec's layout built piecewise: each text run between special tokens tokenised on its own."""

    def enc(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False)

    instruction = RELEASE_TRAJ_INSTRUCTION if mode == "teacher" else RELEASE_COT_INSTRUCTION
    assistant = {
        "teacher": [ids["traj_future_start"]],
        "rollout": [ids["cot_start"]],
        "given-cot": [ids["cot_start"], *enc(cot or ""), ids["cot_end"], ids["traj_future_start"]],
    }[mode]
    out = [
        ids["im_start"],
        *enc("system\n" + RELEASE_SYSTEM),
        ids["im_end"],
        *enc("\n"),
        ids["im_start"],
        *enc("user\n"),
    ]
    out += ([ids["vision_start"]] + [ids["image_pad"]] * per_image + [ids["vision_end"]]) * n_images
    out += [
        ids["traj_history_start"],
        *(ids["history_bins_start"] + np.asarray(bins)).tolist(),
        ids["traj_history_end"],
    ]
    out += [*enc(instruction), ids["im_end"], *enc("\n"), ids["im_start"], *enc("assistant\n"), *assistant]
    return out


# ---- processor files ---------------------------------------------------------------------------------


def test_tiny_processor_files_are_deterministic_and_qwen_shaped(tmp_path, tiny_dir):
    write_tiny_processor(tmp_path)
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "preprocessor_config.json",
    ):
        assert (tmp_path / name).read_bytes() == (tiny_dir / name).read_bytes(), name
    template = (tiny_dir / "chat_template.jinja").read_bytes()
    assert len(template) == 5292
    assert (
        hashlib.sha256(template).hexdigest()
        == "3636d0f0bd6bef02654cdffdc447b79cb2cef8ab02cc75267345946291a489e4"
    )
    tok_json = json.loads((tiny_dir / "tokenizer.json").read_text())
    n_bpe = len(tok_json["model"]["vocab"])
    added = [(t["id"], t["content"], t["special"]) for t in tok_json["added_tokens"]]
    assert added == [(n_bpe + i, c, s) for i, (c, s) in enumerate(QWEN_ADDED_TOKENS)]
    assert len(QWEN_ADDED_TOKENS) == 26 and QWEN_ADDED_TOKENS[12] == ("<|image_pad|>", True)


def test_load_processor_applies_release_additions(processor):
    tok = processor.tokenizer
    ids = alpamayo_token_ids(tok)
    base = ids["pad"] + len(QWEN_ADDED_TOKENS)  # first id after Qwen's added tokens
    assert ids["traj_start"] == base and ids["history_bins_start"] == base + 3000
    assert tok.convert_tokens_to_ids("<i3999>") == base + 3999
    new_specials = [k for k in SPECIAL_TOKENS_KEYS if k != "image_pad"]
    assert [ids[k] for k in new_specials] == list(range(base + 4000, base + 4028))
    assert ids["image_pad"] == ids["pad"] + 12  # pre-existing Qwen id, not re-added
    assert ids["vocab_size"] == len(tok) == base + 4028
    assert (ids["traj_history_start"], ids["cot_start"], ids["traj_future_start"], ids["traj_history"]) == (
        base + 4005,
        base + 4008,
        base + 4012,
        base + 4015,
    )
    # <iN> are plain added tokens (kept when decoding with skip_special_tokens), the new ones special
    assert tok.decode([base + 7, ids["cot_start"]], skip_special_tokens=True) == "<i7>"
    add_alpamayo_tokens(tok)  # idempotent
    assert len(tok) == ids["vocab_size"]


def test_image_processor_uses_release_pixel_band(processor):
    ip = processor.image_processor
    assert (ip.size["shortest_edge"], ip.size["longest_edge"]) == (163840, 196608)
    assert (ip.patch_size, ip.temporal_patch_size, ip.merge_size) == (16, 2, 2)
    assert processor.chat_template == QWEN3_VL_CHAT_TEMPLATE


# ---- prompt layout ---------------------------------------------------------------------------------


def test_rendered_rollout_string_is_the_release_prompt(processor):
    text = P.render_prompt(processor, 16, "rollout")
    vis = "<|vision_start|><|image_pad|><|vision_end|>"
    assert text == (
        "<|im_start|>system\nYou are a driving assistant that generates safe and accurate actions.<|im_end|>\n"
        "<|im_start|>user\n"
        + vis * 16
        + "<|traj_history_start|>"
        + "<|traj_history|>" * 48
        + "<|traj_history_end|>"
        "output the chain-of-thought reasoning of the driving process, then output the future trajectory.<|im_end|>\n"
        "<|im_start|>assistant\n<|cot_start|>"
    )


def test_rendered_teacher_string_is_the_stage2_prompt(processor):
    text = P.render_prompt(processor, 2, "teacher")
    vis = "<|vision_start|><|image_pad|><|vision_end|>"
    assert text == (
        "<|im_start|>system\nYou are a driving assistant that generates safe and accurate actions.<|im_end|>\n"
        "<|im_start|>user\n" + vis * 2 + "<|traj_history_start|>" + "<|traj_history|>" * 48 + "<|traj_history_end|>"
        "output the future trajectory.<|im_end|>\n<|im_start|>assistant\n<|traj_future_start|>"
    )


@pytest.mark.parametrize("mode", ["teacher", "rollout", "given-cot"])
@pytest.mark.parametrize("hw, per_image", [((1080, 1920), 180), ((1208, 1920), 170)])
def test_input_ids_equal_spec_reference(processor, mode, hw, per_image):
    sample = make_sample(*hw, cot=COT)
    out = P.build_vlm_inputs(processor, sample, mode=mode)
    ids = alpamayo_token_ids(processor.tokenizer)
    expected = reference_ids(
        processor.tokenizer, ids, 16, per_image, history_token_ids(sample.ego_history_xyz), mode, COT
    )
    assert out["input_ids"].dtype == torch.int64 and out["input_ids"].shape == (1, len(expected))
    assert out["input_ids"][0].tolist() == expected
    assert torch.equal(out["attention_mask"], torch.ones(1, len(expected), dtype=torch.int64))
    assert torch.equal(out["mm_token_type_ids"], (out["input_ids"] == ids["image_pad"]).long())
    pv, grid = preprocess_images(torch.from_numpy(sample.images).flatten(0, 1))
    assert torch.equal(out["pixel_values"], pv) and torch.equal(out["image_grid_thw"], grid)
    if mode == "rollout":
        assert out["prefix_len"] is None
    else:
        assert out["prefix_len"] == len(expected) and expected[-1] == ids["traj_future_start"]


def test_layout_counts_1080p_teacher(processor):
    sample = make_sample(1080, 1920)
    out = P.build_vlm_inputs(processor, sample, mode="teacher")
    ids = alpamayo_token_ids(processor.tokenizer)
    seq = out["input_ids"][0]
    assert int((seq == ids["image_pad"]).sum()) == 16 * 180
    assert int((seq == ids["vision_start"]).sum()) == int((seq == ids["vision_end"]).sum()) == 16
    assert out["image_grid_thw"].tolist() == [[1, 20, 36]] * 16 and out["pixel_values"].shape == (11520, 1536)
    hist = (seq >= ids["history_bins_start"]) & (seq < ids["traj_end"])
    assert int(hist.sum()) == 48 and int((seq == ids["traj_history"]).sum()) == 0
    where = hist.nonzero().flatten()
    assert where.tolist() == list(range(int(where[0]), int(where[0]) + 48))  # contiguous block
    assert seq[where[0] - 1] == ids["traj_history_start"] and seq[where[-1] + 1] == ids["traj_history_end"]
    assert out["history_bins"].tolist() == (seq[hist] - ids["history_bins_start"]).tolist()
    assert seq[-1] == ids["traj_future_start"] and out["prefix_len"] == seq.shape[0]


def test_images_are_camera_major_oldest_first(processor):
    out = P.build_vlm_inputs(processor, make_sample(720, 1280, constant=True), mode="rollout")
    per_image = out["pixel_values"].reshape(16, 720, 1536)
    for cam in range(4):
        for frame in range(4):
            value = (10 * cam + frame - 127.5) / 127.5
            assert torch.all(per_image[4 * cam + frame] == torch.tensor(value, dtype=torch.float32))


def test_expansion_matches_transformers_processor_call(processor):
    """Qwen3VLProcessor's own pad expansion and tokenisation give the same ids before fusion."""
    sample = make_sample(1080, 1920)
    out = P.build_vlm_inputs(processor, sample, mode="rollout")
    text = P.render_prompt(processor, 16, "rollout")
    ref = processor(text=[text], images=list(sample.images.reshape(16, 3, 1080, 1920)), return_tensors="pt")
    ids = alpamayo_token_ids(processor.tokenizer)
    unfused = out["input_ids"].clone()
    unfused[(unfused >= ids["history_bins_start"]) & (unfused < ids["traj_end"])] = ids["traj_history"]
    assert torch.equal(ref["input_ids"], unfused)
    assert torch.equal(ref["image_grid_thw"], out["image_grid_thw"])
    assert torch.equal(ref["mm_token_type_ids"].long(), out["mm_token_type_ids"])


def test_given_cot_defaults_to_sample_cot_and_validates(processor):
    sample = make_sample(720, 1280, cot=COT)
    a = P.build_vlm_inputs(processor, sample, mode="given-cot")
    b = P.build_vlm_inputs(processor, sample, mode="given-cot", cot=COT)
    assert torch.equal(a["input_ids"], b["input_ids"])
    with pytest.raises(ValueError, match="needs the reasoning"):
        P.build_vlm_inputs(processor, make_sample(720, 1280), mode="given-cot")
    with pytest.raises(ValueError, match="must not contain"):
        P.build_vlm_inputs(processor, sample, mode="given-cot", cot="stop <|cot_end|> now")
    with pytest.raises(ValueError, match="must not contain"):
        P.build_vlm_inputs(processor, sample, mode="given-cot", cot="bin <i42>")
    with pytest.raises(ValueError, match="mode must be"):
        P.build_vlm_inputs(processor, sample, mode="inference")


# ---- rollout helpers ---------------------------------------------------------------------------------


def test_rollout_sampling_is_the_release_setting():
    assert P.ROLLOUT_SAMPLING == dict(
        do_sample=True, top_p=0.98, temperature=0.6, top_k=None, max_new_tokens=256
    )


def test_traj_token_mask_covers_exactly_the_4000_bins(processor):
    ids = alpamayo_token_ids(processor.tokenizer)
    mask = P.traj_logits_mask(ids["vocab_size"], ids["traj_start"])
    assert mask.shape == (ids["vocab_size"],) and int(mask.sum()) == 4000
    assert mask[ids["traj_start"]] and mask[ids["traj_end"] - 1] and not mask[ids["traj_end"]]
    scores = torch.zeros(2, ids["vocab_size"])
    masked = P.MaskTrajTokens(ids["traj_start"])(torch.zeros(2, 1, dtype=torch.long), scores)
    assert torch.equal(torch.isinf(masked), mask.expand(2, -1))
    assert masked[0, ids["traj_future_start"]] == 0 and masked[0, ids["cot_end"]] == 0


def test_expert_prefix_len_from_generated():
    fs = 99
    assert P.expert_prefix_len_from_generated(torch.tensor([1, 2, fs, 5, fs, 0]), fs) == 3
    assert P.expert_prefix_len_from_generated([4, 5, 6, 7], fs) == 4  # missing: whole sequence
    assert P.expert_prefix_len_from_generated(torch.tensor([[1, fs, 2]]), fs) == 2


def test_extract_cot():
    decoded = "<|im_start|>assistant\n<|cot_start|>  Slow down for the bus. <|cot_end|><|traj_future_start|>"
    assert P.extract_cot(decoded) == "Slow down for the bus."


def test_generate_accepts_rollout_settings():
    """transformers' generate takes ROLLOUT_SAMPLING and the mask: no top-k warper, no <iN> sampled."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=5000, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    model = LlamaForCausalLM(cfg).eval()
    seen = {}
    build = model._get_logits_processor

    def spy(*args, **kwargs):
        procs = build(*args, **kwargs)
        seen["procs"] = [type(p).__name__ for p in procs]
        return procs

    model._get_logits_processor = spy
    settings = {**P.ROLLOUT_SAMPLING, "max_new_tokens": 64}
    out = model.generate(
        torch.tensor([[1, 2, 3]]), **settings, logits_processor=[P.MaskTrajTokens(100)], pad_token_id=0
    )
    gen = out[0, 3:]
    assert seen["procs"] == ["MaskTrajTokens", "TemperatureLogitsWarper", "TopPLogitsWarper"]
    assert gen.shape == (64,) and not bool(((gen >= 100) & (gen < 4100)).any())
