"""The VLM input of one sample, built exactly as Alpamayo-R1's release builds it.

One ChatML conversation for Qwen3-VL (docs/alpamayo-r1-prompt.md §2):
system "You are a driving assistant...", user = 16 still images (camera-major, oldest -> newest) + the
history block `<|traj_history_start|>` 48 x `<|traj_history|>` `<|traj_history_end|>` + an instruction,
assistant left open (continue_final_message). Three layouts:

- "rollout": release inference. CoC instruction, assistant `<|cot_start|>`; the VLM then generates the
  reasoning and `<|traj_future_start|>` (3006 tokens at release settings).
- "teacher": official SFT Stage 2. Trajectory instruction, assistant `<|traj_future_start|>`. Only the
  prefix up to and including `<|traj_future_start|>` is built (2993 tokens): that is all the expert
  attends to, and under causal attention its KV equals that of the full SFT sequence.
- "given-cot": CoC teacher forcing with dataset reasoning: CoC instruction, assistant
  `<|cot_start|>{cot}<|cot_end|><|traj_future_start|>`, again cut after `<|traj_future_start|>`.

Pixels come from shared.images (bitwise the release's torchvision path, no torchvision needed); the 48
history placeholders are already fused with the ego-history bins.
"""

from __future__ import annotations

import re

import torch

from shared.history_tokens import NUM_HISTORY_TOKENS, fuse_history, history_token_ids
from shared.images import MAX_PIXELS, MIN_PIXELS, num_image_tokens, preprocess_images
from shared.qwen_files import TRAJ_VOCAB_SIZE, alpamayo_token_ids
from shared.sample import Sample

SYSTEM_PROMPT = "You are a driving assistant that generates safe and accurate actions."
COT_INSTRUCTION = (
    "output the chain-of-thought reasoning of the driving process, then output the future trajectory."
)
TRAJ_INSTRUCTION = "output the future trajectory."
HISTORY_BLOCK = "<|traj_history_start|>" + "<|traj_history|>" * NUM_HISTORY_TOKENS + "<|traj_history_end|>"
IMAGE_PAD = "<|image_pad|>"
MODES = ("teacher", "rollout", "given-cot")
_TOKEN_STRING = re.compile(r"<\|[a-z_]+\|>|<i\d+>")  # would tokenise as a special or trajectory id

# Keys of build_vlm_inputs' result that Qwen3VLForConditionalGeneration.forward takes (transformers 5.x).
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")

# Release rollout sampling (models/alpamayo_r1.py:168-180). top_k=None matters: the VLM is built from
# a config, so generate's default top_k=50 would otherwise apply. Pass `logits_processor=[MaskTrajTokens(...)]`.
ROLLOUT_SAMPLING = dict(do_sample=True, top_p=0.98, temperature=0.6, top_k=None, max_new_tokens=256)


def build_messages(n_images: int, mode: str, cot: str | None = None) -> list[dict]:
    """The release's [system, user, assistant] messages for `mode` (see module docstring)."""
    if mode == "rollout":
        instruction, assistant = COT_INSTRUCTION, "<|cot_start|>"
    elif mode == "teacher":
        instruction, assistant = TRAJ_INSTRUCTION, "<|traj_future_start|>"
    elif mode == "given-cot":
        if not cot:
            raise ValueError("mode 'given-cot' needs the reasoning text: pass cot=...")
        if _TOKEN_STRING.search(cot):
            raise ValueError("cot text must not contain special-token or <iN> strings")
        instruction, assistant = COT_INSTRUCTION, f"<|cot_start|>{cot}<|cot_end|><|traj_future_start|>"
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    user = [{"type": "image"} for _ in range(n_images)]
    user.append({"type": "text", "text": HISTORY_BLOCK + instruction})
    return [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
        {"role": "user", "content": user},
        {"role": "assistant", "content": [{"type": "text", "text": assistant}]},
    ]


def render_prompt(processor, n_images: int, mode: str, cot: str | None = None) -> str:
    """The chat-template string, one `<|image_pad|>` per image (before expansion)."""
    return render_messages(processor, build_messages(n_images, mode, cot))


def render_messages(processor, messages: list[dict]) -> str:
    """Messages -> chat-template string, assistant turn left open as the release renders it."""
    return processor.apply_chat_template(
        messages,
        tokenize=False,
        add_generation_prompt=False,
        continue_final_message=True,
    )


