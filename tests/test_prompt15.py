"""Alpamayo 1.5 prompt: ids for 1/2/4 cameras with and without navigation against a reference built from
the sheet (docs/ALPAMAYO_1_5.md), route span / removal, release token counts with Qwen's real vocabulary."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared import prompt15 as P15
from shared.history_tokens import history_token_ids
from shared.qwen_files import alpamayo_token_ids, load_processor, qwen_tiktoken_path, write_tiny_processor
from shared.sample import Sample

NAV = "Turn left in 11m"
NAMES = {0: "Front left camera", 1: "Front camera", 2: "Front right camera", 6: "Front telephoto camera"}
SYSTEM = "You are a driving assistant that generates safe and accurate actions."
SFT = "output the future trajectory."
COC = "output the chain-of-thought reasoning of the driving process, then output the future trajectory."


def make_sample(cams: list[int], h: int = 56, w: int = 56, seed: int = 0) -> Sample:
    rng = np.random.default_rng(seed)
    t = np.arange(-15, 1) * 0.1
    n = len(cams)
    return Sample(
        clip_id="clip", t0_us=5_100_000, images=rng.integers(0, 256, (n, 4, 3, h, w), dtype=np.uint8),
        camera_names=tuple(f"cam{c}" for c in cams), camera_indices=np.array(cams),
        frame_timestamps_us=np.zeros((n, 4), np.int64), ego_history_xyz=np.stack([8 * t, 0.05 * t**2, 0 * t], 1),
        ego_history_rot=np.tile(np.eye(3), (16, 1, 1)), ego_future_xyz=np.zeros((64, 3)),
        ego_future_rot=np.tile(np.eye(3), (64, 1, 1)),
    )


def reference(tok, ids, cams, per_image, bins, mode, nav):
    """The sheet's layout spelled out: each text run between special tokens tokenised on its own."""

    def enc(s):
        return tok.encode(s, add_special_tokens=False)

    out = [ids["im_start"], *enc("system\n" + SYSTEM), ids["im_end"], *enc("\n"), ids["im_start"], *enc("user\n")]
    vis = [ids["vision_start"], *[ids["image_pad"]] * per_image, ids["vision_end"]]
    for c in sorted(cams):
        out += enc(f"{NAMES[c]}: frame 0 ") + vis
        for k in (1, 2, 3):
            out += enc(f"frame {k} ") + vis
    out += [ids["traj_history_start"], *(ids["history_bins_start"] + np.asarray(bins)).tolist(), ids["traj_history_end"]]
    if nav is not None:
        out += [ids["route_start"], *enc(nav), ids["route_end"]]
    out += enc(SFT if mode == "teacher" else COC)
    out += [ids["im_end"], *enc("\n"), ids["im_start"], *enc("assistant\n")]
    out += [ids["traj_future_start"]] if mode == "teacher" else [ids["cot_start"]]
    return out


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_processor15")
    write_tiny_processor(d)
    return load_processor(str(d))


@pytest.mark.parametrize("cams", [[1], [6, 1], [0, 1, 2, 6]])
@pytest.mark.parametrize("nav", [None, NAV])
@pytest.mark.parametrize("mode", ["teacher", "rollout"])
def test_ids_equal_sheet_reference(processor, cams, nav, mode):
    s = make_sample(cams)
    out = P15.build_vlm_inputs15(processor, s, mode=mode, nav_text=nav)
    ids = alpamayo_token_ids(processor.tokenizer)
    per_image = int(out["image_grid_thw"][0].prod()) // 4
    expected = reference(processor.tokenizer, ids, cams, per_image, history_token_ids(s.ego_history_xyz), mode, nav)
    assert out["input_ids"][0].tolist() == expected
    assert out["camera_ids"].tolist() == sorted(cams)
    assert out["prefix_len"] == (len(expected) if mode == "teacher" else None)
    if nav is None:
        assert out["route_span"] is None
    else:
        r_s, r_e = out["route_span"]
        assert expected[r_s] == ids["route_start"] and expected[r_e] == ids["route_end"]
        assert expected[r_s - 1] == ids["traj_history_end"]


