"""The unguided branch of Alpamayo 1.5's navigation guidance, as a suffix on top of the guided prefix.

The release re-runs the VLM on the prompt with the route span removed (nav_utils.remove_nav_text),
then forwards the guided rollout's generated tokens on top (sheet §4). The VLM is causal, and tokens
before `<|route_start|>` have the same ids and positions in both prompts, so the unguided KV over
[0, r_s) is the guided KV over [0, r_s). Only the suffix after the route differs: here it is forwarded
on the guided cache cropped at r_s, at positions r_s + delta + j (text tokens after the images advance
by one per token, delta from the images only), and stored alone (11 tokens for the SFT layout).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from shared.head import _CACHE_KW

from .vlm import cache_layers


@torch.no_grad()
def unguided_suffix(vlm, guided_ids: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    route_span: tuple[int, int], rope_delta: int) -> tuple[torch.Tensor, torch.Tensor]:
    """KV of the unguided prefix's tokens after the shared part [0, r_s).

    guided_ids: (1, L_g) guided prefix ids (prompt, plus any generated CoC, through
    `<|traj_future_start|>`); keys/values: (layers, 1, kv_heads, >= r_s, head_dim) its prefill KV;
    route_span: (r_s, r_e) inclusive. Returns keys, values (layers, 1, kv_heads, n, head_dim) with
    n = L_g - r_e - 1 = L_u - r_s, the unguided prefix length being L_u = L_g - (r_e - r_s + 1).
    """
    r_s, r_e = route_span
    suffix = guided_ids[:, r_e + 1:].to(vlm.device)  # (1, n)
    n = suffix.shape[1]
    if n <= 0 or r_s <= 0:
        raise ValueError(f"route span {route_span} leaves no suffix in a prefix of {guided_ids.shape[1]} tokens")
    cache = DynamicCache()
    for i in range(keys.shape[0]):
        cache.update(keys[i, :, :, :r_s].to(vlm.device), values[i, :, :, :r_s].to(vlm.device), i)
    pos = (r_s + int(rope_delta) + torch.arange(n, device=vlm.device)).view(1, 1, n).expand(3, 1, n)
    lm = vlm.model.language_model
    lm(input_ids=suffix, position_ids=pos, use_cache=True, **{_CACHE_KW: cache})
    layers = cache_layers(cache)
    return (torch.stack([k[:, :, r_s:] for k, _ in layers]),  # (layers, 1, kv_heads, n, head_dim)
            torch.stack([v[:, :, r_s:] for _, v in layers]))