def build_vlm_inputs(
    processor,
    sample: Sample,
    *,
    mode: str,
    cot: str | None = None,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    pixels: str = "inference",
) -> dict:
    """VLM inputs for one sample: what the release feeds Qwen3-VL, with history already fused.

    `pixels`: "inference" (release inference's uint8 path, the default) or "stage2" (the official
    Stage-2 training code's float path); see shared.images.

    `processor` comes from shared.qwen_files.load_processor (Alpamayo tokens added). Returns
    input_ids (1, T) int64, attention_mask (1, T) int64, pixel_values (n_img * patches, 1536) float32,
    image_grid_thw (n_img, 3) int64, mm_token_type_ids (1, T) int64 (1 on image pads, needed by 5.x
    M-RoPE), history_bins (48,) int64, and prefix_len: for teacher / given-cot the index of the last
    `<|traj_future_start|>` + 1 (= T: only the prefix is built); None for rollout, whose prefix is only
    known after generation (expert_prefix_len_from_generated).
    """
    if mode == "given-cot" and cot is None:
        cot = sample.cot
    images = torch.as_tensor(sample.images)  # (n_cam, n_frames, 3, H, W) uint8
    if images.ndim != 5 or images.dtype != torch.uint8:
        raise ValueError(f"sample.images must be (n_cam, n_frames, 3, H, W) uint8, got {tuple(images.shape)}")
    messages = build_messages(images.shape[0] * images.shape[1], mode, cot)
    return inputs_from_messages(processor, messages, images, sample.ego_history_xyz, with_prefix=mode != "rollout",
                                min_pixels=min_pixels, max_pixels=max_pixels, pixels=pixels)


def inputs_from_messages(processor, messages: list[dict], images: torch.Tensor, ego_history_xyz, *,
                         with_prefix: bool, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS,
                         pixels: str = "inference") -> dict:
    """Render `messages` (one image item per frame, camera-major), expand the pads, tokenise, fuse history.

    images: (n_cam, n_frames, 3, H, W) uint8 in prompt order. Shared by the R1 and 1.5 prompt builders;
    returns build_vlm_inputs' dict (prefix_len only when `with_prefix`).
    """
    ids = alpamayo_token_ids(processor.tokenizer)
    frames = images.flatten(0, 1)  # (n_img, 3, H, W): camera-major, each camera oldest -> newest
    pixel_values, grid = preprocess_images(frames, min_pixels=min_pixels, max_pixels=max_pixels, pixels=pixels)

    text = render_messages(processor, messages)
    pieces = text.split(IMAGE_PAD)
    if len(pieces) != frames.shape[0] + 1:
        raise ValueError(f"chat template rendered {len(pieces) - 1} image pads for {frames.shape[0]} images")
    expanded = pieces[0] + "".join(
        IMAGE_PAD * n + rest for n, rest in zip(num_image_tokens(grid), pieces[1:])
    )
    input_ids = processor.tokenizer(expanded, add_special_tokens=False, return_tensors="pt")["input_ids"]
    input_ids = input_ids.to(torch.int64)  # (1, T)

    bins = history_token_ids(ego_history_xyz)  # (48,)
    input_ids = fuse_history(input_ids, bins, ids["history_bins_start"], ids["traj_history"])

    prefix_len = None
    if with_prefix:
        hits = (input_ids[0] == ids["traj_future_start"]).nonzero().flatten()
        prefix_len = int(hits[-1]) + 1
        if prefix_len != input_ids.shape[1]:
            raise AssertionError("prompt does not end with <|traj_future_start|>")
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": pixel_values,
        "image_grid_thw": grid,
        "mm_token_type_ids": (input_ids == ids["image_pad"]).to(torch.int64),
        "history_bins": torch.from_numpy(bins),
        "prefix_len": prefix_len,
    }


# ---- rollout helpers -------------------------------------------------------------------------------


def traj_logits_mask(vocab_size: int, traj_start: int) -> torch.Tensor:
    """(vocab_size,) bool, True on the 4000 `<iN>` ids the release forbids while sampling reasoning."""
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[traj_start : traj_start + TRAJ_VOCAB_SIZE] = True
    return mask


class MaskTrajTokens:
    """Logits processor: scores of all `<iN>` ids set to -inf at every step (ExpertLogitsProcessor).

    Special tokens such as `<|cot_end|>` and `<|traj_future_start|>` stay allowed.
    """

    def __init__(self, traj_start: int):
        self.traj_start = traj_start

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, self.traj_start : self.traj_start + TRAJ_VOCAB_SIZE] = float("-inf")  # (B, vocab)
        return scores


def expert_prefix_len_from_generated(sequence: torch.Tensor, traj_future_start_id: int) -> int:
    """KV length the expert attends to after a rollout: first `<|traj_future_start|>` + 1.

    sequence: (T,) prompt + generated ids. Without the token (generation hit its limit) the release
    takes the last index, i.e. the whole sequence.
    """
    seq = torch.as_tensor(sequence).reshape(-1)
    hits = (seq == traj_future_start_id).nonzero().flatten()
    p = int(hits[0]) if len(hits) else seq.shape[0] - 1
    return p + 1


def extract_cot(decoded: str) -> str:
    """Reasoning text from a rollout decoded with special tokens kept: last `<|cot_start|>` to first `<|cot_end|>`."""
    text = decoded.rsplit("<|cot_start|>", 1)[-1]
    return text.split("<|cot_end|>", 1)[0].strip()
