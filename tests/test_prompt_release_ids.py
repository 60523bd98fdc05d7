"""Exact release token ids with Qwen's real vocabulary, rebuilt offline from `qwen.tiktoken`.

The ids below are the tables of docs/alpamayo-r1-prompt.md §1.2 and §2.3. The tokenizer is rebuilt at
test time from the BPE ranks shipped in the PyPI `dashscope` wheel (a dev dependency); the module is
skipped, with the reason, where that wheel is not installed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared import prompt as P
from shared.history_tokens import history_token_ids
from shared.qwen_files import (
    QWEN_PRETOKENIZE_REGEX,
    RELEASE_VOCAB_SIZE,
    alpamayo_token_ids,
    load_processor,
    qwen_tiktoken_path,
    write_qwen_processor_from_tiktoken,
)
from shared.sample import Sample

TIKTOKEN = qwen_tiktoken_path()
pytestmark = pytest.mark.skipif(
    TIKTOKEN is None, reason="qwen.tiktoken not found: install the dev extra (`dashscope`) to pin release ids"
)

# docs/alpamayo-r1-prompt.md §2.3
SYSTEM_RUN = [8948, 198, 2610, 525, 264, 9842, 17847, 429, 26885, 6092, 323, 13382, 6168, 13]
COT_INSTRUCTION_RUN = [3006, 279, 8781, 8668, 7563, 2450, 32711, 315, 279, 9842, 1882, 11, 1221, 2550, 279, 3853, 34682, 13]  # fmt: skip
TRAJ_INSTRUCTION_RUN = [3006, 279, 3853, 34682, 13]  # §2.4
HEAD = [151644, *SYSTEM_RUN, 151645, 198, 151644, 872, 198]
ASSISTANT = [151645, 198, 151644, 77091, 198]
COT = "The lead car brakes at the crosswalk, so I slow down and keep 2 m from it."


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen_full")
    write_qwen_processor_from_tiktoken(d, TIKTOKEN)
    return load_processor(str(d))


@pytest.fixture(scope="module")
def tiktoken_encode():
    """Qwen's BPE through tiktoken: an implementation independent of HF tokenizers."""
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe

    enc = tiktoken.Encoding(
        "qwen",
        pat_str=QWEN_PRETOKENIZE_REGEX,
        mergeable_ranks=load_tiktoken_bpe(str(TIKTOKEN)),
        special_tokens={},
    )
    return enc.encode_ordinary


def _sample(h: int, w: int) -> Sample:
    rng = np.random.default_rng(3)
    t = np.arange(-15, 1) * 0.1
    return Sample(
        clip_id="clip",
        t0_us=5_100_000,
        images=rng.integers(0, 256, (4, 4, 3, h, w), dtype=np.uint8),
        camera_names=("a", "b", "c", "d"),
        camera_indices=np.array([0, 1, 2, 6]),
        frame_timestamps_us=np.zeros((4, 4), np.int64),
        ego_history_xyz=np.stack([10 * t, 0.02 * t**2, 0 * t], axis=1),
        ego_history_rot=np.tile(np.eye(3), (16, 1, 1)),
        ego_future_xyz=np.zeros((64, 3)),
        ego_future_rot=np.tile(np.eye(3), (64, 1, 1)),
    )


def _images_and_history(per_image: int, bins) -> list[int]:
    hist = (154669 + np.asarray(bins)).tolist()
    return ([151652] + [151655] * per_image + [151653]) * 16 + [155674, *hist, 155676]


def test_release_vocabulary_ids(processor):
    ids = alpamayo_token_ids(processor.tokenizer)
    assert ids["vocab_size"] == RELEASE_VOCAB_SIZE == 155697
    assert (ids["traj_start"], ids["history_bins_start"], ids["traj_end"]) == (151669, 154669, 155669)
    expected = {
        "im_start": 151644, "im_end": 151645, "pad": 151643, "vision_start": 151652, "vision_end": 151653,
        "image_pad": 151655, "prompt_start": 155669, "traj_history_start": 155674, "traj_history_end": 155676,
        "cot_start": 155677, "cot_end": 155678, "meta_action_start": 155679, "traj_future_start": 155681,
        "traj_future_end": 155683, "traj_history": 155684, "traj_future": 155685, "vectorized_wm": 155686,
        "answer_end": 155696,
    }  # fmt: skip
    assert {k: ids[k] for k in expected} == expected


def test_text_runs_match_doc_tables(processor, tiktoken_encode):
    tok = processor.tokenizer
    for text, expected in [
        ("system\n" + P.SYSTEM_PROMPT, SYSTEM_RUN),
        (P.COT_INSTRUCTION, COT_INSTRUCTION_RUN),
        (P.TRAJ_INSTRUCTION, TRAJ_INSTRUCTION_RUN),
        ("You are a helpful assistant.", [2610, 525, 264, 10950, 17847, 13]),  # published Qwen ids
        ("assistant\n", [77091, 198]),
    ]:
        assert tok.encode(text, add_special_tokens=False) == expected
        assert tiktoken_encode(text) == expected


def test_rollout_prompt_is_3006_release_ids(processor):
    sample = _sample(1080, 1920)
    out = P.build_vlm_inputs(processor, sample, mode="rollout")
    bins = history_token_ids(sample.ego_history_xyz)
    assert bins[:6].tolist() == [0, 505, 500, 624, 499, 500]
    expected = HEAD + _images_and_history(180, bins) + COT_INSTRUCTION_RUN + ASSISTANT + [155677]
    assert len(expected) == 3006
    assert out["input_ids"][0].tolist() == expected
    assert out["image_grid_thw"].tolist() == [[1, 20, 36]] * 16 and out["pixel_values"].shape == (11520, 1536)


def test_teacher_prefix_is_2993_release_ids(processor):
    sample = _sample(1080, 1920)
    out = P.build_vlm_inputs(processor, sample, mode="teacher")
    bins = history_token_ids(sample.ego_history_xyz)
    expected = HEAD + _images_and_history(180, bins) + TRAJ_INSTRUCTION_RUN + ASSISTANT + [155681]
    assert len(expected) == 2993
    assert out["input_ids"][0].tolist() == expected and out["prefix_len"] == 2993


def test_given_cot_and_other_image_size(processor, tiktoken_encode):
    sample = _sample(1208, 1920)  # -> 320x544, 170 tokens per image
    out = P.build_vlm_inputs(processor, sample, mode="given-cot", cot=COT)
    bins = history_token_ids(sample.ego_history_xyz)
    assistant = [155677, *tiktoken_encode(COT), 155678, 155681]
    expected = HEAD + _images_and_history(170, bins) + COT_INSTRUCTION_RUN + ASSISTANT + assistant
    assert out["input_ids"][0].tolist() == expected
    assert out["prefix_len"] == len(expected) == 3006 - 16 * 10 - 1 + len(assistant)
    assert torch.equal(out["image_grid_thw"], torch.tensor([[1, 20, 34]] * 16))
