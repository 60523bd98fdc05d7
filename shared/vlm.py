"""The frozen VLM: load it from an official checkpoint's `vlm.*` tensors and run the prefix once.

In shared/ because both phases run it: cache-build (cache_builder.vlm re-exports this module) and
`head-eval --live`, which recomputes a few prefixes to check the cache against the VLM.

The release builds `Qwen3VLForConditionalGeneration` from `vlm_name_or_path`'s config with the
vocabulary enlarged to the Alpamayo tokenizer (155,697 rows), then loads the `vlm.*` weights. We do
the same through `from_pretrained(checkpoint_dir, key_mapping={"^vlm.": ""})`, which reads only the
VLM's tensors from the shards (the head's keys are reported unexpected and skipped).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
from transformers.utils import logging as hf_logging

from .checkpoint import AlpamayoCheckpoint


def load_vlm(ckpt: AlpamayoCheckpoint, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
             attn_implementation: str = "sdpa") -> Qwen3VLForConditionalGeneration:
    cfg = Qwen3VLConfig.from_dict(ckpt.vlm_config_dict())
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the head's tensors are "unexpected" here by design
    try:
        vlm, info = Qwen3VLForConditionalGeneration.from_pretrained(
            str(ckpt.path), config=cfg, key_mapping={r"^vlm\.": ""}, dtype=dtype, device_map=str(device),
            attn_implementation=attn_implementation, output_loading_info=True,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    if info["missing_keys"] or info["mismatched_keys"]:
        raise ValueError(f"{ckpt.path}: VLM weights do not match its config: missing={sorted(info['missing_keys'])[:5]} "
                         f"mismatched={list(info['mismatched_keys'])[:5]}")
    vlm.eval().requires_grad_(False)
    return vlm


@dataclass
class Prefill:
    """One batch of prefixes from a VLM forward.

    keys/values: (layers, B, kv_heads, L, head_dim) post-RoPE K and raw V, cut at `prefix_len`;
    hidden: (B, L, hidden) last-layer (final-norm) hidden states or None; rope_deltas: (B,) int64, on
    the VLM's device (reading it would wait for the forward; the store writer reads it later).
    """

    keys: torch.Tensor
    values: torch.Tensor
    hidden: torch.Tensor | None
    rope_deltas: torch.Tensor
    prefix_len: int


def cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(K, V) per layer from a transformers cache object (5.x `layers[i].keys`, 4.x `key_cache[i]`)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


SEQ_INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids")


@torch.no_grad()
def prefill(vlm: Qwen3VLForConditionalGeneration, inputs: dict, prefix_len: int, keep_hidden: bool = True) -> Prefill:
    """Forward the prompt cut after `<|traj_future_start|>` (index prefix_len - 1).

    The VLM is causal and dropout-free, so this equals the release's full teacher-forced forward
    followed by a cache crop at the same index (alpamayo-r1-head.md §1.9). Inputs in pinned memory
    are copied without blocking, so the next batch can be queued while this one runs.
    """
    device = vlm.device
    kw = {k: (v[:, :prefix_len] if k in SEQ_INPUTS else v) for k, v in inputs.items()
          if k in SEQ_INPUTS or k in ("pixel_values", "image_grid_thw")}
    kw = {k: v.to(device, non_blocking=True) for k, v in kw.items()}
    kw["pixel_values"] = kw["pixel_values"].to(vlm.dtype)
    out = vlm.model(**kw, use_cache=True)
    cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")  # 5.24 renamed it
    layers = cache_layers(cache)
    keys = torch.stack([k for k, _ in layers])  # (layers, B, kv_heads, L, D)
    values = torch.stack([v for _, v in layers])
    rope = out.rope_deltas if getattr(out, "rope_deltas", None) is not None else vlm.model.rope_deltas
    return Prefill(keys, values, out.last_hidden_state if keep_hidden else None,
                   rope.view(-1).to(device=device, dtype=torch.long), prefix_len)
