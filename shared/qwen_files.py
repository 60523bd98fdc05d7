"""Qwen3-VL processor files, offline, and the Alpamayo-R1 vocabulary additions.

Why this exists: cache-build must tokenise exactly like the release (docs/alpamayo-r1-prompt.md §1-2),
tests and the tiny checkpoint must run without the hub, and the real tokenizer is only fetched by
users who are online. So this module can

- write a small but real Qwen3-VL-style processor directory (`write_tiny_processor`): a byte-level BPE
  trained on the prompt texts, Qwen's 26 added tokens in Qwen's order right after the BPE vocab, the
  Qwen3-VL-8B-Instruct chat template (byte-identical, sha256 3636d0f0...a489e4) and Qwen3-VL's
  image-processor settings;
- rebuild the full 151,669-token Qwen tokenizer from Qwen's public BPE ranks (`qwen.tiktoken`, shipped
  in the PyPI `dashscope` wheel) for tests that pin exact text ids;
- load any of these, or a user's Qwen3-VL directory / hub id, and apply Alpamayo's additions exactly as
  the release does (`load_processor`): 4000 non-special `<iN>`, then the 28 new special tokens.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

# Qwen3-VL's added tokens, in id order right after the BPE vocab: (content, special).
QWEN_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),  # pad
    ("<|im_start|>", True),
    ("<|im_end|>", True),  # eos
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)
QWEN_BPE_SIZE = 151_643  # ids 0..151642 in the real tokenizer; the tiny one is smaller

# Alpamayo-R1 additions (alpamayo_r1/models/base_model.py SPECIAL_TOKENS_KEYS, in that order).
TRAJ_VOCAB_SIZE = 4000  # <i0>..<i3999>: 3000 future bins, then 1000 history bins
FUTURE_TRAJ_BINS = 3000
HISTORY_TRAJ_BINS = 1000
SPECIAL_TOKENS_KEYS: tuple[str, ...] = (
    "prompt_start",
    "prompt_end",
    "image_start",
    "image_pre_tkn",
    "image_end",
    "traj_history_start",
    "traj_history_pre_tkn",
    "traj_history_end",
    "cot_start",
    "cot_end",
    "meta_action_start",
    "meta_action_end",
    "traj_future_start",
    "traj_future_pre_tkn",
    "traj_future_end",
    "traj_history",
    "traj_future",
    "image_pad",  # already in Qwen's vocab: keeps 151655 and is not re-added
    "vectorized_wm",
    "vectorized_wm_start",
    "vectorized_wm_end",
    "vectorized_wm_pre_tkn",
    "route_start",
    "route_pad",
    "route_end",
    "question_start",
    "question_end",
    "answer_start",
    "answer_end",
)
SPECIAL_TOKENS: dict[str, str] = {k: f"<|{k}|>" for k in SPECIAL_TOKENS_KEYS}
RELEASE_VOCAB_SIZE = (
    QWEN_BPE_SIZE + len(QWEN_ADDED_TOKENS) + TRAJ_VOCAB_SIZE + len(SPECIAL_TOKENS_KEYS) - 1
)  # 155697

# Qwen's pre-tokenizer split (single digits, unlike GPT-4's \p{N}{1,3}).
QWEN_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# Qwen3-VL-8B-Instruct's chat template, byte for byte (5292 bytes,
# sha256 3636d0f0bd6bef02654cdffdc447b79cb2cef8ab02cc75267345946291a489e4; tests pin the hash).
QWEN3_VL_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Qwen3-VL's preprocessor_config.json (the pixel band is overridden at load time by min/max_pixels).
PREPROCESSOR_CONFIG = {
    "image_processor_type": "Qwen2VLImageProcessorFast",
    "processor_class": "Qwen3VLProcessor",
    "do_resize": True,
    "resample": 3,  # PIL.Image.BICUBIC
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "do_convert_rgb": True,
    "size": {"shortest_edge": 65536, "longest_edge": 16777216},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
}
VIDEO_PREPROCESSOR_CONFIG = {
    "video_processor_type": "Qwen3VLVideoProcessor",
    "processor_class": "Qwen3VLProcessor",
    "size": {"shortest_edge": 4096, "longest_edge": 25165824},
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
}

# What the tiny BPE is trained on: every prompt string plus some plain English and digits, so that any
# text the project renders tokenises into a handful of merges rather than raw bytes.
_TINY_CORPUS = (
    "You are a driving assistant that generates safe and accurate actions.",
    "output the chain-of-thought reasoning of the driving process, then output the future trajectory.",
    "output the future trajectory.",
    "output meta actions",
    "system\n",
    "user\n",
    "assistant\n",
    "The ego vehicle keeps its lane and slows down because a pedestrian is crossing ahead at the intersection.",
    "Nudge to the left to increase clearance from the parked truck, then accelerate to match the traffic flow.",
    "Stop at the red light; the lead car is braking and the left turn lane is blocked by construction cones.",
    "Yield to the cyclist on the right, follow the curve of the road and keep a safe distance from the bus.",
    "frame 0 1 2 3 4 5 6 7 8 9 10 100 camera front wide cross left right tele rear",
)


def _tiktoken_bpe_tokenizer(tiktoken_path: Path):
    """The 151,643-token Qwen BPE rebuilt from `qwen.tiktoken` ranks, with Qwen's regex and NFC."""
    from tokenizers import normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = TikTokenConverter(vocab_file=str(tiktoken_path), pattern=QWEN_PRETOKENIZE_REGEX).converted()
    tok.normalizer = normalizers.NFC()
    return tok