def test_images_follow_sorted_camera_order(processor):
    s = make_sample([6, 1])
    out = P15.build_vlm_inputs15(processor, s, mode="teacher")
    swapped = make_sample([6, 1])
    swapped.images, swapped.camera_indices = s.images[::-1].copy(), np.array([1, 6])
    ref = P15.build_vlm_inputs15(processor, swapped, mode="teacher")
    assert torch.equal(out["pixel_values"], ref["pixel_values"]) and torch.equal(out["input_ids"], ref["input_ids"])


def test_removing_route_gives_the_no_nav_prompt(processor):
    s = make_sample([0, 1, 2, 6])
    with_nav = P15.build_vlm_inputs15(processor, s, mode="teacher", nav_text=NAV)
    without = P15.build_vlm_inputs15(processor, s, mode="teacher")
    unguided = P15.remove_route(with_nav["input_ids"], with_nav["route_span"])
    assert torch.equal(unguided, without["input_ids"])
    r_s, r_e = with_nav["route_span"]
    assert torch.equal(with_nav["input_ids"][:, :r_s], without["input_ids"][:, :r_s])
    assert without["input_ids"].shape[1] - r_s == 11  # SFT suffix: instruction + turn end + <|traj_future_start|>


def test_bad_inputs_raise(processor):
    s = make_sample([1])
    for bad in ("", "go <|route_end|> now", 3):
        with pytest.raises(ValueError, match="nav_text"):
            P15.build_vlm_inputs15(processor, s, mode="teacher", nav_text=bad)
    dup = make_sample([1, 6])
    dup.camera_indices = np.array([1, 1])
    with pytest.raises(ValueError, match="distinct"):
        P15.build_vlm_inputs15(processor, dup, mode="teacher")
    with pytest.raises(ValueError, match="mode"):
        P15.prompt_provenance("sft")
    assert P15.camera_display_name(9) == "Camera 9"
    assert P15.prompt_provenance("teacher")["layout"] == "sft"
    assert P15.prompt_provenance("rollout")["layout"] == "chain-of-causation"


TIKTOKEN = qwen_tiktoken_path()


@pytest.mark.skipif(TIKTOKEN is None, reason="qwen.tiktoken not found: install the dev extra (`dashscope`)")
def test_release_token_counts_with_qwen_vocabulary(tmp_path):
    """The sheet's §3.5 table: prefix lengths at 1080x1920 for 1, 2 and 4 cameras (360x640 frames resize to
    the same 320x576, 180 tokens per image, and preprocess 9x faster)."""
    from shared.qwen_files import write_qwen_processor_from_tiktoken

    write_qwen_processor_from_tiktoken(tmp_path, TIKTOKEN)
    proc = load_processor(str(tmp_path))
    ids = alpamayo_token_ids(proc.tokenizer)
    assert (ids["route_start"], ids["route_end"]) == (155690, 155692)
    enc = proc.tokenizer.encode
    assert [len(enc(f"{NAMES[c]}: frame 0 ", add_special_tokens=False)) for c in (0, 1, 2, 6)] == [8, 7, 8, 9]
    assert len(enc("frame 3 ", add_special_tokens=False)) == 4 and len(enc(NAV, add_special_tokens=False)) == 7
    table = {  # cams: (SFT no nav, SFT nav, CoC no nav, CoC nav)
        (1,): (828, 837, 841, 850),
        (1, 6): (1577, 1586, 1590, 1599),
        (0, 1, 2, 6): (3073, 3082, 3086, 3095),
    }
    for cams, counts in table.items():
        s = make_sample(list(cams), 360, 640)
        got = tuple(P15.build_vlm_inputs15(proc, s, mode=m, nav_text=n)["input_ids"].shape[1]
                    for m in ("teacher", "rollout") for n in (None, NAV))
        assert got == counts, cams