def _tiny_bpe_tokenizer(vocab_size_hint: int):
    """A byte-level BPE with Qwen's pre-tokenisation, trained deterministically on _TINY_CORPUS."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size_hint,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text encodes
        special_tokens=[],
    )
    tok.train_from_iterator(list(_TINY_CORPUS) * 4, trainer=trainer)
    return tok


def _write_processor_dir(out: Path, bpe) -> None:
    """Append Qwen's 26 added tokens to `bpe` and write the processor files transformers 5.x reads."""
    from tokenizers import AddedToken

    out.mkdir(parents=True, exist_ok=True)
    n_bpe = bpe.get_vocab_size(with_added_tokens=False)
    if bpe.get_vocab_size(with_added_tokens=True) != n_bpe:
        raise ValueError("the BPE tokenizer must not have added tokens yet")
    for content, special in QWEN_ADDED_TOKENS:  # one by one: ids follow Qwen's order exactly
        token = AddedToken(content, special=special, normalized=False)
        (bpe.add_special_tokens if special else bpe.add_tokens)([token])
    for i, (content, _) in enumerate(QWEN_ADDED_TOKENS):
        if bpe.token_to_id(content) != n_bpe + i:
            raise RuntimeError(f"{content} got id {bpe.token_to_id(content)}, expected {n_bpe + i}")
    bpe.save(str(out / "tokenizer.json"))

    decoder = {
        str(n_bpe + i): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for i, (content, special) in enumerate(QWEN_ADDED_TOKENS)
    }
    tokenizer_config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": [c for c, s in QWEN_ADDED_TOKENS[1:14] if s],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 262144,
        "pad_token": "<|endoftext|>",
        "processor_class": "Qwen3VLProcessor",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (out / "chat_template.jinja").write_text(QWEN3_VL_CHAT_TEMPLATE)
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2) + "\n")
    (out / "video_preprocessor_config.json").write_text(
        json.dumps(VIDEO_PREPROCESSOR_CONFIG, indent=2) + "\n"
    )


def write_tiny_processor(dir: Path, *, vocab_size_hint: int = 512) -> None:
    """Write an offline Qwen3-VL-style processor directory with a small BPE vocab.

    Real in every respect but the vocab size: Qwen's added tokens follow the BPE vocab in Qwen's
    order, the chat template and image settings are Qwen3-VL-8B-Instruct's. Deterministic, so the
    tiny checkpoint's vocab size is stable: `alpamayo_vocab_size` after `load_processor`.
    """
    _write_processor_dir(Path(dir), _tiny_bpe_tokenizer(vocab_size_hint))


def qwen_tiktoken_path() -> Path | None:
    """Qwen's public BPE ranks as shipped in the `dashscope` wheel, or None if it is not installed.

    Found without importing dashscope (its import pulls in a web stack).
    """
    spec = importlib.util.find_spec("dashscope")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "resources" / "qwen.tiktoken"
        if path.is_file():
            return path
    return None


def write_qwen_processor_from_tiktoken(dir: Path, tiktoken_path: Path | None = None) -> None:
    """Write a processor directory with the full 151,669-token Qwen tokenizer rebuilt from BPE ranks.

    Reproduces Qwen's published ids (docs/alpamayo-r1-prompt.md §7); for tests that pin text ids.
    """
    path = tiktoken_path or qwen_tiktoken_path()
    if path is None:
        raise FileNotFoundError("qwen.tiktoken not found: `pip install dashscope` ships it")
    bpe = _tiktoken_bpe_tokenizer(Path(path))
    if bpe.get_vocab_size(with_added_tokens=False) != QWEN_BPE_SIZE:
        raise ValueError(f"{path} holds {bpe.get_vocab_size()} ranks, Qwen's BPE has {QWEN_BPE_SIZE}")
    _write_processor_dir(Path(dir), bpe)


def add_alpamayo_tokens(tokenizer) -> None:
    """Extend a Qwen tokenizer in place exactly as the release does (base_model.py `_build_tokenizer`).

    First 4000 non-special `<iN>`, then the special tokens in SPECIAL_TOKENS_KEYS order; the existing
    `<|image_pad|>` is skipped, so 28 new ids. Idempotent: a tokenizer that already has them is left alone.
    """
    vocab = tokenizer.get_vocab()
    if "<i0>" in vocab:
        if len(tokenizer) - vocab["<i0>"] != TRAJ_VOCAB_SIZE + len(SPECIAL_TOKENS_KEYS) - 1:
            raise ValueError("tokenizer has <i0> but not the Alpamayo additions in release order")
        return
    n_added = tokenizer.add_tokens([f"<i{v}>" for v in range(TRAJ_VOCAB_SIZE)])
    if n_added != TRAJ_VOCAB_SIZE:
        raise ValueError(f"added {n_added} trajectory tokens, expected {TRAJ_VOCAB_SIZE}")
    tokenizer.add_tokens(list(SPECIAL_TOKENS.values()), special_tokens=True)


def alpamayo_token_ids(tokenizer) -> dict[str, int]:
    """Ids the prompt, fusion and rollout need, checked against the release layout.

    Keys: Qwen's im_start/im_end/pad/vision_start/vision_end/image_pad; traj_start (<i0>, first future
    bin), history_bins_start (<i3000>), traj_end (one past <i3999>); every Alpamayo special token by
    its key (traj_history = history placeholder, traj_future_start = expert prefix end, cot_start...);
    vocab_size = len(tokenizer), the VLM embedding rows.
    """

    def tid(token: str) -> int:
        i = tokenizer.convert_tokens_to_ids(token)
        if i is None or i == tokenizer.unk_token_id:
            raise KeyError(f"{token} is not in the tokenizer: load it with shared.qwen_files.load_processor")
        return int(i)

    traj_start = tid("<i0>")
    if tid(f"<i{TRAJ_VOCAB_SIZE - 1}>") != traj_start + TRAJ_VOCAB_SIZE - 1:
        raise ValueError("<iN> ids are not contiguous")
    ids = {
        "im_start": tid("<|im_start|>"),
        "im_end": tid("<|im_end|>"),
        "pad": tid("<|endoftext|>"),
        "vision_start": tid("<|vision_start|>"),
        "vision_end": tid("<|vision_end|>"),
        "image_pad": tid("<|image_pad|>"),
        "traj_start": traj_start,
        "history_bins_start": traj_start + FUTURE_TRAJ_BINS,
        "traj_end": traj_start + TRAJ_VOCAB_SIZE,
    }
    ids.update({key: tid(token) for key, token in SPECIAL_TOKENS.items()})
    ids["vocab_size"] = len(tokenizer)
    return ids


def alpamayo_vocab_size(tokenizer) -> int:
    """Rows of the VLM embedding: len(tokenizer) after the additions (155697 for the release)."""
    return len(tokenizer)


def load_processor(
    vlm_name_or_path: str,
    *,
    min_pixels: int = 163_840,
    max_pixels: int = 196_608,
    local_files_only: bool = True,
):
    """Load a Qwen3-VL processor (directory or hub id) and apply Alpamayo's token additions.

    min/max_pixels are the release's (320x576 for 1080p). The image processor is kept for reference
    only: build_vlm_inputs computes pixels with shared.images, which does not need torchvision.
    """
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer
    from transformers.utils import is_torchvision_available

    kw = dict(local_files_only=local_files_only)
    if is_torchvision_available():
        processor = AutoProcessor.from_pretrained(
            vlm_name_or_path, min_pixels=min_pixels, max_pixels=max_pixels, **kw
        )
    else:
        # Qwen3-VL's video processor needs torchvision and AutoProcessor insists on it; we never process
        # video, so assemble the processor from its tokenizer and the PIL image backend.
        tokenizer = AutoTokenizer.from_pretrained(vlm_name_or_path, **kw)
        image_processor = AutoImageProcessor.from_pretrained(
            vlm_name_or_path, min_pixels=min_pixels, max_pixels=max_pixels, backend="pil", **kw
        )
        processor = _image_only_processor_class()(
            image_processor=image_processor,
            tokenizer=tokenizer,
            chat_template=tokenizer.chat_template or QWEN3_VL_CHAT_TEMPLATE,
        )
    add_alpamayo_tokens(processor.tokenizer)
    return processor


def _image_only_processor_class():
    """Qwen3VLProcessor minus its video processor, for machines without torchvision.

    ProcessorMixin derives its sub-processors from the __init__ signature, so dropping the argument is
    enough; text and image handling are Qwen3VLProcessor's own.
    """
    from transformers.models.qwen3_vl import Qwen3VLProcessor

    class Qwen3VLImageOnlyProcessor(Qwen3VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return Qwen3VLImageOnlyProcessor
